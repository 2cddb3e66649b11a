"""The protocol features around the tools: ``logging/setLevel``, ``resources/subscribe`` and
``unsubscribe``, ``resources/list`` listing the plans, the ``listChanged`` capability, and
the middleware that gives every session its :class:`~claudecluster_mcp.notifications.Outbox`.

The SDK (mcp 2.3) serves these methods only to sessions of the handshake protocol versions
(up to 2025-11-25); 2026-07-28 removed ``logging/setLevel`` and ``resources/subscribe``
(its sessions subscribe with ``subscriptions/listen``, served by the SDK from the bus the
broadcaster feeds). MCPServer has no public way to add spec methods, so, as the SDK's own
docs advise, they are added on its low-level server.
"""

from __future__ import annotations

from typing import Any

from mcp.server.connection import Connection
from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.lowlevel import Server
from mcp.server.mcpserver import MCPServer
from mcp.server.session import ServerSession
from mcp.types import (
    EmptyResult,
    ListResourcesResult,
    PaginatedRequestParams,
    Resource,
    SetLevelRequestParams,
    SubscribeRequestParams,
    UnsubscribeRequestParams,
)
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

from .hub import HubRef
from .mcp_session import BROADCASTER_KEY, HUB_KEY
from .notifications import Broadcaster, Outbox, plan_uri

__all__ = ["SessionMiddleware", "register_protocol"]


def _connection_of(session: ServerSession) -> Connection:
    # The SDK hands handlers a per-request ServerSession; the per-connection state (its
    # standalone channel, and the exit stack that runs when the client goes) is the
    # Connection behind it, which mcp 2.3 does not expose publicly.
    connection: Connection = session._connection
    return connection


def _outbox(ctx: ServerRequestContext[Any, Any]) -> Outbox | None:
    """The outbox of the session sending ``ctx`` (attached on first use), or None if it cannot
    be told anything: a 2026-07-28 session, or one with no channel for notifications."""
    broadcaster = ctx.lifespan_context.get(BROADCASTER_KEY) if isinstance(ctx.lifespan_context, dict) else None
    if not isinstance(broadcaster, Broadcaster):
        return None
    connection = _connection_of(ctx.session)
    if connection.protocol_version in MODERN_PROTOCOL_VERSIONS or not connection.has_standalone_channel:
        return None
    outbox = broadcaster.outbox(connection)
    if outbox is None:
        outbox = broadcaster.attach(connection, connection.notify)
        if outbox is not None:
            connection.exit_stack.callback(broadcaster.detach, connection)
    return outbox


class SessionMiddleware:
    """Attaches every initialized session to the broadcaster (so it gets failure logs and
    ``list_changed`` without asking), and advertises ``resources.listChanged`` in
    ``initialize`` (the SDK derives every other capability from the registered handlers)."""

    async def __call__(self, ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> HandlerResult:
        """Handle one inbound message."""
        result = await call_next(ctx)
        if ctx.method == "initialize" and isinstance(result, dict):
            capabilities = result.get("capabilities")
            if isinstance(capabilities, dict) and isinstance(capabilities.get("resources"), dict):
                result = {**result, "capabilities": {**capabilities, "resources": {**capabilities["resources"]}}}
                result["capabilities"]["resources"]["listChanged"] = True
        elif ctx.method == "notifications/initialized" or ctx.request_id is not None:
            _outbox(ctx)
        return result


async def _set_level(ctx: ServerRequestContext[Any, Any], params: SetLevelRequestParams) -> EmptyResult:
    if (outbox := _outbox(ctx)) is not None:
        outbox.set_level(params.level)
    return EmptyResult()


async def _subscribe(ctx: ServerRequestContext[Any, Any], params: SubscribeRequestParams) -> EmptyResult:
    # Any URI is accepted: one that does not exist (yet) stays silent until it does.
    if (outbox := _outbox(ctx)) is not None:
        outbox.subscriptions.add(str(params.uri))
    return EmptyResult()


async def _unsubscribe(ctx: ServerRequestContext[Any, Any], params: UnsubscribeRequestParams) -> EmptyResult:
    if (outbox := _outbox(ctx)) is not None:
        outbox.subscriptions.discard(str(params.uri))
    return EmptyResult()


def _list_plans(mcp: MCPServer[Any]) -> Any:
    async def list_resources(
        ctx: ServerRequestContext[Any, Any], params: PaginatedRequestParams | None
    ) -> ListResourcesResult:
        resources = await mcp.list_resources()
        ref = ctx.lifespan_context.get(HUB_KEY) if isinstance(ctx.lifespan_context, dict) else None
        hub = ref.hub if isinstance(ref, HubRef) else None
        for cluster in hub.clusters if hub is not None else []:
            for plan in reversed(await cluster.store.plans()):
                resources.append(
                    Resource(
                        uri=plan_uri(plan.id),
                        name=f"plan {plan.id}",
                        title=f"{plan.id}: {plan.goal[:80]}",
                        description=f"{plan.state.value} plan in {plan.repo}: {plan.goal[:500]}",
                        mime_type="application/json",
                    )
                )
        return ListResourcesResult(resources=resources)

    return list_resources


def register_protocol(mcp: MCPServer[Any]) -> None:
    """Add logging, subscriptions, the plans' resource list and the session middleware to
    ``mcp`` (whose lifespan must come from :func:`~claudecluster_mcp.mcp_session.lifespan`)."""
    low: Server[Any] = mcp._lowlevel_server  # see the module docstring
    low.add_request_handler("logging/setLevel", SetLevelRequestParams, _set_level)
    low.add_request_handler("resources/subscribe", SubscribeRequestParams, _subscribe)
    low.add_request_handler("resources/unsubscribe", UnsubscribeRequestParams, _unsubscribe)
    low.add_request_handler("resources/list", PaginatedRequestParams, _list_plans(mcp))
    mcp.middleware.append(SessionMiddleware())
