"""What the command line shows of a plan: the live table with an overall bar while it runs
(:func:`follow` for the plan of this process's engine, :func:`show_live` for any source,
such as ``watch`` reading the store of another process), the final table with its summary,
and after a run one line saying what landed on the target branch, or why not and the
command that lands the work that passed (:func:`landing_line`).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Awaitable, Callable

from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from .engine import STATUS_FOCUS, Cluster
from .merge_queue import FinalMerge
from .models import FINAL_STATES, PlanStatus, TaskState
from .report import merge_queue_text, to_json
from .table import plan_view

__all__ = ["exit_code", "follow", "landing_line", "print_overview", "print_status", "show_live", "tally"]

EXIT_OK, EXIT_FAILED = 0, 1

#: Reads the plan: (its status, True once there is nothing more to wait for).
Poll = Callable[[], Awaitable[tuple[PlanStatus, bool]]]


def exit_code(status: PlanStatus) -> int:
    """0 when every task merged, else 1."""
    return EXIT_OK if status.counts and set(status.counts) == {TaskState.MERGED.value} else EXIT_FAILED


def tally(status: PlanStatus) -> str:
    """Tasks by state, e.g. ``3 merged, 1 gate_failed``."""
    return ", ".join(f"{n} {s}" for s, n in sorted(status.counts.items()))


async def show_live(
    console: Console,
    poll: Poll,
    changed: Callable[[float], Awaitable[None]],
    isolation: str,
    *,
    live: bool,
    note: Callable[[], str] | None = None,
) -> PlanStatus:
    """Show the live table, ``note`` (e.g. the pool's rate-limit state) when it says
    something, and the overall bar until ``poll`` says it is done; returns the last status
    read. The display is transient: the caller prints the final table."""
    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn(), console=console
    )
    bar = progress.add_task("merged", total=1)
    with Live(console=console, refresh_per_second=4, transient=True) if live else _NoLive() as screen:
        while True:
            status, done = await poll()
            total = sum(status.counts.values())
            final = sum(n for s, n in status.counts.items() if TaskState(s) in FINAL_STATES)
            progress.update(bar, total=total, completed=final, description=f"{final}/{total} final")
            said = note() if note is not None else ""
            lines = [Text(said, style="yellow")] if said else []
            screen.update(Group(plan_view(status, isolation, width=console.width), *lines, progress))
            if done:
                return status
            await changed(0.5)


async def follow(console: Console, cluster: Cluster, plan_id: str, *, live: bool) -> PlanStatus:
    """Show the live table of a plan this engine runs until every task is final (or the
    plan waits for the user to approve held tasks)."""

    async def poll() -> tuple[PlanStatus, bool]:
        status = await cluster.status(plan_id, focus=STATUS_FOCUS)
        return status, status.finished or bool(await cluster.held_up(plan_id))

    await show_live(
        console, poll, cluster.changed, cluster.settings.isolation, live=live, note=lambda: cluster.rate_limit
    )
    return await cluster.wait(plan_id)


class _NoLive:
    def __enter__(self) -> _NoLive:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def update(self, renderable: object) -> None:
        return None


def print_status(console: Console, status: PlanStatus, *, as_json: bool, isolation: str) -> None:
    """A plan as JSON on stdout, or as the task table, its notes and a summary line."""
    if as_json:
        sys.stdout.write(to_json(status, isolation=isolation) + "\n")
        return
    console.print(plan_view(status, isolation, width=console.width))
    totals = f"${status.total_cost_usd:.4f}, {status.total_tokens:,} tokens"
    queue = f"; {text}" if (text := merge_queue_text(status)) else ""
    console.print(f"{sum(status.counts.values())} tasks: {tally(status)}; {totals}{queue}")


def print_overview(console: Console, title: str, overview: list[PlanStatus], *, as_json: bool) -> None:
    """The repository's plans, one row each (``status`` without a plan id)."""
    if as_json:
        rows = [
            {
                "plan_id": s.plan.id,
                "goal": s.plan.goal,
                "state": s.plan.state.value,
                "counts": s.counts,
                "cost_usd": round(s.total_cost_usd, 6),
                "tokens": s.total_tokens,
                "created_at": s.plan.created_at.isoformat(),
            }
            for s in overview
        ]
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    table = Table(title=title, title_justify="left")
    for column in ("plan", "state", "tasks", "cost", "goal"):
        table.add_column(column)
    for s in overview:
        table.add_row(s.plan.id, s.plan.state.value, tally(s), f"${s.total_cost_usd:.4f}", escape(s.plan.goal[:50]))
    console.print(table)


def landing_line(status: PlanStatus, merged: FinalMerge | str | None, *, asked: bool) -> str:
    """One line after a run: what landed on the target branch (``merged``: the final merge,
    or why it could not be made), or why nothing did and the command that lands the work
    that passed."""
    plan = status.plan
    done = status.counts.get(TaskState.MERGED.value, 0)
    total = sum(status.counts.values())
    land = f"claudecluster merge {plan.id}"
    if isinstance(merged, FinalMerge) and merged.kind == "conflict":
        return (
            f"not landed: {plan.integration_branch} conflicts with {merged.target} in {', '.join(merged.conflicts)}; "
            f"nothing changed (by hand: git switch {merged.target} && git merge {plan.integration_branch})"
        )
    if isinstance(merged, FinalMerge) and merged.kind == "gate_failed":
        last = (merged.gate_output or "").strip().splitlines()[-1:] or [""]
        return (
            f"not landed: {plan.integration_branch} merged with {merged.target} fails the gate ({last[0][:120]}); "
            f"nothing changed; the whole gate output: claudecluster logs {plan.id}"
        )
    if isinstance(merged, FinalMerge):
        return f"landed: {done} tasks merged into {merged.target} ({merged.kind}); undo: {merged.undo}"
    prefix = "not landed: " if asked else ""
    if isinstance(merged, str):
        return f"{prefix}{merged}; land the {done} merged tasks later with: {land}"
    held = [t.id for t in status.tasks if t.state is TaskState.HELD]
    if held:
        return f"{prefix}waiting for your approval of {', '.join(held)}: claudecluster approve {plan.id}:{held[0]}"
    if done == 0:
        return f"{prefix}no task merged, nothing to land" + (f" ({plan.reason})" if plan.reason else "")
    if done == total:
        return f"all {total} tasks merged on {plan.integration_branch}; land them with: {land}"
    missed = [f"{t.id} {t.state.value}" for t in status.tasks if t.state is not TaskState.MERGED]
    listed = ", ".join(missed[:3]) + (f" and {len(missed) - 3} more" if len(missed) > 3 else "")
    return (
        f"{prefix}{total - done} of {total} tasks did not merge ({listed}); the {done} that passed are on "
        f"{plan.integration_branch}; land them with: {land}"
    )
