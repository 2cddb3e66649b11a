"""Port blocks: each running agent (with its setup) and each gate run holds a block of
``ports_per_task`` consecutive ports from ``port_base`` up, which no other holder in this
process has, so that parallel dev servers and test databases do not collide. Agents learn
their block from ``CLAUDECLUSTER_PORT_BASE``.

One :data:`PORTS` serves the whole process: a server hosting several repositories (each
with its own ``port_base`` and block size) never hands out a port twice. A block in which
some port is already bound on this machine (by another program, or another claudecluster
process) is skipped.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import threading
from collections.abc import Iterator

from .errors import ConfigError

__all__ = ["PORTS", "PortBlocks", "fleet_env"]

_LAST_PORT = 65535


class PortBlocks:
    """Hands out blocks of ports that no other holder of this allocator has."""

    def __init__(self) -> None:
        self._held: set[int] = set()
        self._lock = threading.Lock()  # engines of a server may live on other threads

    def acquire(self, base: int, size: int) -> int:
        """The first port of a free block of ``size`` ports at ``base + k * size``; raises
        :class:`ConfigError` when every block up to port 65535 is taken."""
        with self._lock:
            for start in range(base, _LAST_PORT - size + 2, size):
                block = range(start, start + size)
                if self._held.isdisjoint(block) and all(_bindable(port) for port in block):
                    self._held.update(block)
                    return start
        raise ConfigError(
            f"no free block of {size} ports from port_base {base}: lower ports_per_task or workers, "
            "or choose another port_base"
        )

    def release(self, start: int, size: int) -> None:
        """Give a block back."""
        with self._lock:
            self._held.difference_update(range(start, start + size))

    @contextlib.contextmanager
    def block(self, base: int, size: int) -> Iterator[int]:
        """A block held for the ``with`` body; yields its first port."""
        start = self.acquire(base, size)
        try:
            yield start
        finally:
            self.release(start, size)

    @property
    def held(self) -> frozenset[int]:
        """Every port held now."""
        with self._lock:
            return frozenset(self._held)


def _bindable(port: int) -> bool:
    """False when something on this machine has the port bound (as a server would bind it)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as exc:
            return exc.errno not in (errno.EADDRINUSE, errno.EACCES)
    return True


def fleet_env(plan_id: str, task_id: str, port_base: int) -> dict[str, str]:
    """What every agent, its setup and its gate learn about their place in the fleet."""
    return {
        "CLAUDECLUSTER_PLAN_ID": plan_id,
        "CLAUDECLUSTER_TASK_ID": task_id,
        "CLAUDECLUSTER_PORT_BASE": str(port_base),
    }


#: The process's one allocator.
PORTS = PortBlocks()
