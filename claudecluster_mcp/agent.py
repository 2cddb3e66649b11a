"""Supervise one real Claude Code agent (``claude -p … --output-format stream-json``) in a pty.

:class:`AgentRun` starts what an :class:`~claudecluster_mcp.agent_spec.AgentSpec` describes,
parses its stream into events, enforces timeouts, the memory cap and cancellation, and
returns an :class:`~claudecluster_mcp.outcome.AgentOutcome`.

Nothing is ever typed into the pty (the prompt goes on argv after ``--``), no shell is
involved, and every process of the run, including Bash-tool children in their own
sessions, is gone when :meth:`AgentRun.run` returns. On Linux ``claude`` runs under a
per-run reaper (:mod:`~claudecluster_mcp.reaper`) that owns every orphan of the run, even
one that cleared its environment tag and left its session.

Finding ``claude`` is :mod:`~claudecluster_mcp.claude_cli`; what to run,
:mod:`~claudecluster_mcp.agent_spec`; what happened, :mod:`~claudecluster_mcp.outcome`.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import signal
import sys
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

import anyio
import psutil

from .agent_spec import AgentSpec, agent_env, build_argv, run_tmpdir
from .claude_cli import INSTALL_HINT, ClaudeBinary, find_claude
from .errors import AgentError, ClaudeNotFoundError
from .events import (
    AgentEvent,
    ApiRetry,
    AssistantText,
    InitEvent,
    ResultEvent,
    StderrLine,
    StreamParser,
    ToolResult,
    ToolUse,
    Usage,
)
from .outcome import AgentOutcome, OutcomeStatus, RunState, decide_outcome, ended_on_api_error, verdict_events
from .proctree import REAPER_SCRIPT, ProcessTree, become_subreaper
from .redact import redactor

__all__ = ["AgentRun", "run_agent"]

logger = logging.getLogger(__name__)
RECENT_EVENTS = 500  #: events an :class:`AgentRun` keeps in :attr:`AgentRun.events`


def _default_log_dir() -> Path:
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "claudecluster" / "runs"


# --------------------------------------------------------------------------- the run


class AgentRun:
    """One supervised ``claude`` process. ``await run.run()`` once; ``run.cancel()`` any time."""

    def __init__(
        self,
        spec: AgentSpec,
        *,
        claude: ClaudeBinary | None = None,
        on_event: Callable[[AgentEvent], None] | None = None,
        on_start: Callable[[int, float], Awaitable[None]] | None = None,
        run_id: str | None = None,
    ) -> None:
        self.spec = spec
        self.run_id = run_id or uuid.uuid4().hex[:12]
        self.session_id = spec.resume or spec.session_id or str(uuid.uuid4())
        self.log_path = spec.log_path or _default_log_dir() / f"{self.run_id}.log"
        self.state = RunState.STARTING
        self.pid: int | None = None
        self.tmpdir: Path | None = None  #: the run's private TMPDIR, removed at the end
        #: The most recent events (a long run's whole stream would stay in memory).
        self.events: deque[AgentEvent] = deque(maxlen=RECENT_EVENTS)
        self._init: InitEvent | None = None
        self._verdict: list[AgentEvent] = []
        self.last_activity = time.monotonic()
        self._claude = claude
        self._on_event = on_event
        self._on_start = on_start
        self._stop: tuple[OutcomeStatus, str] | None = None
        self._stop_requested = anyio.Event()
        # A run can emit several results (background tasks start new turns); per result the
        # CLI reports turns and usage since the previous one, but cost as a running total.
        self._results: list[ResultEvent] = []
        self._last_retry: ApiRetry | None = None
        self._stderr: deque[str] = deque(maxlen=20)
        self._turn_messages: set[str] = set()
        self._tree: ProcessTree | None = None
        self._started = False

    # -- control --------------------------------------------------------------------------

    def cancel(self, reason: str = "cancelled by request") -> None:
        """Stop the agent: SIGINT, grace period, SIGTERM, SIGKILL, then sweep its processes."""
        self._request_stop(OutcomeStatus.CANCELLED, reason)

    def _request_stop(self, status: OutcomeStatus, reason: str) -> None:
        if self._stop is None:
            self._stop = (status, reason)
            logger.info("run %s: stopping (%s: %s)", self.run_id, status, reason)
        self._stop_requested.set()

    @property
    def turns(self) -> int:
        """Model turns so far (distinct assistant messages)."""
        return len(self._turn_messages)

    # -- events ---------------------------------------------------------------------------

    def _handle(self, event: AgentEvent) -> None:
        self.events.append(event)
        if not isinstance(event, StderrLine):
            self.last_activity = time.monotonic()
        self._verdict = verdict_events(self._verdict, event)
        if isinstance(event, InitEvent):
            self.session_id = event.session_id
            self._init = self._init or event
        elif isinstance(event, ApiRetry):
            self._last_retry = event
            self.state = RunState.WAITING
        elif isinstance(event, ToolUse):
            self.state = RunState.TOOL
            if event.message_id:
                self._turn_messages.add(event.message_id)
        elif isinstance(event, ToolResult):
            if self.state is RunState.TOOL:
                self.state = RunState.RUNNING
        elif isinstance(event, AssistantText):
            if event.message_id:
                self._turn_messages.add(event.message_id)
            if self.state is not RunState.STOPPING:
                self.state = RunState.RUNNING
        elif isinstance(event, ResultEvent):
            self._results.append(event)
        elif isinstance(event, StderrLine):
            self._stderr.append(event.text)
        if self._on_event is not None:
            try:
                self._on_event(event)
            except Exception:
                logger.exception("run %s: on_event callback failed", self.run_id)

    # -- the run --------------------------------------------------------------------------

    async def run(self) -> AgentOutcome:
        """Start the agent, supervise it to the end, and return what happened."""
        if self._started:
            raise AgentError("an AgentRun can only be run once")
        self._started = True
        from ptyprocess import PtyProcess

        spec = self.spec
        if not spec.cwd.is_dir():
            raise AgentError(f"agent working directory {spec.cwd} does not exist")
        claude = self._claude if self._claude is not None else await anyio.to_thread.run_sync(find_claude)
        become_subreaper()
        tmpdir = self.tmpdir = run_tmpdir(self.run_id)
        tmpdir.mkdir(mode=0o700)
        env = agent_env(spec, tmpdir=tmpdir, run_tag=self.run_id)
        argv = _under_reaper(build_argv(spec, claude.path, self.session_id, tmpdir=tmpdir))
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        started_at = datetime.now(UTC)
        t0 = time.monotonic()
        self.last_activity = t0
        log = self.log_path.open("ab")
        try:
            try:
                # The reaper would only report a missing claude on the pty: check first.
                if not os.access(claude.path, os.X_OK) or claude.path.is_dir():
                    raise FileNotFoundError(errno.ENOENT, "no such executable", str(claude.path))
                proc = PtyProcess.spawn(argv, cwd=str(spec.cwd), env=env, echo=False, dimensions=(50, 250))
            except OSError as exc:
                if exc.errno == errno.E2BIG:
                    size = sum(len(a.encode()) for a in argv)
                    raise AgentError(
                        f"cannot start the agent: its command line ({size:,} bytes, mostly the prompt) is longer "
                        "than the system allows; shorten the task's prompt"
                    ) from exc
                raise ClaudeNotFoundError(f"cannot start {claude.path}: {exc}. {INSTALL_HINT}") from exc
            self.pid = proc.pid
            self._tree = ProcessTree(proc.pid, self.run_id)
            self._tree.seen[proc.pid] = _create_time(proc.pid)
            self.state = RunState.RUNNING
            try:
                if self._on_start is not None:
                    await self._on_start(proc.pid, _create_time(proc.pid))
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._watch, proc, t0)
                    await self._pump(proc, log)
                    tg.cancel_scope.cancel()
            finally:
                with anyio.CancelScope(shield=True):
                    if proc.isalive():
                        self._request_stop(OutcomeStatus.CANCELLED, "cancelled: the caller was cancelled")
                        await self._terminate(proc)
                    killed = await anyio.to_thread.run_sync(self._tree.kill_all)
                    # ptyprocess.close() sleeps 0.1 s (blocking the event loop) before it checks
                    # the child; ours is already reaped, so skip that wait.
                    proc.delayafterclose = 0
                    with contextlib.suppress(OSError):
                        proc.close(force=True)
        finally:
            log.close()
            shutil.rmtree(tmpdir, ignore_errors=True)
        self.state = RunState.FINISHED
        return self._outcome(proc, started_at, time.monotonic() - t0, killed)

    def _outcome(self, proc: Any, started_at: datetime, duration: float, killed: list[int]) -> AgentOutcome:
        exit_code = proc.exitstatus
        signal_number = proc.signalstatus
        result = self._results[-1] if self._results else None
        status, reason = decide_outcome(
            result,
            exit_code=exit_code,
            signal_number=signal_number,
            stopped=self._stop,
            stderr_tail=list(self._stderr),
            last_retry=self._last_retry,
        )
        init = self._init
        retry_after = self._last_retry.retry_delay_ms / 1000 if self._last_retry else None
        assert self._tree is not None
        return AgentOutcome(
            run_id=self.run_id,
            status=status,
            reason=reason,
            exit_code=exit_code,
            signal=signal_number,
            session_id=self.session_id,
            model=init.model if init else None,
            num_turns=sum(r.num_turns for r in self._results) if result else self.turns,
            cost_usd=result.total_cost_usd if result else 0.0,
            usage=Usage(**{name: sum(getattr(r.usage, name) for r in self._results) for name in Usage.model_fields}),
            duration_s=round(duration, 3),
            final_text=result.result if result else None,
            structured_output=result.structured_output if result else None,
            permission_denials=result.permission_denials if result else [],
            api_error=ended_on_api_error(self._verdict, stopped=self._stop is not None),
            api_error_status=result.api_error_status if result else None,
            retry_after_s=retry_after if status is OutcomeStatus.RATE_LIMITED else None,
            started_at=started_at,
            log_path=self.log_path,
            pids=sorted(self._tree.seen),
            killed_pids=killed,
        )

    async def _pump(self, proc: Any, log: BinaryIO) -> None:
        """Read the pty until the CLI has exited and its output is drained. The transcript
        gets the bytes with secrets redacted (a secret split across reads included), in a
        0600 file (its directory is the caller's: the engine makes its own 0700)."""
        fd = proc.fd
        os.set_blocking(fd, False)
        parser = StreamParser()
        os.fchmod(log.fileno(), 0o600)
        transcript = redactor(self.spec.env).stream()
        exited_at: float | None = None
        try:
            while True:
                data = b""
                with anyio.move_on_after(0.25):
                    await anyio.wait_readable(fd)
                try:
                    data = os.read(fd, 65536)
                    eof = not data
                except BlockingIOError:
                    eof = False
                except OSError as exc:  # EIO: every holder of the pty's other end has closed it
                    if exc.errno not in (errno.EIO, errno.EBADF):
                        raise
                    eof = True
                if data:
                    log.write(transcript.feed(data))
                    for event in parser.feed(data):
                        self._handle(event)
                    continue
                if eof:
                    break
                if exited_at is None:
                    if not proc.isalive():
                        exited_at = time.monotonic()
                elif time.monotonic() - exited_at > 0.5:
                    # The CLI is gone but an escaped process still holds the pty: stop reading.
                    break
        finally:
            # What was held back (a possible secret head) is written, redacted, even on cancel.
            log.write(transcript.close())
        log.flush()
        for event in parser.close():
            self._handle(event)
        # Reap the CLI (ptyprocess owns its exit status).
        await _wait_exit(proc, None)

    async def _watch(self, proc: Any, t0: float) -> None:
        """Timeouts, memory cap and cancel requests; records the run's processes."""
        spec = self.spec
        assert self._tree is not None
        scan_every = 1.0 if spec.memory_limit_mb else 2.0
        next_scan = time.monotonic()
        while not self._stop_requested.is_set():
            with anyio.move_on_after(0.2):
                await self._stop_requested.wait()
            if self._stop_requested.is_set():
                break
            now = time.monotonic()
            if spec.wall_timeout is not None and now - t0 > spec.wall_timeout:
                self._request_stop(
                    OutcomeStatus.TIMED_OUT,
                    f"wall-clock timeout: still running after {spec.wall_timeout:g}s",
                )
            elif spec.inactivity_timeout is not None and now - self.last_activity > spec.inactivity_timeout:
                self._request_stop(
                    OutcomeStatus.TIMED_OUT,
                    f"inactivity timeout: no event from claude for {spec.inactivity_timeout:g}s",
                )
            elif now >= next_scan:
                next_scan = now + scan_every
                rss = await anyio.to_thread.run_sync(self._tree.rss_bytes)
                if spec.memory_limit_mb and rss > spec.memory_limit_mb * 1024 * 1024:
                    self._request_stop(
                        OutcomeStatus.FAILED,
                        f"memory cap exceeded: the agent's processes used {rss / 2**20:.0f} MB "
                        f"(cap {spec.memory_limit_mb} MB)",
                    )
        await self._terminate(proc)

    async def _terminate(self, proc: Any) -> None:
        """SIGINT (the CLI stops its tools and may emit a result), then SIGTERM (both passed
        on by the reaper), then the whole run frozen and SIGKILLed."""
        self.state = RunState.STOPPING
        tree = self._tree
        assert tree is not None
        await anyio.to_thread.run_sync(tree.scan)
        for sig, wait in ((signal.SIGINT, self.spec.cancel_grace), (signal.SIGTERM, 3.0)):
            if not proc.isalive():
                return
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, sig)
            if await _wait_exit(proc, wait):
                return
        # Not the reaper alone: its orphans would be re-parented out of the run's subtree.
        await anyio.to_thread.run_sync(tree.kill_all)
        await _wait_exit(proc, 2.0)


def _under_reaper(argv: list[str]) -> list[str]:
    """``argv`` run by the per-run reaper (Linux; elsewhere ``argv`` itself)."""
    if not sys.platform.startswith("linux"):
        return argv
    # -I: no PYTHON* variables or user site; -S: the reaper needs the standard library only.
    return [sys.executable, "-I", "-S", REAPER_SCRIPT, "--", *argv]


def _create_time(pid: int) -> float:
    try:
        return float(psutil.Process(pid).create_time())
    except psutil.Error:
        return time.time()


async def _wait_exit(proc: Any, limit: float | None) -> bool:
    """Wait until the CLI has exited (and is reaped); False on timeout.

    Polling: a pty child offers no exit notification that works on every anyio backend.
    """
    with anyio.move_on_after(limit):
        while proc.isalive():  # noqa: ASYNC110
            await anyio.sleep(0.02)
        return True
    return False


async def run_agent(
    spec: AgentSpec,
    *,
    claude: ClaudeBinary | None = None,
    on_event: Callable[[AgentEvent], None] | None = None,
) -> AgentOutcome:
    """Run one agent to completion (see :class:`AgentRun` for cancel and live state)."""
    return await AgentRun(spec, claude=claude, on_event=on_event).run()
