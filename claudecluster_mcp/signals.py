"""The engine's pulse: one signal that something changed (a task moved, a merge landed),
which wakes the scheduler and answers every long-poll waiting for a change."""

from __future__ import annotations

import anyio

__all__ = ["Pulse"]


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
