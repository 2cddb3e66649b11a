"""Run one real Claude Code agent (``claude -p … --output-format stream-json``) in a pty.

:class:`AgentSpec` says what to run; :class:`AgentRun` runs it and returns an
:class:`AgentOutcome` that tells the truth about what happened: the last ``result`` event
decides success (``is_error`` counts, not ``subtype``), our own stop reasons (cancel,
timeouts, memory cap) take precedence, and a process that ends without a result crashed.

Nothing is ever typed into the pty (the prompt goes on argv after ``--``), no shell is
involved, the environment is an allow-list, and every process of the run, including
Bash-tool children in their own sessions, is gone when :meth:`AgentRun.run` returns.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, Literal

import anyio
import psutil
from pydantic import BaseModel, ConfigDict, Field, field_validator

from .errors import AgentError, ClaudeNotFoundError, ClaudeVersionError
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
from .proctree import RUN_TAG_VAR, ProcessTree, become_subreaper

__all__ = [
    "CLAUDE_BIN_ENV",
    "MIN_CLAUDE_VERSION",
    "AgentOutcome",
    "AgentRun",
    "AgentSpec",
    "ClaudeBinary",
    "OutcomeStatus",
    "PermissionMode",
    "RunState",
    "agent_env",
    "build_argv",
    "decide_outcome",
    "find_claude",
    "run_agent",
    "run_tmpdir",
]

logger = logging.getLogger(__name__)

CLAUDE_BIN_ENV = "CLAUDECLUSTER_CLAUDE_BIN"
MIN_CLAUDE_VERSION = (2, 1, 300)
PINNED_CLAUDE_VERSION = "2.1.332"
_INSTALL_HINT = (
    "Install the pinned Claude Code CLI with `npm ci` in the claudecluster checkout "
    f"(or `npm install -g @anthropic-ai/claude-code@{PINNED_CLAUDE_VERSION}`), "
    f"or point {CLAUDE_BIN_ENV} at a `claude` executable."
)

PermissionMode = Literal["acceptEdits", "auto", "bypassPermissions", "default", "dontAsk", "manual", "plan"]


# --------------------------------------------------------------------------- the binary


class ClaudeBinary(BaseModel):
    """A located, version-checked ``claude`` executable."""

    model_config = ConfigDict(frozen=True)

    path: Path
    version: str


_version_cache: dict[tuple[str, float], str] = {}


def _candidates(explicit: str | os.PathLike[str] | None) -> list[tuple[str, Path]]:
    found: list[tuple[str, Path]] = []
    if explicit:
        return [("the configured path", Path(explicit))]
    if env := os.environ.get(CLAUDE_BIN_ENV):
        return [(f"${CLAUDE_BIN_ENV}", Path(env))]
    project_root = Path(__file__).resolve().parent.parent
    for root in dict.fromkeys([project_root, Path.cwd()]):
        found.append((f"{root}/node_modules", root / "node_modules" / ".bin" / "claude"))
    if on_path := shutil.which("claude"):
        found.append(("PATH", Path(on_path)))
    return found


def _version_of(path: Path) -> str:
    key = (str(path), path.stat().st_mtime)
    if key not in _version_cache:
        try:
            done = subprocess.run(
                [str(path), "--version"],
                capture_output=True,
                text=True,
                timeout=30,
                stdin=subprocess.DEVNULL,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ClaudeVersionError(f"`{path} --version` failed: {exc}. {_INSTALL_HINT}") from exc
        match = re.search(r"(\d+)\.(\d+)\.(\d+)", done.stdout)
        if done.returncode != 0 or match is None:
            detail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise ClaudeVersionError(
                f"`{path} --version` did not report a Claude Code version ({detail[0]}). " + _INSTALL_HINT
            )
        _version_cache[key] = match.group(0)
    return _version_cache[key]


def find_claude(explicit: str | os.PathLike[str] | None = None) -> ClaudeBinary:
    """Locate ``claude``: ``explicit``, else ``$CLAUDECLUSTER_CLAUDE_BIN``, else the project's
    ``node_modules/.bin/claude``, else ``PATH``. Raises a :class:`ClaudeNotFoundError` that
    says how to install it, or :class:`ClaudeVersionError` if it is older than
    :data:`MIN_CLAUDE_VERSION`."""
    looked: list[str] = []
    for origin, path in _candidates(explicit):
        if path.is_file() and os.access(path, os.X_OK):
            version = _version_of(path)
            if tuple(int(p) for p in version.split(".")) < MIN_CLAUDE_VERSION:
                minimum = ".".join(map(str, MIN_CLAUDE_VERSION))
                raise ClaudeVersionError(
                    f"Claude Code at {path} is version {version}; "
                    f"claudecluster needs {minimum} or newer. " + _INSTALL_HINT
                )
            return ClaudeBinary(path=path, version=version)
        looked.append(f"{path} ({origin})")
    raise ClaudeNotFoundError(
        "The Claude Code CLI (`claude`) was not found; looked at: "
        + "; ".join(looked or ["PATH"])
        + ". "
        + _INSTALL_HINT
    )


# --------------------------------------------------------------------------- spec and outcome


class AgentSpec(BaseModel):
    """Everything needed to start one agent. Validated; never passed through a shell."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1)
    cwd: Path
    model: str | None = None
    permission_mode: PermissionMode = "acceptEdits"
    allowed_tools: list[str] = Field(default_factory=list)
    disallowed_tools: list[str] = Field(default_factory=list)
    max_turns: int | None = Field(default=None, ge=1)
    max_budget_usd: float | None = Field(default=None, gt=0)
    mcp_config: dict[str, Any] | Path | None = None
    append_system_prompt: str | None = None
    json_schema: dict[str, Any] | None = None
    session_id: str | None = None
    resume: str | None = None
    env: dict[str, str] = Field(default_factory=dict)
    config_dir: Path | None = None
    wall_timeout: float | None = Field(default=3600.0, gt=0)
    inactivity_timeout: float | None = Field(default=600.0, gt=0)
    memory_limit_mb: int | None = Field(default=None, gt=0)
    cancel_grace: float = Field(default=5.0, ge=0)
    log_path: Path | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt_has_text(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt is empty")
        return value

    @field_validator("allowed_tools", "disallowed_tools")
    @classmethod
    def _tools_are_names(cls, value: list[str]) -> list[str]:
        for tool in value:
            if not tool or tool.startswith("-") or "," in tool:
                raise ValueError(f"bad tool rule {tool!r}: one rule per item, no commas, not starting with '-'")
        return value

    @field_validator("session_id", "resume")
    @classmethod
    def _uuid_like(cls, value: str | None) -> str | None:
        if value is not None:
            uuid.UUID(value)
        return value


class OutcomeStatus(enum.StrEnum):
    """How an agent run ended."""

    SUCCEEDED = "succeeded"  #: the CLI reported success (result event, not is_error)
    FAILED = "failed"  #: the CLI reported an error (API error, max turns, budget, memory cap…)
    CANCELLED = "cancelled"  #: we were asked to stop it
    TIMED_OUT = "timed_out"  #: wall-clock or inactivity timeout
    RATE_LIMITED = "rate_limited"  #: the model API refused with a rate/usage limit
    CRASHED = "crashed"  #: the process ended without any result


class RunState(enum.StrEnum):
    """Live state of a run, for progress displays."""

    STARTING = "starting"
    RUNNING = "running"
    TOOL = "tool"  #: a tool call is executing
    WAITING = "waiting"  #: the CLI is waiting to retry the model API (api_retry)
    STOPPING = "stopping"
    FINISHED = "finished"


class AgentOutcome(BaseModel):
    """The typed, truthful result of one agent run."""

    run_id: str
    status: OutcomeStatus
    reason: str = ""
    exit_code: int | None = None
    signal: int | None = None
    session_id: str | None = None
    model: str | None = None
    num_turns: int = 0
    cost_usd: float = 0.0
    usage: Usage = Field(default_factory=Usage)
    duration_s: float = 0.0
    final_text: str | None = None
    structured_output: Any = None
    permission_denials: list[dict[str, Any]] = Field(default_factory=list)
    api_error_status: int | None = None
    retry_after_s: float | None = None
    started_at: datetime
    log_path: Path | None = None
    pids: list[int] = Field(default_factory=list)
    killed_pids: list[int] = Field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when the agent succeeded."""
        return self.status is OutcomeStatus.SUCCEEDED


_RATE_LIMIT_TEXT = re.compile(r"\b429\b|rate.?limit|usage limit", re.IGNORECASE)


def decide_outcome(
    result: ResultEvent | None,
    *,
    exit_code: int | None,
    signal_number: int | None,
    stopped: tuple[OutcomeStatus, str] | None,
    stderr_tail: list[str],
    last_retry: ApiRetry | None = None,
) -> tuple[OutcomeStatus, str]:
    """Pure decision of a run's status and reason from what was observed."""
    if stopped is not None:
        return stopped
    if result is not None:
        if result.succeeded:
            return OutcomeStatus.SUCCEEDED, ""
        text = result.result or "; ".join(result.errors) or f"{result.subtype} ({result.terminal_reason})"
        limited = result.api_error_status == 429 or result.api_error_type == "rate_limit_error"
        if limited or (result.terminal_reason == "api_error" and _RATE_LIMIT_TEXT.search(text)):
            return OutcomeStatus.RATE_LIMITED, text
        if last_retry is not None and last_retry.error == "rate_limit" and result.api_error_status is None:
            return OutcomeStatus.RATE_LIMITED, text
        return OutcomeStatus.FAILED, text
    how = f"was killed by signal {signal_number}" if signal_number else f"exited with code {exit_code}"
    detail = " | ".join(line for line in stderr_tail[-3:] if line)
    return OutcomeStatus.CRASHED, f"claude {how} without a result" + (f": {detail}" if detail else "")


# --------------------------------------------------------------------------- argv and env


def build_argv(spec: AgentSpec, claude: Path, session_id: str) -> list[str]:
    """The argv for ``spec``: ``--flag=value`` so no value reads as an option; prompt after ``--``.

    ``--strict-mcp-config`` is always passed: otherwise a ``.mcp.json`` in the agent's
    working tree would start its servers without approval.
    """
    argv = [
        str(claude),
        "-p",
        "--output-format=stream-json",
        "--verbose",
        "--strict-mcp-config",
        f"--permission-mode={spec.permission_mode}",
    ]
    if spec.resume:
        argv.append(f"--resume={spec.resume}")
    else:
        argv.append(f"--session-id={session_id}")
    if spec.model:
        argv.append(f"--model={spec.model}")
    if spec.allowed_tools:
        argv.append("--allowedTools=" + ",".join(spec.allowed_tools))
    if spec.disallowed_tools:
        argv.append("--disallowedTools=" + ",".join(spec.disallowed_tools))
    if spec.max_turns is not None:
        argv.append(f"--max-turns={spec.max_turns}")
    if spec.max_budget_usd is not None:
        argv.append(f"--max-budget-usd={spec.max_budget_usd:g}")
    if isinstance(spec.mcp_config, dict):
        argv.append("--mcp-config=" + json.dumps(spec.mcp_config, separators=(",", ":")))
    elif spec.mcp_config is not None:
        argv.append(f"--mcp-config={spec.mcp_config}")
    if spec.append_system_prompt:
        argv.append(f"--append-system-prompt={spec.append_system_prompt}")
    if spec.json_schema is not None:
        argv.append("--json-schema=" + json.dumps(spec.json_schema, separators=(",", ":")))
    argv += ["--", spec.prompt]
    return argv


# Passed through from the parent environment: basics, locale, TLS and proxies, cloud
# credentials for Bedrock/Vertex, and the user's ANTHROPIC_* / CLAUDE_CODE_* settings.
_ENV_ALLOW = frozenset(
    {
        "PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "TZ", "TMP", "TEMP",
        "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "NODE_EXTRA_CA_CERTS",
        "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY", "http_proxy", "https_proxy",
        "no_proxy", "all_proxy", "XDG_CONFIG_HOME", "XDG_CACHE_HOME", "XDG_DATA_HOME",
        "XDG_STATE_HOME", "XDG_RUNTIME_DIR", "CLAUDE_CONFIG_DIR", "GIT_AUTHOR_NAME",
        "GIT_AUTHOR_EMAIL", "GIT_COMMITTER_NAME", "GIT_COMMITTER_EMAIL", "IS_SANDBOX",
        "API_TIMEOUT_MS", "BASH_DEFAULT_TIMEOUT_MS", "BASH_MAX_TIMEOUT_MS", "MCP_TIMEOUT",
        "MCP_TOOL_TIMEOUT", "MAX_MCP_OUTPUT_TOKENS", "MAX_THINKING_TOKENS", "ENABLE_TOOL_SEARCH",
        "DISABLE_AUTOUPDATER", "DISABLE_TELEMETRY", "DISABLE_ERROR_REPORTING",
        "GOOGLE_APPLICATION_CREDENTIALS", "CLOUD_ML_REGION",
    }
)  # fmt: skip
_ENV_ALLOW_PREFIXES = ("LC_", "ANTHROPIC_", "CLAUDE_CODE_", "AWS_", "VERTEX_REGION_")
# Set by a parent Claude Code session (e.g. when claudecluster runs as its MCP server);
# an agent inheriting them would think it is that session's child.
_ENV_PARENT_SESSION = frozenset(
    {
        "CLAUDECODE", "CLAUDE_CODE_ENTRYPOINT", "CLAUDE_CODE_SSE_PORT", "CLAUDE_CODE_SESSION_ID",
        "CLAUDE_CODE_EXECPATH", "CLAUDE_CODE_MESSAGING_SOCKET", "CLAUDE_CODE_MESSAGING_TOKEN",
        "CLAUDE_CODE_CHILD_SESSION", "CLAUDE_CODE_TOOL_USE_ID", "CLAUDE_CODE_SHELL_HANDOVER_KEY",
        "CLAUDE_CODE_SHELL_HANDOVER_PATH", "CLAUDE_CODE_REMOTE_SESSION_ID",
        "CLAUDE_CODE_HOST_SESSION_ID", "CLAUDE_CODE_LAUNCHED_BY_SESSION_IDS",
        "CLAUDE_CODE_SPAWNED_BY_SERVER", "CLAUDE_CODE_SPAWN_TIMESTAMP_MS",
        "CLAUDE_CODE_SESSION_NAME", "CLAUDE_CODE_SESSION_KIND", "CLAUDE_CODE_SESSION_ORIGIN",
        "CLAUDE_CODE_SESSION_LOG", "CLAUDE_CODE_TASK_LIST_ID", "CLAUDE_CODE_TMPDIR",
        "CLAUDE_CODE_ACTION", "CLAUDE_CODE_TEAMMATE_COMMAND", "CLAUDE_CODE_TMUX_SESSION",
    }
)  # fmt: skip


def agent_env(
    spec: AgentSpec,
    *,
    tmpdir: Path,
    run_tag: str,
    parent: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment for an agent: an allow-list of ``parent`` (default ``os.environ``),
    minus a parent Claude Code session's variables, plus the run's own settings, then
    ``spec.env`` (which wins)."""
    source = os.environ if parent is None else parent
    env = {
        key: value
        for key, value in source.items()
        if (key in _ENV_ALLOW or key.startswith(_ENV_ALLOW_PREFIXES)) and key not in _ENV_PARENT_SESSION
    }
    env.setdefault("PATH", os.defpath)
    env.update(
        {
            "TMPDIR": str(tmpdir),
            "CLAUDE_CODE_TMPDIR": str(tmpdir),
            "TERM": "dumb",
            "NO_COLOR": "1",
            RUN_TAG_VAR: run_tag,
        }
    )
    if spec.config_dir is not None:
        env["CLAUDE_CONFIG_DIR"] = str(spec.config_dir)
    if spec.permission_mode == "bypassPermissions" and hasattr(os, "geteuid") and os.geteuid() == 0:
        # The CLI refuses bypass mode as root unless told it runs in a sandbox; the caller
        # asked for bypass explicitly, and each agent works in its own worktree.
        env.setdefault("IS_SANDBOX", "1")
    env.update(spec.env)
    return env


def run_tmpdir(run_id: str) -> Path:
    """The private TMPDIR of a run. Derived from the run id (kept short: the CLI puts unix
    sockets in it), so that crash recovery can remove it when the run's supervisor died."""
    return Path(tempfile.gettempdir()) / f"ccrun-{run_id}"


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
        self.events: list[AgentEvent] = []
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
        if isinstance(event, InitEvent):
            self.session_id = event.session_id
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
        argv = build_argv(spec, claude.path, self.session_id)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        started_at = datetime.now(UTC)
        t0 = time.monotonic()
        self.last_activity = t0
        log = self.log_path.open("ab")
        try:
            try:
                proc = PtyProcess.spawn(argv, cwd=str(spec.cwd), env=env, echo=False, dimensions=(50, 250))
            except (OSError, FileNotFoundError) as exc:
                raise ClaudeNotFoundError(f"cannot start {claude.path}: {exc}. {_INSTALL_HINT}") from exc
            self.pid = proc.pid
            self._tree = ProcessTree(proc.pid, self.run_id)
            self._tree.seen[proc.pid] = time.time()
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
        init = next((e for e in self.events if isinstance(e, InitEvent)), None)
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
            api_error_status=result.api_error_status if result else None,
            retry_after_s=retry_after if status is OutcomeStatus.RATE_LIMITED else None,
            started_at=started_at,
            log_path=self.log_path,
            pids=sorted(self._tree.seen),
            killed_pids=killed,
        )

    async def _pump(self, proc: Any, log: BinaryIO) -> None:
        """Read the pty until the CLI has exited and its output is drained."""
        fd = proc.fd
        os.set_blocking(fd, False)
        parser = StreamParser()
        exited_at: float | None = None
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
                log.write(data)
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
        """SIGINT (the CLI stops its tools and may emit a result), then SIGTERM, then SIGKILL."""
        self.state = RunState.STOPPING
        assert self._tree is not None
        await anyio.to_thread.run_sync(self._tree.scan)
        for sig, wait in (
            (signal.SIGINT, self.spec.cancel_grace),
            (signal.SIGTERM, 3.0),
            (signal.SIGKILL, 2.0),
        ):
            if not proc.isalive():
                return
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, sig)
            await _wait_exit(proc, wait)


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
