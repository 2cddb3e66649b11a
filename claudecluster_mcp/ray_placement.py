"""Placement ``ray``: agents run on the nodes of a Ray cluster; the engine stays here.

The engine keeps all state, the merge queue and every git ref on its own machine; each
agent run is a :class:`~claudecluster_mcp.ray_run.RayAgentHandle` (snapshot out as a git
bundle, the same runner on a node, events back one by one, the result back into the local
worktree). :class:`RayPlacement` holds what runs share: the connection
(:mod:`~claudecluster_mcp.ray_cluster`), the engine's slots
(:mod:`~claudecluster_mcp.ray_slots`), the base bundles (one per integration tip, in Ray's
object store), every attempt's timings (:attr:`RayPlacement.placed`), and the runs a crashed
engine left: slots are detached actors, so their runs go on; the next engine's recovery
calls :meth:`RayPlacement.reap`, which finds them for their tasks to re-attach to.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio

from .agent_spec import AgentSpec
from .bundles import Snapshot, git_identity, make_bundle
from .claude_cli import ClaudeBinary
from .events import AgentEvent
from .placement import RunRecord, reap_local
from .ray_actor import RunInfo
from .ray_cluster import SLOT_RESOURCE, connect
from .ray_run import FoundRun, Placed, RayAgentHandle, end_run
from .ray_slots import SlotPool, survey
from .settings import EngineSettings

__all__ = ["ADOPT_WINDOW", "RayPlacement"]

logger = logging.getLogger(__name__)

OnEvent = Callable[[AgentEvent], None]
OnStart = Callable[[int, float], Awaitable[None]]

#: Seconds a run found after a restart waits for its task to start again before it is stopped.
ADOPT_WINDOW = 120.0
_HOUSEKEEPING_EVERY = 5.0
_BUNDLES_KEPT = 32
_PLACED_KEPT = 10_000


class RayPlacement:
    """Agents on a Ray cluster's slots (see the module docstring). Open with :meth:`open`."""

    name = "ray"

    def __init__(self, settings: EngineSettings, pool: SlotPool, claude: ClaudeBinary | None = None) -> None:
        self.settings = settings
        self.pool = pool
        self.claude = claude  #: the engine's own claude (the planner runs here)
        self.placed: list[Placed] = []  #: every attempt of every run, in order
        self._adoptable: dict[str, FoundRun] = {}
        self._bundles: OrderedDict[tuple[str, ...], Any] = OrderedDict()
        self._survey: tuple[float, list[tuple[Any, RunInfo]]] | None = None
        self._identity: tuple[str, str] | None = None

    @classmethod
    @asynccontextmanager
    async def open(cls, settings: EngineSettings, claude: ClaudeBinary | None = None) -> AsyncIterator[RayPlacement]:
        """Connect (if this process is not yet), start the slots, and end them on leaving."""
        cluster = connect(settings.ray_address, allow_public=settings.ray_allow_public)
        placement = cls(settings, SlotPool(settings.claude_bin, cap=cluster.slots), claude)
        await placement.survey()  # also ends the idle slots an engine of this machine left
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(placement._housekeeping)
                yield placement
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await placement.aclose()

    def agent(self, spec: AgentSpec, *, on_event: OnEvent, on_start: OnStart) -> RayAgentHandle:
        """A run for ``spec`` on some slot (or the run a crashed engine left for this task)."""
        # Slots take a second to start: at the first agent, as many as can run at once.
        if not len(self.pool):
            self.pool.prewarm(self.settings.workers)
        adopt = None if spec.resume else self._adoptable.pop(str(spec.cwd), None)
        return RayAgentHandle(self, spec, on_event, on_start, adopt)

    async def reap(self, record: RunRecord) -> list[int]:
        """After a crash: a run of ``record`` still on a slot is kept for its task to
        re-attach to (:data:`ADOPT_WINDOW`). A run no slot holds may have been a local one
        (the engine ran with ``placement = "local"`` before): its processes here are killed,
        as the local placement would."""
        for actor, info in await self.survey(fresh=False):
            if info.run_id == record.run_id:
                logger.info("run %s is still on Ray node %s: its task will re-attach", info.run_id, info.node.hostname)
                self._adoptable[info.key] = FoundRun(actor, info)
                return []
        return await reap_local(record)

    def record(self, placed: Placed) -> None:
        """Keep an attempt in :attr:`placed` (the last :data:`_PLACED_KEPT` of them)."""
        self.placed.append(placed)
        if len(self.placed) > _PLACED_KEPT:
            del self.placed[: _PLACED_KEPT // 2]

    async def survey(self, *, fresh: bool = True) -> list[tuple[Any, RunInfo]]:
        """The runs on the cluster's slots (any engine's); ``fresh=False``: seconds old will do."""
        if fresh or self._survey is None or time.monotonic() - self._survey[0] > 10:
            self._survey = (time.monotonic(), await survey())
        return self._survey[1]

    async def aclose(self) -> None:
        """Stop what is left: runs nobody re-attached to, and every slot of this engine."""
        for left in self._adoptable.values():
            end_run(left.actor, left.info.run_id)
        self._adoptable.clear()
        await self.pool.aclose()

    async def identity(self, worktree: Path) -> tuple[str, str]:
        """Who commits on the nodes: the repository's committer (looked up once)."""
        if self._identity is None:
            self._identity = await git_identity(worktree)
        return self._identity

    async def bundle_of(self, worktree: Path, snapshot: Snapshot, known: str | None) -> tuple[Any, int]:
        """The snapshot's bundle, without the history of ``known`` (a commit the slot has),
        in Ray's object store (made once per snapshot and ``known``), and its size."""
        import ray

        key = (*snapshot.tips.values(), known or "")
        if key not in self._bundles:
            data = await make_bundle(worktree, snapshot.tips, exclude=[known] if known else [])
            self._bundles[key] = (await anyio.to_thread.run_sync(ray.put, data), len(data))
            while len(self._bundles) > _BUNDLES_KEPT:
                self._bundles.popitem(last=False)
        self._bundles.move_to_end(key)
        ref_and_size: tuple[Any, int] = self._bundles[key]
        return ref_and_size

    async def _housekeeping(self) -> None:
        import ray

        while True:
            await anyio.sleep(_HOUSEKEEPING_EVERY)
            self.pool.trim()
            with contextlib.suppress(Exception):  # nodes join and leave
                resources = await anyio.to_thread.run_sync(ray.cluster_resources)
                self.pool.cap = max(1, int(resources.get(SLOT_RESOURCE, 0)))
            for key, left in list(self._adoptable.items()):
                if time.monotonic() - left.found > ADOPT_WINDOW:
                    logger.info("run %s: its task did not start again; stopped", left.info.run_id)
                    end_run(left.actor, left.info.run_id)
                    del self._adoptable[key]
