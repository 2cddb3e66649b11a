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

import hashlib
import json
import logging
import re
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import anyio
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .scenario import Fault, Scenario, Turn

__all__ = ["RecordedRequest", "ScriptedModelServer", "create_app", "scripted_env"]

logger = logging.getLogger(__name__)

_CWD = re.compile(r"Primary working directory: ([^\n]+?)\s*$", re.MULTILINE)
_TEMPLATE = re.compile(r"\{(\w+)\}")
_FAULT_STATUS = {"rate_limit": 429, "overloaded": 529, "server_error": 500, "unauthorized": 401}
_FAULT_ERROR = {
    "rate_limit": ("rate_limit_error", "scripted rate limit"),
    "overloaded": ("overloaded_error", "Overloaded"),
    "server_error": ("api_error", "Internal server error"),
    "unauthorized": ("authentication_error", "invalid x-api-key"),
}


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


def _blocks_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    parts: list[str] = []
    for block in content:
        if not isinstance(block, dict):
            continue
        if block.get("type") == "text":
            parts.append(str(block.get("text", "")))
        elif block.get("type") == "tool_result":
            parts.append(_blocks_text(block.get("content")))
    return "\n".join(parts)


# Assistant messages the CLI writes itself (e.g. into a resumed session's history after an
# interruption); they are not answers of the model, so they do not advance the script.
_SYNTHETIC_ASSISTANT = frozenset(
    {"No response requested.", "[Request interrupted by user]", "[Request interrupted by user for tool use]"}
)


def _is_model_turn(message: Any) -> bool:
    if not isinstance(message, dict) or message.get("role") != "assistant":
        return False
    return _blocks_text(message.get("content")).strip() not in _SYNTHETIC_ASSISTANT or any(
        isinstance(b, dict) and b.get("type") == "tool_use" for b in message.get("content") or []
    )


def _substitute(value: Any, variables: Mapping[str, str]) -> Any:
    """Replace ``{name}`` for known names only, so JSON or code braces pass through."""
    if isinstance(value, str):
        return _TEMPLATE.sub(lambda m: variables.get(m.group(1), m.group(0)), value)
    if isinstance(value, list):
        return [_substitute(v, variables) for v in value]
    if isinstance(value, dict):
        return {k: _substitute(v, variables) for k, v in value.items()}
    return value


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def _chunks(text: str, pieces: int = 3) -> list[str]:
    size = max(1, -(-len(text) // pieces))
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]


def _error_response(status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> Response:
    body = {"type": "error", "error": {"type": kind, "message": message}}
    return JSONResponse(body, status_code=status, headers=headers)


class _CutStream(Exception):
    """Raised inside a streaming body to drop the connection mid-message."""


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

    def _should_fault(self, fault: Fault | None, conversation: str, turn: int) -> bool:
        if fault is None:
            return False
        with self._lock:
            attempt = self._attempts[(conversation, turn)]
            self._attempts[(conversation, turn)] += 1
        return fault.times is None or attempt < fault.times

    def _storm_fault(self) -> Fault | None:
        storm = self.scenario.storm
        with self._lock:
            self._model_requests += 1
            number = self._model_requests
        return storm.fault if storm is not None and number <= storm.requests else None

    async def messages(self, request: Request) -> Response:
        """``POST /v1/messages`` (streaming and not)."""
        try:
            body = json.loads(await request.body())
        except json.JSONDecodeError:
            self._record(path=request.url.path, outcome="bad request: body is not JSON")
            return _error_response(400, "invalid_request_error", "request body is not JSON")
        messages = body.get("messages") if isinstance(body, dict) else None
        if not isinstance(messages, list) or not messages:
            self._record(path=request.url.path, outcome="bad request: no messages")
            return _error_response(400, "invalid_request_error", "messages: at least one message is required")

        first_user = next((m for m in messages if isinstance(m, dict) and m.get("role") == "user"), {})
        first_text = _blocks_text(first_user.get("content"))
        all_text = (
            _blocks_text(body.get("system"))
            + "\n"
            + "\n".join(_blocks_text(m.get("content")) for m in messages if isinstance(m, dict))
        )
        cwd_match = _CWD.search(all_text)
        cwd = cwd_match.group(1) if cwd_match else None
        turn_index = sum(1 for m in messages if _is_model_turn(m))
        last = messages[-1] if isinstance(messages[-1], dict) else {}
        last_content = last.get("content")
        tool_results = tuple(
            _blocks_text(b.get("content"))
            for b in (last_content if isinstance(last_content, list) else [])
            if isinstance(b, dict) and b.get("type") == "tool_result"
        )
        stream = bool(body.get("stream"))
        model = str(body.get("model") or "claude-scripted")
        conversation = (
            request.headers.get("x-claude-code-session-id") or hashlib.sha256(first_text.encode()).hexdigest()[:16]
        )
        common = {
            "path": request.url.path,
            "model": model,
            "stream": stream,
            "cwd": cwd,
            "first_user_text": first_text[-2000:],
            "tool_results": tool_results,
        }

        storm = self._storm_fault()
        if storm is not None:
            self._record(outcome=f"storm fault: {storm.type}", turn=turn_index, **common)
            return await self._fault_response(storm, request)

        found = self.scenario.find_rule(first_text)
        if found is None:
            snippet = " ".join(first_text.split())[-160:]
            record = self._record(outcome="unmatched: no rule matches", turn=turn_index, **common)
            return _error_response(
                400,
                "invalid_request_error",
                f"scripted model: request #{record.index} matches no rule of scenario "
                f"{self.scenario.name!r} (first user message ends: {snippet!r})",
            )
        rule, variables = found
        if turn_index >= len(rule.turns):
            record = self._record(
                outcome=f"unmatched: rule has only {len(rule.turns)} turns",
                rule=rule.name,
                turn=turn_index,
                **common,
            )
            return _error_response(
                400,
                "invalid_request_error",
                f"scripted model: request #{record.index} asks for turn {turn_index + 1} of rule "
                f"{rule.name!r}, which scripts only {len(rule.turns)} turns",
            )
        turn = rule.turns[turn_index]
        fault = turn.fault if self._should_fault(turn.fault, conversation, turn_index) else None
        self._record(
            outcome=f"fault: {fault.type}" if fault else "ok",
            rule=rule.name,
            turn=turn_index,
            **common,
        )
        latency = self.scenario.default_latency if turn.latency is None else turn.latency
        if latency:
            await anyio.sleep(latency)
        if fault is not None and fault.type in _FAULT_STATUS | {"hang": 0}:
            return await self._fault_response(fault, request)
        if rule.captures:
            earlier = [
                _blocks_text(b.get("content"))
                for m in messages
                if isinstance(m, dict) and isinstance(m.get("content"), list)
                for b in m["content"]
                if isinstance(b, dict) and b.get("type") == "tool_result"
            ]
            variables = {**variables, **rule.captured(earlier)}
        if cwd is not None:
            variables = {"cwd": cwd, **variables}
        content = self._content(turn, variables)
        usage = {
            "input_tokens": turn.input_tokens if turn.input_tokens is not None else max(1, len(first_text) // 4),
            "output_tokens": turn.output_tokens
            if turn.output_tokens is not None
            else max(1, len(json.dumps(content)) // 4),
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
        }
        message_id = f"msg_scripted_{uuid.uuid4().hex[:20]}"
        stop_reason = "tool_use" if turn.tools else "end_turn"
        if not stream:
            if fault is not None:  # stall/cut apply to streams; a plain request just waits
                await anyio.sleep(fault.seconds if fault.type == "stall" else 0)
            return JSONResponse(
                {
                    "id": message_id,
                    "type": "message",
                    "role": "assistant",
                    "model": model,
                    "content": content,
                    "stop_reason": stop_reason,
                    "stop_sequence": None,
                    "usage": usage,
                }
            )
        return StreamingResponse(
            self._stream(message_id, model, content, stop_reason, usage, fault),
            media_type="text/event-stream",
            headers={"cache-control": "no-cache", "request-id": f"req_{message_id}"},
        )

    @staticmethod
    def _content(turn: Turn, variables: Mapping[str, str]) -> list[dict[str, Any]]:
        content: list[dict[str, Any]] = []
        if turn.text is not None:
            content.append({"type": "text", "text": _substitute(turn.text, variables)})
        for call in turn.tools:
            content.append(
                {
                    "type": "tool_use",
                    "id": f"toolu_scripted_{uuid.uuid4().hex[:20]}",
                    "name": call.name,
                    "input": _substitute(call.input, variables),
                }
            )
        return content

    async def _fault_response(self, fault: Fault, request: Request) -> Response:
        if fault.type in ("hang", "stall", "cut"):
            # Accept and say nothing; stop as soon as the client gives up.
            with anyio.move_on_after(fault.seconds):
                while not await request.is_disconnected():  # noqa: ASYNC110 - no event exists
                    await anyio.sleep(0.25)
            return _error_response(504, "timeout_error", "scripted hang ended")
        kind, default_message = _FAULT_ERROR[fault.type]
        headers = {"retry-after": f"{fault.retry_after:g}"} if fault.type == "rate_limit" else None
        return _error_response(_FAULT_STATUS[fault.type], kind, fault.message or default_message, headers)

    @staticmethod
    async def _stream(
        message_id: str,
        model: str,
        content: list[dict[str, Any]],
        stop_reason: str,
        usage: dict[str, int],
        fault: Fault | None,
    ) -> AsyncIterator[bytes]:
        start_usage = {**usage, "output_tokens": 1}
        yield _sse(
            "message_start",
            {
                "type": "message_start",
                "message": {
                    "id": message_id,
                    "type": "message",
                    "role": "assistant",
                    "model": model,
                    "content": [],
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": start_usage,
                },
            },
        )
        if fault is not None and fault.type == "stall":
            await anyio.sleep(fault.seconds)
        yield _sse("ping", {"type": "ping"})
        for index, block in enumerate(content):
            if block["type"] == "text":
                yield _sse(
                    "content_block_start",
                    {
                        "type": "content_block_start",
                        "index": index,
                        "content_block": {"type": "text", "text": ""},
                    },
                )
                for piece in _chunks(block["text"]):
                    yield _sse(
                        "content_block_delta",
                        {
                            "type": "content_block_delta",
                            "index": index,
                            "delta": {"type": "text_delta", "text": piece},
                        },
                    )
                    if fault is not None and fault.type == "cut":
                        raise _CutStream("scripted cut")
            else:
                yield _sse(
                    "content_block_start",
                    {
                        "type": "content_block_start",
                        "index": index,
                        "content_block": {
                            "type": "tool_use",
                            "id": block["id"],
                            "name": block["name"],
                            "input": {},
                        },
                    },
                )
                for piece in _chunks(json.dumps(block["input"])):
                    yield _sse(
                        "content_block_delta",
                        {
                            "type": "content_block_delta",
                            "index": index,
                            "delta": {"type": "input_json_delta", "partial_json": piece},
                        },
                    )
                    if fault is not None and fault.type == "cut":
                        raise _CutStream("scripted cut")
            yield _sse("content_block_stop", {"type": "content_block_stop", "index": index})
        yield _sse(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                "usage": {"output_tokens": usage["output_tokens"]},
            },
        )
        yield _sse("message_stop", {"type": "message_stop"})

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
    uvicorn.Server(config).run()
