"""The ``claudecluster`` command line's arguments: one small function per group of commands.
:mod:`claudecluster_mcp.cli` runs the command ``args.command`` names."""

from __future__ import annotations

import argparse
import re
from datetime import timedelta
from pathlib import Path

from . import __version__
from .benchmarks import BENCHES

__all__ = ["build_parser"]


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
    p.add_argument("--max-cost-usd", type=float, help="cost budget of the whole plan (all its agents)")
    p.add_argument("--max-tokens", type=int, help="token budget of the whole plan (all its agents)")


def _placement_options(p: argparse.ArgumentParser) -> None:
    """Where agents run (``serve`` and ``run``)."""
    p.add_argument("--placement", choices=["local", "ray"], help="where agents run: this machine, or a Ray cluster")
    p.add_argument("--ray-address", help="HOST:PORT of the Ray cluster's head (with --placement ray)")
    p.add_argument(
        "--ray-allow-public", action="store_true", default=None, help="accept a --ray-address outside private networks"
    )


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

    model = commands.add_parser(
        "model-server",
        help="serve a scripted Anthropic Messages API for offline claude runs",
        description="Serve a scripted Anthropic Messages API (see docs/scenarios.md).",
    )
    model.add_argument("--scenario", required=True, type=Path, help="scenario file (YAML or JSON)")
    model.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    model.add_argument("--port", type=int, default=8123, help="port (default 8123)")


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
    _placement_options(serve)


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
    _placement_options(run)


def _add_readers(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    status = commands.add_parser("status", help="show a plan, or list the repository's plans")
    status.add_argument("plan", nargs="?", help="plan id (default: list plans)")
    status.add_argument("--json", action="store_true")
    _repo_option(status)

    watch = commands.add_parser(
        "watch",
        help="the live table of a plan another process (serve, run) runs; exits when it is final",
        description="Follow a plan that `claudecluster serve` or another `claudecluster run` executes: the live "
        "table of `run`, read from the repository's store (read-only, no engine lease). Exits when the plan is "
        "final (0 when every task merged, else 1), or when it waits for your approval of a held task.",
    )
    watch.add_argument("plan", nargs="?", help="plan id (default: the latest running plan, else the latest plan)")
    _repo_option(watch)

    logs = commands.add_parser("logs", help="show what a task's agent did")
    logs.add_argument("task", help="<plan_id>:<task id>")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing until the task is final")
    logs.add_argument("--tail", type=int, default=200, help="how many of the last events (default 200)")
    _repo_option(logs)

    approve = commands.add_parser(
        "approve", help="approve (or --reject) a task held because it changes protected paths"
    )
    approve.add_argument("task", help="<plan_id>:<task id>")
    approve.add_argument("--reject", action="store_true", help="reject it instead: cancelled, dependents blocked")
    _repo_option(approve)

    cancel = commands.add_parser("cancel", help="cancel a plan or a task (<plan_id>:<task id>)")
    cancel.add_argument("id")
    _repo_option(cancel)


def _add_actions(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    workers = commands.add_parser("workers", help="show the agent pool size, or set it in claudecluster.toml")
    workers.add_argument("action", nargs="?", choices=["list", "set"], default="list")
    workers.add_argument("count", nargs="?", type=int)
    _repo_option(workers)

    merge = commands.add_parser("merge", help="merge a finished plan into its target branch")
    merge.add_argument("plan")
    merge.add_argument("--target", help="branch to merge into (default: the plan's target)")
    merge.add_argument("--dry-run", action="store_true", help="only report what would happen")
    _repo_option(merge)

    export = commands.add_parser("export", help="write a plan's report as json, md or html")
    export.add_argument("format", choices=["json", "md", "html"])
    export.add_argument("--plan", help="plan id (default: the latest plan)")
    export.add_argument("-o", "--output", type=Path, help="file to write (default: stdout)")
    _repo_option(export)

    gc = commands.add_parser(
        "gc",
        help="remove what finished plans left on disk (worktrees, transcripts, events, branches)",
        description="Remove what plans that finished more than AGE ago left: worktrees of tasks that did "
        "not merge, agent transcripts (also Claude Code's), events, and branches; and the leftovers of killed "
        "runs. Never touches a running plan, nor commits that no other branch holds (such a plan is trimmed and "
        "kept) unless --unmerged. A running engine does this itself every hour for retention_days.",
    )
    gc.add_argument(
        "--older-than", type=_age, metavar="AGE", help="e.g. 7d, 12h, 30m, 0 for every finished plan (default: "
        "retention_days)"
    )  # fmt: skip
    gc.add_argument("--dry-run", action="store_true", help="only say what would be removed, and how much")
    gc.add_argument("--unmerged", action="store_true", help="also delete work that no other branch holds")
    gc.add_argument("--json", action="store_true", help="print the report as JSON")
    _repo_option(gc)

    init = commands.add_parser(
        "init", help="write claudecluster.toml, register the MCP server in .mcp.json, check claude"
    )
    init.add_argument("--yes", action="store_true", help="do not ask; use flags and defaults")
    init.add_argument("--force", action="store_true", help="overwrite an existing claudecluster.toml")
    _repo_option(init)
    _engine_options(init)


def _add_bench_and_check(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    bench = commands.add_parser(
        "bench",
        help="run the benchmark suite and print one table of ratios against their targets",
        description="Run bench/*.py (runner overhead, scheduling efficiency, real speed-up, 1,000-task "
        "plan, MCP latency, the race against bare `claude -p`, the sandbox's cost, MCP clients polling "
        "under held load, kill -9 at random points, the batching merge queue, faults at scale, a "
        "rate-limit storm). Takes about 20 minutes on 2 cores without faults and storm, which add "
        "about 28 and 7.",
    )
    bench.add_argument("--only", action="append", choices=list(BENCHES), help="run only these (repeatable)")
    bench.add_argument(
        "--duration", type=float, metavar="S", help="measured seconds of the held-load benchmark (load; default 120)"
    )

    check = commands.add_parser(
        "check",
        help="find the claude CLI, print its version and the isolation available",
        description="Locate the Claude Code CLI the way agents will, and print its version.",
    )
    check.add_argument("--claude", help="path to a claude executable to check")


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def _age(text: str) -> timedelta:
    """An age such as ``7d``, ``12h``, ``30m``, ``90s``, ``2w`` (a bare number: days)."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text)
    if found is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not an age such as 7d, 12h, 30m or 0")
    return timedelta(seconds=float(found[1]) * _UNITS[found[2] or "d"])
