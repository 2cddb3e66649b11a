"""Reports of a real run: JSON and Markdown for content, HTML rendered by headless Chromium;
the state colours and elapsed times every report (and the terminal table) shares."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest

from claudecluster_mcp.claude_cli import ClaudeBinary
from claudecluster_mcp.engine import Cluster, EngineSettings
from claudecluster_mcp.model_server import ScriptedModelServer
from claudecluster_mcp.models import Task, TaskState
from claudecluster_mcp.report import diffstats, elapsed_text, state_colour, to_json, to_markdown
from claudecluster_mcp.report_html import to_html
from claudecluster_mcp.scenario import marker_rule, write_turn

pytestmark = pytest.mark.anyio

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture
async def finished_plan(
    claude: ClaudeBinary,
    repo: Path,
    model_server: Callable[[dict[str, Any]], ScriptedModelServer],
    engine_settings: Callable[..., EngineSettings],
) -> Any:
    model = model_server(
        {
            "rules": [
                marker_rule("a", write_turn("a.txt", "x\ny\n")),
                marker_rule("b", write_turn("b.txt", "x\ny\n")),
                # c fails: the API keeps answering 500.
                marker_rule("c", {"text": "x", "fault": {"type": "server_error", "times": None}}),
            ]
        }
    )
    settings = engine_settings(model, max_attempts=1)
    async with Cluster.open(repo, settings=settings, claude=claude) as cluster:
        plan = (
            await cluster.plan(
                "report me",
                [
                    {"id": "a", "title": "Task A", "prompt": "[a] go"},
                    {"id": "b", "prompt": "[b] go", "deps": ["a"]},
                    {"id": "c", "prompt": "[c] go"},
                    {"id": "d", "prompt": "[d] never", "deps": ["c"]},
                ],
            )
        ).plan
        await cluster.dispatch(plan.id)
        with anyio.fail_after(90):
            status = await cluster.wait(plan.id)
    return status, await diffstats(repo, status.tasks)


@pytest.mark.claude
async def test_json_and_markdown_reports_hold_the_run(finished_plan: Any) -> None:
    status, stats = finished_plan

    data = json.loads(to_json(status, stats))
    markdown = to_markdown(status, stats)

    tasks = {t["id"]: t for t in data["tasks"]}
    assert {k: t["state"] for k, t in tasks.items()} == {"a": "merged", "b": "merged", "c": "failed", "d": "blocked"}
    assert tasks["a"]["diffstat"] == {"files": 1, "added": 2, "removed": 0}
    assert tasks["a"]["turns"] == 2 and tasks["a"]["cost_usd"] > 0
    assert data["counts"] == {"merged": 2, "failed": 1, "blocked": 1}
    assert f"# Plan {status.plan.id}: report me" in markdown
    assert "| a | merged | 1 | 2 |" in markdown and "1 files +2 -0" in markdown
    assert "- **c** (failed): API Error: 500" in markdown
    assert "- **d** (blocked): dependency c did not merge" in markdown


@pytest.mark.claude
@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (`make test` installs it where apt-get works)")
async def test_html_report_renders_in_headless_chromium(finished_plan: Any, tmp_path: Path) -> None:
    status, stats = finished_plan
    page = tmp_path / "report.html"
    page.write_text(to_html(status, stats))
    flags = [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'chrome'}", "--window-size=1100,1400",
    ]  # fmt: skip
    assert CHROMIUM is not None

    shot = await anyio.run_process([CHROMIUM, *flags, f"--screenshot={tmp_path / 'report.png'}", page.as_uri()])
    dom = (await anyio.run_process([CHROMIUM, *flags, "--dump-dom", page.as_uri()])).stdout.decode()

    png = (tmp_path / "report.png").read_bytes()
    assert shot.returncode == 0 and png.startswith(b"\x89PNG") and len(png) > 10_000
    # The rendered page has the timeline, the graph, the task table, and the failure reasons.
    assert dom.count('class="bar"') == 3  # a, b, c ran (d never started)
    assert dom.count('class="node"') == 4 and dom.count('class="edge"') == 2
    assert dom.count('<tr data-task="') == 4
    assert "API Error: 500" in dom and "dependency c did not merge" in dom
    assert "<script" not in dom and "http://" not in dom.split("<body", 1)[1].split("svg", 1)[0]


def test_elapsed_time_reads_the_same_everywhere() -> None:
    start = datetime(2026, 1, 1, tzinfo=UTC)

    def task(state: TaskState, started: datetime | None = None, seconds: float | None = None) -> Task:
        finished = started + timedelta(seconds=seconds) if started and seconds is not None else None
        times = {"created_at": start, "updated_at": start, "started_at": started, "finished_at": finished}
        return Task(id="t", prompt="p", plan_id="p1", state=state, **times)

    assert elapsed_text(task(TaskState.PENDING)) == "-"
    assert elapsed_text(task(TaskState.MERGED, start, 4.3)) == "4.3s"
    assert elapsed_text(task(TaskState.FAILED, start, 73.4)) == "73s"
    # A running task counts until now.
    assert elapsed_text(task(TaskState.RUNNING, datetime.now(UTC) - timedelta(seconds=30))) in ("30s", "31s")


def test_every_state_has_its_own_colour() -> None:
    colours = {state: state_colour(state) for state in TaskState}

    assert all(re.fullmatch(r"#[0-9a-f]{6}", c) for c in colours.values()), colours
    assert colours[TaskState.MERGED] != colours[TaskState.FAILED] != colours[TaskState.RUNNING]
