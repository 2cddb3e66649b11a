"""The engine where it used to break: merges without a git identity, cancel during a gate,
unexpected merge errors, gate retries, shutdown, and engine errors in one plan. Real `claude`
agents against the scripted model, real git, a real store."""

from __future__ import annotations

import json
import sqlite3
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anyio
import psutil
import pytest

from claudecluster_mcp.claude_cli import ClaudeBinary
from claudecluster_mcp.engine import Cluster
from claudecluster_mcp.errors import EngineBusyError, PlanValidationError
from claudecluster_mcp.graph import TaskGraph
from claudecluster_mcp.model_server import ScriptedModelServer
from claudecluster_mcp.models import PlanState, TaskState
from claudecluster_mcp.scenario import marker_rule, marker_task, write_turn
from claudecluster_mcp.settings import EngineSettings
from claudecluster_mcp.store import state_db_path

pytestmark = [pytest.mark.anyio, pytest.mark.claude]

StartServer = Callable[[dict[str, Any]], ScriptedModelServer]
Settings = Callable[..., EngineSettings]
Git = Callable[..., str]


def slow_gate(pid_file: Path, seconds: float = 60) -> list[str]:
    code = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep({seconds})"
    return [sys.executable, "-c", code]


async def wait_for(condition: Callable[[], bool], seconds: float = 60) -> None:
    with anyio.fail_after(seconds):
        while not condition():  # noqa: ASYNC110 (polls the file system and the engine)
            await anyio.sleep(0.05)


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def journal(repo: Path) -> list[tuple[Any, ...]]:
    with sqlite3.connect(repo / ".git" / "claudecluster" / "state.db") as db:
        return db.execute("SELECT task_id, ref, state FROM merges ORDER BY seq").fetchall()


@pytest.mark.parametrize("checked_out", [True, False], ids=["checked-out", "not-checked-out"])
async def test_final_merge_commit_needs_no_git_identity_and_is_journalled(
    claude: ClaudeBinary,
    repo: Path,
    model_server: StartServer,
    engine_settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    checked_out: bool,
    git: Git,
    tmp_path: Path,
) -> None:
    # A machine where git knows nobody: no global config, no guessing from the hostname.
    # (Engine git drops inherited GIT_CONFIG_* variables, so the global config goes with HOME.)
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", "/dev/null")
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    monkeypatch.setenv("HOME", str(tmp_path / "nobody"))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    for name in ("GIT_AUTHOR_NAME", "GIT_AUTHOR_EMAIL", "GIT_COMMITTER_NAME", "GIT_COMMITTER_EMAIL", "EMAIL"):
        monkeypatch.delenv(name, raising=False)
    git(repo, "config", "user.useConfigOnly", "true")
    target = "main" if checked_out else "release"
    if not checked_out:
        git(repo, "branch", "release")
    server = model_server({"rules": [marker_rule("A", write_turn("a.txt", "from A\n"))]})

    async with Cluster.open(repo, workers=1, settings=engine_settings(server), claude=claude) as cluster:
        plan = (await cluster.plan("add a", [marker_task("A")], target=target)).plan
        await cluster.dispatch(plan.id)
        with anyio.fail_after(90):
            await cluster.wait(plan.id)
        # The target moves on meanwhile, so the final merge cannot fast-forward.
        (repo / "b.txt").write_text("from the user\n")
        git(repo, "add", "b.txt")
        ident = ["-c", "user.name=User", "-c", "user.email=user@example.invalid"]
        if checked_out:
            git(repo, *ident, "commit", "-qm", "user work")
        else:
            tree = git(repo, "write-tree").strip()
            commit = git(repo, *ident, "commit-tree", tree, "-p", "release", "-m", "user work").strip()
            git(repo, "update-ref", "refs/heads/release", commit)
            git(repo, "reset", "-q", "--", "b.txt")
            (repo / "b.txt").unlink()
        report = await cluster.merge(plan.id)

    assert report.kind == "merge", report
    assert git(repo, "rev-parse", target).strip() == report.new_tip
    assert len(git(repo, "rev-list", "--parents", "-n1", target).split()) == 3
    assert set(git(repo, "ls-tree", "--name-only", target).split()) >= {"a.txt", "b.txt"}
    if checked_out:
        assert (repo / "a.txt").read_text() == "from A\n"
        assert git(repo, "status", "--porcelain") == ""
    assert (None, f"refs/heads/{target}", "done") in journal(repo)


@pytest.mark.parametrize("whole_plan", [True, False], ids=["cancel-plan", "cancel-task"])
async def test_cancel_during_a_gate_stops_it_within_seconds_and_store_and_refs_agree(
    claude: ClaudeBinary,
    repo: Path,
    model_server: StartServer,
    engine_settings: Settings,
    tmp_path: Path,
    git: Git,
    whole_plan: bool,
) -> None:
    server = model_server({"rules": [marker_rule("A", write_turn("a.txt", "from A\n"))]})
    pid_file = tmp_path / "gate.pid"
    settings = engine_settings(server, gate=slow_gate(pid_file))

    async with Cluster.open(repo, workers=1, settings=settings, claude=claude) as cluster:
        plan = (await cluster.plan("add a", [marker_task("A")])).plan
        await cluster.dispatch(plan.id)
        await wait_for(lambda: pid_file.exists() and pid_file.read_text() != "")
        started = time.monotonic()
        await cluster.cancel(plan.id, None if whole_plan else "A")
        took = time.monotonic() - started
        task = await cluster.task(plan.id, "A")
        with anyio.fail_after(10):
            await cluster.wait(plan.id)

    assert took < 5, f"cancel took {took:.1f}s while the gate ran"
    assert task.state is TaskState.CANCELLED, task.reason
    assert git(repo, "rev-parse", plan.integration_branch).strip() == plan.base_commit
    assert gone(int(pid_file.read_text()))
    assert all(state != "started" for _, _, state in journal(repo))


async def test_leaving_the_engine_during_a_gate_stops_it_and_keeps_the_task_for_the_next_engine(
    claude: ClaudeBinary, repo: Path, model_server: StartServer, engine_settings: Settings, tmp_path: Path, git: Git
) -> None:
    server = model_server({"rules": [marker_rule("A", write_turn("a.txt", "from A\n"))]})
    pid_file = tmp_path / "gate.pid"
    settings = engine_settings(server, gate=slow_gate(pid_file))

    async with Cluster.open(repo, workers=1, settings=settings, claude=claude) as cluster:
        plan = (await cluster.plan("add a", [marker_task("A")])).plan
        await cluster.dispatch(plan.id)
        await wait_for(lambda: pid_file.exists() and pid_file.read_text() != "")
        started = time.monotonic()
    took = time.monotonic() - started

    assert took < 5, f"shutdown took {took:.1f}s while the gate ran"
    assert gone(int(pid_file.read_text()))
    assert git(repo, "rev-parse", plan.integration_branch).strip() == plan.base_commit
    async with Cluster.open(repo, settings=settings.model_copy(update={"gate": None}), claude=claude) as cluster:
        # The plan's own gate is stored with it: the next engine re-queues the merge.
        task = await cluster.task(plan.id, "A")
        assert task.state is TaskState.SUCCEEDED
        await cluster.cancel(plan.id)


async def test_an_unexpected_merge_error_fails_the_task_blocks_dependents_and_settles_the_plan(
    claude: ClaudeBinary,
    repo: Path,
    model_server: StartServer,
    engine_settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def disk_full(**_: Any) -> str:
        raise OSError(28, "No space left on device")

    # The gate's temporary worktree cannot be created.
    monkeypatch.setattr("claudecluster_mcp.merge.tempfile", SimpleNamespace(mkdtemp=disk_full))
    server = model_server({"rules": [marker_rule("A", write_turn("a.txt", "A\n")), marker_rule("B")]})
    settings = engine_settings(server, gate=["true"])

    async with Cluster.open(repo, workers=2, settings=settings, claude=claude) as cluster:
        plan = (await cluster.plan("a then b", [marker_task("A"), marker_task("B", "A")])).plan
        await cluster.dispatch(plan.id)
        with anyio.fail_after(60):
            status = await cluster.wait(plan.id)

    a, b = status.task("A"), status.task("B")
    assert a.state is TaskState.FAILED and "No space left on device" in a.reason, a.reason
    assert b.state is TaskState.BLOCKED and "dependency A" in b.reason
    assert status.plan.state is PlanState.DONE


async def test_a_gate_retry_never_shows_the_task_final_in_between(
    claude: ClaudeBinary, repo: Path, model_server: StartServer, engine_settings: Settings, tmp_path: Path
) -> None:
    counter = tmp_path / "gate-runs"
    code = (
        f"import pathlib, sys; p = pathlib.Path({str(counter)!r}); n = len(p.read_text()) if p.exists() else 0; "
        "p.write_text('x' * (n + 1)); print('1 test failed' if n == 0 else 'ok'); sys.exit(1 if n == 0 else 0)"
    )
    server = model_server({"rules": [marker_rule("A", write_turn("a.txt", "from A\n"))]})
    settings = engine_settings(server, gate=[sys.executable, "-c", code], gate_retries=1)

    async with Cluster.open(repo, workers=1, settings=settings, claude=claude) as cluster:
        plan = (await cluster.plan("add a", [marker_task("A")])).plan
        await cluster.dispatch(plan.id)
        with anyio.fail_after(90):
            status = await cluster.wait(plan.id)
        events = await cluster.events(plan.id, "A")

    a = status.task("A")
    assert a.state is TaskState.MERGED and a.attempts == 2, (a.state, a.reason)
    states = [e["data"]["state"] for e in events if e["kind"] == "state"]
    assert "gate_failed" not in states
    retried = [e["data"] for e in events if e["kind"] == "state" and e["data"]["state"] == "pending"]
    assert retried and "1 test failed" in retried[0]["reason"]


async def test_shutdown_marks_for_resume_only_the_agents_that_got_somewhere(
    claude: ClaudeBinary, repo: Path, model_server: StartServer, engine_settings: Settings, tmp_path: Path
) -> None:
    server = model_server(
        {
            "rules": [
                marker_rule("Q", {"text": "thinking", "latency": 60}),
                marker_rule("P", write_turn("p.txt", "from P\n"), {"text": "more", "latency": 60}),
            ]
        }
    )
    worktrees = tmp_path / "state" / "worktrees"

    async with Cluster.open(repo, workers=2, settings=engine_settings(server), claude=claude) as cluster:
        plan = (await cluster.plan("two", [marker_task("Q"), marker_task("P")])).plan
        await cluster.dispatch(plan.id)
        await wait_for(lambda: (worktrees / plan.id / "P" / "p.txt").exists())
        await wait_for(lambda: cluster.running == 2)

    with sqlite3.connect(await state_db_path(repo)) as db:
        rows = dict(db.execute("SELECT id, resume || ' ' || reason || ' ' || state FROM tasks").fetchall())
    assert rows["P"].startswith("1 ") and "resuming" in rows["P"], rows
    assert rows["Q"].startswith("0 ") and "resuming" not in rows["Q"], rows


async def test_an_engine_error_in_one_plan_fails_that_plan_and_the_others_go_on(
    claude: ClaudeBinary,
    repo: Path,
    model_server: StartServer,
    engine_settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class BrokenForB(TaskGraph):  # an engine bug that only plans holding a task "B" hit
        def critical_path_lengths(self, weights: Any = None) -> dict[str, float]:
            if "B" in self.tasks:
                raise RuntimeError("a bug in the scheduler")
            return super().critical_path_lengths(weights)

    monkeypatch.setattr("claudecluster_mcp.scheduler.TaskGraph", BrokenForB)
    server = model_server({"rules": [marker_rule("A", write_turn("a.txt", "A\n")), marker_rule("B")]})

    async with Cluster.open(repo, workers=2, settings=engine_settings(server), claude=claude) as cluster:
        broken = (await cluster.plan("broken", [marker_task("B")])).plan
        healthy = (await cluster.plan("healthy", [marker_task("A")])).plan
        await cluster.dispatch(broken.id)
        await cluster.dispatch(healthy.id)
        with anyio.fail_after(60):
            failed = await cluster.wait(broken.id)
            done = await cluster.wait(healthy.id)

    assert failed.plan.state is PlanState.FAILED
    assert failed.plan.reason == "engine error: a bug in the scheduler", failed.plan.reason
    assert done.plan.state is PlanState.DONE and done.task("A").state is TaskState.MERGED


async def test_an_error_inside_the_engine_block_is_raised_as_itself(claude: ClaudeBinary, repo: Path) -> None:
    with pytest.raises(PlanValidationError, match="cycle"):
        async with Cluster.open(repo, claude=claude, settings=EngineSettings(state_dir=repo.parent / "s")) as cluster:
            await cluster.plan("loop", [marker_task("A", "B"), marker_task("B", "A")])


async def test_a_second_engine_on_a_repository_is_refused_with_a_typed_error(
    claude: ClaudeBinary, repo: Path, tmp_path: Path
) -> None:
    settings = EngineSettings(state_dir=tmp_path / "state")
    async with Cluster.open(repo, settings=settings, claude=claude):
        with pytest.raises(EngineBusyError, match="another claudecluster engine"):
            async with Cluster.open(repo, settings=settings, claude=claude):
                pass


async def test_a_linked_worktree_keeps_its_state_in_the_common_git_directory(
    claude: ClaudeBinary, repo: Path, tmp_path: Path, git: Git
) -> None:
    linked = tmp_path / "linked"
    git(repo, "worktree", "add", "-q", "-b", "feature", str(linked))
    assert (linked / ".git").is_file()

    async with Cluster.open(linked, settings=EngineSettings(state_dir=tmp_path / "state"), claude=claude) as cluster:
        plan = (await cluster.plan("in a linked worktree", [marker_task("A")])).plan

    assert await state_db_path(linked) == repo / ".git" / "claudecluster" / "state.db"
    with sqlite3.connect(repo / ".git" / "claudecluster" / "state.db") as db:
        assert db.execute("SELECT target_branch FROM plans WHERE id = ?", [plan.id]).fetchone() == ("feature",)
    assert json.loads(json.dumps(plan.warnings)) == []


@pytest.mark.parametrize("base", ["origin/main", "v1.0", "sha", "refs/heads/main"])
async def test_a_base_that_is_not_a_branch_name_merges_into_the_current_branch(
    claude: ClaudeBinary, repo: Path, tmp_path: Path, git: Git, base: str
) -> None:
    tip = git(repo, "rev-parse", "HEAD").strip()
    git(repo, "update-ref", "refs/remotes/origin/main", tip)
    git(repo, "tag", "v1.0")
    base_ref = tip if base == "sha" else base

    async with Cluster.open(repo, settings=EngineSettings(state_dir=tmp_path / "state"), claude=claude) as cluster:
        plan = (await cluster.plan("from elsewhere", [marker_task("A")], base_ref=base_ref)).plan
        await cluster.cancel(plan.id)
        report = await cluster.merge(plan.id)

    assert plan.target_branch == "main" and report.target == "main"
    branches = git(repo, "for-each-ref", "--format=%(refname)", "refs/heads/").split()
    assert [b for b in branches if not b.startswith("refs/heads/claudecluster/")] == ["refs/heads/main"]
