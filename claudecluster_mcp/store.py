"""Durable state: one SQLite file per repository (WAL); its schema is in
:mod:`~claudecluster_mcp.schema`, the registry of plan ids in :mod:`~claudecluster_mcp.registry`.

Every state change is committed before it is acted on. Task moves are guarded updates
(``UPDATE … WHERE state IN (allowed predecessors)``) that fail loudly when the task was not
where the caller thought. Agent events go to an append-only table. A merge journal
(:mod:`~claudecluster_mcp.merge_journal`) makes ref updates recoverable.

The database lives in the repository's git directory (``.git/claudecluster/state.db``), so
``git status`` never shows it; the registry (``$XDG_STATE_HOME/claudecluster/registry.db``)
maps plan ids to repositories so that a plan id alone is enough, also after a restart.

No ``sqlite3.Error`` leaves this module: every public method runs inside
:func:`~claudecluster_mcp.sqlite_errors.sqlite_errors`, which turns it into a
:class:`StoreError` naming the file and what to do about it.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import aiosqlite
import anyio

from .errors import NotFoundError, StateError, StoreError
from .merge_journal import MergeJournal
from .models import FINAL_STATES, TRANSITIONS, Plan, PlanState, PlanStatus, Priority, Task, TaskState
from .redact import private_dir, private_file, redact_data
from .rows import brief_plan, brief_task, encoded_tasks, redacted_fields
from .schema import decode, encode, migrate, quote
from .signals import Change, Watchers
from .sqlite_errors import sqlite_errors, translate_sqlite_errors
from .workspace import git_common_dir

__all__ = ["Store", "StoredEvent", "TaskRow", "now", "state_db_path"]


async def state_db_path(repo: Path) -> Path:
    """Where the state database of ``repo`` lives: ``claudecluster/state.db`` in the
    repository's common git directory (right also when ``.git`` is a file, as in a linked
    worktree or a submodule)."""
    return await git_common_dir(repo) / "claudecluster" / "state.db"


def now() -> datetime:
    """The current UTC time (what the store records)."""
    return datetime.now(UTC)


class TaskRow(NamedTuple):
    """What the scheduler needs of a task."""

    id: str
    state: TaskState
    deps: list[str]
    priority: Priority
    not_before: float | None
    seq: int
    resolves: str | None = None

    @property
    def files(self) -> list[str]:
        """Not loaded in this view."""
        return []


class StoredEvent(dict[str, Any]):
    """An event row: seq, plan_id, task_id, at, kind, data."""


_STATE_DB = "the state database"


@translate_sqlite_errors(_STATE_DB)
class Store(MergeJournal):
    """The state of every plan of one repository."""

    def __init__(self, db: aiosqlite.Connection, path: Path) -> None:
        self._db = db
        self.path = path
        # One connection: transactions of concurrent tasks must not interleave on it.
        self._lock = anyio.Lock()
        #: Observers of committed changes (plans created, task moves, agent events, plan
        #: updates); each is told after its transaction committed, never inside it.
        self.watchers = Watchers()

    @classmethod
    @asynccontextmanager
    async def open(cls, path: Path) -> AsyncIterator[Store]:
        """Open (creating and migrating as needed) the database at ``path``."""
        try:
            _make_private(path)
        except OSError as exc:
            raise StoreError(f"cannot open the state database {path}: {exc}") from exc
        with sqlite_errors(_STATE_DB, path):
            db = await aiosqlite.connect(path, isolation_level=None)
        try:
            with sqlite_errors(_STATE_DB, path):
                db.row_factory = aiosqlite.Row
                await db.execute("PRAGMA journal_mode=WAL")
                await db.execute("PRAGMA busy_timeout=10000")
                await db.execute("PRAGMA synchronous=NORMAL")
                await db.execute("PRAGMA foreign_keys=ON")
                store = cls(db, path)
                await migrate(db, path)
            yield store
        finally:
            # A cancelled close would strand the db thread.
            with anyio.CancelScope(shield=True), sqlite_errors(_STATE_DB, path):
                await db.close()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """A write transaction (``BEGIN IMMEDIATE`` … ``COMMIT``; rolled back on error)."""
        async with self._lock:
            with sqlite_errors(_STATE_DB, self.path):
                # Cancelled while its thread runs, a BEGIN would still open the transaction, and
                # every later one on this connection would fail: it finishes, then the body sees
                # the cancellation and rolls back.
                with anyio.CancelScope(shield=True):
                    await self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    # SQLite rolls back by itself on some errors (a full disk): then a ROLLBACK
                    # would fail and hide the error that matters.
                    if self._db.in_transaction:
                        with anyio.CancelScope(shield=True):
                            await self._db.execute("ROLLBACK")
                    raise
                with anyio.CancelScope(shield=True):
                    await self._db.execute("COMMIT")

    async def _rows(self, query: str, args: Sequence[Any] = ()) -> list[aiosqlite.Row]:
        """Every row of a read, in one trip to the connection's thread (a cursor takes three:
        under load each trip waits for the event loop, and a status call made nine)."""
        return list(await self._db.execute_fetchall(query, args))

    async def _one(self, query: str, args: Sequence[Any] = ()) -> aiosqlite.Row | None:
        """The first row of a read (None without), in one trip."""
        rows = await self._rows(query, args)
        return rows[0] if rows else None

    # -- plans ------------------------------------------------------------------------------

    async def create_plan(self, plan: Plan, tasks: Sequence[Task]) -> None:
        """Store a plan and its tasks atomically."""
        # Encoding thousands of tasks takes a while: off the event loop.
        columns, values = await anyio.to_thread.run_sync(encoded_tasks, tasks)
        async with self.transaction() as db:
            row = plan.model_dump()
            await db.execute(
                f"INSERT INTO plans ({', '.join(map(quote, row))}) VALUES ({', '.join('?' * len(row))})",
                [encode(k, v) for k, v in row.items()],
            )
            if values:
                await db.executemany(
                    f"INSERT INTO tasks ({', '.join(map(quote, columns))}) VALUES ({', '.join('?' * len(columns))})",
                    values,
                )
        self.watchers.emit(Change(plan.id, None, "plan", {"goal": plan.goal, "tasks": len(tasks)}))

    async def _insert_task(self, db: aiosqlite.Connection, task: Task, seq: int) -> None:
        row = {**task.model_dump(), "seq": seq}
        await db.execute(
            f"INSERT INTO tasks ({', '.join(map(quote, row))}) VALUES ({', '.join('?' * len(row))})",
            [encode(k, v) for k, v in row.items()],
        )

    async def add_task(self, task: Task) -> None:
        """Add a task to an existing plan (resolve tasks)."""
        async with self.transaction() as db:
            async with db.execute(
                "SELECT COALESCE(MAX(seq), -1) + 1 FROM tasks WHERE plan_id = ?", [task.plan_id]
            ) as c:
                row = await c.fetchone()
            await self._insert_task(db, task, int(row[0]) if row else 0)
        self.watchers.emit(Change(task.plan_id, task.id, "task_added", {"state": task.state.value}))

    async def plan(self, plan_id: str) -> Plan:
        """The plan with this id (:class:`NotFoundError` if none)."""
        row = await self._one("SELECT * FROM plans WHERE id = ?", [plan_id])
        if row is None:
            known = ", ".join(p.id for p in await self.plans()) or "none"
            raise NotFoundError(f"no plan {plan_id!r} in {self.path.parent.parent} (plans: {known})")
        return Plan.model_validate(decode(row))

    async def plans(self, states: Iterable[PlanState] | None = None) -> list[Plan]:
        """All plans (optionally only those in ``states``), oldest first."""
        query, args = "SELECT * FROM plans", []
        if states is not None:
            wanted = [s.value for s in states]
            query += f" WHERE state IN ({', '.join('?' * len(wanted))})"
            args = wanted
        return [Plan.model_validate(decode(row)) for row in await self._rows(query + " ORDER BY created_at", args)]

    async def update_plan(self, plan_id: str, **fields: Any) -> None:
        """Set plan columns (``state``, ``final_merge``, …)."""
        fields = {**redacted_fields(fields), "updated_at": now()}
        sets = ", ".join(f"{quote(k)} = ?" for k in fields)
        async with self.transaction() as db:
            cursor = await db.execute(
                f"UPDATE plans SET {sets} WHERE id = ?",
                [*(encode(k, v) for k, v in fields.items()), plan_id],
            )
            if cursor.rowcount == 0:
                raise NotFoundError(f"no plan {plan_id!r}")
        self.watchers.emit(Change(plan_id, None, "plan_state", brief_plan(fields)))

    # -- tasks ------------------------------------------------------------------------------

    async def tasks(
        self, plan_id: str, *, states: Iterable[TaskState] | None = None, limit: int | None = None
    ) -> list[Task]:
        """The plan's tasks in stored (topological) order (only ``states``, at most ``limit``)."""
        query, args = "SELECT * FROM tasks WHERE plan_id = ?", [plan_id]
        if states is not None:
            wanted = [s.value for s in states]
            query += f" AND state IN ({', '.join('?' * len(wanted))})"
            args += wanted
        query += " ORDER BY seq"
        if limit is not None:
            query += f" LIMIT {int(limit)}"
        return [Task.model_validate(decode(row)) for row in await self._rows(query, args)]

    async def tally(self, plan_id: str) -> tuple[dict[str, int], float, int]:
        """(tasks by state, total cost in USD, total tokens) of a plan, computed by SQLite."""
        rows = await self._rows(
            "SELECT state, COUNT(*), SUM(cost_usd), SUM(input_tokens + output_tokens) FROM tasks "
            "WHERE plan_id = ? GROUP BY state",
            [plan_id],
        )
        counts = {row[0]: int(row[1]) for row in rows}
        return counts, float(sum(row[2] or 0 for row in rows)), int(sum(row[3] or 0 for row in rows))

    async def status(self, plan_id: str, *, focus: int | None = None, task_id: str | None = None) -> PlanStatus:
        """The plan, its tasks in order, counts by state and totals: the one place a
        :class:`PlanStatus` is built. With ``task_id``, only that task is listed. With
        ``focus``, a plan of more than ``focus`` tasks lists only the tasks that need attention
        (running, waiting, awaiting merge, failed in some way; at most ``focus``); the others
        are in the counts and ``omitted``."""
        plan = await self.plan(plan_id)
        counts, cost, tokens = await self.tally(plan_id)
        total = sum(counts.values())
        if task_id is not None:
            tasks = [await self.task(plan_id, task_id)]
        elif focus is not None and total > focus:
            quiet = (TaskState.PENDING, TaskState.READY, TaskState.MERGED)
            tasks = await self.tasks(plan_id, states=[s for s in TaskState if s not in quiet], limit=focus)
        else:
            tasks = await self.tasks(plan_id)
        return PlanStatus(
            plan=plan, tasks=tasks, counts=counts, total_cost_usd=cost, total_tokens=tokens, omitted=total - len(tasks)
        )

    async def overview(self) -> list[PlanStatus]:
        """Every plan, oldest first, with counts and totals but no tasks listed."""
        overview = []
        for plan in await self.plans():
            counts, cost, tokens = await self.tally(plan.id)
            overview.append(
                PlanStatus(
                    plan=plan,
                    tasks=[],
                    counts=counts,
                    total_cost_usd=cost,
                    total_tokens=tokens,
                    omitted=sum(counts.values()),
                )
            )
        return overview

    async def task_rows(self, plan_id: str) -> list[TaskRow]:
        """The scheduling view of a plan's tasks (cheap: no model validation)."""
        rows = await self._rows(
            "SELECT id, state, deps, priority, not_before, seq, resolves FROM tasks WHERE plan_id = ? ORDER BY seq",
            [plan_id],
        )
        return [
            TaskRow(row[0], TaskState(row[1]), json.loads(row[2]), Priority(row[3]), row[4], row[5], row[6])
            for row in rows
        ]

    async def unfinished(self, plan_id: str) -> int:
        """How many tasks of the plan are not in a final state."""
        finals = [s.value for s in FINAL_STATES]
        row = await self._one(
            f"SELECT COUNT(*) FROM tasks WHERE plan_id = ? AND state NOT IN ({', '.join('?' * len(finals))})",
            [plan_id, *finals],
        )
        return int(row[0]) if row else 0

    async def task(self, plan_id: str, task_id: str) -> Task:
        """One task (:class:`NotFoundError` naming the plan's tasks if unknown)."""
        row = await self._one("SELECT * FROM tasks WHERE plan_id = ? AND id = ?", [plan_id, task_id])
        if row is None:
            known = ", ".join(t.id for t in await self.tasks(plan_id)) or "none"
            raise NotFoundError(f"plan {plan_id!r} has no task {task_id!r} (tasks: {known})")
        return Task.model_validate(decode(row))

    async def move(self, plan_id: str, task_id: str, to: TaskState, **fields: Any) -> Task:
        """Guarded state transition; raises :class:`StateError` if ``to`` is not allowed from
        the task's current state. Extra ``fields`` are written in the same statement."""
        allowed_from = [s.value for s, targets in TRANSITIONS.items() if to in targets]
        fields = {**redacted_fields(fields), "state": to, "updated_at": now()}
        sets = ", ".join(f"{quote(k)} = ?" for k in fields)
        async with self.transaction() as db:
            cursor = await db.execute(
                f"UPDATE tasks SET {sets} WHERE plan_id = ? AND id = ? "
                f"AND state IN ({', '.join('?' * len(allowed_from))})",
                [*(encode(k, v) for k, v in fields.items()), plan_id, task_id, *allowed_from],
            )
            if cursor.rowcount == 0:
                async with db.execute("SELECT state FROM tasks WHERE plan_id = ? AND id = ?", [plan_id, task_id]) as c:
                    row = await c.fetchone()
                if row is None:
                    raise NotFoundError(f"plan {plan_id!r} has no task {task_id!r}")
                raise StateError(f"task {plan_id}/{task_id} cannot move from {row[0]} to {to.value}")
            stored = await self._event(db, plan_id, task_id, "state", {"state": to.value, **brief_task(fields)})
        self.watchers.emit(Change(plan_id, task_id, "state", stored))
        return await self.task(plan_id, task_id)

    async def update_task(self, plan_id: str, task_id: str, **fields: Any) -> None:
        """Set non-state task columns (progress, pid, worktree, …)."""
        if "state" in fields:
            raise ValueError("use move() to change a task's state")
        fields = {**redacted_fields(fields), "updated_at": now()}
        sets = ", ".join(f"{quote(k)} = ?" for k in fields)
        async with self.transaction() as db:
            await db.execute(
                f"UPDATE tasks SET {sets} WHERE plan_id = ? AND id = ?",
                [*(encode(k, v) for k, v in fields.items()), plan_id, task_id],
            )

    # -- events -----------------------------------------------------------------------------

    @staticmethod
    async def _event(
        db: aiosqlite.Connection,
        plan_id: str,
        task_id: str | None,
        kind: str,
        data: Mapping[str, Any],
    ) -> Any:
        """Append an event row; returns ``data`` as stored (redacted)."""
        clean = redact_data(data)
        await db.execute(
            "INSERT INTO events (plan_id, task_id, at, kind, data) VALUES (?, ?, ?, ?, ?)",
            [plan_id, task_id, now().isoformat(), kind, json.dumps(clean, default=str)],
        )
        return clean

    async def append_event(self, plan_id: str, task_id: str | None, kind: str, data: Mapping[str, Any]) -> None:
        """Append to the event log (never updated or deleted)."""
        async with self.transaction() as db:
            stored = await self._event(db, plan_id, task_id, kind, data)
        self.watchers.emit(Change(plan_id, task_id, kind, stored))

    async def events(
        self, plan_id: str, task_id: str | None = None, *, after: int = 0, limit: int | None = None
    ) -> list[StoredEvent]:
        """Events of a plan (or one task), oldest first, after sequence number ``after``."""
        query = "SELECT * FROM events WHERE plan_id = ? AND seq > ?"
        args: list[Any] = [plan_id, after]
        if task_id is not None:
            query += " AND task_id = ?"
            args.append(task_id)
        query += " ORDER BY seq"
        if limit is not None:
            query = f"SELECT * FROM ({query.replace('ORDER BY seq', 'ORDER BY seq DESC')} LIMIT ?) ORDER BY seq"
            args.append(limit)
        rows = await self._rows(query, args)
        return [StoredEvent({**dict(row), "data": json.loads(row["data"])}) for row in rows]

    async def schema(self) -> list[tuple[str, str]]:
        """(name, sql) of every table and index, for the migrated-equals-fresh test."""
        rows = await self._rows(
            "SELECT name, sql FROM sqlite_master WHERE sql IS NOT NULL AND name NOT LIKE 'sqlite_%' ORDER BY name"
        )
        return [(row[0], row[1]) for row in rows]


def _make_private(path: Path) -> None:
    """The database's directory 0700 and its files (database, WAL, shared memory, lock) 0600;
    SQLite gives the WAL and shm files the database file's mode, so it is created first."""
    private_dir(path.parent)
    private_file(path)
    for sibling in path.parent.iterdir():
        private_file(sibling, create=False)
