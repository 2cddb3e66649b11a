"""The terminal's view of a plan (``run``, ``watch``, ``status``): a table with one line per
task at any width, and below it what does not fit in a line.

Task ids and states are never cut: the table has no borders (the longest task id and a
state fit in 80 columns), every column but "last activity" is as wide as its widest cell,
"last activity" takes what is left (cut with an ellipsis), and on a narrow terminal "last
activity", then the setup, turns, cost and time columns, are left out. A failed
task's whole reason (a gate's test output, a setup's error), the warnings of agents that
were denied something (each said once, with the tasks it hit) and why the plan ended are
printed under the table.
"""

from __future__ import annotations

from rich import box
from rich.console import Group, RenderableType
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from .denials import warning_lines
from .models import FINAL_STATES, PlanStatus, Task, TaskState
from .report import elapsed_text, isolation_text, state_colour

__all__ = ["plan_view", "status_notes", "status_table"]

_COLUMNS = ("task", "state", "time", "turns", "cost", "setup")
_LEFT = ("task", "state")
_MIN_ACTIVITY = 12  # narrower than this, "last activity" says too little: it goes
_DROPPABLE = ("setup", "turns", "cost", "time")  # left out first to last when too narrow
_REASON_LINES = 12  # of a reason shown under the table


def _explained(task: Task) -> bool:
    """True when the task's reason, not its last activity, says where it is."""
    return (task.state in FINAL_STATES and task.state is not TaskState.MERGED) or task.state is TaskState.HELD


def _activity(task: Task) -> str:
    text = task.reason if _explained(task) and task.reason else task.last_activity
    return " ".join(text.split())


def _cells(task: Task) -> dict[str, str]:
    return {
        "task": task.id,  # a resolve task's id says so: <id>.resolve
        "state": task.state.value,
        "time": elapsed_text(task),
        "turns": str(task.turns or ""),
        "cost": f"${task.cost_usd:.4f}" if task.cost_usd else "",
        "setup": f"{task.setup_s:.1f}s" if task.setup_s is not None else "",
    }


def _layout(rows: list[dict[str, str]], width: int) -> tuple[dict[str, int], int]:
    """Widths of the fixed columns kept, and the width left for "last activity" (0: left out).
    Between two columns: a space of padding either side of a blank separator."""
    names = [name for name in _COLUMNS if name != "setup" or any(r["setup"] for r in rows)]
    widths = {name: max(len(name), *(len(r[name]) for r in rows)) for name in names}
    left = width - sum(widths.values()) - 3 * len(widths)
    if left >= _MIN_ACTIVITY:
        return widths, left
    for drop in (None, *_DROPPABLE):  # "last activity" goes first, then the numbers
        widths.pop(drop or "", None)
        if sum(widths.values()) + 3 * (len(widths) - 1) <= width:
            break
    return widths, 0


def status_table(status: PlanStatus, isolation: str | None = None, *, width: int = 120) -> Table:
    """The task table, ``width`` columns wide at most, one line per task (with the isolation
    level and the tasks not listed in its caption)."""
    title = escape(f"plan {status.plan.id}: {status.plan.goal[:60]}")
    # No borders: the longest task id (64) and state fit in 80 columns with room to spare.
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    rows = [_cells(task) for task in status.tasks]
    widths, activity = _layout(rows or [dict.fromkeys(_COLUMNS, "")], width)
    for name, column_width in widths.items():
        table.add_column(name, width=column_width, no_wrap=True, justify="left" if name in _LEFT else "right")
    if activity:
        table.add_column("last activity", width=activity, no_wrap=True, overflow="ellipsis")
    for task, cells in zip(status.tasks, rows, strict=True):
        values = [escape(cells[name]) for name in widths]
        values[1] = f"[{state_colour(task.state)}]{values[1]}[/]"
        table.add_row(*values, *([escape(_activity(task))] if activity else []))
    caption = [f"{status.omitted} more tasks pending or merged"] if status.omitted else []
    caption += [isolation_text(isolation)] if isolation else []
    table.caption = "; ".join(caption) or None
    return table


def _reason_lines(task: Task) -> list[str]:
    """The reason's first line (what failed) and its last lines (a test run's summary)."""
    lines = [line for line in task.reason.strip().splitlines() if line.strip()]
    if len(lines) > _REASON_LINES:
        more = len(lines) - _REASON_LINES
        hint = f"… {more} lines more (all of them: claudecluster export md --plan {task.plan_id})"
        lines = [lines[0], hint, *lines[-(_REASON_LINES - 1) :]]
    return lines


def status_notes(status: PlanStatus, *, activity_width: int = 0) -> list[Text]:
    """What the table has no room for: each explained task's whole reason when it does not
    fit in its line, the denial warnings (each once), and why the plan ended."""
    notes: list[Text] = []
    for task in status.tasks:
        if not (_explained(task) and task.reason):
            continue
        lines = _reason_lines(task)
        if len(lines) == 1 and len(_activity(task)) <= activity_width:
            continue
        notes.append(Text.assemble((f"{task.id}", "bold"), f" ({task.state.value}): ", lines[0]))
        notes += [Text("    " + line, no_wrap=True, overflow="ellipsis") for line in lines[1:]]
    notes += [Text.assemble(("warning: ", "yellow"), line) for line in warning_lines(status.tasks)]
    if status.plan.reason:
        notes.append(Text.assemble(("plan: ", "bold"), status.plan.reason))
    return notes


def plan_view(status: PlanStatus, isolation: str | None = None, *, width: int = 120) -> RenderableType:
    """The table and its notes, for a terminal ``width`` columns wide."""
    table = status_table(status, isolation, width=width)
    activity = next((c.width or 0 for c in table.columns if c.header == "last activity"), 0)
    return Group(table, *status_notes(status, activity_width=activity))
