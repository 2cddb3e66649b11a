"""The engine's signals: the pulse (something changed: a task moved, a merge landed), which
wakes the scheduler and answers every long-poll waiting for a change; and the change feed,
which tells observers (the MCP server's notifications) *what* changed, after it is stored."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import anyio

__all__ = ["Change", "Pulse", "Watcher", "Watchers"]

logger = logging.getLogger(__name__)


class Pulse:
    """``notify()`` after a change; ``await changed(timeout)`` to wait for the next one; the
    scheduler waits on :attr:`wake`, which ``kick()`` sets without counting as a change."""

    def __init__(self) -> None:
        self.wake = anyio.Event()
        self._changed = anyio.Event()

    def kick(self) -> None:
        """Ask the scheduler for a pass."""
        self.wake.set()

    def notify(self) -> None:
        """Something changed: wake everyone waiting, and the scheduler."""
        self._changed.set()
        self._changed = anyio.Event()
        self.kick()

    async def changed(self, timeout: float | None) -> None:
        """Return at the next change, or after ``timeout`` seconds."""
        changed = self._changed
        with anyio.move_on_after(timeout):
            await changed.wait()

    def rearm(self) -> None:
        """The scheduler took the wake-up: the next ``kick`` wakes it again."""
        self.wake = anyio.Event()


class Change(NamedTuple):
    """One committed change of a repository's state.

    ``kind`` is ``"plan"`` (a plan was created: ``data`` has its ``goal``), ``"plan_state"``
    (plan columns were set: ``data`` holds them, e.g. ``state``), ``"task_added"`` (a resolve
    task), ``"state"`` (a task moved: ``data`` has the new ``state`` and the ``reason``…), or
    the kind of an agent event appended to the task's log (``tool_use``, ``text``, …)."""

    plan_id: str
    task_id: str | None
    kind: str
    data: Mapping[str, Any]


#: Observes changes; called on the event loop right after the change is committed. It must
#: not block or raise (hand the work to a task of your own).
Watcher = Callable[[Change], None]


class Watchers:
    """A synchronous fan-out of :class:`Change` to the watchers registered with :meth:`watch`."""

    def __init__(self) -> None:
        self._watchers: dict[object, Watcher] = {}

    def watch(self, watcher: Watcher) -> Callable[[], None]:
        """Call ``watcher`` with every change from now on; returns the (idempotent) unwatch."""
        token = object()
        self._watchers[token] = watcher

        def unwatch() -> None:
            self._watchers.pop(token, None)

        return unwatch

    def emit(self, change: Change) -> None:
        """Hand ``change`` to every watcher; one that raises is logged and skipped, so an
        observer can never fail the engine's write that caused the change."""
        for watcher in list(self._watchers.values()):
            try:
                watcher(change)
            except Exception:
                logger.exception("a change watcher failed on %s", change.kind)
