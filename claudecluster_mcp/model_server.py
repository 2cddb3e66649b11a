"""The scripted model server: an Anthropic Messages API stand-in for offline ``claude`` runs.

The real Claude Code CLI is pointed at it with ``ANTHROPIC_BASE_URL`` (see
:func:`scripted_env`) and then runs exactly as it would against the real API: it streams
messages, executes the scripted tool calls (Write, Edit, Bash, ``mcp__…``) for real, and
reports turns, tokens and cost. Which answer a request gets is decided by a
:class:`~claudecluster_mcp.scenario.Scenario`.

Use it in-process (``with ScriptedModelServer(scenario) as server: server.url``; it serves
from a background thread on a free loopback port) or as ``claudecluster model-server``.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import anyio
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .messages_api import (
    FAULT_ERRORS,
    CutStream,
    MessagesRequest,
    answer_usage,
    cut_response,
    error_response,
    message_response,
    new_message_id,
    stream_events,
    streaming_response,
    templated,
    text_block,
    tool_result_texts,
    tool_use_block,
)
from .scenario import Fault, Rule, Scenario, Turn

__all__ = ["RecordedRequest", "ScriptedModelServer", "create_app", "scripted_env", "serve_forever"]

logger = logging.getLogger(__name__)

# Faults answered with an error (or, for a hang, with silence) instead of a message.
_NO_MESSAGE_FAULTS = frozenset(FAULT_ERRORS) | {"hang"}


class _QuietCuts(logging.Filter):
    """A scripted cut drops its connection by raising :class:`CutStream` on purpose: no
    "Exception in ASGI application" traceback for it."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, BaseExceptionGroup):
            return error.subgroup(CutStream) is None
        return not isinstance(error, CutStream)


_QUIET_CUTS = _QuietCuts()


def scripted_env(url: str) -> dict[str, str]:
    """Environment that points a ``claude`` process at the scripted model server at ``url``.

    Retries are off so that faults surface at once (the CLI would otherwise retry for ~3 min).
    """
    return {
        "ANTHROPIC_BASE_URL": url,
        "ANTHROPIC_API_KEY": "scripted-model-key",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "CLAUDE_CODE_MAX_RETRIES": "0",
        "DISABLE_AUTOUPDATER": "1",
        "DISABLE_TELEMETRY": "1",
    }


@dataclass(frozen=True)
class RecordedRequest:
    """What the server saw and did for one request (for logs and test assertions)."""

    index: int
    path: str
    outcome: str
    rule: str | None = None
    turn: int | None = None
    model: str | None = None
    stream: bool = False
    cwd: str | None = None
    first_user_text: str = ""
    tool_results: tuple[str, ...] = ()
    at: float = field(default_factory=time.time)


def _content(turn: Turn, variables: Mapping[str, str]) -> list[dict[str, Any]]:
    """The content blocks of a scripted turn, templated with ``variables``."""
    texts = [text_block(templated(turn.text, variables))] if turn.text is not None else []
    return texts + [tool_use_block(call.name, templated(call.input, variables)) for call in turn.tools]


def _record_fields(request: MessagesRequest) -> dict[str, Any]:
    """The :class:`RecordedRequest` fields a Messages API request fills."""
    return {
        "path": request.path,
        "turn": request.turn,
        "model": request.model,
        "stream": request.stream,
        "cwd": request.cwd,
        "first_user_text": request.first_text[-2000:],
        "tool_results": request.tool_results,
    }


class ScriptedModelServer:
    """A scripted Messages API on a loopback port, served from a background thread."""

    def __init__(self, scenario: Scenario, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.scenario = scenario
        self.host = host
        self.port = port
        self._lock = threading.Lock()
        self._requests: list[RecordedRequest] = []
        self._attempts: Counter[tuple[str, int]] = Counter()
        self._model_requests = 0
        self._first_request_at: float | None = None  # epoch seconds of the first model request
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.app = create_app(self)

    # -- what tests and logs read ---------------------------------------------------------

    @property
    def url(self) -> str:
        """Base URL for ``ANTHROPIC_BASE_URL`` (no ``/v1``)."""
        return f"http://{self.host}:{self.port}"

    @property
    def requests(self) -> list[RecordedRequest]:
        """A snapshot of every request received so far, in arrival order."""
        with self._lock:
            return list(self._requests)

    @property
    def storm_window(self) -> tuple[float, float] | None:
        """(start, end) in epoch seconds of a time-window storm, once its clock has started
        (at the first model request); else ``None``."""
        storm = self.scenario.storm
        if storm is None or storm.seconds is None or self._first_request_at is None:
            return None
        start = self._first_request_at + storm.after
        return start, start + storm.seconds

    def _record(self, **fields: Any) -> RecordedRequest:
        with self._lock:
            record = RecordedRequest(index=len(self._requests), **fields)
            self._requests.append(record)
        level = logging.WARNING if record.outcome.startswith("unmatched") else logging.INFO
        logger.log(level, "scripted model request #%d %s: %s", record.index, record.path, record.outcome)
        return record

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> ScriptedModelServer:
        """Bind the port and serve in a daemon thread; returns once accepting requests."""
        logging.getLogger("uvicorn.error").addFilter(_QUIET_CUTS)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app,
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=1,
            timeout_keep_alive=30,
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="scripted-model", daemon=True)
        thread.start()
        deadline = time.monotonic() + 15
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                sock.close()
                raise RuntimeError("scripted model server failed to start")
            time.sleep(0.005)
        self._server, self._thread = server, thread
        return self

    def stop(self) -> None:
        """Stop serving; open streams are closed."""
        if self._server is None or self._thread is None:
            return
        self._server.should_exit = True
        self._thread.join(timeout=5)
        if self._thread.is_alive():
            self._server.force_exit = True
            self._thread.join(timeout=5)
        self._server = self._thread = None

    def __enter__(self) -> ScriptedModelServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    async def __aenter__(self) -> ScriptedModelServer:
        return await anyio.to_thread.run_sync(self.start)

    async def __aexit__(self, *exc_info: object) -> None:
        await anyio.to_thread.run_sync(self.stop)

    # -- the Messages API -----------------------------------------------------------------

    async def messages(self, request: Request) -> Response:
        """``POST /v1/messages`` (streaming and not)."""
        call = await self._read_call(request)
        if isinstance(call, Response):
            return call
        storm = self._storm_fault()
        if storm is not None:
            self._record(outcome=f"storm fault: {storm.type}", **_record_fields(call))
            return await self._fault_response(storm, request)
        selected = self._select_turn(call)
        if isinstance(selected, Response):
            return selected
        rule, turn, variables = selected
        fault = self._turn_fault(turn.fault, rule, call)
        self._record(outcome=f"fault: {fault.type}" if fault else "ok", rule=rule.name, **_record_fields(call))
        latency = self.scenario.default_latency if turn.latency is None else turn.latency
        if latency:
            await anyio.sleep(latency)
        if fault is not None and fault.type in _NO_MESSAGE_FAULTS:
            return await self._fault_response(fault, request)
        content = _content(turn, self._variables(rule, variables, call))
        return await self._answer(call, turn, content, fault)

    async def _read_call(self, request: Request) -> MessagesRequest | Response:
        """Parse the body; a 400 (recorded) if it is not JSON or has no messages."""
        try:
            body = json.loads(await request.body())
        except json.JSONDecodeError:
            self._record(path=request.url.path, outcome="bad request: body is not JSON")
            return error_response(400, "invalid_request_error", "request body is not JSON")
        messages = body.get("messages") if isinstance(body, dict) else None
        if not isinstance(messages, list) or not messages:
            self._record(path=request.url.path, outcome="bad request: no messages")
            return error_response(400, "invalid_request_error", "messages: at least one message is required")
        return MessagesRequest.read(request.url.path, body, messages, request.headers)

    def _storm_fault(self) -> Fault | None:
        """The storm's fault if it hits this request, else ``None``."""
        storm = self.scenario.storm
        clock = time.time()
        with self._lock:
            self._model_requests += 1
            number = self._model_requests
            if self._first_request_at is None:
                self._first_request_at = clock
            since_first = clock - self._first_request_at
        return storm.fault if storm is not None and storm.hits(number, since_first) else None

    def _select_turn(self, call: MessagesRequest) -> tuple[Rule, Turn, dict[str, str]] | Response:
        """The matching rule, its turn for this request and the match's variables; else a 400."""
        found = self.scenario.find_rule(call.first_text)
        if found is None:
            snippet = " ".join(call.first_text.split())[-160:]
            record = self._record(outcome="unmatched: no rule matches", **_record_fields(call))
            return error_response(
                400,
                "invalid_request_error",
                f"scripted model: request #{record.index} matches no rule of scenario "
                f"{self.scenario.name!r} (first user message ends: {snippet!r})",
            )
        rule, variables = found
        if call.turn >= len(rule.turns):
            outcome = f"unmatched: rule has only {len(rule.turns)} turns"
            record = self._record(outcome=outcome, rule=rule.name, **_record_fields(call))
            return error_response(
                400,
                "invalid_request_error",
                f"scripted model: request #{record.index} asks for turn {call.turn + 1} of rule "
                f"{rule.name!r}, which scripts only {len(rule.turns)} turns",
            )
        return rule, rule.turns[call.turn], variables

    def _turn_fault(self, fault: Fault | None, rule: Rule, call: MessagesRequest) -> Fault | None:
        """``fault`` if it still applies: its first ``times`` attempts at this turn, of this
        conversation or (``per="rule"``) of every conversation of the rule."""
        if fault is None:
            return None
        key = ("rule:" + rule.name if fault.per == "rule" else call.conversation, call.turn)
        with self._lock:
            attempt = self._attempts[key]
            self._attempts[key] += 1
        return fault if fault.times is None or attempt < fault.times else None

    @staticmethod
    def _variables(rule: Rule, variables: dict[str, str], call: MessagesRequest) -> dict[str, str]:
        """Template variables: the match's, the rule's captures from tool results, and ``cwd``."""
        if rule.captures:
            variables = {**variables, **rule.captured(tool_result_texts(call.messages))}
        if call.cwd is not None:
            variables = {"cwd": call.cwd, **variables}
        return variables

    @staticmethod
    async def _answer(
        call: MessagesRequest, turn: Turn, content: list[dict[str, Any]], fault: Fault | None
    ) -> Response:
        """The assistant message, streamed or whole; a ``stall`` or ``cut`` fault shapes it."""
        usage = answer_usage(turn.input_tokens, turn.output_tokens, call.first_text, content)
        message_id = new_message_id()
        stop_reason = "tool_use" if turn.tools else "end_turn"
        if not call.stream:
            if fault is not None and fault.type == "stall":  # a plain request just waits
                await anyio.sleep(fault.seconds)
            response = message_response(message_id, call.model, content, stop_reason, usage)
            return cut_response(response) if fault is not None and fault.type == "cut" else response
        stall = fault.seconds if fault is not None and fault.type == "stall" else None
        cut = fault is not None and fault.type == "cut"
        events = stream_events(message_id, call.model, content, stop_reason, usage, stall=stall, cut=cut)
        return streaming_response(events, message_id)

    @staticmethod
    async def _fault_response(fault: Fault, request: Request) -> Response:
        """A hang (silence until the client gives up or ``seconds`` pass), or the fault's API error."""
        if fault.type in ("hang", "stall", "cut"):
            # Accept and say nothing; stop as soon as the client gives up.
            with anyio.move_on_after(fault.seconds):
                while not await request.is_disconnected():  # noqa: ASYNC110 - no event exists
                    await anyio.sleep(0.25)
            return error_response(504, "timeout_error", "scripted hang ended")
        status, kind, default_message = FAULT_ERRORS[fault.type]
        headers = None
        if fault.type == "rate_limit" and fault.retry_after is not None:
            headers = {"retry-after": f"{fault.retry_after:g}"}
        return error_response(status, kind, fault.message or default_message, headers)

    async def count_tokens(self, request: Request) -> Response:
        """``POST /v1/messages/count_tokens``: a length-based estimate."""
        raw = await request.body()
        self._record(path=request.url.path, outcome="ok")
        return JSONResponse({"input_tokens": max(1, len(raw) // 4)})

    async def probe(self, request: Request) -> Response:
        """``HEAD``/``GET /`` and ``GET /v1/models``: the CLI's and users' reachability probes."""
        if request.url.path.endswith("/models"):
            return JSONResponse({"data": [{"type": "model", "id": "claude-scripted"}], "has_more": False})
        return JSONResponse({"ok": True, "server": "claudecluster scripted model", "scenario": self.scenario.name})


def create_app(server: ScriptedModelServer) -> Starlette:
    """The Starlette app behind a :class:`ScriptedModelServer`."""
    return Starlette(
        routes=[
            Route("/v1/messages", server.messages, methods=["POST"]),
            Route("/v1/messages/count_tokens", server.count_tokens, methods=["POST"]),
            Route("/v1/models", server.probe, methods=["GET"]),
            Route("/", server.probe, methods=["GET", "HEAD"]),
        ]
    )


def serve_forever(scenario: Scenario, host: str, port: int) -> None:
    """Run the server in the foreground until interrupted (``claudecluster model-server``)."""
    server = ScriptedModelServer(scenario, host=host, port=port)
    config = uvicorn.Config(server.app, host=host, port=port, log_level="info", lifespan="off")
    logging.getLogger("uvicorn.error").addFilter(_QUIET_CUTS)
    uvicorn.Server(config).run()
