"""The node side of Ray placement: :class:`AgentSlot`, one ``claude_slot`` of a Ray node.

A slot is a Ray actor (async, detached, named; it holds one ``claude_slot`` resource while
it lives, so a node never runs more agents than it has slots). It runs one agent at a time
with the very runner a local placement uses (:class:`~claudecluster_mcp.agent.AgentRun`:
pty, stream-json parsing, timeouts, memory cap, the sandbox when the node has it, the
per-run reaper and the sweep of leftover processes), in a temporary repository rebuilt from
the engine's bundle (:mod:`~claudecluster_mcp.bundles`), and removed after the run. The
slot keeps the history it has received in an object cache that its runs borrow from, so
the engine sends each slot only what is new.

Everything the run produces is kept as a list of messages, read by the engine with
:meth:`AgentSlot.events` from any offset: an engine that restarted can read a run again
from the start. The run itself lives in the actor, not in the engine's call, so it goes on
while no engine listens; its result is kept until the engine releases it (or
:data:`RESULT_KEPT` seconds have passed), and a slot with no run for :data:`IDLE_EXIT`
seconds ends itself, so that nothing of an engine that died stays on a node.

Messages, in order: ``("started", pid, start_time)`` once the agent's process exists,
``("event", AgentEvent)`` for each parsed event, and ``("done", RunResult)`` last; or
``("gone",)`` alone when the slot does not hold that run.

The class is plain Python: :mod:`~claudecluster_mcp.ray_slots` makes it a Ray actor, so
that importing this module does not import Ray.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import anyio
import psutil

from .agent import AgentRun
from .agent_spec import AgentSpec
from .bundles import Snapshot, checkout_snapshot, make_bundle, take_snapshot
from .claude_cli import find_claude
from .confined import run_confined
from .errors import AgentError, ClusterError, ConfigError
from .events import AgentEvent
from .isolation import sandbox_support
from .outcome import AgentOutcome
from .proctree import RUN_TAG_VAR
from .workspace import git

__all__ = ["IDLE_EXIT", "RESULT_KEPT", "AgentSlot", "Message", "NodeInfo", "RemoteJob", "RunInfo", "RunResult"]

logger = logging.getLogger(__name__)

#: Seconds a slot without a run waits for one before it ends itself.
IDLE_EXIT = 180.0
#: Seconds a finished run's result waits for its engine before the slot drops it.
RESULT_KEPT = 900.0
_WATCH_EVERY = 5.0

Message = tuple[Any, ...]
# The temporary directories of a slot process (its pid in the name): see _sweep_stale_dirs.
_STALE = re.compile(r"ccray-(\d+)-[a-z0-9_]+|ccrun-[0-9a-f]{12}-(\d+)")


@dataclass(frozen=True)
class NodeInfo:
    """Where a slot runs."""

    node_id: str
    address: str
    hostname: str
    pid: int
    claude_version: str | None = None  #: the ``claude`` found there (None: not found yet)


@dataclass(frozen=True)
class RemoteJob:
    """One agent run for a slot: the spec (its ``cwd`` and ``log_path`` are the engine's;
    the node uses its own), the worktree to rebuild, and who commits there."""

    run_id: str
    spec: AgentSpec
    snapshot: Snapshot
    identity: tuple[str, str]
    claude_bin: str | None = None
    #: what identifies the run's task to a restarted engine: its worktree on the engine
    key: str = ""
    #: the ``setup`` command, run (confined) in the node's worktree before the agent
    setup: list[str] | None = None
    setup_timeout: float = 600.0


@dataclass(frozen=True)
class RunResult:
    """How a run ended: the agent's outcome, the worktree it left (``snapshot``, whose
    objects ``bundle`` holds) and its transcript; or the error that kept it from running."""

    outcome: AgentOutcome | None = None
    snapshot: Snapshot | None = None
    bundle: bytes = b""
    transcript: bytes = b""
    error: ClusterError | None = None
    #: clock times on the node: "received", "checked_out", ("set_up",) "agent_done", "result_ready"
    times: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class RunInfo:
    """What a slot says about its run (for an engine looking for runs after a restart)."""

    run_id: str
    key: str
    base: Snapshot
    finished: bool
    node: NodeInfo


@dataclass
class _Run:
    job: RemoteJob
    messages: list[Message] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    agent: AgentRun | None = None
    cancel_reason: str | None = None
    release_when_done: bool = False
    finished_at: float | None = None
    task: asyncio.Task[None] | None = None

    def add(self, message: Message) -> None:
        self.messages.append(message)
        self.changed.set()
        self.changed = asyncio.Event()


class AgentSlot:
    """One ``claude_slot`` of a node: runs one agent at a time (see the module docstring)."""

    def __init__(self, idle_exit: float = IDLE_EXIT, result_kept: float = RESULT_KEPT) -> None:
        self._idle_exit = idle_exit
        self._result_kept = result_kept
        self._run: _Run | None = None
        self._idle_since = time.monotonic()
        self._watchdog: asyncio.Task[None] | None = None
        self._node: NodeInfo | None = None
        self._cache: Path | None = None

    async def node(self, claude_bin: str | None = None) -> NodeInfo:
        """Where this slot runs, and its ``claude`` (looked up once: it takes a while, and
        a slot is started ahead of its first run). Also a call that returns once the slot is up."""
        self._watch()
        if self._node is None:
            import ray

            await anyio.to_thread.run_sync(_sweep_stale_dirs)
            # The slot's object cache: runs borrow its history, bundles bring only what is new.
            self._cache = Path(tempfile.mkdtemp(prefix=f"ccray-{os.getpid()}-")) / "cache.git"
            atexit.register(shutil.rmtree, self._cache.parent, True)  # a worker that exits on its own
            await git(self._cache.parent, "init", "--bare", "--quiet", str(self._cache))

            node_id = ray.get_runtime_context().get_node_id()
            address = await anyio.to_thread.run_sync(_address_of, node_id)
            self._node = NodeInfo(node_id, address, socket.gethostname(), os.getpid())
        if self._node.claude_version is None:
            with contextlib.suppress(ClusterError):  # reported by the run that needs it
                claude = await anyio.to_thread.run_sync(find_claude, claude_bin)
                self._node = replace(self._node, claude_version=claude.version)
        return self._node

    async def start(self, job: RemoteJob, bundle: bytes) -> NodeInfo | None:
        """Start ``job`` (``bundle`` holds its snapshot); None when busy with another run."""
        node = await self.node(job.claude_bin)
        if self._run is not None:
            return node if self._run.job.run_id == job.run_id else None
        run = self._run = _Run(job)
        # The run must outlive this call (an engine restart re-reads it), so it is the
        # actor's own task, not the caller's.
        run.task = asyncio.get_running_loop().create_task(self._execute(run, bundle, node))
        return node

    async def events(self, run_id: str, offset: int = 0) -> AsyncIterator[Message]:
        """The run's messages from ``offset`` on, as they come, until its ``done``."""
        run = self._run
        if run is None or run.job.run_id != run_id:
            yield ("gone",)
            return
        while True:
            while offset < len(run.messages):
                yield run.messages[offset]
                offset += 1
            if run.finished_at is not None:
                return
            await run.changed.wait()

    async def cancel(self, run_id: str, reason: str, release: bool = False) -> None:
        """Stop the run as a local cancel does (SIGINT, grace, SIGTERM, SIGKILL, sweep); with
        ``release`` the slot forgets it once stopped (nobody will read the result)."""
        run = self._run
        if run is None or run.job.run_id != run_id:
            return
        run.release_when_done = run.release_when_done or release
        if run.finished_at is not None:
            if release:
                self._forget(run)
            return
        run.cancel_reason = reason
        if run.agent is not None:
            run.agent.cancel(reason)

    async def release(self, run_id: str) -> None:
        """The engine has the result: forget the run, the slot is free again."""
        run = self._run
        if run is not None and run.job.run_id == run_id:
            if run.finished_at is None:
                run.release_when_done = True
            else:
                self._forget(run)

    async def shutdown(self) -> None:
        """End the slot (idle: the engine no longer needs it), its object cache removed, and
        what slots that died on this machine left (see :func:`_sweep_stale_dirs`)."""
        import ray

        self._remove_cache()
        await anyio.to_thread.run_sync(_sweep_stale_dirs)
        ray.actor.exit_actor()  # type: ignore[no-untyped-call]

    async def runs(self) -> list[RunInfo]:
        """The run this slot holds, if any."""
        run = self._run
        if run is None:
            return []
        job = run.job
        return [RunInfo(job.run_id, job.key, job.snapshot, run.finished_at is not None, await self.node())]

    # -- the run ----------------------------------------------------------------------------

    async def _execute(self, run: _Run, bundle: bytes, node: NodeInfo) -> None:
        job = run.job
        result = RunResult(error=AgentError("the run ended without a result"))
        try:
            with tempfile.TemporaryDirectory(prefix=f"ccray-{os.getpid()}-") as tmp:
                result = await self._agent(run, bundle, Path(tmp), node)
        except ClusterError as exc:
            result = RunResult(error=exc)
        except Exception as exc:
            logger.exception("run %s failed on the node", job.run_id)
            result = RunResult(error=AgentError(f"the run failed on Ray node {node.hostname}: {exc!r}"))
        finally:
            run.finished_at = time.monotonic()
            run.add(("done", result))
            if run.release_when_done:
                self._forget(run)

    async def _agent(self, run: _Run, bundle: bytes, tmp: Path, node: NodeInfo) -> RunResult:
        job = run.job
        times = {"received": time.time()}
        if job.spec.sandbox is not None and not (support := sandbox_support()).available:
            raise ConfigError(
                f'Ray node {node.hostname} cannot run agents under isolation "sandbox": {support.describe()} '
                '(install it there, or set isolation = "none")'
            )
        worktree = await checkout_snapshot(tmp / "wt", bundle, job.snapshot, job.identity, cache=self._cache)
        times["checked_out"] = time.time()
        if job.setup:
            await _set_up(job, worktree, node)
            times["set_up"] = time.time()
        claude = await anyio.to_thread.run_sync(find_claude, job.claude_bin)
        log = tmp / "transcript.log"
        spec = job.spec.model_copy(update={"cwd": worktree, "log_path": log})

        async def started(pid: int, start_time: float) -> None:
            run.add(("started", pid, start_time))

        def event(item: AgentEvent) -> None:
            run.add(("event", item))

        # Its own tag and TMPDIR per slot process: a retry may land on a machine that still
        # has the TMPDIR of an attempt whose node died (see _sweep_stale_dirs).
        agent = run.agent = AgentRun(
            spec, claude=claude, on_event=event, on_start=started, run_id=f"{job.run_id}-{os.getpid()}"
        )
        if run.cancel_reason is not None:
            agent.cancel(run.cancel_reason)
        outcome = await agent.run()
        times["agent_done"] = time.time()
        snapshot = await take_snapshot(worktree, job.identity, files=True)
        known = set(job.snapshot.tips.values())  # the engine has these; HEAD is the files commit's parent
        tips = {name: sha for name, sha in snapshot.tips.items() if name != "head" and sha not in known}
        data = await make_bundle(worktree, tips, exclude=known, scratch=True)
        transcript = await anyio.Path(log).read_bytes() if log.exists() else b""
        times["result_ready"] = time.time()
        return RunResult(outcome, snapshot, data, transcript, times=times)

    def _remove_cache(self) -> None:
        if self._cache is not None:
            shutil.rmtree(self._cache.parent, ignore_errors=True)
            self._cache = None

    def _forget(self, run: _Run) -> None:
        if self._run is run:
            self._run = None
            self._idle_since = time.monotonic()

    # -- housekeeping -----------------------------------------------------------------------

    def _watch(self) -> None:
        if self._watchdog is None:
            self._watchdog = asyncio.get_running_loop().create_task(self._watch_loop())

    async def _watch_loop(self) -> None:
        """Drop a result nobody came for; end the slot when it has been idle too long."""
        while True:
            await asyncio.sleep(_WATCH_EVERY)
            run, clock = self._run, time.monotonic()
            if run is not None and run.finished_at is not None and clock - run.finished_at > self._result_kept:
                logger.info("run %s: nobody collected its result; dropped", run.job.run_id)
                self._forget(run)
            elif run is None and clock - self._idle_since > self._idle_exit:
                import ray

                logger.info("idle for %.0f s: this slot ends", clock - self._idle_since)
                self._remove_cache()
                await anyio.to_thread.run_sync(_sweep_stale_dirs)
                with contextlib.suppress(Exception):
                    ray.kill(ray.get_runtime_context().current_actor)
                return


async def _set_up(job: RemoteJob, worktree: Path, node: NodeInfo) -> None:
    """Run the ``setup`` command in the node's worktree, as the engine does in its own (what
    it installs, e.g. ``node_modules``, git ignores: it does not travel in bundles)."""
    fleet = {k: v for k, v in job.spec.env.items() if k.startswith("CLAUDECLUSTER_")}
    env = {**fleet, RUN_TAG_VAR: f"{job.run_id}-{os.getpid()}"}
    assert job.setup is not None
    ran = await run_confined(job.setup, worktree, timeout=job.setup_timeout, sandbox=job.spec.sandbox, env=env)
    if not ran.ok:
        raise AgentError(
            f"setup {' '.join(job.setup)} failed on Ray node {node.hostname} "
            f"(exit {ran.returncode}): {ran.output.strip()[-1500:]}"
        )


def _address_of(node_id: str) -> str:
    """The address the cluster knows this node by (``ray.util.get_node_ip_address`` in a
    worker guesses from the routing table, which is wrong for nodes on loopback addresses)."""
    import ray

    nodes = ray.nodes()  # type: ignore[no-untyped-call]
    return next((str(n["NodeManagerAddress"]) for n in nodes if n["NodeID"] == node_id), "?")


def _sweep_stale_dirs() -> None:
    """Remove what slots that died on this machine (a lost node, a killed worker) could
    not: their temporary repositories (``ccray-<pid>-…``) and runs' TMPDIRs (``ccrun-<run>-<pid>``)."""
    for path in Path(tempfile.gettempdir()).iterdir():
        if (found := _STALE.fullmatch(path.name)) and _owner_gone(int(found[1] or found[2]), path):
            shutil.rmtree(path, ignore_errors=True)


def _owner_gone(pid: int, path: Path) -> bool:
    """Whether the slot process that made ``path`` has ended: no such pid, a zombie (a worker
    whose raylet died is re-parented, possibly to a subreaper that never waits for it), or
    a process started after the directory was last changed (the pid was reused)."""
    try:
        proc = psutil.Process(pid)
        return proc.status() == psutil.STATUS_ZOMBIE or proc.create_time() > path.stat().st_mtime + 1
    except (psutil.NoSuchProcess, FileNotFoundError):
        return True
    except psutil.Error:  # e.g. another user's process: leave its directory alone
        return False
