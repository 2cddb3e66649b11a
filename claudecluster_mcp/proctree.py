"""Finding and killing every process an agent run started, wherever it went.

Claude Code starts each Bash-tool command in a **new session**, and a command may
double-fork, so neither the CLI's process group nor its child list reaches everything.
Three mechanisms make the tree findable:

* each run's ``claude`` runs under its own **per-run reaper** (:mod:`~claudecluster_mcp.reaper`),
  a child subreaper: an orphan of the run is re-parented to it, so while it lives the
  run's processes are exactly its process subtree, even those that cleared their
  environment and left the session (``(env -i setsid sleep 1000 &)``);
* the engine process is a child subreaper too (Linux ``PR_SET_CHILD_SUBREAPER``), so what
  escapes a reaper that was killed stays in our process tree instead of going to PID 1;
* each run's processes carry a unique environment tag (``CLAUDECLUSTER_RUN=<id>``) that
  children inherit, so a sweep can find them by ``/proc/<pid>/environ`` (and crash
  recovery can find them after the engine died).

A :class:`ProcessTree` records every (pid, start time) seen for a run and kills them all:
first it **freezes** them (SIGSTOP, so none can fork a child past the sweep), then
SIGKILLs them, re-checking start times so that a recycled pid is never hit.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field

import psutil

from . import reaper

__all__ = ["REAPER_SCRIPT", "RUN_TAG_VAR", "ProcessTree", "become_subreaper"]

logger = logging.getLogger(__name__)

RUN_TAG_VAR = "CLAUDECLUSTER_RUN"
_PR_SET_CHILD_SUBREAPER = 36
REAPER_SCRIPT = reaper.__file__
_subreaper: bool | None = None


def become_subreaper() -> bool:
    """Make this process the subreaper of its descendants (once; Linux only)."""
    global _subreaper
    if _subreaper is None:
        _subreaper = False
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                _subreaper = libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
            except (OSError, AttributeError):  # pragma: no cover - exotic libc
                _subreaper = False
        if not _subreaper:  # pragma: no cover - non-Linux
            logger.info("cannot become a child subreaper; relying on the environment tag sweep")
    return _subreaper


def _has_tag(proc: psutil.Process, tag: str) -> bool:
    try:
        return proc.environ().get(RUN_TAG_VAR) == tag
    except (psutil.Error, OSError):
        return False


@dataclass
class ProcessTree:
    """The processes of one agent run: the CLI (``root``) and all it started."""

    root: int
    tag: str
    seen: dict[int, float] = field(default_factory=dict)
    #: Look for tagged processes system-wide, not only below this process. Needed when we
    #: are not their subreaper (not on Linux, or cleaning up after another process died).
    everywhere: bool = False

    def _remember(self, proc: psutil.Process) -> None:
        with contextlib.suppress(psutil.Error):
            self.seen.setdefault(proc.pid, proc.create_time())

    def scan(self) -> list[psutil.Process]:
        """Living processes of the run (root, descendants, re-parented orphans); remembers them."""
        found: dict[int, psutil.Process] = {}
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(self.root)
            found[root.pid] = root
            for child in root.children(recursive=True):
                found[child.pid] = child
        # Orphans re-parented to us (the subreaper) and not below the root any more.
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process().children(recursive=True):
                if child.pid not in found and _has_tag(child, self.tag):
                    found[child.pid] = child
        for proc in found.values():
            self._remember(proc)
        return [p for p in found.values() if _alive(p)]

    def rss_bytes(self) -> int:
        """Resident memory of the whole run, in bytes."""
        total = 0
        for proc in self.scan():
            with contextlib.suppress(psutil.Error):
                total += proc.memory_info().rss
        return total

    def _tagged_anywhere(self) -> list[psutil.Process]:
        if self.everywhere or not _subreaper:
            candidates = list(psutil.process_iter())
        else:
            # As the subreaper, every escaped descendant was re-parented below us.
            with contextlib.suppress(psutil.Error):
                candidates = psutil.Process().children(recursive=True)
        return [p for p in candidates if p.pid != os.getpid() and _has_tag(p, self.tag)]

    def survivors(self) -> list[psutil.Process]:
        """Processes of this run still alive: recorded ones that kept their identity, every
        process below them (a reaper's whole subtree), and tagged ones."""
        alive: dict[int, psutil.Process] = {}
        for pid, started in list(self.seen.items()):
            with contextlib.suppress(psutil.Error):
                proc = psutil.Process(pid)
                if abs(proc.create_time() - started) < 0.01 and _alive(proc):
                    alive[pid] = proc
        for proc in self._tagged_anywhere():
            if _alive(proc):
                alive.setdefault(proc.pid, proc)
        for proc in _descendants(list(alive)):
            if proc.pid != os.getpid() and _alive(proc):
                alive.setdefault(proc.pid, proc)
        for proc in alive.values():
            self._remember(proc)
        return list(alive.values())

    def kill_all(self, *, timeout: float = 3.0) -> list[int]:
        """Freeze, then SIGKILL every process of the run until none is left; reap our
        orphaned zombies.

        Freezing first (SIGSTOP, repeated until no new process shows up) means no process
        can fork between the last look and the kill, and none is orphaned out of sight by
        the death of its parent before it is hit itself. A per-run reaper at the root is
        killed last: it is resumed once everything below it is dead, reaps those zombies
        itself and exits (as its ``claude`` did); only if it does not, it is killed too.
        Blocking (call from a worker thread). Returns the pids that were killed.
        """
        killed: set[int] = set()
        deadline = time.monotonic() + timeout
        reaper = self._root_reaper()
        self._freeze(deadline)
        resumed_at: float | None = None
        while targets := self.survivors():
            below = [p for p in targets if p.pid != reaper]
            if below or reaper is None:
                hit = below or targets
            elif resumed_at is None:
                hit, resumed_at = [], time.monotonic()
                with contextlib.suppress(ProcessLookupError):
                    os.kill(reaper, signal.SIGCONT)
            else:
                hit = targets if time.monotonic() - resumed_at > 1.0 else []
            for proc in hit:
                with contextlib.suppress(psutil.Error):
                    proc.send_signal(signal.SIGKILL)
                    killed.add(proc.pid)
            self._reap()
            if time.monotonic() > deadline:
                logger.error("processes of run %s survived SIGKILL: %s", self.tag, [p.pid for p in targets])
                break
            time.sleep(0.02)
        self._reap()
        return sorted(killed)

    def _freeze(self, deadline: float) -> None:
        frozen: set[int] = set()
        while time.monotonic() < deadline:
            fresh = [p for p in self.survivors() if p.pid not in frozen]
            if not fresh:
                return
            for proc in fresh:
                with contextlib.suppress(psutil.Error):
                    proc.send_signal(signal.SIGSTOP)
                frozen.add(proc.pid)

    def _root_reaper(self) -> int | None:
        """The root's pid if it is a living per-run reaper (:mod:`~claudecluster_mcp.reaper`)."""
        if self.root <= 0:  # crash recovery: no root of ours (see placement._kill_leftovers)
            return None
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(self.root)
            if _alive(proc) and REAPER_SCRIPT in proc.cmdline()[1:5]:
                return proc.pid
        return None

    def _reap(self) -> None:
        """waitpid() only our own zombie children that belong to this run (never the root:
        its owner reaps it), so no other waiter loses an exit status."""
        me = os.getpid()
        for pid in list(self.seen):
            if pid == self.root:
                continue
            try:
                proc = psutil.Process(pid)
                if proc.ppid() != me or proc.status() != psutil.STATUS_ZOMBIE:
                    continue
            except psutil.Error:
                continue
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
            except OSError as exc:  # pragma: no cover - defensive
                if exc.errno != errno.ECHILD:
                    raise


def _descendants(roots: list[int]) -> list[psutil.Process]:
    """Every process below the given pids (one pass over the process table)."""
    children: dict[int, list[int]] = {}
    for proc in psutil.process_iter(["ppid"]):
        children.setdefault(proc.info["ppid"], []).append(proc.pid)
    found: list[psutil.Process] = []
    queue = [child for root in roots for child in children.get(root, [])]
    seen: set[int] = set()
    while queue:
        pid = queue.pop()
        if pid in seen:
            continue
        seen.add(pid)
        with contextlib.suppress(psutil.Error):
            found.append(psutil.Process(pid))
        queue.extend(children.get(pid, []))
    return found


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
