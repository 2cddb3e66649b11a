"""The `claudecluster` command as a user runs it (a real subprocess)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from claudecluster_mcp.cli import build_parser

README = Path(__file__).parent.parent / "README.md"


Cli = Callable[..., subprocess.CompletedProcess[str]]


def test_help_lists_the_commands(cli: Cli) -> None:
    done = cli("--help")

    assert done.returncode == 0
    for command in ("demo", "model-server", "check"):
        assert command in done.stdout


def test_every_command_is_documented_in_the_readme() -> None:
    readme = README.read_text()
    commands = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]

    for name in commands:
        assert f"claudecluster {name}" in readme, f"`claudecluster {name}` is not in README.md"


def test_check_finds_the_pinned_claude(cli: Cli) -> None:
    done = cli("check")

    assert done.returncode == 0, done.stderr
    assert "claude 2.1.332 at" in done.stdout


def test_model_server_command_serves_a_scenario(tmp_path: Path, free_port: Callable[[], int]) -> None:
    scenario = tmp_path / "s.yaml"
    scenario.write_text("rules:\n  - name: hi\n    match: HELLO\n    turns:\n      - text: hi there\n")
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "claudecluster_mcp.cli",
            "model-server",
            "--scenario",
            str(scenario),
            "--port",
            str(port),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while True:
            try:
                httpx.get(url + "/", timeout=1)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "model server did not come up"
                time.sleep(0.1)
        answer = httpx.post(
            url + "/v1/messages",
            json={
                "model": "m",
                "max_tokens": 10,
                "messages": [{"role": "user", "content": "HELLO"}],
            },
            timeout=5,
        )
        assert answer.status_code == 200
        assert answer.json()["content"] == [{"type": "text", "text": "hi there"}]
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=10)
    assert proc.returncode == 0


@pytest.mark.claude
def test_demo_runs_a_dag_through_the_merge_queue(tmp_path: Path, cli: Cli) -> None:
    done = cli("demo", "--workdir", str(tmp_path / "demo"), timeout=240)

    assert done.returncode == 0, done.stdout + done.stderr
    assert "7/7 tasks merged" in done.stdout  # 6 planned + 1 resolve task
    report = (tmp_path / "demo" / "report.html").read_text()
    assert report.count('<tr data-task="') == 7 and 'id="timeline"' in report
    repo = tmp_path / "demo" / "repo"
    # The planned conflict was resolved by a resolve task, and main holds everyone's work.
    assert "resolve" in done.stdout
    assert "calc.ops" in (repo / "CHANGELOG.md").read_text() and "parse_number" in (repo / "CHANGELOG.md").read_text()
    assert "## Usage" in (repo / "README.md").read_text()
    assert "python3 -m calc 2 + 3" in (repo / "README.md").read_text()
    assert (repo / "tests" / "test_ops.py").exists()
    assert (
        subprocess.run(["python3", "-m", "calc", "4", "*", "5"], cwd=repo, capture_output=True, text=True).stdout
        == "20\n"
    )
