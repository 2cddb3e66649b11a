"""The plan registry: plan id → repository, across repositories, in a small SQLite file in
the state directory (``$XDG_STATE_HOME/claudecluster/registry.db``), so that a plan id alone
is enough for every command and tool, also after a restart."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

from .errors import NotFoundError
from .redact import private_dir, private_file
from .sqlite_errors import sqlite_errors
from .store import now

__all__ = ["Registry"]

_REGISTRY = "the plan registry"


class Registry:
    """Plan id → repository, across repositories (a small SQLite file in the state dir)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _connect(self) -> sqlite3.Connection:
        private_dir(self.path.parent)  # the state dir: worktrees, transcripts, this registry
        private_file(self.path)
        db = sqlite3.connect(self.path, timeout=10)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(
            "CREATE TABLE IF NOT EXISTS plans (id TEXT PRIMARY KEY, repo TEXT NOT NULL, created_at TEXT NOT NULL)"
        )
        return db

    def register(self, plan_id: str, repo: Path) -> None:
        """Remember which repository holds ``plan_id``."""
        with sqlite_errors(_REGISTRY, self.path), contextlib.closing(self._connect()) as db, db:
            db.execute(
                "INSERT OR REPLACE INTO plans VALUES (?, ?, ?)",
                [plan_id, str(repo), now().isoformat()],
            )

    def lookup(self, plan_id: str) -> Path:
        """The repository of ``plan_id`` (:class:`NotFoundError` listing recent plans if unknown)."""
        with sqlite_errors(_REGISTRY, self.path), contextlib.closing(self._connect()) as db:
            row = db.execute("SELECT repo FROM plans WHERE id = ?", [plan_id]).fetchone()
            recent = [r[0] for r in db.execute("SELECT id FROM plans ORDER BY created_at DESC LIMIT 10")]
        if row is None:
            raise NotFoundError(f"unknown plan id {plan_id!r} (recent plans: {', '.join(recent) or 'none'})")
        return Path(row[0])

    def plans(self, prefix: str = "", limit: int = 100) -> list[tuple[str, Path]]:
        """(plan id, repository) of the newest ``limit`` plans whose id starts with ``prefix``."""
        if not self.path.exists():
            return []
        with sqlite_errors(_REGISTRY, self.path), contextlib.closing(self._connect()) as db:
            rows = db.execute(
                "SELECT id, repo FROM plans WHERE substr(id, 1, ?) = ? ORDER BY created_at DESC LIMIT ?",
                [len(prefix), prefix, limit],
            ).fetchall()
        return [(row[0], Path(row[1])) for row in rows]

    def forget(self, plan_ids: list[str]) -> None:
        """Drop ``plan_ids`` (plans removed by the collector)."""
        with sqlite_errors(_REGISTRY, self.path), contextlib.closing(self._connect()) as db, db:
            db.executemany("DELETE FROM plans WHERE id = ?", [[plan_id] for plan_id in plan_ids])
