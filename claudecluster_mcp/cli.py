"""The ``claudecluster`` command line.

:func:`main` is the one error boundary. Errors a user can act on
(:class:`~claudecluster_mcp.errors.ClusterError`, also when a task group wrapped them in an
exception group) are printed as one line on stderr with exit code 2; Ctrl-C exits 130;
anything else is a bug: logged with its traceback, exit code 70.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
from rich.console import Console

from .cli_parser import build_parser
from .errors import ClusterError, leaves

__all__ = ["build_parser", "main"]

logger = logging.getLogger("claudecluster_mcp.cli")

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_BUG, EXIT_INTERRUPTED = 0, 1, 2, 70, 130


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    console = Console(highlight=False, emoji=False)
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
    from .config import load_config
    from .server import ServerSettings, prepare_http, serve_http, serve_stdio, token_from
    from .settings import EngineSettings

    if args.token:
        print(
            "claudecluster: warning: a --token on the command line is visible to every user of this machine "
            "(ps); use --token-file FILE or CLAUDECLUSTER_TOKEN instead",
            file=sys.stderr,
        )
    # Like `run`: flags > CLAUDECLUSTER_* environment > claudecluster.toml > defaults. Only the
    # flags are fixed here; the hub merges them over each repository's own configuration.
    flags = {k: v for k, v in {"workers": args.workers, **_placement_flags(args)}.items() if v is not None}
    config = load_config(None, **flags)  # fails fast on bad flags or environment
    # Where agents run is the server's choice, for every repository it serves.
    placement = {k: getattr(config, k) for k in ("placement", "ray_address", "ray_allow_public")}
    if config.placement == "ray":
        from .ray_cluster import connect

        connect(config.ray_address, allow_public=config.ray_allow_public)  # before the event loop starts
    settings = ServerSettings(
        roots=args.root or [Path.cwd()],
        engine=EngineSettings(**{**flags, **placement}),
        claude_bin=args.claude or None,
        host=args.host,
        port=args.port,
        token=None if args.no_auth else token_from(args.token, args.token_file),
        no_auth=args.no_auth,
        allowed_hosts=args.allowed_host or [],
        allowed_origins=args.allowed_origin or [],
    )
    if args.transport == "stdio":
        # stdout carries the protocol only: every log line goes to stderr.
        anyio.run(serve_stdio, settings)
        return EXIT_OK
    print(prepare_http(settings, args.transport), file=sys.stderr)
    with contextlib.suppress(KeyboardInterrupt):
        serve_http(settings, args.transport)
    return EXIT_OK


def _console() -> Console:
    return Console(highlight=False, emoji=False)


def _run_async(fn: Any, *args: Any, **kwargs: Any) -> int:
    code: int = anyio.run(lambda: fn(*args, **kwargs))
    return code


def _placement_flags(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "placement": getattr(args, "placement", None),
        "ray_address": getattr(args, "ray_address", None),
        "ray_allow_public": getattr(args, "ray_allow_public", None),
    }


def _engine_flags(args: argparse.Namespace) -> dict[str, Any]:
    return {
        **_placement_flags(args),
        "workers": getattr(args, "workers", None),
        "model": getattr(args, "model", None),
        "permission_mode": getattr(args, "permission_mode", None),
        "allowed_tools": getattr(args, "allowed_tool", None),
        "gate": args.gate.split() if getattr(args, "gate", None) else None,
        "merge_policy": getattr(args, "merge_policy", None),
        "max_budget_usd": getattr(args, "max_budget_usd", None),
        "max_cost_usd": getattr(args, "max_cost_usd", None),
        "max_tokens": getattr(args, "max_tokens", None),
    }


_current_plan: dict[str, str] = {}


def _cmd_run(args: argparse.Namespace) -> int:
    from .commands import run_command

    return _run_async(
        run_command,
        _console(),
        args.goal,
        tasks_file=args.tasks,
        plan_id=args.plan,
        repo=args.repo,
        merge=args.merge,
        as_json=args.json,
        flags=_engine_flags(args),
        on_plan=lambda plan_id: _current_plan.update(id=plan_id),
    )


def _cmd_status(args: argparse.Namespace) -> int:
    from .commands import status_command

    return _run_async(status_command, _console(), args.plan, repo=args.repo, as_json=args.json)


def _cmd_watch(args: argparse.Namespace) -> int:
    from .commands import watch_command

    return _run_async(watch_command, _console(), args.plan, repo=args.repo)


def _cmd_logs(args: argparse.Namespace) -> int:
    from .commands import logs_command

    return _run_async(logs_command, _console(), args.task, repo=args.repo, tail=args.tail, follow=args.follow)


def _cmd_approve(args: argparse.Namespace) -> int:
    from .commands import approve_command

    return _run_async(approve_command, _console(), args.task, repo=args.repo, reject=args.reject)


def _cmd_cancel(args: argparse.Namespace) -> int:
    from .commands import cancel_command

    return _run_async(cancel_command, _console(), args.id, repo=args.repo)


def _cmd_merge(args: argparse.Namespace) -> int:
    from .commands import merge_command

    return _run_async(merge_command, _console(), args.plan, repo=args.repo, target=args.target, dry_run=args.dry_run)


def _cmd_workers(args: argparse.Namespace) -> int:
    from .commands import workers_command

    return _run_async(workers_command, _console(), args.action, args.count, repo=args.repo)


def _cmd_gc(args: argparse.Namespace) -> int:
    from .gc_command import gc_command

    return _run_async(
        gc_command,
        _console(),
        repo=args.repo,
        older_than=args.older_than,
        dry_run=args.dry_run,
        unmerged=args.unmerged,
        as_json=args.json,
    )


def _cmd_export(args: argparse.Namespace) -> int:
    from .commands import export_command

    return _run_async(export_command, _console(), args.format, args.plan, repo=args.repo, output=args.output)


def _cmd_init(args: argparse.Namespace) -> int:
    from .repo_init import init_command

    interactive = sys.stdin.isatty() and not args.yes
    return _run_async(
        init_command, _console(), repo=args.repo, interactive=interactive, force=args.force, flags=_engine_flags(args)
    )


def _cmd_bench(args: argparse.Namespace) -> int:
    from .benchmarks import BENCHES, run_benchmarks

    return run_benchmarks(_console(), args.only or list(BENCHES), verbose=args.verbose, duration=args.duration)


def _cmd_check(args: argparse.Namespace) -> int:
    from .claude_cli import find_claude
    from .isolation import sandbox_support

    found = find_claude(args.claude)
    print(f"claude {found.version} at {found.path}")
    print(sandbox_support().describe())
    return EXIT_OK


_HANDLERS = {
    "demo": _cmd_demo,
    "model-server": _cmd_model_server,
    "serve": _cmd_serve,
    "run": _cmd_run,
    "status": _cmd_status,
    "watch": _cmd_watch,
    "logs": _cmd_logs,
    "approve": _cmd_approve,
    "cancel": _cmd_cancel,
    "workers": _cmd_workers,
    "merge": _cmd_merge,
    "export": _cmd_export,
    "gc": _cmd_gc,
    "init": _cmd_init,
    "bench": _cmd_bench,
    "check": _cmd_check,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``claudecluster`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        code: int = _HANDLERS[args.command](args)
    except BaseException as exc:  # the one boundary: every way a command can end badly
        return _exit_for(exc)
    return code


def _one_line(error: ClusterError) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return "; ".join(lines) or type(error).__name__


def _exit_for(exc: BaseException) -> int:
    """Say what ended the command and choose the exit code. anyio task groups (the engine's)
    wrap what their body raises in an exception group: a user's error is still one line."""
    found = leaves(exc)
    if any(isinstance(leaf, KeyboardInterrupt) for leaf in found):
        resume = f"; resume with: claudecluster run --plan {_current_plan['id']}" if _current_plan.get("id") else ""
        print(f"claudecluster: interrupted — agents stopped, nothing left running{resume}", file=sys.stderr)
        return EXIT_INTERRUPTED
    if all(isinstance(leaf, ClusterError) for leaf in found):
        messages = list(dict.fromkeys(_one_line(leaf) for leaf in found if isinstance(leaf, ClusterError)))
        more = f" (and {len(messages) - 1} more errors)" if len(messages) > 1 else ""
        print(f"claudecluster: error: {messages[0]}{more}", file=sys.stderr)
        return EXIT_USAGE
    if isinstance(exc, SystemExit):
        raise exc
    logger.error("unexpected error: this is a bug in claudecluster; please report it with this traceback", exc_info=exc)
    return EXIT_BUG


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
