"""An engine's agent slots on a Ray cluster: :class:`~claudecluster_mcp.ray_actor.AgentSlot`
actors, started ahead of need and reused from run to run.

A new slot costs a new Ray worker process (0.7 to 1.2 s, and a node starts only as many at
once as it has CPUs); a slot that is already up takes a run in milliseconds. So the pool
starts as many slots as the engine has workers at its first agent (Ray places them on
nodes with a free ``claude_slot``, spread over the nodes), never more than the cluster has
slots (one more would only wait for one of ours), hands out the warm ones first, and ends
slots that stayed idle for :data:`IDLE_KEEP` seconds (a slot holds its ``claude_slot``
while it lives, and other engines may want it). Each slot remembers the last base it got
(:attr:`Slot.known`), so that the next one goes to it as an increment.

Slots are detached, named actors in the ``claudecluster`` namespace: after an engine
restart, :func:`survey` finds the runs of slots that outlived their engine.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import secrets
import socket
import time
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import anyio
import psutil

from .ray_actor import AgentSlot, RunInfo
from .ray_cluster import NAMESPACE, SLOT_RESOURCE

__all__ = ["IDLE_KEEP", "Slot", "SlotPool", "actor_class", "survey"]

logger = logging.getLogger(__name__)

#: Seconds an idle slot is kept for the next run before the engine ends it.
IDLE_KEEP = 120.0
_SURVEY_TIMEOUT = 10.0


@cache
def actor_class() -> Any:
    """:class:`AgentSlot` as a Ray actor class (Ray imported on first use)."""
    import ray

    return ray.remote(AgentSlot)


@dataclass(eq=False)
class Slot:
    """One slot actor of this engine."""

    name: str
    actor: Any
    #: done once the slot is up on a node (its result: the slot's NodeInfo)
    ready: concurrent.futures.Future[Any]
    idle_since: float = field(default_factory=time.monotonic)
    #: a commit whose history the slot's object cache holds (bundles for it leave that out)
    known: str | None = None

    @property
    def warm(self) -> bool:
        """Up and answering."""
        return self.ready.done() and self.ready.exception() is None


class SlotPool:
    """This engine's slots: idle ones wait for a run; busy ones are with a handle. At most
    :attr:`cap` slots live at once (the cluster's ``claude_slot`` count): a slot beyond it
    could only wait for one of ours to end."""

    def __init__(self, claude_bin: str | None = None, *, cap: int = 1, idle_keep: float = IDLE_KEEP) -> None:
        self.claude_bin = claude_bin  #: the slots look for ``claude`` there as soon as they are up
        self.cap = cap
        self.idle_keep = idle_keep
        self._prefix = f"slot:{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self._count = 0
        self._idle: list[Slot] = []
        self._live: dict[str, Slot] = {}
        self._changed = anyio.Event()

    def __len__(self) -> int:
        return len(self._live)

    def prewarm(self, count: int) -> None:
        """Have ``count`` idle slots (starting where there are fewer, up to :attr:`cap`)."""
        while len(self._idle) < count and len(self._live) < self.cap:
            self._idle.append(self._new())

    async def acquire(self) -> Slot:
        """A slot for a run: a warm idle one, else one still starting, else a new one, else
        (:attr:`cap` reached, all busy) the next one released."""
        while True:
            warm = [slot for slot in self._idle if slot.warm]
            pick = warm[-1] if warm else next((s for s in self._idle if not s.ready.done()), None)
            if pick is not None:
                self._idle.remove(pick)
                return pick
            if len(self._live) < self.cap:
                return self._new()
            changed = self._changed
            with anyio.move_on_after(1.0):  # also: a slot that came up, a cap that grew
                await changed.wait()

    def release(self, slot: Slot) -> None:
        """Back to the idle slots (its run is over and released)."""
        if slot.name in self._live and slot not in self._idle:
            slot.idle_since = time.monotonic()
            self._idle.append(slot)
            self._notify()

    def discard(self, slot: Slot) -> None:
        """End a slot: dead, on a lost node, or no longer wanted."""
        self._live.pop(slot.name, None)
        with contextlib.suppress(ValueError):
            self._idle.remove(slot)
        _kill(slot.actor)
        self._notify()

    def trim(self) -> None:
        """End the slots idle for longer than :attr:`idle_keep`, and the ones that failed to start."""
        clock = time.monotonic()
        for slot in list(self._idle):
            failed = slot.ready.done() and slot.ready.exception() is not None
            if failed or (slot.warm and clock - slot.idle_since > self.idle_keep):
                self.discard(slot)

    def close(self) -> None:
        """End every slot of this engine (their agents, if any, are stopped with them)."""
        for slot in list(self._live.values()):
            self.discard(slot)

    async def aclose(self, timeout: float = 5.0) -> None:
        """End every slot: idle ones on their own (their object caches removed), then the rest."""
        async with anyio.create_task_group() as tg:
            for slot in [s for s in self._idle if s.warm]:
                tg.start_soon(_shut_down, slot.actor, timeout)
        self.close()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    def _new(self) -> Slot:
        self._count += 1
        name = f"{self._prefix}:{self._count}"
        actor = (
            actor_class()
            .options(
                name=name,
                namespace=NAMESPACE,
                lifetime="detached",  # outlives a crashed engine: the next one finds its run
                num_cpus=0,
                resources={SLOT_RESOURCE: 1},
                max_restarts=0,
                scheduling_strategy="SPREAD",
            )
            .remote()
        )
        slot = Slot(name, actor, actor.node.remote(self.claude_bin).future())
        self._live[name] = slot
        return slot


async def _shut_down(actor: Any, timeout: float) -> None:
    with contextlib.suppress(Exception), anyio.move_on_after(timeout):
        await actor.shutdown.remote()  # raises ActorDiedError as the slot exits


def _kill(actor: Any) -> None:
    import ray

    with contextlib.suppress(Exception):
        ray.kill(actor, no_restart=True)


async def survey() -> list[tuple[Any, RunInfo]]:
    """Every run held by a claudecluster slot of the cluster (any engine's), with its slot;
    and, on the way, the end of the idle slots of engines of this machine that are gone
    (a slot ends itself after :data:`~claudecluster_mcp.ray_actor.IDLE_EXIT` anyway, but
    meanwhile it holds a ``claude_slot`` the restarted engine needs)."""
    import ray

    def handles() -> list[tuple[str, Any]]:
        found = []
        for name in ray.util.list_named_actors():
            with contextlib.suppress(Exception):
                found.append((name, ray.get_actor(name, namespace=NAMESPACE)))
        return found

    found: list[tuple[Any, RunInfo]] = []

    async def ask(name: str, actor: Any) -> None:
        with contextlib.suppress(Exception), anyio.fail_after(_SURVEY_TIMEOUT):
            runs = await actor.runs.remote()
            found.extend((actor, info) for info in runs)
            if not runs and _orphaned(name):
                actor.shutdown.remote()

    async with anyio.create_task_group() as tg:
        for name, actor in await anyio.to_thread.run_sync(handles):
            tg.start_soon(ask, name, actor)
    return found


def _orphaned(name: str) -> bool:
    """A slot named by an engine of this machine that is no longer running."""
    parts = name.split(":")
    if len(parts) != 5 or parts[0] != "slot" or parts[1] != socket.gethostname() or not parts[2].isdigit():
        return False
    return not psutil.pid_exists(int(parts[2]))
