"""Retention and `claudecluster gc`: what finished plans leave on disk is removed once they are
old enough — never a running plan, and never work no other branch holds unless asked. Real
`claude` agents against the scripted model, real git, real SQLite."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest
import yaml

from claudecluster_mcp.claude_cli import ClaudeBinary
from claudecluster_mcp.engine import Cluster, EngineSettings
from claudecluster_mcp.errors import NotFoundError
from claudecluster_mcp.model_server import ScriptedModelServer, scripted_env
from claudecluster_mcp.models import PlanState, TaskState
from claudecluster_mcp.registry import Registry
from claudecluster_mcp.scenario import marker_rule, marker_task, write_turn

pytestmark = [pytest.mark.anyio, pytest.mark.claude]

StartServer = Callable[[dict[str, Any]], ScriptedModelServer]
Settings = Callable[..., EngineSettings]
Git = Callable[..., str]
Cli = Callable[..., subprocess.CompletedProcess[str]]

# A writes a.txt and succeeds; B writes half of its work, then the model fails for good.
SCENARIO = {
    "rules": [
        marker_rule("A", write_turn("a.txt", "from A\n")),
        {
            "name": "B",
            "match": "[B]",
            "turns": [write_turn("b.txt", "half\n"), {"fault": {"type": "server_error", "times": None}}],
        },
    ]
}


async def _finished_plan(cluster: Cluster, *, land: bool) -> str:
    plan = (await cluster.plan("a and b", [marker_task("A"), marker_task("B")])).plan
    await cluster.dispatch(plan.id)
    with anyio.fail_after(90):
        status = await cluster.wait(plan.id)
    assert {t.id: t.state for t in status.tasks} == {"A": TaskState.MERGED, "B": TaskState.FAILED}, [
        (t.id, t.state, t.reason) for t in status.tasks
    ]
    if land:
        await cluster.merge(plan.id)
    return plan.id


def _branches(git: Git, repo: Path, plan_id: str) -> list[str]:
    return git(repo, "for-each-ref", "--format=%(refname:short)", f"refs/heads/claudecluster/{plan_id}/").split()


def _projects(settings: EngineSettings, plan_id: str) -> list[str]:
    projects = settings.claude_config_dir / "projects" if settings.claude_config_dir else Path()
    return sorted(p.name for p in projects.iterdir() if plan_id in p.name)


async def test_a_landed_plan_is_removed_with_everything_it_left(
    claude: ClaudeBinary, repo: Path, model_server: StartServer, engine_settings: Settings, git: Git
) -> None:
    settings = engine_settings(model_server(SCENARIO), max_attempts=1)
    state = settings.state_dir
    async with Cluster.open(repo, workers=2, settings=settings, claude=claude) as cluster:
        plan_id = await _finished_plan(cluster, land=True)
        # Left for inspection: the failed task's worktree with its half-done work, transcripts
        # (ours and Claude Code's), events, and the plan's branches.
        assert (state / "worktrees" / plan_id / "B" / "b.txt").read_text() == "half\n"
        assert sorted(p.name for p in (state / "logs" / plan_id).iterdir()) == ["A.1.log", "B.1.log"]
        assert len(_projects(settings, plan_id)) == 2
        assert len(_branches(git, repo, plan_id)) == 3
        someone_elses = settings.claude_config_dir / "projects" / "-home-someone-else"  # type: ignore[operator]
        someone_elses.mkdir()

        dry = await cluster.collect(timedelta(0), dry_run=True)
        assert [(p.plan_id, p.action, p.worktrees, p.logs) for p in dry.plans] == [(plan_id, "removed", 1, 4)]
        assert dry.freed_bytes > 0 and (state / "worktrees" / plan_id / "B").is_dir()

        report = await cluster.collect(timedelta(0))
        assert [(p.plan_id, p.action) for p in report.plans] == [(plan_id, "removed")]
        assert report.plans[0].events > 0 and len(report.plans[0].branches_deleted) == 3
        with pytest.raises(NotFoundError):
            await cluster.status(plan_id)
        assert (await cluster.collect(timedelta(0))).plans == []

    assert not (state / "worktrees" / plan_id).exists() and not (state / "logs" / plan_id).exists()
    assert _projects(settings, plan_id) == [] and someone_elses.is_dir()
    assert _branches(git, repo, plan_id) == []
    assert git(repo, "worktree", "list", "--porcelain").count("worktree ") == 1
    with pytest.raises(NotFoundError):
        Registry(state / "registry.db").lookup(plan_id)
    # The work that was merged is the user's, on main.
    assert (repo / "a.txt").read_text() == "from A\n" and git(repo, "fsck", "--no-dangling") == ""


async def test_work_no_other_branch_holds_is_kept_and_the_plan_only_trimmed(
    claude: ClaudeBinary, repo: Path, model_server: StartServer, engine_settings: Settings, git: Git
) -> None:
    settings = engine_settings(model_server(SCENARIO), max_attempts=1)
    async with Cluster.open(repo, workers=2, settings=settings, claude=claude) as cluster:
        plan_id = await _finished_plan(cluster, land=False)  # A's work is only on the integration branch

        report = await cluster.collect(timedelta(0))
        [trimmed] = report.plans
        integration = f"claudecluster/{plan_id}/integration"
        assert (trimmed.action, trimmed.branches_kept) == ("trimmed", [integration])
        assert sorted(trimmed.branches_deleted) == [f"claudecluster/{plan_id}/A", f"claudecluster/{plan_id}/B"]
        # Scratch is gone; the plan, its state history and its unmerged work stay.
        assert not (settings.state_dir / "worktrees" / plan_id).exists() and _projects(settings, plan_id) == []
        status = await cluster.status(plan_id)
        assert status.task("B").reason.startswith("API Error: 500")
        assert {e["kind"] for e in await cluster.events(plan_id)} == {"state", "gc_trimmed"}
        assert _branches(git, repo, plan_id) == [integration]
        assert (await cluster.collect(timedelta(0))).plans == []  # nothing more to take

        # Landed later, the plan has nothing unmerged left: the next collection removes it.
        assert (await cluster.merge(plan_id)).kind == "fast-forward"
        assert [p.action for p in (await cluster.collect(timedelta(0))).plans] == ["removed"]
    assert (repo / "a.txt").read_text() == "from A\n" and _branches(git, repo, plan_id) == []


async def test_running_and_recent_plans_are_never_touched(
    claude: ClaudeBinary, repo: Path, model_server: StartServer, engine_settings: Settings
) -> None:
    server = model_server(
        {
            "rules": [
                marker_rule("A", write_turn("a.txt", "a\n")),
                {
                    "name": "slow",
                    "match": "[slow]",
                    "turns": [{"text": "...", "fault": {"type": "hang", "seconds": 60}}],
                },
            ]
        }
    )
    settings = engine_settings(server)
    async with Cluster.open(repo, workers=2, settings=settings, claude=claude) as cluster:
        recent = (await cluster.plan("recent", [marker_task("A")])).plan
        await cluster.dispatch(recent.id)
        with anyio.fail_after(60):
            await cluster.wait(recent.id)
        running = (await cluster.plan("running", [marker_task("slow")])).plan
        await cluster.dispatch(running.id)
        with anyio.fail_after(60):
            while (await cluster.task(running.id, "slow")).state is not TaskState.RUNNING:
                await cluster.changed(0.5)

        assert (await cluster.collect(timedelta(days=1))).plans == []  # the finished one is too recent
        report = await cluster.collect(timedelta(0))
        assert [p.plan_id for p in report.plans] == [recent.id]
        assert (settings.state_dir / "worktrees" / running.id / "slow").is_dir()
        assert (await cluster.status(running.id)).plan.state is PlanState.RUNNING
        await cluster.cancel(running.id)


async def test_an_open_engine_applies_retention_by_itself(
    claude: ClaudeBinary, repo: Path, model_server: StartServer, engine_settings: Settings, git: Git
) -> None:
    settings = engine_settings(model_server(SCENARIO), max_attempts=1)
    async with Cluster.open(repo, workers=2, settings=settings, claude=claude) as cluster:
        plan_id = await _finished_plan(cluster, land=True)
    assert (settings.state_dir / "worktrees" / plan_id / "B").is_dir()

    # A few milliseconds of retention: the plan is past it when the engine next opens.
    short = settings.model_copy(update={"retention_days": 0.05 / 86400})
    await anyio.sleep(0.1)
    async with Cluster.open(repo, settings=short, claude=claude) as cluster:
        with anyio.fail_after(30):
            while await cluster.overview():  # noqa: ASYNC110 - the pass runs in the engine's background
                await anyio.sleep(0.1)
    assert not (settings.state_dir / "worktrees" / plan_id).exists() and _branches(git, repo, plan_id) == []


async def test_leftovers_of_killed_runs_are_swept_but_live_ones_kept(
    claude: ClaudeBinary, repo: Path, engine_settings: Settings, git: Git
) -> None:
    stale = Path(tempfile.gettempdir()) / f"ccrun-gc{uuid.uuid4().hex[:8]}"
    fresh = Path(tempfile.gettempdir()) / f"ccrun-gc{uuid.uuid4().hex[:8]}"
    objects = Path(git(repo, "rev-parse", "--path-format=absolute", "--git-common-dir").strip()) / "objects"
    half_written = objects / "ab" / "tmp_obj_Xyz123"
    for path in (stale / "sub", fresh):
        path.mkdir(parents=True)
    half_written.parent.mkdir(exist_ok=True)
    half_written.write_bytes(b"\0" * 50_000)
    hour_ago = time.time() - 3600
    for path in (stale / "sub", stale, half_written):
        os.utime(path, (hour_ago, hour_ago))
    try:
        async with Cluster.open(repo, settings=engine_settings(retention_days=0), claude=claude) as cluster:
            report = await cluster.collect(timedelta(days=30))
        assert str(stale) in report.leftovers and str(fresh) not in report.leftovers
        assert not stale.exists() and fresh.is_dir() and not half_written.exists()
        assert report.leftover_bytes >= 50_000
    finally:
        for path in (stale, fresh):
            shutil.rmtree(path, ignore_errors=True)


async def test_gc_command_dry_run_json_and_refusal_while_an_engine_runs(
    tmp_path: Path, user_env: dict[str, str], cli: Cli, repo: Path, model_server: StartServer, claude: ClaudeBinary
) -> None:
    env = {**user_env, **scripted_env(model_server(SCENARIO).url), "CLAUDECLUSTER_MAX_ATTEMPTS": "1"}
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text(yaml.safe_dump({"tasks": [marker_task("A"), marker_task("B")]}))
    ran = cli("run", "a and b", "--tasks", str(tasks), "--json", cwd=repo, env=env)
    plan_id = json.loads(ran.stdout)["plan"]["id"]

    dry = cli("gc", "--older-than", "0", "--dry-run", cwd=repo, env=env)
    assert dry.returncode == 0, dry.stderr
    assert f"plan {plan_id} (done, finished" in dry.stdout and "would be trimmed" in dry.stdout
    assert "dry run: nothing removed" in dry.stdout and f"claudecluster merge {plan_id}" in dry.stdout
    assert plan_id not in cli("gc", cwd=repo, env=env).stdout  # retention_days: 30 by default

    async with Cluster.open(repo, settings=EngineSettings(retention_days=0), claude=claude):
        busy = cli("gc", "--older-than", "0", cwd=repo, env=env)
    assert busy.returncode == 2 and "removes plans finished more than retention_days" in busy.stderr

    done = cli("gc", "--older-than", "0", "--unmerged", "--json", cwd=repo, env=env)
    report = json.loads(done.stdout)
    assert [(p["plan_id"], p["action"]) for p in report["plans"]] == [(plan_id, "removed")]
    assert report["freed_bytes"] > 0
    bad = cli("gc", "--older-than", "soon", cwd=repo, env=env)
    assert bad.returncode == 2 and "not an age such as 7d" in bad.stderr


async def test_gc_finds_what_a_collector_killed_half_way_left(
    tmp_path: Path, user_env: dict[str, str], cli: Cli, repo: Path, model_server: StartServer, git: Git
) -> None:
    env = {**user_env, **scripted_env(model_server(SCENARIO).url), "CLAUDECLUSTER_MAX_ATTEMPTS": "1"}
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text(yaml.safe_dump({"tasks": [marker_task("A"), marker_task("B")]}))
    plan_id = json.loads(cli("run", "ab", "--tasks", str(tasks), "--json", cwd=repo, env=env).stdout)["plan"]["id"]
    # The store's rows went first; the collector died before the files and branches.
    db = (
        Path(git(repo, "rev-parse", "--path-format=absolute", "--git-common-dir").strip())
        / "claudecluster"
        / "state.db"
    )
    with sqlite3.connect(db) as conn:
        for table in ("events", "merges", "tasks"):
            conn.execute(f"DELETE FROM {table} WHERE plan_id = ?", [plan_id])
        conn.execute("DELETE FROM plans WHERE id = ?", [plan_id])
    state = Path(env["HOME"]) / ".local" / "state" / "claudecluster"
    assert (state / "worktrees" / plan_id / "B").is_dir()

    kept = cli("gc", "--older-than", "30d", cwd=repo, env=env)
    assert kept.returncode == 0, kept.stderr
    assert f"plan {plan_id} (unknown) trimmed: 1 worktrees" in kept.stdout
    assert not (state / "worktrees" / plan_id).exists()
    assert _branches(git, repo, plan_id) == [f"claudecluster/{plan_id}/integration"]  # A's work, unmerged
    done = cli("gc", "--older-than", "30d", "--unmerged", cwd=repo, env=env)
    assert f"plan {plan_id} (unknown) removed: 0 worktrees" in done.stdout
    assert not (state / "worktrees" / plan_id).exists() and _branches(git, repo, plan_id) == []
