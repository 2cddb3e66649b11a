"""The kill loop's view of the system under test: ``claudecluster serve`` as a real
subprocess (started, SIGKILLed by its pid, restarted), the repository's store read from
outside (read-only SQLite), and every process the server ever had below it.

The loop's process is a child subreaper, so whatever a killed server leaves behind is
re-parented here rather than to PID 1: it stays countable, and its zombies are reaped here.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

_PR_SET_CHILD_SUBREAPER = 36
FINAL = frozenset({"failed", "timed_out", "cancelled", "blocked", "merged", "conflicted", "gate_failed"})


def become_subreaper() -> None:
    """Orphans of the servers we start come to this process (Linux)."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def alive(pid: int, started: float | None = None) -> bool:
    """True while ``pid`` is a living (not zombie) process, and the same one if ``started``."""
    try:
        proc = psutil.Process(pid)
        if started is not None and abs(proc.create_time() - started) > 0.05:
            return False
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def reap_orphans(keep: set[int]) -> None:
    """waitpid() our zombie children, except ``keep`` (live ``Popen`` objects reap their own)."""
    for child in psutil.Process().children():
        with contextlib.suppress(psutil.Error, ChildProcessError):
            if child.pid not in keep and child.status() == psutil.STATUS_ZOMBIE:
                os.waitpid(child.pid, os.WNOHANG)


@dataclass
class Server:
    """One ``claudecluster serve --transport http --no-auth`` at a time, on a fixed port."""

    root: Path
    port: int
    env: dict[str, str]
    log_dir: Path
    workers: int
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0
    #: (pid, create time) of every process ever seen below a server, with its command name.
    seen: dict[tuple[int, float], str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        """Base URL (``/mcp``, ``/health``)."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start a server (it recovers the repository's running plans before it serves)."""
        self.starts += 1
        log = self.log_dir / f"serve-{self.starts:02d}.log"
        argv = [sys.executable, "-m", "claudecluster_mcp.cli", "serve", "--transport", "http", "--no-auth"]
        argv += ["--port", str(self.port), "--root", str(self.root), "--workers", str(self.workers)]
        with log.open("wb") as stderr:
            self.process = subprocess.Popen(argv, env=self.env, stdin=subprocess.DEVNULL, stderr=stderr)

    def ready(self) -> bool:
        """Whether the server answers /health (so its recovery is done)."""
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(self.url + "/health", timeout=0.5).status_code == 200
        return False

    def exited(self) -> int | None:
        """The server's exit code if it died on its own."""
        return self.process.poll() if self.process is not None else None

    def tree(self) -> dict[tuple[int, float], str]:
        """Every process below the server now (remembered in :attr:`seen`)."""
        found: dict[tuple[int, float], str] = {}
        if self.process is None:
            return found
        with contextlib.suppress(psutil.Error):
            for proc in psutil.Process(self.process.pid).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    found[(proc.pid, proc.create_time())] = proc.name()
        self.seen.update(found)
        return found

    def kill(self) -> dict[tuple[int, float], str]:
        """SIGKILL the server by its pid; returns the processes it had just before."""
        assert self.process is not None
        below = self.tree()
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait()
        self.process = None
        return below

    def stop(self) -> None:
        """Stop the server the polite way (SIGTERM), as a user would."""
        if self.process is not None:
            self.tree()
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None

    def log_tail(self, lines: int = 30) -> str:
        """The end of the current (or last) server's stderr."""
        log = self.log_dir / f"serve-{self.starts:02d}.log"
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.exists() else ""


class StoreView:
    """The repository's store, read from outside while servers come and go."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _rows(self, query: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        if not self.path.exists():
            return []
        for attempt in range(50):
            try:
                with contextlib.closing(sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=5)) as db:
                    db.row_factory = sqlite3.Row
                    return db.execute(query, args).fetchall()
            except sqlite3.OperationalError:  # a writer's checkpoint, a file being created
                if attempt == 49:
                    raise
                time.sleep(0.02)
        return []

    def tasks(self, plan_id: str) -> list[dict[str, Any]]:
        """Every task of the plan (state, pid, commit, …)."""
        return [dict(r) for r in self._rows("SELECT * FROM tasks WHERE plan_id = ? ORDER BY seq", (plan_id,))]

    def states(self, plan_id: str) -> dict[str, list[str]]:
        """Each task's state events in order (the store's append-only event log)."""
        moves: dict[str, list[str]] = {}
        query = "SELECT task_id, data FROM events WHERE plan_id = ? AND kind = 'state' ORDER BY seq"
        for row in self._rows(query, (plan_id,)):
            moves.setdefault(row["task_id"], []).append(json.loads(row["data"])["state"])
        return moves

    def last_event(self) -> int:
        """The newest event's sequence number."""
        rows = self._rows("SELECT max(seq) FROM events")
        return int(rows[0][0] or 0) if rows else 0

    def recovered_since(self, seq: int) -> int:
        """Tasks re-queued by a recovery after event ``seq``."""
        query = "SELECT count(*) FROM events WHERE seq > ? AND kind = 'state' AND data LIKE '%the engine stopped%'"
        return int(self._rows(query, (seq,))[0][0])

    def journal(self) -> list[dict[str, Any]]:
        """The merge journal."""
        return [dict(r) for r in self._rows("SELECT * FROM merges ORDER BY seq")]

    def plan_state(self, plan_id: str) -> str:
        """The plan's state."""
        rows = self._rows("SELECT state FROM plans WHERE id = ?", (plan_id,))
        return str(rows[0][0]) if rows else ""

    def finished(self, plan_id: str) -> bool:
        """Every task final (the conflicted task of a merged resolve counts when merged)."""
        tasks = self.tasks(plan_id)
        return bool(tasks) and all(t["state"] in FINAL for t in tasks) and self.plan_state(plan_id) != "running"
