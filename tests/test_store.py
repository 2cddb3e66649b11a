"""The SQLite store: plans and tasks round-trip, guarded moves, events, migrations, the merge
journal, concurrency, and the plan registry."""

from __future__ import annotations

import functools
import itertools
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from claudecluster_mcp import schema as schema_module
from claudecluster_mcp.errors import NotFoundError, StateError, StoreError
from claudecluster_mcp.models import (
    FINAL_STATES,
    TRANSITIONS,
    Category,
    MergePolicy,
    Plan,
    PlanState,
    Priority,
    Task,
    TaskKind,
    TaskState,
)
from claudecluster_mcp.registry import Registry
from claudecluster_mcp.schema import MIGRATIONS
from claudecluster_mcp.store import Store, now

pytestmark = pytest.mark.anyio

PlanFactory = Callable[..., Plan]
TaskFactory = Callable[..., Task]


@pytest.fixture
async def store(tmp_path: Path) -> Any:
    async with Store.open(tmp_path / "state.db") as opened:
        yield opened


# -- plans and tasks ------------------------------------------------------------------------


async def test_a_plan_and_its_tasks_read_back_equal(
    store: Store, tmp_path: Path, make_plan: PlanFactory, make_task: TaskFactory
) -> None:
    plan = make_plan(
        repo=tmp_path / "repo",
        merge_policy=MergePolicy.REPORT,
        gate=["make", "test"],
        warnings=["tasks 'a' and 'b' may edit the same files"],
        final_merge={"kind": "merge", "new_tip": "b" * 40},
    )
    tasks = [
        make_task("a", title="first", files=["src/*.py"], priority=Priority.HIGH, category=Category.TEST),
        make_task(
            "b",
            deps=["a"],
            kind=TaskKind.RESOLVE,
            resolves="a",
            worktree=tmp_path / "wt",
            changed_files=["x.py"],
            cost_usd=0.25,
            resume=True,
            not_before=12.5,
            started_at=now(),
        ),
    ]
    await store.create_plan(plan, tasks)

    assert await store.plan("p1") == plan
    assert await store.tasks("p1") == tasks
    assert await store.task("p1", "b") == tasks[1]
    assert await store.plans() == [plan]
    assert await store.plans([PlanState.PLANNED]) == [plan]
    assert await store.plans([PlanState.RUNNING, PlanState.DONE]) == []


async def test_tasks_keep_insertion_order_and_add_task_appends(
    store: Store, make_plan: PlanFactory, make_task: TaskFactory
) -> None:
    await store.create_plan(make_plan(), [make_task(t) for t in ("z", "m", "a")])
    await store.add_task(make_task("a.resolve", kind=TaskKind.RESOLVE, resolves="a"))
    assert [t.id for t in await store.tasks("p1")] == ["z", "m", "a", "a.resolve"]


async def test_create_plan_is_atomic(store: Store, make_plan: PlanFactory, make_task: TaskFactory) -> None:
    with pytest.raises(StoreError, match="UNIQUE"):
        await store.create_plan(make_plan(), [make_task("a"), make_task("a")])
    assert await store.plans() == []
    assert await store.tasks("p1") == []


async def test_unknown_plan_lists_existing_plan_ids(
    store: Store, make_plan: PlanFactory, make_task: TaskFactory
) -> None:
    with pytest.raises(NotFoundError, match=r"no plan 'nope' .*\(plans: none\)"):
        await store.plan("nope")
    await store.create_plan(make_plan("p1"), [make_task("a")])
    await store.create_plan(make_plan("p2"), [make_task("a", plan_id="p2")])
    with pytest.raises(NotFoundError, match=r"\(plans: p1, p2\)"):
        await store.plan("nope")


async def test_unknown_task_lists_the_plans_tasks(store: Store, make_plan: PlanFactory, make_task: TaskFactory) -> None:
    await store.create_plan(make_plan(), [make_task("a"), make_task("b")])
    with pytest.raises(NotFoundError, match=r"plan 'p1' has no task 'c' \(tasks: a, b\)"):
        await store.task("p1", "c")


async def test_update_plan(store: Store, make_plan: PlanFactory, make_task: TaskFactory) -> None:
    await store.create_plan(make_plan(), [make_task("a")])
    before = await store.plan("p1")
    await store.update_plan("p1", state=PlanState.RUNNING, final_merge={"kind": "fast-forward"})
    after = await store.plan("p1")
    assert after.state is PlanState.RUNNING
    assert after.final_merge == {"kind": "fast-forward"}
    assert after.updated_at >= before.updated_at
    with pytest.raises(NotFoundError):
        await store.update_plan("ghost", state=PlanState.DONE)


async def test_update_task_sets_fields_but_refuses_state(
    store: Store, tmp_path: Path, make_plan: PlanFactory, make_task: TaskFactory
) -> None:
    await store.create_plan(make_plan(), [make_task("a")])
    await store.update_task("p1", "a", pid=4242, worktree=tmp_path / "wt", changed_files=["f.py"], turns=3)
    task = await store.task("p1", "a")
    assert (task.pid, task.worktree, task.changed_files, task.turns) == (4242, tmp_path / "wt", ["f.py"], 3)
    with pytest.raises(ValueError, match="move"):
        await store.update_task("p1", "a", state=TaskState.MERGED)
    assert (await store.task("p1", "a")).state is TaskState.PENDING


async def test_running_tasks_need_a_run_id(store: Store, make_plan: PlanFactory, make_task: TaskFactory) -> None:
    with pytest.raises(StoreError, match="CHECK"):
        await store.create_plan(make_plan(), [make_task("a", state=TaskState.RUNNING, run_id=None)])


# -- moves ----------------------------------------------------------------------------------

ALL_PAIRS = list(itertools.product(TaskState, TaskState))


@pytest.mark.parametrize(("start", "to"), ALL_PAIRS, ids=[f"{a.value}->{b.value}" for a, b in ALL_PAIRS])
async def test_move_follows_the_transition_table(
    store: Store, start: TaskState, to: TaskState, make_plan: PlanFactory, make_task: TaskFactory
) -> None:
    await store.create_plan(make_plan(), [make_task("t", state=start)])
    if to in TRANSITIONS[start]:
        moved = await store.move("p1", "t", to, reason="because")
        assert moved.state is to
        assert moved.reason == "because"
        assert (await store.task("p1", "t")).state is to
        [event] = await store.events("p1", "t")
        assert event["kind"] == "state"
        assert event["data"] == {"state": to.value, "reason": "because"}
    else:
        with pytest.raises(StateError) as caught:
            await store.move("p1", "t", to, reason="because")
        message = str(caught.value)
        assert f"from {start.value} to {to.value}" in message
        assert "p1/t" in message
        task = await store.task("p1", "t")
        assert task.state is start, "a refused move changes nothing"
        assert task.reason == ""
        assert await store.events("p1") == []


async def test_move_of_an_unknown_task(store: Store, make_plan: PlanFactory, make_task: TaskFactory) -> None:
    await store.create_plan(make_plan(), [make_task("a")])
    with pytest.raises(NotFoundError, match="has no task 'ghost'"):
        await store.move("p1", "ghost", TaskState.READY)
    with pytest.raises(NotFoundError):
        await store.move("other-plan", "a", TaskState.READY)


async def test_move_writes_extra_fields_in_the_same_step(
    store: Store, make_plan: PlanFactory, make_task: TaskFactory
) -> None:
    await store.create_plan(make_plan(), [make_task("a", run_id=None)])
    await store.move("p1", "a", TaskState.READY)
    task = await store.move("p1", "a", TaskState.RUNNING, run_id="r1", attempts=1, started_at=now())
    assert (task.state, task.run_id, task.attempts) == (TaskState.RUNNING, "r1", 1)
    assert task.started_at is not None


async def test_every_move_appends_a_state_event_in_order(
    store: Store, make_plan: PlanFactory, make_task: TaskFactory
) -> None:
    await store.create_plan(make_plan(), [make_task("a"), make_task("b")])
    path = [TaskState.READY, TaskState.RUNNING, TaskState.WAITING, TaskState.RUNNING, TaskState.SUCCEEDED]
    for state in path:
        await store.move("p1", "a", state)
    await store.move("p1", "b", TaskState.CANCELLED)
    await store.move("p1", "a", TaskState.MERGED, commit="c" * 40)

    events = await store.events("p1", "a")
    assert [e["kind"] for e in events] == ["state"] * 6
    assert [e["data"]["state"] for e in events] == [s.value for s in path] + ["merged"]
    assert events[-1]["data"]["commit"] == "c" * 40
    assert [e["seq"] for e in events] == sorted(e["seq"] for e in events)
    assert all(e["plan_id"] == "p1" and e["task_id"] == "a" for e in events)

    everything = await store.events("p1")
    assert len(everything) == 7
    assert [e["task_id"] for e in everything] == ["a"] * 5 + ["b", "a"]


async def test_events_limit_and_after(store: Store, make_plan: PlanFactory, make_task: TaskFactory) -> None:
    await store.create_plan(make_plan(), [make_task("a")])
    for n in range(10):
        await store.append_event("p1", "a" if n % 2 else None, "note", {"n": n})

    everything = await store.events("p1")
    assert [e["data"]["n"] for e in everything] == list(range(10))

    last3 = await store.events("p1", limit=3)
    assert [e["data"]["n"] for e in last3] == [7, 8, 9]

    after = everything[5]["seq"]
    assert [e["data"]["n"] for e in await store.events("p1", after=after)] == [6, 7, 8, 9]
    assert [e["data"]["n"] for e in await store.events("p1", after=after, limit=2)] == [8, 9]
    assert [e["data"]["n"] for e in await store.events("p1", "a", limit=2)] == [7, 9]
    assert [e["data"]["n"] for e in await store.events("p1", "a", after=after)] == [7, 9]
    assert await store.events("p1", after=everything[-1]["seq"]) == []
    assert await store.events("other") == []


async def test_concurrent_moves_all_land(store: Store, make_plan: PlanFactory, make_task: TaskFactory) -> None:
    ids = [f"t{n}" for n in range(50)]
    await store.create_plan(make_plan(), [make_task(t) for t in ids])

    async def advance(task_id: str) -> None:
        await store.move("p1", task_id, TaskState.READY)
        await store.append_event("p1", task_id, "note", {"hello": task_id})
        await store.move("p1", task_id, TaskState.RUNNING, attempts=1)
        await store.update_task("p1", task_id, pid=1000)

    async with anyio.create_task_group() as tg:
        for task_id in ids:
            tg.start_soon(advance, task_id)

    tasks = await store.tasks("p1")
    assert {t.state for t in tasks} == {TaskState.RUNNING}
    assert {(t.attempts, t.pid) for t in tasks} == {(1, 1000)}
    events = await store.events("p1")
    assert len(events) == 150
    for task_id in ids:
        kinds = [(e["kind"], e["data"].get("state")) for e in events if e["task_id"] == task_id]
        assert kinds == [("state", "ready"), ("note", None), ("state", "running")]


async def test_a_write_cancelled_at_any_moment_leaves_the_store_usable(
    store: Store, make_plan: PlanFactory, make_task: TaskFactory
) -> None:
    # Shutdown cancels writers wherever they are, also while SQLite runs their BEGIN.
    await store.create_plan(make_plan(), [make_task("A")])
    for attempt in range(60):
        async with anyio.create_task_group() as tg:
            tg.start_soon(functools.partial(store.update_task, "p1", "A", pid=attempt))
            for _ in range(attempt % 6):
                await anyio.lowlevel.checkpoint()
            tg.cancel_scope.cancel()
    await store.update_task("p1", "A", pid=4242)
    assert (await store.task("p1", "A")).pid == 4242


async def test_concurrent_conflicting_moves_let_exactly_one_win(
    store: Store, make_plan: PlanFactory, make_task: TaskFactory
) -> None:
    await store.create_plan(make_plan(), [make_task("a", state=TaskState.RUNNING)])
    outcomes: list[str] = []

    async def finish(to: TaskState) -> None:
        try:
            await store.move("p1", "a", to)
            outcomes.append(to.value)
        except StateError:
            outcomes.append("refused")

    async with anyio.create_task_group() as tg:
        # None of these three may follow another, so only the first move can succeed.
        for to in (TaskState.FAILED, TaskState.TIMED_OUT, TaskState.PENDING) * 5:
            tg.start_soon(finish, to)

    winners = [o for o in outcomes if o != "refused"]
    assert len(outcomes) == 15
    assert len(winners) == 1
    assert (await store.task("p1", "a")).state.value == winners[0]
    assert len(await store.events("p1")) == 1


# -- merge journal --------------------------------------------------------------------------


async def test_merge_journal(store: Store) -> None:
    assert await store.open_merges() == []
    first = await store.begin_merge("p1", "a", "refs/heads/x", "1" * 40, "2" * 40)
    second = await store.begin_merge("p1", None, "refs/heads/y", "3" * 40, "4" * 40)
    assert second > first

    opened = await store.open_merges()
    assert [(m["seq"], m["task_id"], m["ref"], m["old"], m["new"], m["state"]) for m in opened] == [
        (first, "a", "refs/heads/x", "1" * 40, "2" * 40, "started"),
        (second, None, "refs/heads/y", "3" * 40, "4" * 40, "started"),
    ]

    await store.end_merge(first, "done")
    assert [m["seq"] for m in await store.open_merges()] == [second]
    await store.end_merge(first, "undone")  # a closed entry stays closed
    await store.end_merge(second, "undone")
    assert await store.open_merges() == []


async def test_merge_journal_rejects_unknown_states(store: Store) -> None:
    seq = await store.begin_merge("p1", "a", "refs/heads/x", "1" * 40, "2" * 40)
    with pytest.raises(StoreError, match="CHECK"):
        await store.end_merge(seq, "maybe")
    assert [m["seq"] for m in await store.open_merges()] == [seq]


# -- the database file ----------------------------------------------------------------------


async def test_database_is_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "dir" / "state.db"
    async with Store.open(path):
        pass
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    db.close()


async def test_state_survives_reopening(tmp_path: Path, make_plan: PlanFactory, make_task: TaskFactory) -> None:
    path = tmp_path / "state.db"
    async with Store.open(path) as first:
        await first.create_plan(make_plan(), [make_task("a")])
        await first.move("p1", "a", TaskState.READY)
        seq = await first.begin_merge("p1", "a", "refs/heads/x", "1" * 40, "2" * 40)
    async with Store.open(path) as second:
        assert (await second.plan("p1")).id == "p1"
        assert (await second.task("p1", "a")).state is TaskState.READY
        assert [e["data"]["state"] for e in await second.events("p1")] == ["ready"]
        assert [m["seq"] for m in await second.open_merges()] == [seq]


async def test_two_stores_on_one_file_see_each_others_writes(
    tmp_path: Path, make_plan: PlanFactory, make_task: TaskFactory
) -> None:
    path = tmp_path / "state.db"
    async with Store.open(path) as one, Store.open(path) as two:
        await one.create_plan(make_plan(), [make_task("a")])
        assert (await two.plan("p1")).goal == "make it better"
        await two.move("p1", "a", TaskState.READY)
        assert (await one.task("p1", "a")).state is TaskState.READY
        with pytest.raises(StateError, match="from ready to merged"):
            await one.move("p1", "a", TaskState.MERGED)


async def test_fresh_schema_equals_step_by_step_migration(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with Store.open(tmp_path / "fresh.db") as fresh:
        expected = await fresh.schema()
    assert {name for name, _ in expected} >= {"plans", "tasks", "events", "merges", "events_by_task"}

    path = tmp_path / "migrated.db"
    with sqlite3.connect(path) as db:  # an empty v0 database file
        assert db.execute("PRAGMA user_version").fetchone()[0] == 0
    db.close()
    for version in range(len(MIGRATIONS) + 1):
        monkeypatch.setattr(schema_module, "MIGRATIONS", MIGRATIONS[:version])
        async with Store.open(path):
            pass
        with sqlite3.connect(path) as db:
            assert db.execute("PRAGMA user_version").fetchone()[0] == version
        db.close()
    monkeypatch.undo()
    async with Store.open(path) as migrated:
        assert await migrated.schema() == expected


async def test_a_database_from_a_newer_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version={len(MIGRATIONS) + 1}")
    db.close()
    with pytest.raises(StoreError, match=r"newer claudecluster \(schema \d+, this version knows \d+\)"):
        async with Store.open(path):
            pass


async def test_an_unopenable_path_is_a_store_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StoreError, match="cannot open the state database"):
        async with Store.open(blocker / "state.db"):
            pass


# -- registry -------------------------------------------------------------------------------


def test_registry_maps_plan_ids_to_repositories(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "state" / "registry.db")
    repo_a, repo_b = tmp_path / "a", tmp_path / "b"
    registry.register("plan-a1", repo_a)
    registry.register("plan-b1", repo_b)
    registry.register("plan-a2", repo_a)
    assert registry.lookup("plan-a1") == repo_a
    assert registry.lookup("plan-b1") == repo_b
    assert registry.lookup("plan-a2") == repo_a
    # A second Registry object on the same file (another process) sees the same entries.
    assert Registry(tmp_path / "state" / "registry.db").lookup("plan-b1") == repo_b
    # Registering again moves a plan id.
    registry.register("plan-a1", repo_b)
    assert registry.lookup("plan-a1") == repo_b


def test_registry_unknown_id_lists_recent_ids(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "registry.db")
    with pytest.raises(NotFoundError, match=r"unknown plan id 'x' \(recent plans: none\)"):
        registry.lookup("x")
    registry.register("first", tmp_path / "a")
    registry.register("second", tmp_path / "b")
    with pytest.raises(NotFoundError) as caught:
        registry.lookup("x")
    message = str(caught.value)
    assert "unknown plan id 'x'" in message
    assert "first" in message
    assert "second" in message


def test_registry_on_an_unwritable_path_is_a_store_error(tmp_path: Path) -> None:
    (tmp_path / "registry.db").mkdir()
    with pytest.raises(StoreError, match="plan registry"):
        Registry(tmp_path / "registry.db").register("p", tmp_path)


async def test_a_gate_retry_is_one_move_and_gate_failed_is_final(
    store: Store, make_plan: PlanFactory, make_task: TaskFactory
) -> None:
    await store.create_plan(make_plan(), [make_task("a", state=TaskState.SUCCEEDED)])
    retried = await store.move("p1", "a", TaskState.PENDING, reason="gate failed (exit 1)")
    assert retried.state is TaskState.PENDING
    assert TaskState.GATE_FAILED in FINAL_STATES and not TRANSITIONS[TaskState.GATE_FAILED]
