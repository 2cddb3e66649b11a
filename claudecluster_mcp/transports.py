"""How the server is reached: stdio, and one Starlette app serving Streamable HTTP at /mcp,
legacy SSE at /sse + /messages/, /health and /metrics; bearer-token auth and Host/Origin
(DNS-rebinding) validation for HTTP.

Each transport runs the hub in its own lifespan and publishes it through a
:class:`~claudecluster_mcp.hub.HubRef`, so one hub serves every session and outlives them.
"""

from __future__ import annotations

import hmac
import logging
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from mcp.server.auth.provider import AccessToken
from mcp.server.auth.settings import AuthSettings
from mcp.server.mcpserver import MCPServer
from mcp.server.transport_security import TransportSecuritySettings
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from . import __version__
from .errors import ConfigError
from .hub import Hub, HubRef
from .models import TaskState

__all__ = [
    "BearerToken",
    "Metrics",
    "auth_options",
    "check_exposure",
    "http_app",
    "is_loopback",
    "run_stdio",
    "run_uvicorn",
    "token_from",
    "transport_security",
]

logger = logging.getLogger(__name__)

LOOPBACK = ("127.0.0.1", "localhost", "::1")
SCOPE = "claudecluster"


# -- auth and exposure ---------------------------------------------------------------------


class BearerToken:
    """Accepts exactly one shared bearer token (compared in constant time)."""

    def __init__(self, token: str) -> None:
        self._token = token

    async def verify_token(self, token: str) -> AccessToken | None:
        """The access of ``token`` if it is the shared one, else None."""
        if hmac.compare_digest(token.encode(), self._token.encode()):
            return AccessToken(token=token, client_id="claudecluster", scopes=[SCOPE])
        return None


def auth_options(token: str | None, public_url: str = "") -> dict[str, Any]:
    """MCPServer keyword arguments requiring ``token`` on every HTTP request (none without)."""
    if not token:
        return {}
    base = public_url or "http://127.0.0.1"
    return {
        "token_verifier": BearerToken(token),
        "auth": AuthSettings(
            issuer_url=base,  # type: ignore[arg-type]
            resource_server_url=f"{base}/mcp",  # type: ignore[arg-type]
            validate_token_resource=False,
            required_scopes=[SCOPE],
        ),
    }


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the server on this machine."""
    return host in LOOPBACK or host.startswith("127.")


def check_exposure(host: str, token: str | None) -> None:
    """Refuse (:class:`ConfigError`) to serve another machine without a bearer token."""
    if not is_loopback(host) and not token:
        raise ConfigError(
            f"refusing to listen on {host} without a bearer token: pass --token/--token-file "
            "or set CLAUDECLUSTER_TOKEN (or bind 127.0.0.1)"
        )


def transport_security(host: str, allowed_hosts: list[str], allowed_origins: list[str]) -> TransportSecuritySettings:
    """DNS-rebinding protection: the loopback names (any port), the bound host, and extras."""
    hosts = [f"{h}:*" for h in ("127.0.0.1", "localhost", "[::1]")] + allowed_hosts
    origins = [f"http://{h}:*" for h in ("127.0.0.1", "localhost", "[::1]")] + allowed_origins
    if not is_loopback(host):
        hosts.append(f"{host}:*")
    return TransportSecuritySettings(enable_dns_rebinding_protection=True, allowed_hosts=hosts, allowed_origins=origins)


def _authorized(request: Request, token: str) -> bool:
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.encode(), token.encode())


def token_from(flag: str | None, file: Path | None) -> str | None:
    """The bearer token from a flag, a file, or ``$CLAUDECLUSTER_TOKEN``."""
    if flag:
        return flag
    if file is not None:
        try:
            return file.read_text().strip() or None
        except OSError as exc:
            raise ConfigError(f"cannot read the token file {file}: {exc.strerror}") from exc
    return os.environ.get("CLAUDECLUSTER_TOKEN") or None


# -- metrics -------------------------------------------------------------------------------


class Metrics:
    """Prometheus metrics of one server (a private registry, so tests can build several)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.tasks = Gauge("claudecluster_tasks", "Tasks by state", ["state"], registry=self.registry)
        self.agents = Gauge("claudecluster_agents_running", "Agent processes running", registry=self.registry)
        self.queue = Gauge("claudecluster_queue_depth", "Tasks ready and waiting for a slot", registry=self.registry)
        self.merges = Gauge(
            "claudecluster_merge_outcomes", "Tasks by merge outcome", ["outcome"], registry=self.registry
        )
        self.latency = Histogram(
            "claudecluster_tool_seconds",
            "MCP tool latency",
            ["tool"],
            buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=self.registry,
        )
        self.errors = Counter("claudecluster_tool_errors", "MCP tool errors", ["tool"], registry=self.registry)

    def observe(self, tool: str, seconds: float, failed: bool) -> None:
        """Record one tool call."""
        self.latency.labels(tool).observe(seconds)
        if failed:
            self.errors.labels(tool).inc()

    async def refresh(self, hub: Hub) -> None:
        """Recompute the gauges from the open clusters."""
        counts: dict[str, int] = dict.fromkeys((s.value for s in TaskState), 0)
        running = 0
        for cluster in hub.clusters:
            running += cluster.running
            for plan in await cluster.overview():
                for state, count in plan.counts.items():
                    counts[state] = counts.get(state, 0) + count
        for state, count in counts.items():
            self.tasks.labels(state).set(count)
        self.agents.set(running)
        self.queue.set(counts[TaskState.READY.value])
        for outcome in (TaskState.MERGED, TaskState.CONFLICTED, TaskState.GATE_FAILED):
            self.merges.labels(outcome.value).set(counts[outcome.value])


# -- the transports --------------------------------------------------------------------------


async def run_stdio(mcp: MCPServer[Any], ref: HubRef, hub: Hub) -> None:
    """Serve ``mcp`` over stdin/stdout with ``hub`` (nothing but protocol on stdout; logs go
    to stderr)."""
    async with ref.running(hub):
        await mcp.run_stdio_async()


def http_app(
    mcp: MCPServer[Any],
    ref: HubRef,
    make_hub: Callable[[], Hub],
    *,
    host: str,
    security: TransportSecuritySettings,
    token: str | None,
    metrics: Metrics,
) -> Starlette:
    """One Starlette app: Streamable HTTP at /mcp, legacy SSE at /sse + /messages/, /health
    and /metrics. The hub (from ``make_hub``) runs in the app's lifespan."""
    streamable = mcp.streamable_http_app(transport_security=security, host=host)
    sse = mcp.sse_app(transport_security=security, host=host)

    async def health(request: Request) -> Response:
        hub = ref.hub
        return JSONResponse(
            {
                "status": "ok" if hub is not None else "starting",
                "version": __version__,
                "repositories": [str(c.repo) for c in hub.clusters] if hub else [],
                "agents_running": sum(c.running for c in hub.clusters) if hub else 0,
            }
        )

    async def metrics_endpoint(request: Request) -> Response:
        if token and not _authorized(request, token):
            return JSONResponse({"error": "invalid_token"}, status_code=401)
        if ref.hub is not None:
            await metrics.refresh(ref.hub)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # Mounted sub-apps lose their lifespans: run the session manager here.
        async with ref.running(make_hub()), mcp.session_manager.run():
            yield

    return Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            Route("/metrics", metrics_endpoint, methods=["GET"]),
            *streamable.routes,
            *sse.routes,
        ],
        middleware=[Middleware(m.cls, *m.args, **m.kwargs) for m in streamable.user_middleware],
        lifespan=lifespan,
    )


def run_uvicorn(app: Starlette, host: str, port: int, path: str) -> None:
    """Serve ``app`` with uvicorn until interrupted."""
    import uvicorn

    logger.warning("claudecluster MCP server on http://%s:%d%s", host, port, path)
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
