"""The state database's schema: ordered migrations, each run in one transaction together
with its version bump (``PRAGMA user_version``). A migration's text never changes once
released; a fresh database and a migrated one end with the same schema (tested)."""

from __future__ import annotations

import enum
import json
import sqlite3
from datetime import datetime
from pathlib import Path
from typing import Any

import aiosqlite

from .errors import StoreError

__all__ = ["JSON_COLUMNS", "MIGRATIONS", "decode", "encode", "migrate", "quote"]

# Frozen per migration: a migration's text never changes once released.
_TASK_STATES = (
    "'pending', 'ready', 'running', 'waiting', 'succeeded', 'failed', 'timed_out', "
    "'cancelled', 'blocked', 'merged', 'conflicted', 'gate_failed'"
)
_TASK_STATES_3 = _TASK_STATES + ", 'held'"
_PLAN_STATES_1 = "'planned', 'running', 'done', 'cancelled', 'merged'"
_PLAN_STATES_2 = _PLAN_STATES_1 + ", 'failed'"
_PLAN_COLUMNS = (
    "id, repo, goal, state, base_ref, base_commit, target_branch, integration_branch, "
    "merge_policy, gate, warnings, final_merge, created_at, updated_at"
)

_TASK_COLUMNS = (
    "plan_id, id, seq, kind, title, prompt, deps, priority, category, files, state, attempts, reason, branch, "
    'base_commit, "commit", merge_commit, worktree, session_id, run_id, pid, pid_started, turns, cost_usd, '
    "input_tokens, output_tokens, changed_files, resolves, resume, last_activity, not_before, created_at, "
    "started_at, finished_at, updated_at"
)

#: Ordered schema migrations; each runs in one transaction with its version bump.
MIGRATIONS: list[str] = [
    f"""
    CREATE TABLE plans (
        id TEXT PRIMARY KEY,
        repo TEXT NOT NULL,
        goal TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ({_PLAN_STATES_1})),
        base_ref TEXT NOT NULL,
        base_commit TEXT NOT NULL,
        target_branch TEXT NOT NULL,
        integration_branch TEXT NOT NULL,
        merge_policy TEXT NOT NULL,
        gate TEXT,
        warnings TEXT NOT NULL DEFAULT '[]',
        final_merge TEXT,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL
    );
    CREATE TABLE tasks (
        plan_id TEXT NOT NULL REFERENCES plans(id),
        id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        kind TEXT NOT NULL CHECK (kind IN ('task', 'resolve')),
        title TEXT NOT NULL DEFAULT '',
        prompt TEXT NOT NULL CHECK (length(trim(prompt)) > 0),
        deps TEXT NOT NULL DEFAULT '[]',
        priority TEXT NOT NULL CHECK (priority IN ('low', 'medium', 'high', 'critical')),
        category TEXT NOT NULL CHECK (category IN ('code', 'test', 'refactor', 'analyze', 'document')),
        files TEXT NOT NULL DEFAULT '[]',
        state TEXT NOT NULL CHECK (state IN ({_TASK_STATES})),
        attempts INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
        reason TEXT NOT NULL DEFAULT '',
        branch TEXT,
        base_commit TEXT,
        "commit" TEXT,
        merge_commit TEXT,
        worktree TEXT,
        session_id TEXT,
        run_id TEXT,
        pid INTEGER,
        pid_started REAL,
        turns INTEGER NOT NULL DEFAULT 0,
        cost_usd REAL NOT NULL DEFAULT 0,
        input_tokens INTEGER NOT NULL DEFAULT 0,
        output_tokens INTEGER NOT NULL DEFAULT 0,
        changed_files TEXT NOT NULL DEFAULT '[]',
        resolves TEXT,
        resume INTEGER NOT NULL DEFAULT 0,
        last_activity TEXT NOT NULL DEFAULT '',
        not_before REAL,
        created_at TEXT NOT NULL,
        started_at TEXT,
        finished_at TEXT,
        updated_at TEXT NOT NULL,
        PRIMARY KEY (plan_id, id),
        CHECK (state NOT IN ('running', 'waiting') OR run_id IS NOT NULL)
    );
    CREATE TABLE events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        plan_id TEXT NOT NULL,
        task_id TEXT,
        at TEXT NOT NULL,
        kind TEXT NOT NULL,
        data TEXT NOT NULL DEFAULT '{{}}'
    );
    CREATE INDEX events_by_task ON events (plan_id, task_id, seq);
    CREATE TABLE merges (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        plan_id TEXT NOT NULL,
        task_id TEXT,
        ref TEXT NOT NULL,
        old TEXT NOT NULL,
        new TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('started', 'done', 'undone')),
        at TEXT NOT NULL
    );
    """,
    # 2: plans can fail (an engine error ended them) and say why.
    f"""
    CREATE TABLE plans_v2 (
        id TEXT PRIMARY KEY,
        repo TEXT NOT NULL,
        goal TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ({_PLAN_STATES_2})),
        base_ref TEXT NOT NULL,
        base_commit TEXT NOT NULL,
        target_branch TEXT NOT NULL,
        integration_branch TEXT NOT NULL,
        merge_policy TEXT NOT NULL,
        gate TEXT,
        warnings TEXT NOT NULL DEFAULT '[]',
        final_merge TEXT,
        reason TEXT NOT NULL DEFAULT '',
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL
    );
    INSERT INTO plans_v2 ({_PLAN_COLUMNS}) SELECT {_PLAN_COLUMNS} FROM plans;
    DROP TABLE plans;
    ALTER TABLE plans_v2 RENAME TO plans;
    """,
    # 3: a task whose changes touch protected paths is held for the user's approval.
    f"""
    CREATE TABLE tasks_v3 (
        plan_id TEXT NOT NULL REFERENCES plans(id),
        id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        kind TEXT NOT NULL CHECK (kind IN ('task', 'resolve')),
        title TEXT NOT NULL DEFAULT '',
        prompt TEXT NOT NULL CHECK (length(trim(prompt)) > 0),
        deps TEXT NOT NULL DEFAULT '[]',
        priority TEXT NOT NULL CHECK (priority IN ('low', 'medium', 'high', 'critical')),
        category TEXT NOT NULL CHECK (category IN ('code', 'test', 'refactor', 'analyze', 'document')),
        files TEXT NOT NULL DEFAULT '[]',
        state TEXT NOT NULL CHECK (state IN ({_TASK_STATES_3})),
        attempts INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
        reason TEXT NOT NULL DEFAULT '',
        branch TEXT,
        base_commit TEXT,
        "commit" TEXT,
        merge_commit TEXT,
        worktree TEXT,
        session_id TEXT,
        run_id TEXT,
        pid INTEGER,
        pid_started REAL,
        turns INTEGER NOT NULL DEFAULT 0,
        cost_usd REAL NOT NULL DEFAULT 0,
        input_tokens INTEGER NOT NULL DEFAULT 0,
        output_tokens INTEGER NOT NULL DEFAULT 0,
        changed_files TEXT NOT NULL DEFAULT '[]',
        resolves TEXT,
        resume INTEGER NOT NULL DEFAULT 0,
        last_activity TEXT NOT NULL DEFAULT '',
        not_before REAL,
        approved INTEGER NOT NULL DEFAULT 0,
        created_at TEXT NOT NULL,
        started_at TEXT,
        finished_at TEXT,
        updated_at TEXT NOT NULL,
        PRIMARY KEY (plan_id, id),
        CHECK (state NOT IN ('running', 'waiting') OR run_id IS NOT NULL)
    );
    INSERT INTO tasks_v3 ({_TASK_COLUMNS}) SELECT {_TASK_COLUMNS} FROM tasks;
    DROP TABLE tasks;
    ALTER TABLE tasks_v3 RENAME TO tasks;
    """,
    # 4: worktree setup time and permission warnings per task; a cost and token budget per plan.
    """
    ALTER TABLE tasks ADD COLUMN setup_s REAL;
    ALTER TABLE tasks ADD COLUMN warnings TEXT NOT NULL DEFAULT '[]';
    ALTER TABLE plans ADD COLUMN max_cost_usd REAL CHECK (max_cost_usd IS NULL OR max_cost_usd > 0);
    ALTER TABLE plans ADD COLUMN max_tokens INTEGER CHECK (max_tokens IS NULL OR max_tokens > 0);
    """,
    # 5: the merge queue lands batches: a journal entry names every task it lands; a task
    # knows its batch, a plan counts its batches and gate runs.
    """
    ALTER TABLE merges ADD COLUMN task_ids TEXT;
    ALTER TABLE tasks ADD COLUMN merge_batch INTEGER;
    ALTER TABLE plans ADD COLUMN merge_batches INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE plans ADD COLUMN gate_runs INTEGER NOT NULL DEFAULT 0;
    """,
]


async def migrate(db: aiosqlite.Connection, path: Path) -> None:
    """Bring the database to the latest schema, one migration per transaction with its
    version bump; refuse a database from a newer claudecluster."""
    async with db.execute("PRAGMA user_version") as cursor:
        row = await cursor.fetchone()
    version = int(row[0]) if row else 0
    if version > len(MIGRATIONS):
        raise StoreError(
            f"the state database {path} is from a newer claudecluster "
            f"(schema {version}, this version knows {len(MIGRATIONS)})"
        )
    # A migration may rebuild a table that others reference; SQLite allows that only
    # with foreign keys off, which cannot change inside a transaction.
    await db.execute("PRAGMA foreign_keys=OFF")
    for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
        statements = [s for s in script.split(";") if s.strip()]
        await db.execute("BEGIN IMMEDIATE")
        try:
            for statement in statements:
                await db.execute(statement)
            await db.execute(f"PRAGMA user_version={number}")
            await db.execute("COMMIT")
        except sqlite3.Error as exc:
            await db.execute("ROLLBACK")
            raise StoreError(f"migrating {path} to schema {number} failed: {exc}") from exc
    await db.execute("PRAGMA foreign_keys=ON")


# -- how columns hold values ----------------------------------------------------------------

JSON_COLUMNS = {"deps", "files", "changed_files", "warnings", "gate", "final_merge"}


def encode(column: str, value: Any) -> Any:
    """A Python value as its column stores it (JSON, enum value, ISO time, path text)."""
    if value is None:
        return None
    if column in JSON_COLUMNS:
        return json.dumps(value)
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Path):
        return str(value)
    return value


def decode(row: aiosqlite.Row) -> dict[str, Any]:
    """A row as a dict, JSON columns decoded."""
    data = dict(row)
    for column in JSON_COLUMNS & data.keys():
        if data[column] is not None:
            data[column] = json.loads(data[column])
    return data


def quote(column: str) -> str:
    """A column name quoted for SQL, refused unless it is a plain identifier."""
    if not column.replace("_", "").isalnum():
        raise ValueError(f"bad column name {column!r}")
    return f'"{column}"'
