"""The MCP server, assembled: the tools of :mod:`~claudecluster_mcp.tools` over the
:class:`~claudecluster_mcp.hub.Hub`, served by :mod:`~claudecluster_mcp.transports` over
stdio, legacy SSE and Streamable HTTP.

One hub per server process holds one :class:`~claudecluster_mcp.engine.Cluster` per
repository, opened on first use and shared by every session and transport; it outlives
connections. Domain errors become ``isError`` results with the error's message; invalid
arguments are rejected by the SDK with the field names; nothing crashes a session.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from mcp.server.mcpserver import MCPServer
from mcp.server.subscriptions import InMemorySubscriptionBus
from pydantic import BaseModel, Field
from starlette.applications import Starlette

from . import __version__
from .claude_cli import ClaudeBinary
from .completions import register_completions
from .hub import Hub, HubRef
from .mcp_protocol import register_protocol
from .mcp_session import lifespan
from .settings import EngineSettings
from .tools import register
from .transports import (
    Metrics,
    auth_options,
    check_exposure,
    default_token,
    http_app,
    run_stdio,
    run_uvicorn,
    token_banner,
    token_from,
    transport_security,
)
from .views import PlanView, StatusView, TaskView

__all__ = [
    "Hub",
    "HubRef",
    "Metrics",
    "PlanView",
    "ServerSettings",
    "StatusView",
    "TaskView",
    "build_http_app",
    "build_server",
    "prepare_http",
    "serve_http",
    "serve_stdio",
    "token_from",
]

INSTRUCTIONS = (
    "claudecluster runs coding work as parallel Claude Code agents, each in its own git worktree, "
    "and merges their results. Typical flow: `plan` (a goal, optionally split into tasks by you) → "
    "`dispatch` (returns at once) → `status` with wait_seconds to follow progress → `merge` into the "
    "target branch. `logs` shows what an agent did; `cancel` stops work."
)


class ServerSettings(BaseModel):
    """How the server runs: where repositories may be, how agents run, how HTTP is secured.

    HTTP needs ``token`` (the CLI generates one on first start when none is given) unless
    ``no_auth`` is set, which only a loopback ``host`` allows.

    Fields of ``engine`` that are set explicitly are the server's flags: they override each
    repository's ``CLAUDECLUSTER_*`` environment and ``claudecluster.toml``; every other
    configurable setting comes from the repository's configuration."""

    roots: list[Path] = Field(default_factory=lambda: [Path.cwd()], description="repositories must lie below these")
    engine: EngineSettings = Field(default_factory=EngineSettings)
    claude_bin: str | None = Field(default=None, description="the agents' `claude` (default: per repository)")
    host: str = "127.0.0.1"
    port: int = 8765
    token: str | None = Field(default=None, description="the bearer token HTTP clients must send")
    no_auth: bool = Field(default=False, description="serve HTTP without a token (loopback addresses only)")
    max_request_bytes: int = Field(
        default=4 * 1024 * 1024, ge=1024, description="larger HTTP request bodies are refused with 413"
    )
    allowed_hosts: list[str] = Field(default_factory=list, description="extra Host header values to accept")
    allowed_origins: list[str] = Field(default_factory=list, description="extra Origin header values to accept")

    def hub(self, claude: ClaudeBinary | None = None) -> Hub:
        """A hub for these settings (not running yet)."""
        return Hub(self.roots, self.engine, claude_bin=self.claude_bin, claude=claude)


def build_server(
    ref: HubRef | None = None, *, token: str | None = None, metrics: Metrics | None = None, public_url: str = ""
) -> tuple[MCPServer[Any], HubRef, Metrics]:
    """The MCPServer with every tool, resource and prompt, finding its hub through ``ref``
    (set ``ref.hub``, or run the hub with ``ref.running(hub)``, before calling tools)."""
    ref = ref or HubRef()
    metrics = metrics or Metrics()
    bus = InMemorySubscriptionBus()  # 2026-07-28 sessions' subscriptions/listen streams
    mcp: MCPServer[Any] = MCPServer(
        "claudecluster",
        title="claudecluster",
        version=__version__,
        instructions=INSTRUCTIONS,
        log_level="WARNING",
        lifespan=lifespan(ref, bus),
        subscriptions=bus,
        **auth_options(token, public_url),
    )
    register(mcp, observe=metrics.observe)
    register_protocol(mcp)
    register_completions(mcp, ref)
    mcp.middleware.append(metrics.timed)
    return mcp, ref, metrics


async def serve_stdio(settings: ServerSettings, *, claude: ClaudeBinary | None = None) -> None:
    """Serve MCP over stdin/stdout (nothing but protocol on stdout; logs go to stderr)."""
    mcp, ref, _ = build_server()
    await run_stdio(mcp, ref, settings.hub(claude))


def build_http_app(settings: ServerSettings, *, claude: ClaudeBinary | None = None) -> Starlette:
    """One Starlette app: Streamable HTTP at /mcp, legacy SSE at /sse + /messages/, /health and
    /metrics. The hub is created in the app's lifespan and shared by every session."""
    check_exposure(settings.host, settings.token, settings.no_auth)
    mcp, ref, metrics = build_server(token=settings.token, public_url=f"http://{settings.host}:{settings.port}")
    return http_app(
        mcp,
        ref,
        lambda: settings.hub(claude),
        host=settings.host,
        security=transport_security(settings.host, settings.allowed_hosts, settings.allowed_origins),
        token=settings.token,
        metrics=metrics,
        max_request_bytes=settings.max_request_bytes,
    )


def prepare_http(settings: ServerSettings, transport: Literal["sse", "http"]) -> str:
    """Secure ``settings`` for HTTP before serving: HTTP is never open by default, so without
    a token (and without ``no_auth``, refused off loopback) the server's own token is used,
    generated on first start. Returns what to tell the user on stderr (how to connect; the
    token itself only right after generating it)."""
    url = f"http://{settings.host}:{settings.port}/{'sse' if transport == 'sse' else 'mcp'}"
    if settings.no_auth:
        check_exposure(settings.host, settings.token, no_auth=True)
        return f"claudecluster: serving {url} WITHOUT authentication (--no-auth; loopback only)"
    if settings.token:
        return f'claudecluster: clients must send the bearer token: -H "Authorization: Bearer <token>" ({url})'
    default = default_token(settings.engine.state_dir)
    settings.token = default.token
    return token_banner(default, url)


def serve_http(
    settings: ServerSettings, transport: Literal["sse", "http"], *, claude: ClaudeBinary | None = None
) -> None:
    """Serve the HTTP app with uvicorn until interrupted."""
    app = build_http_app(settings, claude=claude)
    run_uvicorn(app, settings.host, settings.port, "/sse" if transport == "sse" else "/mcp")
