"""The engine end to end: real `claude` agents against the scripted model, real git worktrees
and merges, a real SQLite store."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import psutil
import pytest

from claudecluster_mcp.agent_spec import run_tmpdir
from claudecluster_mcp.claude_cli import ClaudeBinary
from claudecluster_mcp.engine import Cluster, EngineSettings
from claudecluster_mcp.errors import (
    DirtyWorktreeError,
    NotFoundError,
    PlanValidationError,
    RepositoryError,
    StateError,
)
from claudecluster_mcp.model_server import ScriptedModelServer
from claudecluster_mcp.models import MergePolicy, PlanState, TaskState
from claudecluster_mcp.proctree import RUN_TAG_VAR
from claudecluster_mcp.scenario import bash_turn, marker_rule, marker_task, write_turn
from claudecluster_mcp.store import Store

pytestmark = [pytest.mark.anyio, pytest.mark.claude]

StartServer = Callable[[dict[str, Any]], ScriptedModelServer]
Settings = Callable[..., EngineSettings]
Git = Callable[..., str]


async def test_diamond_dag_dependents_see_their_dependencies_work(
    claude: ClaudeBinary, repo: Path, model_server: StartServer, tmp_path: Path, engine_settings: Settings, git: Git
) -> None:
    server = model_server(
        {
            "rules": [
                marker_rule("A", write_turn("a.txt", "from A\n")),
                marker_rule("B", bash_turn("cat a.txt > b.txt && echo from B >> b.txt")),
                marker_rule("C", bash_turn("cat a.txt > c.txt && echo from C >> c.txt")),
                marker_rule("D", bash_turn("cat b.txt c.txt > d.txt")),
            ]
        }
    )
    tasks = [marker_task("A"), marker_task("B", "A"), marker_task("C", "A"), marker_task("D", "B", "C")]

    async with Cluster.open(repo, workers=4, settings=engine_settings(server), claude=claude) as cluster:
        plan = (await cluster.plan("build the diamond", tasks)).plan
        await cluster.dispatch(plan.id)
        with anyio.fail_after(90):
            status = await cluster.wait(plan.id)
        report = await cluster.merge(plan.id)

    assert {t.id: t.state for t in status.tasks} == dict.fromkeys("ABCD", TaskState.MERGED), [
        (t.id, t.state, t.reason) for t in status.tasks
    ]
    assert report.kind == "fast-forward"
    # D ran on a tree holding B's and C's work (which held A's), and main now has it all.
    assert (repo / "d.txt").read_text() == "from A\nfrom B\nfrom A\nfrom C\n"
    assert git(repo, "status", "--porcelain") == ""
    d = status.task("D")
    assert d.turns == 2 and d.cost_usd > 0 and d.input_tokens > 0
    assert d.changed_files == ["d.txt"]
    # Worktrees of merged tasks are removed; the task branches stay.
    assert not any((tmp_path / "state" / "worktrees" / plan.id).glob("*/README.md"))
    assert status.plan.state.value == "done"


async def test_conflicting_tasks_get_a_resolve_task_and_merge(
    claude: ClaudeBinary, repo: Path, model_server: StartServer, engine_settings: Settings
) -> None:
    server = model_server(
        {
            "rules": [
                # The resolve prompt quotes the original task's prompt, so its rule comes first.
                {
                    "name": "resolve",
                    "match": "[claudecluster:resolve]",
                    "turns": [write_turn("shared.txt", "line from left\nline from right\n"), {"text": "resolved"}],
                },
                marker_rule("left", write_turn("shared.txt", "line from left\n")),
                marker_rule("right", write_turn("shared.txt", "line from right\n")),
            ]
        }
    )
    tasks = [marker_task("left", files=["shared.txt"]), marker_task("right", files=["shared.txt"])]

    async with Cluster.open(repo, workers=2, settings=engine_settings(server), claude=claude) as cluster:
        created = await cluster.plan("two edits of one file", tasks)
        assert any("expect a merge conflict" in w for w in created.plan.warnings)
        await cluster.dispatch(created.plan.id)
        with anyio.fail_after(90):
            status = await cluster.wait(created.plan.id)
        await cluster.merge(created.plan.id)

    states = {t.id: (t.state, t.kind.value) for t in status.tasks}
    resolver = next(t for t in status.tasks if t.kind.value == "resolve")
    assert states == {
        "left": (TaskState.MERGED, "task"),
        "right": (TaskState.MERGED, "task"),
        resolver.id: (TaskState.MERGED, "resolve"),
    }, [(t.id, t.state, t.reason) for t in status.tasks]
    assert resolver.files == ["shared.txt"]
    assert (repo / "shared.txt").read_text() == "line from left\nline from right\n"


async def test_conflict_with_report_policy_says_how_to_resolve(
    claude: ClaudeBinary, repo: Path, model_server: StartServer, engine_settings: Settings
) -> None:
    server = model_server(
        {
            "rules": [
                marker_rule("left", write_turn("shared.txt", "left\n")),
                marker_rule("right", write_turn("shared.txt", "right\n")),
            ]
        }
    )
    engine = engine_settings(server, merge_policy=MergePolicy.REPORT)

    async with Cluster.open(repo, workers=2, settings=engine, claude=claude) as cluster:
        plan = (await cluster.plan("clash", [marker_task("left"), marker_task("right")])).plan
        await cluster.dispatch(plan.id)
        with anyio.fail_after(90):
            status = await cluster.wait(plan.id)

    states = sorted(t.state.value for t in status.tasks)
    assert states == ["conflicted", "merged"]
    loser = next(t for t in status.tasks if t.state is TaskState.CONFLICTED)
    assert "shared.txt" in loser.reason and f"git merge claudecluster/{plan.id}/{loser.id}" in loser.reason


async def test_gate_failure_keeps_the_work_off_the_integration_branch(
    claude: ClaudeBinary, repo: Path, model_server: StartServer, engine_settings: Settings, git: Git
) -> None:
    server = model_server({"rules": [marker_rule("bad", write_turn("value.txt", "wrong\n"))]})
    gate = [
        "python3",
        "-c",
        "import sys; v = open('value.txt').read(); print('value is', v); sys.exit(v != 'right\\n')",
    ]

    async with Cluster.open(repo, settings=engine_settings(server, gate=gate), claude=claude) as cluster:
        plan = (await cluster.plan("gated", [marker_task("bad"), marker_task("after", "bad")])).plan
        await cluster.dispatch(plan.id)
        with anyio.fail_after(90):
            status = await cluster.wait(plan.id)
        integration_tip = git(repo, "rev-parse", plan.integration_branch).strip()

    bad = status.task("bad")
    assert bad.state is TaskState.GATE_FAILED
    assert "value is wrong" in bad.reason
    assert status.task("after").state is TaskState.BLOCKED
    assert integration_tip == plan.base_commit


async def test_a_429_storm_pauses_the_pool_then_everything_succeeds(
    claude: ClaudeBinary, repo: Path, model_server: StartServer, engine_settings: Settings
) -> None:
    server = model_server(
        {
            "storm": {"requests": 3, "fault": {"type": "rate_limit", "retry_after": 1}},
            "rules": [marker_rule(f"T{i}", write_turn(f"t{i}.txt", f"{i}\n")) for i in range(3)],
        }
    )

    async with Cluster.open(repo, workers=3, settings=engine_settings(server), claude=claude) as cluster:
        plan = (await cluster.plan("storm", [marker_task(f"T{i}") for i in range(3)])).plan
        await cluster.dispatch(plan.id)
        with anyio.fail_after(120):
            status = await cluster.wait(plan.id)
        events = await cluster.store.events(plan.id)

    assert all(t.state is TaskState.MERGED for t in status.tasks), [(t.id, t.state, t.reason) for t in status.tasks]
    model_turns = [r for r in server.requests if r.path == "/v1/messages"]
    assert [r.outcome for r in model_turns[:3]] == ["storm fault: rate_limit"] * 3
    assert any(e["kind"] == "pool_paused" for e in events)
    # Rate limits do not use up attempts.
    assert all(t.attempts == 1 for t in status.tasks)


async def test_429s_of_unknown_length_cost_short_adaptive_pauses_not_fixed_ones(
    claude: ClaudeBinary, repo: Path, model_server: StartServer, engine_settings: Settings
) -> None:
    # The first 5 model requests (the 4 first agents', then the probes') get 429s the
    # engine cannot see the retry-after of
    # (CLAUDE_CODE_MAX_RETRIES=0: no api_retry event), with the default 30 s cap: the old
    # fixed 30 s pause per 429 took minutes; short pauses ended by a probe take seconds.
    # (A turn fault's ``times`` counts per session, and every restart is a new session.)
    count = 10
    server = model_server(
        {
            "storm": {"requests": 5, "fault": {"type": "rate_limit"}},
            "rules": [marker_rule(f"R{i}", write_turn(f"r{i}.txt", f"{i}\n")) for i in range(count)],
        }
    )
    settings = engine_settings(server, rate_limit_pause=30.0)
    assert settings.agent_env["CLAUDE_CODE_MAX_RETRIES"] == "0"

    async with Cluster.open(repo, workers=4, settings=settings, claude=claude) as cluster:
        plan = (await cluster.plan("limited", [marker_task(f"R{i}") for i in range(count)])).plan
        started = time.monotonic()
        await cluster.dispatch(plan.id)
        with anyio.fail_after(90):
            status = await cluster.wait(plan.id)
        elapsed = time.monotonic() - started
        events = await cluster.store.events(plan.id)

    assert all(t.state is TaskState.MERGED for t in status.tasks), [(t.id, t.state, t.reason) for t in status.tasks]
    assert all(t.attempts == 1 for t in status.tasks)  # rate limits use up no attempt
    faults = [r for r in server.requests if r.outcome == "storm fault: rate_limit"]
    assert len(faults) == 5
    pauses = [e["data"]["seconds"] for e in events if e["kind"] == "pool_paused"]
    # All pauses together are shorter than one old fixed pause (the wall time, load-dependent,
    # is the benchmark's business: BENCHMARKS.md, "Adaptive rate-limit pauses").
    assert pauses and sum(pauses) < 30, pauses
    print(f"{count} tasks, {len(faults)} 429s, {len(pauses)} pool_paused events, {elapsed:.1f}s")


async def test_cancel_a_running_plan_leaves_no_process(
    claude: ClaudeBinary, repo: Path, model_server: StartServer, engine_settings: Settings
) -> None:
    sleeper = "python3 -c 'import time; time.sleep(120)'"
    server = model_server({"rules": [marker_rule(f"S{i}", bash_turn(f"({sleeper} &) ; {sleeper}")) for i in range(2)]})

    async with Cluster.open(repo, workers=2, settings=engine_settings(server), claude=claude) as cluster:
        plan = (await cluster.plan("sleepers", [marker_task("S0"), marker_task("S1"), marker_task("S2", "S0")])).plan
        await cluster.dispatch(plan.id)
        with anyio.fail_after(30):
            while cluster.running < 2 or len([r for r in server.requests if r.turn == 0]) < 2:  # noqa: ASYNC110
                await anyio.sleep(0.1)
        await anyio.sleep(1.5)  # the Bash tools are running now
        run_ids = [t.run_id for t in (await cluster.status(plan.id)).tasks if t.run_id]
        status = await cluster.cancel(plan.id)

    assert status.plan.state.value == "cancelled"
    assert {t.state for t in status.tasks} == {TaskState.CANCELLED}
    assert len(run_ids) == 2
    leftovers = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(RUN_TAG_VAR) in run_ids and proc.status() != psutil.STATUS_ZOMBIE:
                leftovers.append(proc.pid)
        except psutil.Error:
            continue
    assert leftovers == []


async def test_bad_input_is_refused_with_clear_errors(
    claude: ClaudeBinary, repo: Path, model_server: StartServer, engine_settings: Settings
) -> None:
    server = model_server({"rules": [marker_rule("A", write_turn("a.txt", "a"))]})

    async with Cluster.open(repo, settings=engine_settings(server), claude=claude) as cluster:
        with pytest.raises(PlanValidationError, match="dependency cycle: A → B → A"):
            await cluster.plan("cycle", [marker_task("A", "B"), marker_task("B", "A")])
        with pytest.raises(PlanValidationError, match="unknown task 'Z'"):
            await cluster.plan("unknown dep", [marker_task("A", "Z")])
        with pytest.raises(PlanValidationError, match="must start with a letter or digit"):
            await cluster.plan("bad id", [marker_task("-rf")])
        with pytest.raises(RepositoryError, match="must not be empty or start with '-'"):
            await cluster.plan("bad base", [marker_task("A")], base_ref="--upload-pack=evil")
        with pytest.raises(RepositoryError, match="'nope' is not a commit"):
            await cluster.plan("missing base", [marker_task("A")], base_ref="nope")
        with pytest.raises(RepositoryError, match="invalid branch name"):
            await cluster.plan("bad target", [marker_task("A")], target="-main")
        with pytest.raises(NotFoundError, match="no plan 'p-nope'"):
            await cluster.status("p-nope")
        plan = (await cluster.plan("ok", [marker_task("A")])).plan
        with pytest.raises(NotFoundError, match=r"has no task 'Q' \(tasks: A\)"):
            await cluster.cancel(plan.id, "Q")
        with pytest.raises(StateError, match="still running"):
            await cluster.merge(plan.id)


async def test_final_merge_refuses_a_dirty_checked_out_target(
    claude: ClaudeBinary, repo: Path, model_server: StartServer, engine_settings: Settings, git: Git
) -> None:
    server = model_server({"rules": [marker_rule("A", write_turn("a.txt", "a\n"))]})

    async with Cluster.open(repo, settings=engine_settings(server), claude=claude) as cluster:
        plan = (await cluster.plan("one", [marker_task("A")])).plan
        await cluster.dispatch(plan.id)
        with anyio.fail_after(60):
            await cluster.wait(plan.id)
        (repo / "README.md").write_text("local edit\n")
        with pytest.raises(DirtyWorktreeError, match="uncommitted changes"):
            await cluster.merge(plan.id)
        dry = await cluster.merge(plan.id, dry_run=True)
        assert dry.kind == "fast-forward" and not (repo / "a.txt").exists()
        git(repo, "checkout", "--", "README.md")
        done = await cluster.merge(plan.id)

    assert (repo / "a.txt").read_text() == "a\n"
    assert done.previous_tip == plan.base_commit and done.undo and plan.base_commit in done.undo


async def test_kill_9_mid_plan_then_reopen_finishes_every_task_exactly_once(
    claude: ClaudeBinary, repo: Path, model_server: StartServer, tmp_path: Path, engine_settings: Settings, git: Git
) -> None:
    # Long enough that B, C and E are surely mid-Bash when the engine is killed, even on a busy machine.
    slow = "python3 -c 'import time; time.sleep(10)' && echo {name} > {name}.txt"
    server = model_server(
        {
            "rules": [
                marker_rule("A", write_turn("a.txt", "a\n")),
                marker_rule("B", bash_turn(slow.format(name="b"))),
                marker_rule("C", bash_turn(slow.format(name="c"))),
                # D may be killed after its last turn, before its commit: then it is resumed
                # and asked once more ("D done" answers that).
                marker_rule("D", write_turn("d.txt", "d\n"), {"text": "wrote d"}),
                # E makes progress (a file) before its long Bash call: it is resumed, not restarted.
                marker_rule("E", write_turn("e.txt", "e\n"), bash_turn("python3 -c 'import time; time.sleep(10)'")),
            ]
        }
    )
    engine = engine_settings(server)
    tasks = [marker_task("A"), marker_task("B"), marker_task("C"), marker_task("D", "A"), marker_task("E")]
    plan_file = tmp_path / "plan-id"
    worker = subprocess.Popen(  # noqa: ASYNC220 - a separate engine process, killed with SIGKILL below
        [
            sys.executable,
            str(Path(__file__).parent / "crash_worker.py"),
            engine.model_dump_json(),
            json.dumps(tasks),
            str(repo),
            str(plan_file),
        ],
        stdin=subprocess.DEVNULL,
    )
    db = repo / ".git" / "claudecluster" / "state.db"

    def snapshot() -> dict[str, tuple[str, str | None, int | None]]:
        with contextlib.closing(sqlite3.connect(db, timeout=10)) as con:
            return {r[0]: (r[1], r[2], r[3]) for r in con.execute("SELECT id, state, run_id, pid FROM tasks")}

    try:
        with anyio.fail_after(60):
            while True:  # wait until A is merged while B, C and E are mid-Bash
                await anyio.sleep(0.2)
                if not plan_file.exists() or not db.exists():
                    continue
                rows = snapshot()
                e_in_bash = any(r.rule == "E" and r.turn == 1 for r in server.requests)
                if (
                    rows.get("A", ("",))[0] == "merged"
                    and all(rows.get(t, ("", None, None))[0] == "running" and rows[t][2] for t in ("B", "C", "E"))
                    and e_in_bash
                ):
                    break
        await anyio.sleep(0.3)
        killed_runs = {tid: row[1] for tid, row in snapshot().items() if row[0] == "running"}
    finally:
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait()
    assert set(killed_runs) >= {"B", "C", "E"}
    plan_id = plan_file.read_text()

    async with Cluster.open(repo, settings=engine, claude=claude) as cluster:
        with anyio.fail_after(90):
            status = await cluster.wait(plan_id)
        events = await cluster.store.events(plan_id)
        integration = status.plan.integration_branch

    assert {t.id: t.state for t in status.tasks} == dict.fromkeys("ABCDE", TaskState.MERGED), [
        (t.id, t.state, t.reason) for t in status.tasks
    ]
    # E had written e.txt: its session was resumed (same attempt, the model saw its history).
    assert status.task("E").attempts == 1
    assert [r.turn for r in server.requests if r.rule == "E"] == [0, 1, 2]
    # Exactly once: one 'merged' transition and one agent commit on the integration branch per task.
    merged_events = [e["task_id"] for e in events if e["kind"] == "state" and e["data"]["state"] == "merged"]
    assert sorted(merged_events) == ["A", "B", "C", "D", "E"]
    log = git(repo, "log", "--format=%B%x00", integration)
    for tid in "ABCDE":
        assert log.count(f"claudecluster plan {plan_id}, task {tid}\n") == 1, log
    # The interrupted tasks were re-run (attempt 2) or resumed, and nothing of the killed runs lives on.
    assert all(status.task(t).attempts >= 1 for t in killed_runs)
    survivors = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(RUN_TAG_VAR) in killed_runs.values() and proc.status() != psutil.STATUS_ZOMBIE:
                survivors.append(proc.pid)
        except psutil.Error:
            continue
    assert survivors == []
    assert not any(run_tmpdir(run_id).exists() for run_id in killed_runs.values())
    for tid in ("b", "c"):
        assert (tmp_path / "state").exists() and git(repo, "show", f"{integration}:{tid}.txt") == f"{tid}\n"


async def test_one_engine_per_repository(claude: ClaudeBinary, repo: Path, tmp_path: Path) -> None:
    engine = EngineSettings(state_dir=tmp_path / "state")

    async with Cluster.open(repo, settings=engine, claude=claude):
        with pytest.raises(StateError, match=rf"another claudecluster engine \(pid {os.getpid()}\)"):
            async with Cluster.open(repo, settings=engine, claude=claude):
                pass
    async with Cluster.open(repo, settings=engine, claude=claude):  # released on close
        pass


async def test_a_failed_resolve_blocks_dependents_and_the_plan_finishes(
    claude: ClaudeBinary,
    repo: Path,
    model_server: StartServer,
    monkeypatch: pytest.MonkeyPatch,
    engine_settings: Settings,
) -> None:
    # No git identity anywhere (a fresh machine): the engine's own commits and merges still work.
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", "/dev/null")
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    monkeypatch.setattr("claudecluster_mcp.workspace._identities", {})
    server = model_server(
        {
            "rules": [
                # The resolver gives up without touching the conflicted file: markers remain.
                {"name": "resolve", "match": "[claudecluster:resolve]", "turns": [{"text": "I cannot resolve this."}]},
                marker_rule("left", write_turn("shared.txt", "left\n")),
                marker_rule("right", write_turn("shared.txt", "right\n")),
                marker_rule("after", write_turn("after.txt", "after\n")),
            ]
        }
    )

    async with Cluster.open(repo, workers=2, settings=engine_settings(server), claude=claude) as cluster:
        plan = (
            await cluster.plan(
                "clash", [marker_task("left"), marker_task("right"), marker_task("after", "left", "right")]
            )
        ).plan
        await cluster.dispatch(plan.id)
        with anyio.fail_after(90):
            status = await cluster.wait(plan.id)

    states = {t.kind.value + ":" + t.state.value for t in status.tasks}
    assert states == {"task:merged", "task:conflicted", "resolve:failed", "task:blocked"}, [
        (t.id, t.state, t.reason) for t in status.tasks
    ]
    resolver = next(t for t in status.tasks if t.kind.value == "resolve")
    assert "conflict markers remain in shared.txt" in resolver.reason
    assert status.task("after").state is TaskState.BLOCKED
    assert status.plan.state.value == "done"


async def test_a_plan_cancelled_through_the_store_by_another_process_stops(
    claude: ClaudeBinary, repo: Path, model_server: StartServer, engine_settings: Settings
) -> None:
    sleeper = "python3 -c 'import time; time.sleep(120)'"
    server = model_server({"rules": [marker_rule("S", bash_turn(sleeper))]})

    async with Cluster.open(repo, settings=engine_settings(server), claude=claude) as cluster:
        plan = (await cluster.plan("sleep", [marker_task("S")])).plan
        await cluster.dispatch(plan.id)
        with anyio.fail_after(30):
            while not any(r.turn == 0 for r in server.requests):  # noqa: ASYNC110
                await anyio.sleep(0.1)
        await anyio.sleep(1)
        run_id = (await cluster.status(plan.id)).task("S").run_id
        # What `claudecluster cancel` does when another process owns the engine.
        async with Store.open(cluster.store.path) as other:
            await other.update_plan(plan.id, state=PlanState.CANCELLED)
        with anyio.fail_after(30):
            while (await cluster.status(plan.id)).task("S").state is not TaskState.CANCELLED:  # noqa: ASYNC110
                await anyio.sleep(0.2)

    leftovers = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if proc.environ().get(RUN_TAG_VAR) == run_id and proc.status() != psutil.STATUS_ZOMBIE:
                leftovers.append(proc.pid)
    assert leftovers == []
