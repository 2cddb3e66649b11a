"""The Anthropic Messages API wire format, as the scripted model server speaks it.

Reading a request (:class:`MessagesRequest`: what Claude Code asks, in which conversation and
at which turn) and writing the answer: the JSON of an assistant message and of its content
blocks, API error bodies, and the server-sent events of a streamed message, including the two
ways a scripted stream misbehaves: it *stalls* after ``message_start``, or it is *cut* after
its first delta. Nothing here knows about scenarios; the server decides what to say and this
module says it.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import anyio
from starlette.responses import JSONResponse, Response, StreamingResponse

__all__ = [
    "FAULT_ERRORS",
    "CutStream",
    "MessagesRequest",
    "answer_usage",
    "blocks_text",
    "cut_response",
    "error_response",
    "message_response",
    "new_message_id",
    "stream_events",
    "streaming_response",
    "templated",
    "text_block",
    "tool_result_texts",
    "tool_use_block",
    "usage_json",
]

#: Fault type answered with an API error -> (HTTP status, error type, default message).
FAULT_ERRORS: dict[str, tuple[int, str, str]] = {
    "rate_limit": (429, "rate_limit_error", "scripted rate limit"),
    "overloaded": (529, "overloaded_error", "Overloaded"),
    "server_error": (500, "api_error", "Internal server error"),
    "unauthorized": (401, "authentication_error", "invalid x-api-key"),
}


class CutStream(Exception):
    """Raised inside a streaming body to drop the connection mid-message."""


# -- reading a request ----------------------------------------------------------------------


def blocks_text(content: Any) -> str:
    """The text of a message's ``content``: a string, or its text and tool-result blocks joined."""
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
            parts.append(blocks_text(block.get("content")))
    return "\n".join(parts)


def tool_result_texts(messages: Iterable[Any]) -> list[str]:
    """The text of every ``tool_result`` block in ``messages``, in order."""
    return [
        blocks_text(block.get("content"))
        for message in messages
        if isinstance(message, dict) and isinstance(message.get("content"), list)
        for block in message["content"]
        if isinstance(block, dict) and block.get("type") == "tool_result"
    ]


_CWD = re.compile(r"Primary working directory: ([^\n]+?)\s*$", re.MULTILINE)

# Assistant messages the CLI writes itself (e.g. into a resumed session's history after an
# interruption); they are not answers of the model, so they do not advance the script.
_SYNTHETIC_ASSISTANT = frozenset(
    {"No response requested.", "[Request interrupted by user]", "[Request interrupted by user for tool use]"}
)


def _is_model_turn(message: Any) -> bool:
    if not isinstance(message, dict) or message.get("role") != "assistant":
        return False
    return blocks_text(message.get("content")).strip() not in _SYNTHETIC_ASSISTANT or any(
        isinstance(b, dict) and b.get("type") == "tool_use" for b in message.get("content") or []
    )


@dataclass(frozen=True)
class MessagesRequest:
    """One ``POST /v1/messages`` from Claude Code, read for what a script needs: whose conversation, which turn."""

    path: str
    #: The request's ``messages``, as sent.
    messages: list[Any]
    first_text: str
    #: The agent's working directory, from Claude Code's system prompt.
    cwd: str | None
    #: How many model answers the history holds (the index of the turn asked for).
    turn: int
    #: The texts of the tool results in the last message.
    tool_results: tuple[str, ...]
    model: str
    stream: bool
    #: Claude Code's session id, or a hash of the first user message.
    conversation: str

    @classmethod
    def read(cls, path: str, body: dict[str, Any], messages: list[Any], headers: Mapping[str, str]) -> MessagesRequest:
        """Read a request whose ``messages`` is a non-empty list."""
        first_user = next((m for m in messages if isinstance(m, dict) and m.get("role") == "user"), {})
        first_text = blocks_text(first_user.get("content"))
        all_text = (
            blocks_text(body.get("system"))
            + "\n"
            + "\n".join(blocks_text(m.get("content")) for m in messages if isinstance(m, dict))
        )
        cwd_match = _CWD.search(all_text)
        last = messages[-1] if isinstance(messages[-1], dict) else {}
        return cls(
            path=path,
            messages=messages,
            first_text=first_text,
            cwd=cwd_match.group(1) if cwd_match else None,
            turn=sum(1 for m in messages if _is_model_turn(m)),
            tool_results=tuple(tool_result_texts([last])),
            model=str(body.get("model") or "claude-scripted"),
            stream=bool(body.get("stream")),
            conversation=(
                headers.get("x-claude-code-session-id") or hashlib.sha256(first_text.encode()).hexdigest()[:16]
            ),
        )


# -- message JSON ---------------------------------------------------------------------------


def new_message_id() -> str:
    """A fresh ``msg_…`` id."""
    return f"msg_scripted_{uuid.uuid4().hex[:20]}"


def text_block(text: str) -> dict[str, Any]:
    """A ``text`` content block."""
    return {"type": "text", "text": text}


def tool_use_block(name: str, tool_input: Any) -> dict[str, Any]:
    """A ``tool_use`` content block with a fresh ``toolu_…`` id."""
    return {"type": "tool_use", "id": f"toolu_scripted_{uuid.uuid4().hex[:20]}", "name": name, "input": tool_input}


def usage_json(input_tokens: int, output_tokens: int) -> dict[str, int]:
    """A ``usage`` object (no prompt caching)."""
    return {
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
    }


def _message_json(
    message_id: str, model: str, content: list[dict[str, Any]], stop_reason: str | None, usage: dict[str, int]
) -> dict[str, Any]:
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": usage,
    }


# -- responses ------------------------------------------------------------------------------


def error_response(status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> Response:
    """An API error: ``{"type": "error", "error": {"type": kind, "message": message}}``."""
    body = {"type": "error", "error": {"type": kind, "message": message}}
    return JSONResponse(body, status_code=status, headers=headers)


def message_response(
    message_id: str, model: str, content: list[dict[str, Any]], stop_reason: str, usage: dict[str, int]
) -> Response:
    """A complete (non-streamed) assistant message."""
    return JSONResponse(_message_json(message_id, model, content, stop_reason, usage))


def cut_response(response: Response) -> Response:
    """``response`` with its body cut in half: the headers and the first half are sent,
    then the connection is dropped (a chunked body that never ends)."""
    body = bytes(response.body)

    async def half() -> AsyncIterator[bytes]:
        yield body[: len(body) // 2]
        raise CutStream("scripted cut")

    headers = {k: v for k, v in response.headers.items() if k.lower() != "content-length"}
    return StreamingResponse(half(), status_code=response.status_code, headers=headers)


def streaming_response(events: AsyncIterator[bytes], message_id: str) -> Response:
    """An ``text/event-stream`` response carrying ``events`` (see :func:`stream_events`)."""
    return StreamingResponse(
        events,
        media_type="text/event-stream",
        headers={"cache-control": "no-cache", "request-id": f"req_{message_id}"},
    )


# -- server-sent events ---------------------------------------------------------------------


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def _chunks(text: str, pieces: int = 3) -> list[str]:
    size = max(1, -(-len(text) // pieces))
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]


def _block_start(index: int, block: dict[str, Any]) -> bytes:
    if block["type"] == "text":
        started: dict[str, Any] = {"type": "text", "text": ""}
    else:
        started = {"type": "tool_use", "id": block["id"], "name": block["name"], "input": {}}
    return _sse("content_block_start", {"type": "content_block_start", "index": index, "content_block": started})


def _block_deltas(index: int, block: dict[str, Any]) -> Iterator[bytes]:
    if block["type"] == "text":
        deltas = [{"type": "text_delta", "text": piece} for piece in _chunks(block["text"])]
    else:
        deltas = [{"type": "input_json_delta", "partial_json": piece} for piece in _chunks(json.dumps(block["input"]))]
    for delta in deltas:
        yield _sse("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})


async def stream_events(
    message_id: str,
    model: str,
    content: list[dict[str, Any]],
    stop_reason: str,
    usage: dict[str, int],
    *,
    stall: float | None = None,
    cut: bool = False,
) -> AsyncIterator[bytes]:
    """The SSE body of a streamed message, each block's text or input JSON in three deltas.

    ``stall`` sleeps that many seconds after ``message_start``; ``cut`` raises
    :class:`CutStream` right after the first delta, so the client sees the connection drop.
    """
    start = _message_json(message_id, model, [], None, {**usage, "output_tokens": 1})
    yield _sse("message_start", {"type": "message_start", "message": start})
    if stall is not None:
        await anyio.sleep(stall)
    yield _sse("ping", {"type": "ping"})
    for index, block in enumerate(content):
        yield _block_start(index, block)
        for delta in _block_deltas(index, block):
            yield delta
            if cut:
                raise CutStream("scripted cut")
        yield _sse("content_block_stop", {"type": "content_block_stop", "index": index})
    message_delta = {
        "type": "message_delta",
        "delta": {"stop_reason": stop_reason, "stop_sequence": None},
        "usage": {"output_tokens": usage["output_tokens"]},
    }
    yield _sse("message_delta", message_delta)
    yield _sse("message_stop", {"type": "message_stop"})


# -- an answer's content ---------------------------------------------------------------------

_TEMPLATE = re.compile(r"\{(\w+)\}")


def templated(value: Any, variables: Mapping[str, str]) -> Any:
    """``value`` (a string, or lists and dicts of them) with ``{name}`` replaced for the
    known names only, so JSON or code braces pass through."""
    if isinstance(value, str):
        return _TEMPLATE.sub(lambda m: variables.get(m.group(1), m.group(0)), value)
    if isinstance(value, list):
        return [templated(v, variables) for v in value]
    if isinstance(value, dict):
        return {k: templated(v, variables) for k, v in value.items()}
    return value


def answer_usage(
    input_tokens: int | None, output_tokens: int | None, first_text: str, content: list[dict[str, Any]]
) -> dict[str, int]:
    """The usage of an answer: the given token counts, or estimates from the prompt's and
    the answer's lengths."""
    return usage_json(
        input_tokens if input_tokens is not None else max(1, len(first_text) // 4),
        output_tokens if output_tokens is not None else max(1, len(json.dumps(content)) // 4),
    )
