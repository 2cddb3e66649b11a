"""What the plan-level CLI commands do (``run``, ``status``, ``watch``, ``logs``, ``cancel``,
``workers``, ``merge``, ``export``, ``init``); :mod:`claudecluster_mcp.cli` parses arguments
into them, :mod:`claudecluster_mcp.terminal` shows their results.

Commands that only read (status, watch, logs, export) open the repository's store directly
and work while another process (``run``, ``serve``) owns the engine. Commands that act open
the engine, which takes the repository's lease.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import yaml
from rich.console import Console
from rich.markup import escape

from .claude_cli import ClaudeBinary, find_claude
from .config import CONFIG_FILE, ClusterConfig, load_config, render_config
from .engine import Cluster
from .errors import ClusterError, ConfigError, EngineBusyError, NotFoundError, StateError
from .merge_queue import FinalMerge
from .models import FINAL_STATES, PlanState, PlanStatus, TaskState, split_task_ref
from .placement import open_placement
from .preflight import check_model
from .registry import Registry
from .report import diffstats, event_line, to_json, to_markdown
from .report_html import to_html
from .scheduler import held_up
from .settings import EngineSettings
from .store import Store, state_db_path
from .terminal import exit_code, follow, landing_line, print_overview, print_status, show_live, tally
from .workspace import repo_root

__all__ = [
    "approve_command",
    "cancel_command",
    "export_command",
    "logs_command",
    "merge_command",
    "run_command",
    "status_command",
    "watch_command",
    "workers_command",
]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def _load_tasks(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except OSError as exc:
        raise ConfigError(f"cannot read the tasks file {path}: {exc.strerror}") from exc
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"the tasks file {path} is not valid YAML/JSON: {exc}") from exc
    tasks = data.get("tasks") if isinstance(data, dict) else None
    if not isinstance(tasks, list):
        raise ConfigError(f"the tasks file {path} must hold `tasks:`, a list of tasks (id, title, prompt, deps, …)")
    return tasks


async def _repo(path: Path | None) -> Path:
    return await repo_root(path or Path.cwd())


@asynccontextmanager
async def _store(repo: Path) -> AsyncIterator[Store]:
    db = await state_db_path(repo)
    if not db.exists():
        raise NotFoundError(f"no claudecluster plans in {repo} yet (start one with `claudecluster run`)")
    async with Store.open(db) as store:
        yield store


async def _plan_repo(plan_id: str | None, repo: Path | None, config: ClusterConfig) -> tuple[Path, str | None]:
    """The repository holding ``plan_id`` (``--repo``, the current repository, or the registry)."""
    if plan_id is None or repo is not None:
        return await _repo(repo), plan_id
    # The current repository first; any failure there (not a repo, no store, unknown id)
    # just means: ask the registry.
    with contextlib.suppress(ClusterError):
        here = await _repo(None)
        async with _store(here) as store:
            await store.plan(plan_id)
            return here, plan_id
    registry = Registry(config.engine().state_dir / "registry.db")
    return await anyio.to_thread.run_sync(registry.lookup, plan_id), plan_id


@asynccontextmanager
async def _engine(root: Path, settings: EngineSettings, claude: ClaudeBinary) -> AsyncIterator[Cluster]:
    """The repository's engine, its agents placed where the settings say."""
    async with (
        open_placement(settings, claude) as placement,
        Cluster.open(root, settings=settings, claude=claude, placement=placement) as cluster,
    ):
        yield cluster


# -- commands ------------------------------------------------------------------------------------


async def run_command(
    console: Console,
    goal: str | None,
    *,
    tasks_file: Path | None,
    plan_id: str | None,
    repo: Path | None,
    merge: bool,
    as_json: bool,
    flags: dict[str, Any],
    on_plan: Any = None,
) -> int:
    """Plan (or continue ``plan_id``), dispatch, show live progress, optionally merge."""
    root = await _repo(repo)
    config = load_config(root, **flags)
    claude = await anyio.to_thread.run_sync(find_claude, config.claude_bin)
    tasks = _load_tasks(tasks_file) if tasks_file else None
    if plan_id is None and not goal:
        raise ConfigError("give a goal (and optionally --tasks FILE), or --plan ID to continue a plan")
    settings = config.engine()
    # Once, before any agent (the planner included) starts: not every task failing alike.
    # (Not for Ray: agents run on the nodes, with the nodes' credentials.)
    if settings.placement == "local":
        await check_model(settings, repo=root)
    async with _engine(root, settings, claude) as cluster:
        if plan_id is None:
            assert goal is not None
            if not as_json:
                console.print("planning…" if tasks is None else f"planning {len(tasks)} tasks…")
            status = await cluster.plan(goal, tasks)
            plan_id = status.plan.id
            for warning in [] if as_json else status.plan.warnings:
                console.print(f"[yellow]warning:[/] {escape(warning)}")
        if on_plan is not None:
            on_plan(plan_id)
        await cluster.dispatch(plan_id)
        status = await follow(console, cluster, plan_id, live=not as_json)
        landed: FinalMerge | str | None = None
        if merge and exit_code(status) == EXIT_OK:
            try:
                landed = await cluster.merge(plan_id)
            except ClusterError as exc:  # e.g. a dirty checkout: the run's work is safe, say how to land it
                landed = str(exc)
        status = await cluster.status(plan_id)
    print_status(console, status, as_json=as_json, isolation=settings.isolation)
    if not as_json:
        console.print(escape(landing_line(status, landed, asked=merge)), soft_wrap=True)
    not_landed = merge and not (isinstance(landed, FinalMerge) and landed.kind not in ("conflict", "gate_failed"))
    return EXIT_FAILED if not_landed else exit_code(status)


async def status_command(console: Console, plan_id: str | None, *, repo: Path | None, as_json: bool) -> int:
    """Show one plan (or list the repository's plans)."""
    config = load_config(await _repo(repo) if repo else None)
    root, plan_id = await _plan_repo(plan_id, repo, config)
    async with _store(root) as store:
        if plan_id is None:
            print_overview(console, f"plans in {root}", await store.overview(), as_json=as_json)
            return EXIT_OK
        status = await store.status(plan_id)
    print_status(console, status, as_json=as_json, isolation=config.isolation)
    return EXIT_OK


async def watch_command(console: Console, plan_id: str | None, *, repo: Path | None) -> int:
    """Show the live table of a plan another process runs (default: the latest running
    plan, else the latest), read from the store, until the plan is final; exit 0 when every
    task merged, else 1."""
    config = load_config(await _repo(repo) if repo else None)
    root, plan_id = await _plan_repo(plan_id, repo, config)
    async with _store(root) as store:
        if plan_id is None:
            plans = await store.plans()
            if not plans:
                raise NotFoundError(f"no plans in {root}")
            running = [p for p in plans if p.state is PlanState.RUNNING]
            plan_id = (running or plans)[-1].id

        async def poll() -> tuple[PlanStatus, bool]:
            status = await store.status(plan_id)
            ended = status.plan.state not in (PlanState.PLANNED, PlanState.RUNNING)
            return status, ended or status.finished or bool(held_up(await store.task_rows(plan_id)))

        await show_live(console, poll, anyio.sleep, config.isolation, live=True)
        status = await store.status(plan_id)
    print_status(console, status, as_json=False, isolation=config.isolation)
    held = [t.id for t in status.tasks if t.state is TaskState.HELD]
    if held and not status.finished:
        console.print(f"waiting for your approval of {', '.join(held)}: claudecluster approve {plan_id}:{held[0]}")
    return exit_code(status)


async def logs_command(console: Console, task_ref: str, *, repo: Path | None, tail: int, follow: bool) -> int:
    """Print a task's recorded agent events; with ``follow``, keep printing until it is final."""
    plan_id, local = split_task_ref(task_ref)
    root, _ = await _plan_repo(plan_id, repo, load_config(None))
    async with _store(root) as store:
        task = await store.task(plan_id, local)
        events = await store.events(plan_id, local, limit=tail)
        last = 0
        for event in events:
            console.print(event_line(event), markup=False, highlight=False)
            last = event["seq"]
        while follow and task.state not in FINAL_STATES:
            await anyio.sleep(0.5)
            for event in await store.events(plan_id, local, after=last):
                console.print(event_line(event), markup=False, highlight=False)
                last = event["seq"]
            task = await store.task(plan_id, local)
    return EXIT_OK


async def cancel_command(console: Console, target: str, *, repo: Path | None) -> int:
    """Cancel a plan or a task: through the engine if none runs, else via the store (the
    running engine notices and stops its agents)."""
    plan_id, local = split_task_ref(target) if (":" in target or "/" in target) else (target, None)
    config = load_config(None)
    root, _ = await _plan_repo(plan_id, repo, config)
    try:
        claude = await anyio.to_thread.run_sync(find_claude, config.claude_bin)
        async with _engine(root, load_config(root).engine(), claude) as cluster:
            status = await cluster.cancel(plan_id, local)
        console.print(f"cancelled {target}: {tally(status)}")
    except EngineBusyError as exc:
        if local is not None:
            raise StateError(f"{exc} (cancel the whole plan, or the task through that engine)") from None
        async with _store(root) as store:
            await store.update_plan(plan_id, state=PlanState.CANCELLED)
        console.print(f"plan {plan_id} marked cancelled; the engine running it stops its agents within seconds")
    return EXIT_OK


async def approve_command(console: Console, target: str, *, repo: Path | None, reject: bool) -> int:
    """Approve (or reject) a task held because its changes touch protected paths."""
    plan_id, local = split_task_ref(target)
    config = load_config(None)
    root, _ = await _plan_repo(plan_id, repo, config)
    claude = await anyio.to_thread.run_sync(find_claude, config.claude_bin)
    async with _engine(root, load_config(root).engine(), claude) as cluster:
        await cluster.approve(plan_id, local, reject=reject)
        status = await cluster.wait(plan_id) if not reject else await cluster.status(plan_id)
    verb = "rejected" if reject else "approved"
    console.print(f"{verb} {plan_id}:{local}; plan: {tally(status)}")
    return EXIT_OK


async def merge_command(console: Console, plan_id: str, *, repo: Path | None, target: str | None, dry_run: bool) -> int:
    """Merge a finished plan into its target branch."""
    config = load_config(None)
    root, _ = await _plan_repo(plan_id, repo, config)
    claude = await anyio.to_thread.run_sync(find_claude, config.claude_bin)
    async with _engine(root, load_config(root).engine(), claude) as cluster:
        report = await cluster.merge(plan_id, target, dry_run=dry_run)
    if report.kind == "conflict":
        console.print(f"[red]conflict[/] merging into {report.target}: {', '.join(report.conflicts)}; nothing changed")
        return EXIT_FAILED
    if report.kind == "gate_failed":
        console.print(f"[red]gate failed[/] on the merge into {report.target}; nothing changed:")
        console.print(escape(report.gate_output or ""))
        return EXIT_FAILED
    verb = "would be merged" if dry_run else "merged"
    console.print(
        f"plan {plan_id} {verb} into {report.target} ({report.kind})"
        + (f"; undo: {report.undo}" if report.undo else "")
    )
    return EXIT_OK


async def workers_command(console: Console, action: str, count: int | None, *, repo: Path | None) -> int:
    """Show the pool size (config and agents running now), or set it in claudecluster.toml."""
    root = await _repo(repo)
    config = load_config(root)
    if action == "set":
        if count is None:
            raise ConfigError("workers set needs a number, e.g. `claudecluster workers set 8`")
        path = root / CONFIG_FILE
        updated = load_config(root, workers=count)
        text = path.read_text() if path.exists() else render_config(updated)
        lines = [line for line in text.splitlines() if not line.strip().startswith(("workers =", "# workers ="))]
        path.write_text("\n".join([*lines, f"workers = {updated.workers}"]) + "\n")
        console.print(
            f"workers = {updated.workers} in {path} "
            "(a running engine keeps its size; the MCP `workers` tool resizes it live)"
        )
        return EXIT_OK
    running = 0
    with contextlib.suppress(NotFoundError):  # no store yet: nothing runs
        async with _store(root) as store:
            for status in await store.overview():
                if status.plan.state is PlanState.RUNNING:
                    running += status.counts.get("running", 0) + status.counts.get("waiting", 0)
    console.print(
        f"workers: {config.workers} (from flags > env > {CONFIG_FILE} > default); agents running now: {running}"
    )
    return EXIT_OK


async def export_command(
    console: Console, fmt: str, plan_id: str | None, *, repo: Path | None, output: Path | None
) -> int:
    """Write a plan's report as JSON, Markdown or self-contained HTML."""
    root, plan_id = await _plan_repo(plan_id, repo, load_config(None))
    isolation = load_config(root).isolation  # as configured for the repository
    async with _store(root) as store:
        if plan_id is None:
            plans = await store.plans()
            if not plans:
                raise NotFoundError(f"no plans in {root}")
            plan_id = plans[-1].id
        status = await store.status(plan_id)
    stats = await diffstats(root, status.tasks)
    text = {"json": to_json, "md": to_markdown, "html": to_html}[fmt](status, stats, isolation)
    if output is None:
        sys.stdout.write(text)
    else:
        output.write_text(text)
        console.print(f"wrote {output} ({fmt}, plan {plan_id})")
    return EXIT_OK
