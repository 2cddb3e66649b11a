"""The ``claudecluster`` command line.

Errors a user can act on (:class:`~claudecluster_mcp.errors.ClusterError`) are printed as
one line on stderr with exit code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import anyio
from rich.console import Console

from . import __version__
from .errors import ClusterError

__all__ = ["main"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    console = Console(highlight=False)
    return anyio.run(lambda: run_demo(console, workdir=args.workdir, workers=args.workers))


def _cmd_model_server(args: argparse.Namespace) -> int:
    from .model_server import serve_forever
    from .scenario import load_scenario

    scenario = load_scenario(args.scenario)
    print(
        f"scripted model server for scenario {scenario.name!r} on http://{args.host}:{args.port}\n"
        f"point claude at it: ANTHROPIC_BASE_URL=http://{args.host}:{args.port} "
        "ANTHROPIC_API_KEY=scripted CLAUDE_CODE_MAX_RETRIES=0",
        file=sys.stderr,
    )
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is how a foreground server stops
        serve_forever(scenario, args.host, args.port)
    return EXIT_OK


def _cmd_serve(args: argparse.Namespace) -> int:
    from .engine import EngineSettings
    from .server import ServerSettings, serve_http, serve_stdio, token_from

    engine = EngineSettings(workers=args.workers) if args.workers else EngineSettings()
    settings = ServerSettings(
        roots=args.root or [Path.cwd()],
        engine=engine,
        host=args.host,
        port=args.port,
        token=token_from(args.token, args.token_file),
        allowed_hosts=args.allowed_host or [],
        allowed_origins=args.allowed_origin or [],
    )
    if args.transport == "stdio":
        # stdout carries the protocol only: every log line goes to stderr.
        anyio.run(serve_stdio, settings)
    else:
        with contextlib.suppress(KeyboardInterrupt):
            serve_http(settings, args.transport)
    return EXIT_OK


def _cmd_check(args: argparse.Namespace) -> int:
    from .agent import find_claude

    found = find_claude(args.claude)
    print(f"claude {found.version} at {found.path}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for documentation tests)."""
    parser = argparse.ArgumentParser(
        prog="claudecluster",
        description="Turn Claude Code into a coding cluster.",
    )
    parser.add_argument("--version", action="version", version=f"claudecluster {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="run a task DAG with real claude agents against the scripted model (offline)",
        description="Plan examples/demo/tasks.yaml in a fresh copy of examples/demo/repo, run the "
        "tasks as real Claude Code agents in parallel (each in its own git worktree) against the "
        "bundled scripted model, merge them (resolving a planned conflict), and show the result. "
        "No API key needed.",
    )
    demo.add_argument("--workdir", type=Path, help="where to put the demo repository (default: a temp dir)")
    demo.add_argument("--workers", type=int, default=4, help="agents at a time (default 4)")
    demo.set_defaults(handler=_cmd_demo)

    model = commands.add_parser(
        "model-server",
        help="serve a scripted Anthropic Messages API for offline claude runs",
        description="Serve a scripted Anthropic Messages API (see docs/scenarios.md).",
    )
    model.add_argument("--scenario", required=True, type=Path, help="scenario file (YAML or JSON)")
    model.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    model.add_argument("--port", type=int, default=8123, help="port (default 8123)")
    model.set_defaults(handler=_cmd_model_server)

    serve = commands.add_parser(
        "serve",
        help="run the MCP server (stdio by default; --transport sse|http for remote clients)",
        description="Run the claudecluster MCP server. stdio for a local host such as Claude Code; "
        "sse or http serve one app with Streamable HTTP at /mcp, legacy SSE at /sse, /health and /metrics.",
    )
    serve.add_argument("--transport", choices=["stdio", "sse", "http"], default="stdio")
    serve.add_argument("--host", default="127.0.0.1", help="bind address for sse/http (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8765, help="port for sse/http (default 8765)")
    serve.add_argument("--token", help="bearer token clients must send (or --token-file, or $CLAUDECLUSTER_TOKEN)")
    serve.add_argument("--token-file", type=Path, help="file holding the bearer token")
    serve.add_argument(
        "--root", type=Path, action="append", help="allow repositories below this path (repeatable; default: cwd)"
    )
    serve.add_argument("--workers", type=int, help="agent slots (default 4)")
    serve.add_argument("--allowed-host", action="append", help="extra Host header value to accept, e.g. myhost:8765")
    serve.add_argument("--allowed-origin", action="append", help="extra Origin to accept, e.g. https://app.example")
    serve.set_defaults(handler=_cmd_serve)

    check = commands.add_parser(
        "check",
        help="find the claude CLI and print its version",
        description="Locate the Claude Code CLI the way agents will, and print its version.",
    )
    check.add_argument("--claude", help="path to a claude executable to check")
    check.set_defaults(handler=_cmd_check)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``claudecluster`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        code: int = args.handler(args)
    except ClusterError as exc:
        print(f"claudecluster: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("claudecluster: interrupted", file=sys.stderr)
        return 130
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
