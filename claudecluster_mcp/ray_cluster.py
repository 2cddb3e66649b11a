"""The engine's connection to a Ray cluster: one per process, made before any agent runs.

:func:`connect` checks the address (a Ray cluster runs whatever its clients send, so by
default only loopback and private addresses are accepted: see :func:`check_address`), turns
on Ray's token authentication when a token is at hand, ships this very package to the nodes
(so that every node runs the engine's version of the agent runner), and keeps Ray off
stdout (the stdio MCP transport owns it). Ray is imported here and only here, on first use:
``import claudecluster_mcp`` and the local placement never load it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import signal
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError

__all__ = ["NAMESPACE", "SLOT_RESOURCE", "RayConnection", "check_address", "connect", "connection", "disconnect"]

logger = logging.getLogger(__name__)

#: The Ray namespace of every claudecluster actor (slots are found there after a restart).
NAMESPACE = "claudecluster"
#: The custom resource a node offers once per agent it may run.
SLOT_RESOURCE = "claude_slot"
_SHARED_SPACE = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT, VPN overlays
_INSTALL_HINT = "placement ray needs Ray: pip install 'claudecluster-mcp[ray]'"
_AUTH_HINT = (
    "the cluster asks for a token: set RAY_AUTH_TOKEN_PATH (or RAY_AUTH_TOKEN) to the cluster's token, "
    "or put it in ~/.ray/auth_token"
)


@dataclass(frozen=True)
class RayConnection:
    """The cluster this process is connected to."""

    address: str
    slots: int  #: ``claude_slot`` offered by the cluster's nodes when we connected
    token_auth: bool


_connection: RayConnection | None = None
_lock = threading.Lock()


def check_address(address: str, *, allow_public: bool = False) -> tuple[str, int]:
    """``HOST:PORT`` of a cluster's head (its GCS), as (host, port). Refused unless every
    address the host resolves to is loopback, private (RFC 1918, fc00::/7), link-local or
    in 100.64.0.0/10, or ``allow_public`` is set."""
    if "://" in address:
        raise ConfigError(
            f"ray_address {address!r}: give the head's HOST:PORT (e.g. 10.0.0.5:6379); Ray Client (ray://) "
            "addresses are not supported, run the engine on a node of the cluster instead"
        )
    host, _, port_text = address.rpartition(":")
    host = host.strip("[]")
    if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(f"ray_address {address!r} is not HOST:PORT (e.g. 10.0.0.5:6379)")
    port = int(port_text)
    try:
        resolved = {str(info[4][0]) for info in socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)}
    except OSError as exc:
        raise ConfigError(f"ray_address {address!r}: cannot resolve {host}: {exc}") from exc
    public = sorted(a for a in resolved if not _private(ipaddress.ip_address(a.split("%")[0])))
    if public and not allow_public:
        raise ConfigError(
            f"ray_address {address!r} resolves to a public address ({', '.join(public)}): a Ray cluster runs "
            "whatever its clients send it, so keep it on a private network; pass --ray-allow-public "
            "(ray_allow_public = true) only if it is firewalled and uses token authentication"
        )
    return host, port


def _private(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return ip.is_loopback or ip.is_private or ip.is_link_local or (ip.version == 4 and ip in _SHARED_SPACE)


def connection() -> RayConnection | None:
    """The connection of this process, if :func:`connect` made one."""
    return _connection


def connect(address: str | None, *, allow_public: bool = False) -> RayConnection:
    """Connect this process to the cluster at ``address`` (once; again for the same address
    is a no-op). Blocks for about a second: call it before the event loop starts where you
    can (Ray installs a signal handler only from the main thread)."""
    global _connection
    if not address:
        raise ConfigError("placement ray needs ray_address: the HOST:PORT of the cluster's head, e.g. 10.0.0.5:6379")
    check_address(address, allow_public=allow_public)
    with _lock:
        if _connection is not None:
            if _connection.address != address:
                raise ConfigError(
                    f"this process is connected to the Ray cluster at {_connection.address}; "
                    f"it cannot also use {address} (one cluster per server)"
                )
            return _connection
        token_auth = _use_token_auth()
        try:
            import ray
        except ImportError as exc:
            raise ConfigError(_INSTALL_HINT) from exc
        _init(ray, address)
        slots = int(ray.cluster_resources().get(SLOT_RESOURCE, 0))  # type: ignore[no-untyped-call]
        if slots < 1:
            ray.shutdown()
            raise ConfigError(
                f"the Ray cluster at {address} offers no {SLOT_RESOURCE}: start its nodes with "
                f"ray start … --resources '{{\"{SLOT_RESOURCE}\": 8}}' (one per agent the node may run)"
            )
        if not token_auth:
            logger.warning("Ray cluster %s: no token authentication; keep its ports on a private network", address)
        _connection = RayConnection(address, slots, token_auth)
        return _connection


def disconnect() -> None:
    """Leave the cluster (the slots of this process's placements must be closed first)."""
    global _connection
    with _lock:
        if _connection is not None:
            import ray

            ray.shutdown()
            _connection = None


def _use_token_auth() -> bool:
    """Ray's token mode, when it is asked for or a token is at hand (and not turned off)."""
    mode = os.environ.get("RAY_AUTH_MODE", "").lower()
    if mode:
        return mode == "token"
    default = Path.home() / ".ray" / "auth_token"
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH") or default.is_file():
        os.environ["RAY_AUTH_MODE"] = "token"
        return True
    return False


def _init(ray: Any, address: str) -> None:
    package = Path(__file__).resolve().parent
    runtime_env = {
        # Every node runs this very package (no version skew between engine and nodes).
        "py_modules": [str(package)],
        # Ray SIGKILLs a dying worker's children: that would kill the per-run reaper and let
        # the agent's escaped processes live on. Without it the pty hangs up when the slot
        # dies, and the reaper stops the agent and sweeps everything the run started.
        "env_vars": {"RAY_kill_child_processes_on_worker_exit": "false"},
    }
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main else None
    try:
        ray.init(
            address=address,
            namespace=NAMESPACE,
            runtime_env=runtime_env,
            log_to_driver=False,
            logging_level=logging.WARNING,
        )
    except Exception as exc:  # Ray raises ConnectionError, RuntimeError, its own errors…
        hint = f"; {_AUTH_HINT}" if "auth" in str(exc).lower() or "token" in str(exc).lower() else ""
        raise ConfigError(f"cannot connect to the Ray cluster at {address}: {exc}{hint}") from exc
    finally:
        if previous is not None:
            # Ray's own SIGTERM handler would exit mid-write; keep what the process had.
            signal.signal(signal.SIGTERM, previous)
    _keep_stdout_clean(ray)


def _keep_stdout_clean(ray: Any) -> None:
    """Ray prints cluster errors (e.g. "Raylet is terminated") to stdout: log them instead."""

    def to_log(data: dict[str, Any], ignore_prefix: bool = False) -> None:
        for line in data.get("lines", []):
            logger.warning("ray %s: %s", data.get("pid", "cluster"), str(line).rstrip())

    with contextlib.suppress(AttributeError):
        ray._private.worker.print_to_stdstream = to_log
