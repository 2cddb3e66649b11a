"""Where an agent runs: the one seam between the engine and agent processes.

The task runner and crash recovery talk only to an :class:`AgentPlacement`: "make an agent
for this spec (events go to ``on_event``), run it to its outcome, cancel it", and "clean up
after a run whose supervisor died". :class:`LocalPlacement`, the first implementation, runs
``claude`` in a pty on this machine (:class:`~claudecluster_mcp.agent.AgentRun`);
:class:`~claudecluster_mcp.ray_placement.RayPlacement` runs it on the nodes of a Ray
cluster; the scheduler and the merge queue do not change with it. :func:`open_placement`
makes the one the settings name.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Protocol

import anyio
import psutil

from .agent import AgentRun
from .agent_spec import AgentSpec, run_tmpdir
from .claude_cli import ClaudeBinary
from .events import AgentEvent
from .outcome import AgentOutcome
from .proctree import ProcessTree
from .settings import EngineSettings

__all__ = ["AgentHandle", "AgentPlacement", "LocalPlacement", "RunRecord", "open_placement", "reap_local"]

OnEvent = Callable[[AgentEvent], None]
OnStart = Callable[[int, float], Awaitable[None]]


@dataclass(frozen=True)
class RunRecord:
    """What the store remembers of a run, enough to find its processes after a crash."""

    run_id: str
    pid: int | None = None
    pid_started: float | None = None


class AgentHandle(Protocol):
    """One agent run: ``await run()`` once for its outcome; ``cancel()`` any time."""

    @property
    def run_id(self) -> str:
        """Unique id of the run (tags its processes and its TMPDIR)."""

    @property
    def session_id(self) -> str:
        """The Claude Code session the run writes (for ``--resume``)."""

    @property
    def turns(self) -> int:
        """Model turns so far."""

    def cancel(self, reason: str = "cancelled by request") -> None:
        """Stop the agent; no process of it survives."""

    async def run(self) -> AgentOutcome:
        """Run the agent to the end and say what happened."""


class AgentPlacement(Protocol):
    """Where agents run."""

    name: str

    def agent(self, spec: AgentSpec, *, on_event: OnEvent, on_start: OnStart) -> AgentHandle:
        """An agent for ``spec``, not started yet; ``on_event`` gets every parsed event,
        ``on_start(pid, start time)`` is awaited once its process exists."""

    async def reap(self, record: RunRecord) -> list[int]:
        """Kill what is left of a run whose supervisor died and remove its files; returns
        the pids killed."""


class LocalPlacement:
    """Agents as ``claude`` processes in a pty on this machine."""

    name = "local"

    def __init__(self, claude: ClaudeBinary) -> None:
        self.claude = claude

    def agent(self, spec: AgentSpec, *, on_event: OnEvent, on_start: OnStart) -> AgentHandle:
        """A supervised local run (:class:`~claudecluster_mcp.agent.AgentRun`)."""
        return AgentRun(spec, claude=self.claude, on_event=on_event, on_start=on_start)

    async def reap(self, record: RunRecord) -> list[int]:
        """Kill the run's processes (by pid + start time, and by its environment tag)."""
        return await reap_local(record)


async def reap_local(record: RunRecord) -> list[int]:
    """Kill what is left of a run on this machine and remove its files; the pids killed."""
    return await anyio.to_thread.run_sync(_kill_leftovers, record)


@asynccontextmanager
async def open_placement(settings: EngineSettings, claude: ClaudeBinary) -> AsyncIterator[AgentPlacement]:
    """The placement ``settings.placement`` names, for the duration of the block
    (``ray``: :class:`~claudecluster_mcp.ray_placement.RayPlacement`, which imports Ray)."""
    if settings.placement == "ray":
        from .ray_placement import RayPlacement

        async with RayPlacement.open(settings, claude) as placement:
            yield placement
    else:
        yield LocalPlacement(claude)


def _kill_leftovers(record: RunRecord) -> list[int]:
    # The recorded pid is the run's reaper (whose subtree is the whole run) or claude; it
    # is the tree's root only while it is still that process (not a recycled pid).
    tree = ProcessTree(root=-1, tag=record.run_id, everywhere=True)
    if record.pid and record.pid_started:
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(record.pid)
            if abs(proc.create_time() - record.pid_started) < 1.0:
                tree.root = record.pid
                tree.seen[record.pid] = proc.create_time()
                for child in proc.children(recursive=True):
                    with contextlib.suppress(psutil.Error):
                        tree.seen[child.pid] = child.create_time()
    killed = tree.kill_all()
    shutil.rmtree(run_tmpdir(record.run_id), ignore_errors=True)
    return killed
