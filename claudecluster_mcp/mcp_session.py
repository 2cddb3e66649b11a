"""What every MCP request handler shares: the hub of the session and the
:class:`~claudecluster_mcp.notifications.Broadcaster` of its notifications (handed over by
the server lifespan; the hub is filled into tools by the SDK's resolver), and the one mapping
of a :class:`~claudecluster_mcp.errors.ClusterError` to an MCP error, for tools and resources."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from typing import Annotated, Any, Literal

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ResourceError, ResourceNotFoundError, ToolError
from mcp.server.mcpserver.resolve import Resolve
from mcp.server.subscriptions import SubscriptionBus
from pydantic import BaseModel

from .errors import ClusterError, ConfigError, NotFoundError
from .hub import Hub, HubRef
from .notifications import Broadcaster

__all__ = ["BROADCASTER_KEY", "HUB_KEY", "HubDep", "check_text", "current_hub", "hub_of", "lifespan", "reported"]

HUB_KEY = "hub"
BROADCASTER_KEY = "broadcaster"

# -- errors: the one mapping ---------------------------------------------------------------


@contextmanager
def reported(kind: Literal["tool", "resource"]) -> Iterator[None]:
    """Turn a :class:`ClusterError` into the MCP error for ``kind``, keeping its message:
    a ``ToolError`` (the client gets an ``isError`` result), or for resources a
    ``ResourceNotFoundError`` (unknown or malformed ids) or ``ResourceError``. Anything else
    is a bug: the SDK logs its traceback and shows the client no details."""
    try:
        yield
    except ClusterError as exc:
        message = shortened(str(exc))
        if kind == "tool":
            raise ToolError(message) from exc
        if isinstance(exc, NotFoundError | ConfigError):
            raise ResourceNotFoundError(message) from exc
        raise ResourceError(message) from exc


MAX_ERROR_CHARS = 8000


def shortened(message: str, limit: int = MAX_ERROR_CHARS) -> str:
    """``message`` cut in its middle to ``limit`` characters: errors quote the caller's
    input (an unknown 200 kB id would come back whole) and a gate's output; the head says
    what went wrong, the tail how it ended."""
    if len(message) <= limit:
        return message
    head, tail = limit * 2 // 3, limit // 3
    return f"{message[:head]} … ({len(message) - head - tail} characters cut) … {message[-tail:]}"


# -- arguments: text every layer can carry ------------------------------------------------


def check_text(value: object, where: str = "arguments") -> None:
    """Refuse a NUL character or a lone surrogate (JSON's ``"\\ud800"``: not valid UTF-8)
    anywhere in ``value``'s strings (inside lists, dicts and models too), naming where:
    no path, git ref, argv, id or SQLite text can hold them, and each layer would fail
    in its own way (``ValueError``, ``UnicodeEncodeError``) instead of saying why."""
    if isinstance(value, str):
        if "\x00" in value:
            raise ConfigError(f"{where} holds a NUL character")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ConfigError(f"{where} is not valid UTF-8 text (it holds a lone surrogate)") from None
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            check_text(item, f"{where}[{index}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            check_text(key, f"a key of {where}")
            check_text(item, f"{where}.{key}")
    elif isinstance(value, BaseModel):
        check_text(value.model_dump(), where)


# -- finding the hub -----------------------------------------------------------------------


def lifespan(
    ref: HubRef, bus: SubscriptionBus | None = None
) -> Callable[[MCPServer[Any]], AbstractAsyncContextManager[dict[str, Any]]]:
    """The server lifespan handing sessions ``ref`` and a broadcaster of the hub's changes;
    the hub itself outlives sessions (stdio and Streamable HTTP enter the lifespan once, the
    SSE transport once per connection). ``bus``, the server's subscription bus, gets resource
    updates for 2026-07-28 sessions from the first lifespan that serves it."""
    served: set[int] = set()

    @asynccontextmanager
    async def enter(_: MCPServer[Any]) -> AsyncIterator[dict[str, Any]]:
        claim = bus is not None and id(bus) not in served
        if claim:
            served.add(id(bus))
        try:
            async with Broadcaster.serving(ref, bus if claim else None) as broadcaster:
                yield {HUB_KEY: ref, BROADCASTER_KEY: broadcaster}
        finally:
            if claim:
                served.discard(id(bus))

    return enter


def hub_of(ctx: Context) -> Hub:
    """The running hub of the session handling ``ctx``."""
    ref = ctx.request_context.lifespan_context[HUB_KEY]
    assert isinstance(ref, HubRef)
    return ref.get()


def current_hub(ctx: Context) -> Hub:
    """The running hub of the server handling this request (the resolver of :data:`HubDep`)."""
    with reported("tool"):
        return hub_of(ctx)


#: A tool parameter the SDK fills with the hub (not part of the input schema).
HubDep = Annotated[Hub, Resolve(current_hub)]
