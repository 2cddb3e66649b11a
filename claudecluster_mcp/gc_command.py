"""``claudecluster gc``: remove what finished plans left on disk, by hand (a running engine
does it by itself for ``retention_days``; see :mod:`~claudecluster_mcp.retention`)."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from rich.console import Console

from .commands import EXIT_OK
from .config import load_config
from .diskfull import megabytes
from .errors import EngineBusyError, NotFoundError
from .recovery import EngineLease
from .registry import Registry
from .retention import GcReport, Retention
from .store import Store, state_db_path
from .workspace import repo_root

__all__ = ["gc_command"]


async def gc_command(
    console: Console, *, repo: Path | None, older_than: timedelta | None, dry_run: bool, unmerged: bool, as_json: bool
) -> int:
    """Remove what finished plans left on disk (see :mod:`~claudecluster_mcp.retention`); not
    while an engine runs the repository (that one does it itself, every hour)."""
    root = await repo_root(repo or Path.cwd())
    settings = load_config(root).engine()
    if older_than is None and settings.retention_days > 0:
        older_than = timedelta(days=settings.retention_days)
    db = await state_db_path(root)
    try:
        with EngineLease(db.parent / "engine.lock", root):
            if not db.exists():
                raise NotFoundError(f"no claudecluster plans in {root} yet")
            async with Store.open(db) as store:
                retention = Retention(root, store, settings, Registry(settings.state_dir / "registry.db"))
                report = await retention.collect(
                    older_than, dry_run=dry_run, unmerged=unmerged, orphans=True, compact=not dry_run
                )
    except EngineBusyError as exc:
        raise EngineBusyError(
            f"{exc}. That engine removes plans finished more than retention_days ({settings.retention_days:g}) "
            "ago by itself, every hour"
        ) from None
    if as_json:
        sys.stdout.write(json.dumps({**report.model_dump(mode="json"), "freed_bytes": report.freed_bytes}) + "\n")
    else:
        _print_gc(console, report)
    return EXIT_OK


def _print_gc(console: Console, report: GcReport) -> None:
    for plan in report.plans:
        age = f", finished {_ago(datetime.now(UTC) - plan.finished_at)} ago" if plan.finished_at else ""
        verb = ("would be " if report.dry_run else "") + plan.action
        console.print(
            f"plan {plan.plan_id} ({plan.state}{age}) {verb}: {plan.worktrees} worktrees, {plan.logs} transcripts, "
            f"{plan.events} events, {len(plan.branches_deleted)} branches; {megabytes(plan.freed_bytes)}",
            markup=False,
        )
        if plan.branches_kept:
            console.print(
                f"  kept the plan and {', '.join(plan.branches_kept)}: work that no other branch holds (land it "
                f"with `claudecluster merge {plan.plan_id}`, or delete it with `claudecluster gc --unmerged`)",
                markup=False,
            )
    if report.leftovers:
        console.print(f"leftovers of killed runs and old planner logs: {len(report.leftovers)}", markup=False)
    if report.compacted_bytes:
        console.print(f"state database compacted by {megabytes(report.compacted_bytes)}", markup=False)
    if not (report.plans or report.leftovers):
        scope = (
            ""
            if report.older_than_s is None
            else f" (plans finished more than {report.older_than_s / 86400:g} days ago)"
        )
        console.print(f"nothing to remove{scope}", markup=False)
        return
    freed = megabytes(report.freed_bytes)
    console.print(f"would free {freed} (dry run: nothing removed)" if report.dry_run else f"freed {freed}")


def _ago(delta: timedelta) -> str:
    seconds = delta.total_seconds()
    for unit, size in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds:.0f} seconds"
