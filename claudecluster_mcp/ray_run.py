"""One agent run on a Ray cluster: :class:`RayAgentHandle` (the engine's side of it).

The handle takes a snapshot of the task's worktree (prepared here as for a local agent),
sends it as a git bundle to a slot (:mod:`~claudecluster_mcp.ray_actor`) on a node with a
free ``claude_slot``, passes the agent's events on as they come, and puts the node's result
back into the local worktree (:mod:`~claudecluster_mcp.bundles`): the task runner then
commits and merges it exactly as a local agent's work.

* A node (or slot) lost mid-run: the run starts again, from the same snapshot, on another
  slot (up to :data:`MAX_NODE_LOSSES` times). The engine sees one run, so the task spends
  no attempt on it and its work is merged at most once.
* ``cancel()``: the node stops the agent as a local cancel does, and the result comes back.
  When the engine itself is cancelled (shutdown), the stream is cancelled (``ray.cancel``)
  and the slot ended, which stops the agent and everything it started (the per-run reaper
  sweeps them when the pty hangs up).
* A run found after an engine crash (:class:`FoundRun`) is re-attached to when its task
  starts again from the same base: every message is read again from the start.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from .agent_spec import AgentSpec
from .bundles import Snapshot, apply_snapshot, ignored_matches, take_snapshot
from .errors import AgentError
from .events import AgentEvent, AssistantText, InitEvent, ToolUse
from .outcome import AgentOutcome
from .ray_actor import Message, NodeInfo, RemoteJob, RunInfo, RunResult
from .ray_slots import Slot

if TYPE_CHECKING:
    from .ray_placement import RayPlacement

__all__ = ["MAX_NODE_LOSSES", "FoundRun", "Placed", "RayAgentHandle", "end_run"]

logger = logging.getLogger(__name__)

OnEvent = Callable[[AgentEvent], None]
OnStart = Callable[[int, float], Awaitable[None]]

#: Slots (nodes) a run may lose before it fails.
MAX_NODE_LOSSES = 3


@dataclass
class Placed:
    """One attempt of a run on a node, with its clock times (for status and benchmarks)."""

    run_id: str
    node: NodeInfo
    requested: float  #: the engine asked for a slot
    accepted: float = 0.0  #: the slot took the job (the base bundle is there)
    started: float = 0.0  #: the agent's process exists on the node
    finished: float = 0.0  #: the result reached the engine
    applied: float = 0.0  #: the result is in the local worktree
    agent_s: float = 0.0  #: the agent's own run time (its outcome's duration)
    bundle_out: int = 0
    incremental: bool = False  #: the base went as an increment over what the slot had
    bundle_back: int = 0
    status: str = ""
    adopted: bool = False
    node_times: dict[str, float] = field(default_factory=dict)  #: the node's clock times (RunResult.times)

    @property
    def overhead_s(self) -> float:
        """What placing the run on Ray added to the agent's own time."""
        return (self.applied - self.requested) - self.agent_s if self.applied else 0.0


class _Busy(Exception):
    """The slot holds another run."""


class _Gone(Exception):
    """The slot does not hold the run (any more)."""


@dataclass
class FoundRun:
    """A run on a slot that outlived its engine, found by a restarted engine's recovery."""

    actor: Any
    info: RunInfo
    found: float = field(default_factory=time.monotonic)


def end_run(actor: Any, run_id: str) -> None:
    """Ask a slot to stop a run nobody wants any more, and to forget it."""
    with contextlib.suppress(Exception):
        actor.cancel.remote(run_id, "cancelled: the engine does not want this run any more", True)


def _lost_errors() -> tuple[type[BaseException], ...]:
    from ray.exceptions import NodeDiedError, ObjectLostError, RayActorError, WorkerCrashedError

    return (RayActorError, NodeDiedError, ObjectLostError, WorkerCrashedError)


class RayAgentHandle:
    """One agent run on the Ray cluster (the :class:`~claudecluster_mcp.placement.AgentHandle`
    protocol): ``await run()`` once, ``cancel()`` any time."""

    def __init__(
        self, placement: RayPlacement, spec: AgentSpec, on_event: OnEvent, on_start: OnStart, adopt: FoundRun | None
    ) -> None:
        self.placement = placement
        self.spec = spec
        self.run_id = adopt.info.run_id if adopt else uuid.uuid4().hex[:12]
        # A node cannot resume a session another machine wrote: a resumed task starts a new one.
        self.session_id = spec.session_id or str(uuid.uuid4())
        self._on_event = on_event
        self._on_start = on_start
        self._adopt = adopt
        self._messages: set[str] = set()
        self._cancel: str | None = None
        self._actor: Any = None
        self._ran = False

    @property
    def turns(self) -> int:
        """Model turns so far (distinct assistant messages)."""
        return len(self._messages)

    def cancel(self, reason: str = "cancelled by request") -> None:
        """Stop the agent on its node, as a local cancel does; its result still comes back."""
        self._cancel = self._cancel or reason
        if self._actor is not None:
            with contextlib.suppress(Exception):
                self._actor.cancel.remote(self.run_id, reason)

    async def run(self) -> AgentOutcome:
        """Run the agent on a slot (another one if a node is lost) and bring its work back."""
        if self._ran:
            raise AgentError("an agent run can only be run once")
        self._ran = True
        worktree = self.spec.cwd
        settings = self.placement.settings
        identity = await self.placement.identity(worktree)
        # Files copied in for the agent (copy_files) that git ignores go along; the rest of
        # what the engine's setup made is made again on the node (the setup runs there too).
        copied = await ignored_matches(worktree, settings.copy_files)
        snapshot = await take_snapshot(worktree, identity, ignored=copied)
        job = RemoteJob(
            self.run_id, self.spec, snapshot, identity, settings.claude_bin, str(worktree),
            setup=settings.setup if not self.spec.resume else None, setup_timeout=settings.setup_timeout,
        )  # fmt: skip
        if self._adopt is not None:
            outcome = await self._reattach(self._adopt, job)
            if outcome is not None:
                return outcome
        losses = dead_slots = 0
        while True:
            requested = time.time()
            slot = await self.placement.pool.acquire()
            bundle, size = await self.placement.bundle_of(worktree, snapshot, slot.known)
            placed = Placed(self.run_id, NodeInfo("", "", "?", 0), requested, bundle_out=size)
            placed.incremental = slot.known is not None
            # A new session per attempt: an attempt lost with its node may have written its own.
            self.session_id = self.session_id if not losses else str(uuid.uuid4())
            spec = self.spec.model_copy(update={"session_id": self.session_id, "resume": None})
            try:
                return await self._run_on(slot, replace(job, spec=spec), bundle, placed)
            except _Busy:
                self.placement.pool.discard(slot)  # someone else's run: not ours to wait for
            except _lost_errors() as exc:
                self.placement.pool.discard(slot)
                if not placed.accepted:  # the slot died before the run began there: nothing was lost
                    dead_slots += 1
                    if dead_slots > MAX_NODE_LOSSES:
                        raise AgentError(f"no slot of the Ray cluster could start: {_first_line(exc)}") from exc
                    continue
                losses += 1
                logger.warning("run %s: lost Ray node %s (%s); starting again", self.run_id, placed.node.address, exc)
                if losses > MAX_NODE_LOSSES:
                    raise AgentError(f"lost the agent's Ray node {losses} times (last: {_first_line(exc)})") from exc

    async def _run_on(self, slot: Slot, job: RemoteJob, bundle: Any, placed: Placed) -> AgentOutcome:
        pool = self.placement.pool
        try:
            node = await slot.actor.start.remote(job, bundle)
        except BaseException:
            pool.discard(slot)  # a dead slot, or a cancelled engine: either way, it goes
            raise
        if node is None:
            raise _Busy
        placed.node, placed.accepted = node, time.time()
        self.placement.record(placed)
        self._actor = slot.actor
        if self._cancel is not None:
            slot.actor.cancel.remote(self.run_id, self._cancel)
        slot.known = None  # until the run shows that the slot's cache took the bundle
        try:
            result = await self._follow(slot.actor, placed, on_cancel=lambda: pool.discard(slot))
            outcome = await self._bring_back(slot.actor, result, placed, job.snapshot)
        except _lost_errors():
            raise  # run() tries another slot
        except BaseException as exc:  # the run's own error, or the engine cancelled
            pool.discard(slot) if isinstance(exc, anyio.get_cancelled_exc_class()) else pool.release(slot)
            raise
        slot.known = job.snapshot.head
        pool.release(slot)
        return outcome

    async def _reattach(self, adopt: FoundRun, job: RemoteJob) -> AgentOutcome | None:
        """Follow the run a crashed engine left, if it started from this very worktree state."""
        base, now = adopt.info.base, job.snapshot
        same = (base.head, base.merge_head, base.files) == (now.head, now.merge_head, now.files)
        if not same:
            logger.info("run %s: its base moved on; stopped, the task runs again", self.run_id)
            end_run(adopt.actor, self.run_id)
            return None
        placed = Placed(self.run_id, adopt.info.node, time.time(), adopted=True)
        placed.accepted = placed.requested
        self.placement.record(placed)
        self._actor = adopt.actor
        try:
            result = await self._follow(adopt.actor, placed, on_cancel=lambda: end_run(adopt.actor, self.run_id))
            outcome = await self._bring_back(adopt.actor, result, placed, job.snapshot)
        except (_Gone, *_lost_errors()):  # type: ignore[misc]
            logger.info("run %s: gone from its slot; the task runs again", self.run_id)
            return None
        finally:
            with contextlib.suppress(Exception):
                adopt.actor.shutdown.remote()  # the slot of an engine that is gone: not ours to keep
        return outcome

    async def _follow(self, actor: Any, placed: Placed, *, on_cancel: Callable[[], None]) -> RunResult:
        """Pass the run's messages on until its result."""
        import ray

        stream = actor.events.remote(self.run_id, 0)
        try:
            async for ref in stream:
                message: Message = await ref
                if message[0] == "started":
                    placed.started = time.time()
                    await self._on_start(message[1], message[2])
                elif message[0] == "event":
                    self._event(message[1])
                elif message[0] == "done":
                    placed.finished = time.time()
                    result: RunResult = message[1]
                    return result
                else:
                    raise _Gone
        except BaseException as exc:
            if isinstance(exc, anyio.get_cancelled_exc_class()):
                # The engine is cancelled (shutting down): stop the stream and the agent.
                with contextlib.suppress(Exception):
                    ray.cancel(stream)
                    on_cancel()
            raise
        raise _Gone

    def _event(self, event: AgentEvent) -> None:
        if isinstance(event, InitEvent):
            self.session_id = event.session_id
        elif isinstance(event, (AssistantText, ToolUse)) and event.message_id:
            self._messages.add(event.message_id)
        try:
            self._on_event(event)
        except Exception:
            logger.exception("run %s: on_event callback failed", self.run_id)

    async def _bring_back(self, actor: Any, result: RunResult, placed: Placed, sent: Snapshot) -> AgentOutcome:
        """The node's worktree into the local one, its transcript into the local log."""
        released = actor.release.remote(self.run_id)  # the slot is free again (we have the result)
        try:
            if result.error is not None:
                raise result.error
            assert result.outcome is not None and result.snapshot is not None
            await apply_snapshot(self.spec.cwd, result.bundle, result.snapshot, sent)
            log = await _append_transcript(self.spec.log_path or _default_log(self.run_id), result.transcript)
        finally:
            with contextlib.suppress(Exception):
                await released  # before the slot can take another run
        placed.applied, placed.agent_s = time.time(), result.outcome.duration_s
        placed.bundle_back, placed.status = len(result.bundle), result.outcome.status.value
        placed.node_times = result.times
        return result.outcome.model_copy(update={"run_id": self.run_id, "log_path": log})


def _first_line(exc: BaseException) -> str:
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)


def _default_log(run_id: str) -> Path:
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "claudecluster" / "runs" / f"{run_id}.log"


async def _append_transcript(path: Path, data: bytes) -> Path:
    """Append the node's transcript (already redacted there) to the run's log, mode 0600."""

    def write() -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("ab") as log:
            os.fchmod(log.fileno(), 0o600)
            log.write(data)

    await anyio.to_thread.run_sync(write)
    return path
