"""Typed events parsed from Claude Code's ``--output-format stream-json`` over a pty.

A pty merges stdout and stderr, turns every ``\\n`` into ``\\r\\n``, and lets the CLI's
terminal escape sequences (colours, cursor resets) land in front of or between JSON lines.
:class:`StreamParser` takes raw bytes in whatever chunks the pty delivers and yields
:data:`AgentEvent` values; anything that is not a JSON object with a ``type`` becomes a
:class:`StderrLine` so that error text printed by the CLI is kept for failure reasons.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .redact import redact

__all__ = [
    "AgentEvent",
    "ApiRetry",
    "AssistantText",
    "InitEvent",
    "OtherEvent",
    "PermissionDenied",
    "ResultEvent",
    "StderrLine",
    "StreamParser",
    "ToolResult",
    "ToolUse",
    "Usage",
    "activity",
    "parse_event",
    "strip_terminal_escapes",
]


class _Event(BaseModel):
    model_config = ConfigDict(frozen=True)


class Usage(BaseModel):
    """Token counts as the CLI reports them."""

    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        """All tokens billed for the run, input (incl. cache) plus output."""
        return self.input_tokens + self.output_tokens + self.cache_creation_input_tokens + self.cache_read_input_tokens


class InitEvent(_Event):
    """``system/init``: the session has started."""

    kind: Literal["init"] = "init"
    session_id: str
    model: str | None = None
    cwd: str | None = None
    permission_mode: str | None = None
    claude_code_version: str | None = None
    tools: list[str] = Field(default_factory=list)
    mcp_servers: list[dict[str, Any]] = Field(default_factory=list)


class AssistantText(_Event):
    """A text block of an assistant message (``is_api_error`` for the CLI's synthetic ones)."""

    kind: Literal["text"] = "text"
    text: str
    message_id: str | None = None
    is_api_error: bool = False


class ToolUse(_Event):
    """The model asked for a tool call."""

    kind: Literal["tool_use"] = "tool_use"
    id: str
    name: str
    input: dict[str, Any] = Field(default_factory=dict)
    message_id: str | None = None


class ToolResult(_Event):
    """The CLI's answer to a tool call."""

    kind: Literal["tool_result"] = "tool_result"
    tool_use_id: str
    content: str = ""
    is_error: bool = False


class ApiRetry(_Event):
    """``system/api_retry``: the CLI is waiting to retry a failed model request."""

    kind: Literal["api_retry"] = "api_retry"
    attempt: int = 0
    max_retries: int = 0
    retry_delay_ms: float = 0
    error_status: int | None = None
    error: str | None = None


class PermissionDenied(_Event):
    """``system/permission_denied``: a tool call was refused by the permission mode."""

    kind: Literal["permission_denied"] = "permission_denied"
    tool_name: str
    tool_use_id: str | None = None
    message: str = ""


class ResultEvent(_Event):
    """A ``result`` event. ``is_error`` is the truth; ``subtype`` may still say success."""

    kind: Literal["result"] = "result"
    subtype: str
    is_error: bool
    result: str | None = None
    session_id: str | None = None
    num_turns: int = 0
    duration_ms: float = 0
    total_cost_usd: float = 0.0
    usage: Usage = Field(default_factory=Usage)
    terminal_reason: str | None = None
    api_error_status: int | None = None
    api_error_type: str | None = None
    errors: list[str] = Field(default_factory=list)
    permission_denials: list[dict[str, Any]] = Field(default_factory=list)
    structured_output: Any = None

    @property
    def succeeded(self) -> bool:
        """True only for a clean success: subtype ``success`` and not ``is_error``."""
        return self.subtype == "success" and not self.is_error


class OtherEvent(_Event):
    """Any other stream-json event, kept raw (``type``/``subtype`` for display)."""

    kind: Literal["other"] = "other"
    type: str
    subtype: str | None = None
    raw: dict[str, Any] = Field(default_factory=dict)


class StderrLine(_Event):
    """A non-JSON line (the CLI's stderr shares the pty), escapes removed."""

    kind: Literal["stderr"] = "stderr"
    text: str


AgentEvent = Annotated[
    InitEvent
    | AssistantText
    | ToolUse
    | ToolResult
    | ApiRetry
    | PermissionDenied
    | ResultEvent
    | OtherEvent
    | StderrLine,
    Field(discriminator="kind"),
]


def activity(event: AgentEvent) -> str:
    """One line of what an agent event says (the task's last activity), secrets redacted."""
    if isinstance(event, ToolUse):
        detail = event.input.get("file_path") or event.input.get("command") or event.input.get("pattern") or ""
        return f"{event.name} {redact(str(detail))[:120]}".strip()
    if isinstance(event, AssistantText):
        return redact(event.text.strip().splitlines()[0])[:160] if event.text.strip() else "…"
    if isinstance(event, ApiRetry):
        return f"waiting to retry the model API ({event.error or event.error_status})"
    if isinstance(event, ResultEvent):
        return f"result: {event.subtype}"
    return event.kind


# CSI, OSC (ended by BEL or ST), DCS/SOS/PM/APC strings, charset selection (ESC ( B),
# two-byte escapes (ESC 7, ESC 8, ESC =, ...), and SO/SI.
_ESCAPES = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]"
    r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)"
    r"|\x1b[PX^_][^\x1b]*\x1b\\"
    r"|\x1b[()*+][0-9A-Za-z]"
    r"|\x1b[78=>cDEHMNOZ\\]"
    r"|[\x0e\x0f\r]"
)
_DECODER = json.JSONDecoder()


def strip_terminal_escapes(text: str) -> str:
    """Remove terminal escape sequences and carriage returns from ``text``."""
    return _ESCAPES.sub("", text)


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [block.get("text", "") for block in content if isinstance(block, dict) and block.get("type") == "text"]
        return "\n".join(parts)
    return ""


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _init(obj: dict[str, Any]) -> list[AgentEvent]:
    if not isinstance(obj.get("session_id"), str):
        return [_other(obj)]
    return [
        InitEvent(
            session_id=obj["session_id"],
            model=obj.get("model"),
            cwd=obj.get("cwd"),
            permission_mode=obj.get("permissionMode"),
            claude_code_version=obj.get("claude_code_version"),
            tools=[t for t in obj.get("tools") or [] if isinstance(t, str)],
            mcp_servers=[s for s in obj.get("mcp_servers") or [] if isinstance(s, dict)],
        )
    ]


def _api_retry(obj: dict[str, Any]) -> list[AgentEvent]:
    return [
        ApiRetry(
            attempt=int(obj.get("attempt") or 0),
            max_retries=int(obj.get("max_retries") or 0),
            retry_delay_ms=float(obj.get("retry_delay_ms") or 0),
            error_status=_int_or_none(obj.get("error_status")),
            error=obj.get("error"),
        )
    ]


def _permission_denied(obj: dict[str, Any]) -> list[AgentEvent]:
    return [
        PermissionDenied(
            tool_name=str(obj.get("tool_name") or "?"),
            tool_use_id=obj.get("tool_use_id"),
            message=str(obj.get("message") or ""),
        )
    ]


def _assistant(obj: dict[str, Any]) -> list[AgentEvent]:
    message = obj["message"]
    message_id = message.get("id")
    api_error = bool(obj.get("is_api_error_message") or obj.get("error"))
    events: list[AgentEvent] = []
    for block in message.get("content") or []:
        if not isinstance(block, dict):
            continue
        if block.get("type") == "text":
            text = str(block.get("text", ""))
            events.append(AssistantText(text=text, message_id=message_id, is_api_error=api_error))
        elif block.get("type") == "tool_use":
            tool_id, name, tool_input = str(block.get("id", "")), str(block.get("name", "")), _dict(block.get("input"))
            events.append(ToolUse(id=tool_id, name=name, input=tool_input, message_id=message_id))
    return events


def _user(obj: dict[str, Any]) -> list[AgentEvent]:
    return [
        ToolResult(
            tool_use_id=str(block.get("tool_use_id", "")),
            content=_text_of(block.get("content")),
            is_error=bool(block.get("is_error")),
        )
        for block in obj["message"].get("content") or []
        if isinstance(block, dict) and block.get("type") == "tool_result"
    ]


def _result(obj: dict[str, Any]) -> list[AgentEvent]:
    usage = _dict(obj.get("usage"))
    errors = _list(obj.get("errors"))
    denials = _list(obj.get("permission_denials"))
    return [
        ResultEvent(
            subtype=str(obj.get("subtype") or "unknown"),
            is_error=bool(obj.get("is_error")),
            result=obj.get("result") if isinstance(obj.get("result"), str) else None,
            session_id=obj.get("session_id"),
            num_turns=int(obj.get("num_turns") or 0),
            duration_ms=float(obj.get("duration_ms") or 0),
            total_cost_usd=float(obj.get("total_cost_usd") or 0.0),
            usage=Usage(**{k: int(v) for k, v in usage.items() if k in Usage.model_fields and isinstance(v, int)}),
            terminal_reason=obj.get("terminal_reason"),
            api_error_status=_int_or_none(obj.get("api_error_status")),
            api_error_type=obj.get("api_error_type"),
            errors=[str(e) for e in errors],
            permission_denials=[d for d in denials if isinstance(d, dict)],
            structured_output=obj.get("structured_output"),
        )
    ]


def _other(obj: dict[str, Any]) -> OtherEvent:
    subtype = obj.get("subtype")
    return OtherEvent(type=str(obj.get("type")), subtype=subtype if isinstance(subtype, str) else None, raw=obj)


# (type, subtype) → parser; subtype None matches any subtype of that type.
_PARSERS: dict[tuple[str, str | None], Callable[[dict[str, Any]], list[AgentEvent]]] = {
    ("system", "init"): _init,
    ("system", "api_retry"): _api_retry,
    ("system", "permission_denied"): _permission_denied,
    ("assistant", None): _assistant,
    ("user", None): _user,
    ("result", None): _result,
}


def parse_event(obj: dict[str, Any]) -> list[AgentEvent]:
    """Turn one decoded stream-json object into zero or more typed events."""
    etype, subtype = obj.get("type"), obj.get("subtype")
    parser = _PARSERS.get((str(etype), subtype if isinstance(subtype, str) else None)) or _PARSERS.get(
        (str(etype), None)
    )
    if parser is None or (etype in ("assistant", "user") and not isinstance(obj.get("message"), dict)):
        return [_other(obj)]
    return parser(obj)


def _decode_line(line: str) -> list[AgentEvent]:
    start = line.find("{")
    if start == 0 or (start > 0 and line[start:].startswith('{"')):
        try:
            obj, _ = _DECODER.raw_decode(line, start)
        except json.JSONDecodeError:
            obj = None
        if isinstance(obj, dict) and isinstance(obj.get("type"), str):
            return parse_event(obj)
    return [StderrLine(text=line)]


class StreamParser:
    """Incremental parser: feed pty bytes, get typed events for every complete line."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[AgentEvent]:
        """Add bytes as read from the pty; return the events of the lines they complete."""
        self._buffer.extend(data)
        events: list[AgentEvent] = []
        while (newline := self._buffer.find(b"\n")) >= 0:
            raw = bytes(self._buffer[:newline])
            del self._buffer[: newline + 1]
            events.extend(self._line(raw))
        return events

    def close(self) -> list[AgentEvent]:
        """Flush a final line that had no newline (the stream has ended)."""
        raw = bytes(self._buffer)
        self._buffer.clear()
        return self._line(raw)

    @staticmethod
    def _line(raw: bytes) -> list[AgentEvent]:
        line = strip_terminal_escapes(raw.decode("utf-8", errors="replace")).strip()
        if not line:
            return []
        return _decode_line(line)
