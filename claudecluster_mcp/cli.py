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

from . import __version__
from .benchmarks import BENCHES
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
    flags = {k: v for k, v in {"workers": args.workers}.items() if v is not None}
    load_config(None, **flags)  # fails fast on bad flags or environment
    settings = ServerSettings(
        roots=args.root or [Path.cwd()],
        engine=EngineSettings(**flags),
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


def _engine_flags(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "workers": getattr(args, "workers", None),
        "model": getattr(args, "model", None),
        "permission_mode": getattr(args, "permission_mode", None),
        "allowed_tools": getattr(args, "allowed_tool", None),
        "gate": args.gate.split() if getattr(args, "gate", None) else None,
        "merge_policy": getattr(args, "merge_policy", None),
        "max_budget_usd": getattr(args, "max_budget_usd", None),
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


def _cmd_export(args: argparse.Namespace) -> int:
    from .commands import export_command

    return _run_async(export_command, _console(), args.format, args.plan, repo=args.repo, output=args.output)


def _cmd_init(args: argparse.Namespace) -> int:
    from .commands import init_command

    interactive = sys.stdin.isatty() and not args.yes
    return _run_async(
        init_command, _console(), repo=args.repo, interactive=interactive, force=args.force, flags=_engine_flags(args)
    )


def _cmd_bench(args: argparse.Namespace) -> int:
    from .benchmarks import run_benchmarks

    return run_benchmarks(_console(), args.only or list(BENCHES), verbose=args.verbose)


def _cmd_check(args: argparse.Namespace) -> int:
    from .claude_cli import find_claude
    from .isolation import sandbox_support

    found = find_claude(args.claude)
    print(f"claude {found.version} at {found.path}")
    print(sandbox_support().describe())
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
    for add in (_add_demo_and_model_server, _add_serve, _add_run, _add_readers, _add_actions, _add_bench_and_check):
        add(commands)
    return parser


def _engine_options(p: argparse.ArgumentParser) -> None:
    """The engine settings a command takes as flags."""
    p.add_argument("--workers", type=int, help="agents at once (1-64)")
    p.add_argument("--model", help="model or alias for agents")
    p.add_argument(
        "--permission-mode", choices=["acceptEdits", "auto", "bypassPermissions", "default", "dontAsk", "plan"]
    )
    p.add_argument("--allowed-tool", action="append", help='tool rule agents may use, e.g. "Bash(pytest *)"')
    p.add_argument("--gate", help='command run on each merge candidate, e.g. "pytest -q"')
    p.add_argument("--merge-policy", choices=["resolve", "report"])
    p.add_argument("--max-budget-usd", type=float, help="cost limit per agent run")


def _repo_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--repo", type=Path, help="the git repository (default: the current directory's)")


def _add_demo_and_model_server(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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


def _add_serve(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = commands.add_parser(
        "serve",
        help="run the MCP server (stdio by default; --transport sse|http for remote clients)",
        description="Run the claudecluster MCP server. stdio for a local host such as Claude Code; "
        "sse or http serve one app with Streamable HTTP at /mcp, legacy SSE at /sse, /health and /metrics.",
    )
    serve.add_argument("--transport", choices=["stdio", "sse", "http"], default="stdio")
    serve.add_argument("--host", default="127.0.0.1", help="bind address for sse/http (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8765, help="port for sse/http (default 8765)")
    auth = serve.add_mutually_exclusive_group()
    auth.add_argument(
        "--token-file",
        type=Path,
        help="file holding the bearer token sse/http clients must send (or $CLAUDECLUSTER_TOKEN)",
    )
    auth.add_argument("--token", help="the bearer token itself (visible in ps: prefer --token-file)")
    auth.add_argument(
        "--no-auth",
        action="store_true",
        help="serve sse/http without a token, on a loopback address only "
        "(default: a token generated on first start into the state directory)",
    )
    serve.add_argument(
        "--root", type=Path, action="append", help="allow repositories below this path (repeatable; default: cwd)"
    )
    serve.add_argument("--workers", type=int, help="agent slots (default: each repository's setting, else 4)")
    serve.add_argument("--claude", help="the agents' claude executable (default: each repository's claude_bin)")
    serve.add_argument("--allowed-host", action="append", help="extra Host header value to accept, e.g. myhost:8765")
    serve.add_argument("--allowed-origin", action="append", help="extra Origin to accept, e.g. https://app.example")
    serve.set_defaults(handler=_cmd_serve)


def _add_run(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    run = commands.add_parser(
        "run",
        help="plan a goal, run it with live progress, optionally merge",
        description="Plan a goal (from --tasks FILE, or split by a read-only planning agent), run its tasks "
        "as parallel Claude Code agents with live progress, and optionally merge. Before any agent starts, "
        "checks once that agents can use the model (logged in, API reachable; CLAUDECLUSTER_SKIP_MODEL_CHECK=1 "
        "skips this). Exit 0 when every task merged, 1 on task failures, 2 on usage, configuration or "
        "model-access errors. Ctrl-C stops the agents cleanly; `claudecluster run --plan ID` resumes.",
    )
    run.add_argument("goal", nargs="?", help="what the work should achieve")
    run.add_argument("--tasks", type=Path, help="YAML/JSON file holding `tasks:` (the MCP plan tool's shape)")
    run.add_argument("--plan", help="continue this plan instead of planning a new one")
    run.add_argument("--merge", action="store_true", help="merge into the target branch when every task merged")
    run.add_argument("--json", action="store_true", help="no live display; print the final report as JSON")
    _repo_option(run)
    _engine_options(run)
    run.set_defaults(handler=_cmd_run)


def _add_readers(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    status = commands.add_parser("status", help="show a plan, or list the repository's plans")
    status.add_argument("plan", nargs="?", help="plan id (default: list plans)")
    status.add_argument("--json", action="store_true")
    _repo_option(status)
    status.set_defaults(handler=_cmd_status)

    logs = commands.add_parser("logs", help="show what a task's agent did")
    logs.add_argument("task", help="<plan_id>:<task id>")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing until the task is final")
    logs.add_argument("--tail", type=int, default=200, help="how many of the last events (default 200)")
    _repo_option(logs)
    logs.set_defaults(handler=_cmd_logs)

    approve = commands.add_parser(
        "approve", help="approve (or --reject) a task held because it changes protected paths"
    )
    approve.add_argument("task", help="<plan_id>:<task id>")
    approve.add_argument("--reject", action="store_true", help="reject it instead: cancelled, dependents blocked")
    _repo_option(approve)
    approve.set_defaults(handler=_cmd_approve)

    cancel = commands.add_parser("cancel", help="cancel a plan or a task (<plan_id>:<task id>)")
    cancel.add_argument("id")
    _repo_option(cancel)
    cancel.set_defaults(handler=_cmd_cancel)


def _add_actions(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    workers = commands.add_parser("workers", help="show the agent pool size, or set it in claudecluster.toml")
    workers.add_argument("action", nargs="?", choices=["list", "set"], default="list")
    workers.add_argument("count", nargs="?", type=int)
    _repo_option(workers)
    workers.set_defaults(handler=_cmd_workers)

    merge = commands.add_parser("merge", help="merge a finished plan into its target branch")
    merge.add_argument("plan")
    merge.add_argument("--target", help="branch to merge into (default: the plan's target)")
    merge.add_argument("--dry-run", action="store_true", help="only report what would happen")
    _repo_option(merge)
    merge.set_defaults(handler=_cmd_merge)

    export = commands.add_parser("export", help="write a plan's report as json, md or html")
    export.add_argument("format", choices=["json", "md", "html"])
    export.add_argument("--plan", help="plan id (default: the latest plan)")
    export.add_argument("-o", "--output", type=Path, help="file to write (default: stdout)")
    _repo_option(export)
    export.set_defaults(handler=_cmd_export)

    init = commands.add_parser(
        "init", help="write claudecluster.toml, register the MCP server in .mcp.json, check claude"
    )
    init.add_argument("--yes", action="store_true", help="do not ask; use flags and defaults")
    init.add_argument("--force", action="store_true", help="overwrite an existing claudecluster.toml")
    _repo_option(init)
    _engine_options(init)
    init.set_defaults(handler=_cmd_init)


def _add_bench_and_check(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    bench = commands.add_parser(
        "bench",
        help="run the benchmark suite and print one table of ratios against their targets",
        description="Run bench/*.py (runner overhead, scheduling efficiency, real speed-up, 1,000-task "
        "plan, MCP latency, and the race against bare `claude -p`). Takes about 8 minutes on 2 cores.",
    )
    bench.add_argument("--only", action="append", choices=list(BENCHES), help="run only these (repeatable)")
    bench.set_defaults(handler=_cmd_bench)

    check = commands.add_parser(
        "check",
        help="find the claude CLI, print its version and the isolation available",
        description="Locate the Claude Code CLI the way agents will, and print its version.",
    )
    check.add_argument("--claude", help="path to a claude executable to check")
    check.set_defaults(handler=_cmd_check)


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
