"""kill -9 of the engine at random points, and what the next engine's recovery must clean up.

The loop itself (bench/killloop.py; 20 kills of a 50-task run in `claudecluster bench --only
kill`) runs here with 5 kills of a 12-task DAG: `claudecluster serve` over Streamable HTTP
as a real subprocess, SIGKILLed while agents run, while the gate runs, right after a gate
passed, and while the restarted server recovers. The focused tests pin the bugs it found."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import psutil
import pytest

from claudecluster_mcp.claude_cli import ClaudeBinary
from claudecluster_mcp.engine import Cluster
from claudecluster_mcp.model_server import ScriptedModelServer
from claudecluster_mcp.models import FINAL_STATES, TaskKind, TaskState
from claudecluster_mcp.scenario import bash_turn, marker_rule, marker_task, write_turn
from claudecluster_mcp.settings import EngineSettings

StartServer = Callable[[dict[str, Any]], ScriptedModelServer]
Settings = Callable[..., EngineSettings]
Git = Callable[..., str]

sys.path.insert(0, str(Path(__file__).parent.parent / "bench"))
from killloop import KillLoop, LoopConfig  # noqa: E402 - the loop lives with the benchmarks

CRASH_WORKER = Path(__file__).parent / "crash_worker.py"
KILL_POINT_WORKER = Path(__file__).parent / "kill_point_worker.py"
FINAL = {s.value for s in FINAL_STATES}


@pytest.mark.claude
@pytest.mark.timeout(300)
def test_kill_9_five_times_during_a_12_task_run_over_http_loses_nothing_and_leaves_no_process(
    claude: ClaudeBinary, tmp_path: Path
) -> None:
    # One kill of each kind, and one more while agents run: the loop (bench/killloop.py) aims
    # each kill, restarts the server, re-dispatches over MCP and judges the run at the end.
    kinds = ("agent", "recovery", "gate", "merge", "agent")
    config = LoopConfig(tasks=12, kills=5, seed=7, workers=3, kinds=kinds, gap=(0.3, 1.5), finish_timeout=180)
    workdir = tmp_path / "loop"
    workdir.mkdir()

    report = KillLoop(config, workdir, claude.path).run()

    assert report.ok, "\n".join(report.problems)
    assert report.kills == 5 and report.tasks == 12, report.figures
    assert report.figures["resolve_tasks"] == 1, report.figures
    # The killed servers left agents running, and each next server's recovery reaped them.
    assert report.figures["alive_at_restart"] > 0, report.figures


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def gate_slow_the_first_time(pid_file: Path) -> list[str]:
    """A gate that, on its first run only, records its pid and sleeps for two minutes."""
    code = (
        f"import os, pathlib, time; p = pathlib.Path({str(pid_file)!r})\n"
        "if not p.exists(): p.write_text(str(os.getpid())); time.sleep(120)"
    )
    return [sys.executable, "-c", code]


@pytest.mark.anyio
@pytest.mark.claude
async def test_a_gate_left_running_by_a_killed_engine_is_stopped_by_the_next_ones_recovery(
    claude: ClaudeBinary, repo: Path, model_server: StartServer, engine_settings: Settings, tmp_path: Path, git: Git
) -> None:
    server = model_server({"rules": [marker_rule("A", write_turn("a.txt", "from A\n"))]})
    pid_file = tmp_path / "gate.pid"
    settings = engine_settings(server, gate=gate_slow_the_first_time(pid_file))
    worker = subprocess.Popen(  # noqa: ASYNC220 - the engine to kill, in its own process
        [sys.executable, str(CRASH_WORKER), settings.model_dump_json(), json.dumps([marker_task("A")]), str(repo),
         str(tmp_path / "plan-id")],
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        with anyio.fail_after(90):
            while not (pid_file.exists() and pid_file.read_text()):  # noqa: ASYNC110 - a file from another process
                await anyio.sleep(0.05)
    finally:
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait()
    gate = int(pid_file.read_text())
    try:
        assert alive(gate), "the gate outlives the engine that started it"
        plan_id = (tmp_path / "plan-id").read_text()

        async with Cluster.open(repo, settings=settings, claude=claude) as cluster:
            left_running = alive(gate)
            with anyio.fail_after(60):
                status = await cluster.wait(plan_id)
    finally:
        if alive(gate):
            os.kill(gate, signal.SIGKILL)

    assert not left_running, "recovery left the killed engine's gate running"
    assert status.task("A").state is TaskState.MERGED
    worktrees = git(repo, "worktree", "list", "--porcelain")
    assert "claudecluster-gate-" not in worktrees, worktrees


@pytest.mark.anyio
@pytest.mark.claude
@pytest.mark.parametrize("point", ["resolve-added", "resolve-running", "resolve-merged", "ref-moved", "journal-done"])
async def test_kill_9_at_each_point_of_a_merge_and_its_conflict_leaves_every_task_merged_once(
    claude: ClaudeBinary,
    repo: Path,
    model_server: StartServer,
    engine_settings: Settings,
    tmp_path: Path,
    git: Git,
    point: str,
) -> None:
    # A and B start together from the same base and write the same file (A only once B has
    # written it, so that B resumes on that base whenever it is killed): B, slower, conflicts
    # with A once A is merged, and a resolve task keeps both lines.
    after_b = "for i in $(seq 600); do [ -f ../B/x.txt ] && break; sleep 0.1; done; printf 'A\\n' > x.txt"
    server = model_server(
        {
            "rules": [
                {"name": "resolve", "match": "[claudecluster:resolve]", "turns": [
                    write_turn("x.txt", "A\nB\n"), {"text": "resolved"}, {"text": "resolved"}]},
                marker_rule("A", bash_turn(after_b), {"text": "A done"}),
                marker_rule("B", write_turn("x.txt", "B\n"), {"text": "B done", "latency": 4}),
            ]
        }
    )  # fmt: skip
    settings = engine_settings(server, workers=2)
    plan_file = tmp_path / "plan-id"
    with anyio.fail_after(100):
        worker = await anyio.run_process(
            [sys.executable, str(KILL_POINT_WORKER), point, settings.model_dump_json(),
             json.dumps([marker_task("A"), marker_task("B")]), str(repo), str(plan_file)],
            stdin=subprocess.DEVNULL, stdout=None, stderr=None, check=False,
        )  # fmt: skip
    assert worker.returncode == -signal.SIGKILL, f"the engine never reached {point}"

    async with Cluster.open(repo, settings=settings, claude=claude) as cluster:
        plan_id = plan_file.read_text()
        with anyio.fail_after(90):
            status = await cluster.wait(plan_id)
        events = await cluster.store.events(plan_id)

    resolves = [t for t in status.tasks if t.kind is TaskKind.RESOLVE]
    assert [t.resolves for t in resolves] == ["B"], [(t.id, t.state, t.reason) for t in status.tasks]
    assert all(t.state is TaskState.MERGED for t in status.tasks), [(t.id, t.state, t.reason) for t in status.tasks]
    finals: dict[str, list[str]] = {}
    for event in events:
        if event["kind"] == "state" and event["data"]["state"] in FINAL:
            finals.setdefault(event["task_id"], []).append(event["data"]["state"])
    assert finals == {"A": ["merged"], "B": ["conflicted", "merged"], resolves[0].id: ["merged"]}
    tip = status.plan.integration_branch
    assert git(repo, "show", f"{tip}:x.txt") == "A\nB\n"
    log = git(repo, "log", "--format=%B%x00", tip)
    for task in status.tasks:
        assert log.count(f"claudecluster plan {plan_id}, task {task.id}\n") == 1, (task.id, log)


@pytest.mark.anyio
@pytest.mark.claude
async def test_a_write_interrupted_by_the_kill_leaves_no_staging_file_in_the_resumed_tasks_commit(
    claude: ClaudeBinary, repo: Path, model_server: StartServer, engine_settings: Settings, tmp_path: Path, git: Git
) -> None:
    # Claude Code writes a file to <name>.tmp.<pid>.<12 hex> and renames it into place: an
    # agent killed in between (here: while its next command runs) leaves that staging file.
    staging = "b.txt.tmp.4242.0123456789ab"
    leave_it = f"printf partial > {staging} && sleep 60"
    resumed = [{"text": "A done"}] * 3
    server = model_server({"rules": [marker_rule("A", write_turn("a.txt", "a\n"), bash_turn(leave_it), *resumed)]})
    settings = engine_settings(server)
    plan_file = tmp_path / "plan-id"
    worker = subprocess.Popen(  # noqa: ASYNC220 - the engine to kill, in its own process
        [sys.executable, str(CRASH_WORKER), settings.model_dump_json(), json.dumps([marker_task("A")]), str(repo),
         str(plan_file)],
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    worktrees = tmp_path / "state" / "worktrees"
    try:
        with anyio.fail_after(90):
            while not list(worktrees.glob(f"*/A/{staging}")):  # noqa: ASYNC110 - a file from another process
                await anyio.sleep(0.05)
    finally:
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait()

    async with Cluster.open(repo, settings=settings, claude=claude) as cluster:
        with anyio.fail_after(60):
            status = await cluster.wait(plan_file.read_text())

    task = status.task("A")
    # Attempt 1 still: its session was resumed in the worktree holding the staging file.
    assert task.state is TaskState.MERGED and task.attempts == 1, (task.state, task.attempts, task.reason)
    assert git(repo, "ls-tree", "-r", "--name-only", status.plan.integration_branch).split() == ["README.md", "a.txt"]


@pytest.mark.anyio
@pytest.mark.claude
async def test_a_gate_directory_left_by_a_kill_after_its_worktree_went_is_removed_by_recovery(
    claude: ClaudeBinary,
    repo: Path,
    model_server: StartServer,
    engine_settings: Settings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = model_server({"rules": [marker_rule("A", write_turn("a.txt", "a\n"))]})
    settings = engine_settings(server, gate=["true"])
    temp = tmp_path / "temp"
    temp.mkdir()
    plan_file = tmp_path / "plan-id"
    with anyio.fail_after(100):
        worker = await anyio.run_process(
            [sys.executable, str(KILL_POINT_WORKER), "gate-tree-removed", settings.model_dump_json(),
             json.dumps([marker_task("A")]), str(repo), str(plan_file)],
            stdin=subprocess.DEVNULL, stdout=None, stderr=None, check=False, env={**os.environ, "TMPDIR": str(temp)},
        )  # fmt: skip
    assert worker.returncode == -signal.SIGKILL
    assert [p.name[:19] for p in temp.iterdir()] == ["claudecluster-gate-"]
    monkeypatch.setattr(tempfile, "tempdir", str(temp))

    async with Cluster.open(repo, settings=settings, claude=claude) as cluster:
        left = list(temp.iterdir())
        with anyio.fail_after(60):
            status = await cluster.wait(plan_file.read_text())

    assert left == [], "recovery left the gate's directory"
    assert status.task("A").state is TaskState.MERGED
