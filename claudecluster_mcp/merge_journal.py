"""The merge journal of the store: what makes ref updates recoverable. A merge is recorded
as ``started`` with the old and new tips before the ref moves, and closed as ``done`` or
``undone``; recovery reads the entries a crash left open. Also the plans' counts of merge
batches and gate runs. Part of :class:`~claudecluster_mcp.store.Store` (a base class of it)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiosqlite

from .errors import NotFoundError
from .sqlite_errors import translate_sqlite_errors

__all__ = ["MergeJournal"]


@translate_sqlite_errors("the state database")
class MergeJournal:
    """The journal's operations; :class:`~claudecluster_mcp.store.Store` provides the
    connection (its transactions and reads)."""

    path: Path

    def transaction(self) -> AbstractAsyncContextManager[aiosqlite.Connection]:
        """A write transaction (see :meth:`Store.transaction`)."""
        raise NotImplementedError

    async def _rows(self, query: str, args: Sequence[Any] = ()) -> list[aiosqlite.Row]:
        raise NotImplementedError

    async def begin_merge(
        self, plan_id: str, task_id: str | None, ref: str, old: str, new: str, *, batch: Sequence[str] = ()
    ) -> int:
        """Record a ref update about to happen (landing ``task_id``, or every task of
        ``batch``); returns its journal number."""
        at, tasks = datetime.now(UTC).isoformat(), json.dumps(list(batch)) if batch else None
        async with self.transaction() as db:
            cursor = await db.execute(
                "INSERT INTO merges (plan_id, task_id, ref, old, new, state, at, task_ids) "
                "VALUES (?, ?, ?, ?, ?, 'started', ?, ?)",
                [plan_id, task_id, ref, old, new, at, tasks],
            )
            return int(cursor.lastrowid or 0)

    async def end_merge(self, seq: int, state: str) -> None:
        """Close a journal entry as ``done`` or ``undone``."""
        async with self.transaction() as db:
            await db.execute("UPDATE merges SET state = ? WHERE seq = ? AND state = 'started'", [state, seq])

    async def open_merges(self) -> list[dict[str, Any]]:
        """Journal entries left ``started`` (a crash between recording and closing); an
        entry's ``tasks`` are the tasks it lands (none for a plan's final merge)."""
        rows = [dict(row) for row in await self._rows("SELECT * FROM merges WHERE state = 'started' ORDER BY seq")]
        for row in rows:
            batch = json.loads(row["task_ids"]) if row["task_ids"] else []
            row["tasks"] = batch or ([row["task_id"]] if row["task_id"] else [])
        return rows

    async def count_merges(self, plan_id: str, *, batches: int = 0, gate_runs: int = 0) -> int:
        """Add to a plan's count of merge batches and gate runs; returns its batch count."""
        async with (
            self.transaction() as db,
            db.execute(
                "UPDATE plans SET merge_batches = merge_batches + ?, gate_runs = gate_runs + ? "
                "WHERE id = ? RETURNING merge_batches",
                [batches, gate_runs, plan_id],
            ) as cursor,
        ):
            row = await cursor.fetchone()
        if row is None:
            raise NotFoundError(f"no plan {plan_id!r}")
        return int(row[0])
