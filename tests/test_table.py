"""The terminal table keeps one line per task at any width: ids and states are never cut,
long reasons (a gate's whole test output) go in a section below it."""

from __future__ import annotations

import io
from collections.abc import Callable
from datetime import timedelta

import pytest
from rich.console import Console

from claudecluster_mcp.models import Plan, PlanStatus, Task, TaskKind, TaskState
from claudecluster_mcp.store import now
from claudecluster_mcp.table import plan_view

PYTEST_OUTPUT = (
    "gate failed (exit 1):\n============================= test session starts ==============================\n"
    "platform linux -- Python 3.11.7, pytest-8.3.4, pluggy-1.5.0\nrootdir: /tmp/click\ncollected 1123 items\n\n"
    "tests/test_basic.py ........F.....\n\n"
    "=================================== FAILURES ===================================\n"
    "___________________________ test_help_option ___________________________\n"
    "E   AssertionError: assert 'Usage: cli [OPTIONS]' in 'Usage: main [OPTIONS]'\n"
    "========================= 1 failed, 1122 passed in 41.20s ========================="
)


@pytest.fixture
def status(make_plan: Callable[..., Plan], make_task: Callable[..., Task]) -> PlanStatus:
    started = now() - timedelta(seconds=75)
    ran = {"attempts": 1, "started_at": started, "finished_at": now(), "turns": 12, "cost_usd": 0.1234}
    tasks = [
        make_task("break-help-output", state=TaskState.GATE_FAILED, reason=PYTEST_OUTPUT, **ran),
        make_task(
            "export-csv",
            state=TaskState.MERGED,
            last_activity="merged",
            setup_s=3.25,
            warnings=["wanted Bash(npm test): add it to allowed_tools"],
            **ran,
        ),
        make_task(
            "zsh-completion",
            state=TaskState.RUNNING,
            started_at=started,
            last_activity="Bash python -m pytest tests/test_shell_completion.py -q -x --no-header -p no:cacheprovider",
        ),
        make_task("export-csv.resolve", kind=TaskKind.RESOLVE, state=TaskState.PENDING),
    ]
    plan = make_plan(goal="improve click: help output, csv export and shell completion", reason="")
    counts: dict[str, int] = {}
    for task in tasks:
        counts[task.state.value] = counts.get(task.state.value, 0) + 1
    return PlanStatus(plan=plan, tasks=tasks, counts=counts)


def render(status: PlanStatus, width: int) -> list[str]:
    console = Console(width=width, file=io.StringIO(), record=True, color_system=None)
    console.print(plan_view(status, "sandbox", width=width))
    return console.export_text().splitlines()


def rows(lines: list[str], status: PlanStatus) -> list[str]:
    """The table's body: the lines between the header's rule and the caption."""
    start = next(i for i, line in enumerate(lines) if line.startswith("───"))
    return lines[start + 1 : start + 1 + len(status.tasks)]


@pytest.mark.parametrize("width", [80, 50, 120, 200])
def test_one_line_per_task_and_whole_ids_at_any_width(status: PlanStatus, width: int) -> None:
    lines = render(status, width)

    assert all(len(line) <= width for line in lines), "\n".join(lines)
    for row, task in zip(rows(lines, status), status.tasks, strict=True):
        assert row.startswith(task.id + " ") and task.state.value in row, "\n".join(lines)
    assert "isolation sandbox" in lines[lines.index(rows(lines, status)[-1]) + 1]  # the caption follows the rows


def test_the_longest_task_id_fits_at_80_columns(make_plan: Callable[..., Plan], make_task: Callable[..., Task]) -> None:
    longest = "x" * 56 + ".resolve"
    task = make_task(longest, kind=TaskKind.RESOLVE, state=TaskState.GATE_FAILED, reason="gate failed (exit 1):\nE")
    alone = PlanStatus(plan=make_plan(), tasks=[task], counts={"gate_failed": 1})
    assert rows(render(alone, 80), alone)[0].split()[:2] == [longest, "gate_failed"]


def test_at_80_columns_the_gate_output_goes_below_the_table(status: PlanStatus) -> None:
    lines = render(status, 80)
    bottom = lines.index(rows(lines, status)[-1])
    table, below = "\n".join(lines[: bottom + 1]), "\n".join(lines[bottom + 1 :])

    # In the table: elapsed, turns, cost and setup keep their room; the reason is cut to a line.
    failed = next(line for line in lines if line.startswith("break-help-output "))
    assert failed.split()[:6] == ["break-help-output", "gate_failed", "75s", "12", "$0.1234", "gate"]
    assert "3.2s" in table and "setup" in table
    assert "AssertionError" not in table
    # Below it: the whole gate output of that task (its first lines), and the denial, once.
    assert "break-help-output (gate_failed): gate failed (exit 1):" in below
    assert "test_help_option" in below and "AssertionError: assert 'Usage: cli [OPTIONS]'" in below
    assert below.count("wanted Bash(npm test)") == 1
    assert "(export-csv)" in below


def test_narrow_terminals_drop_columns_before_cutting_an_id(status: PlanStatus) -> None:
    lines = render(status, 50)
    header = next(line for line in lines if line.startswith("task "))
    assert header.split() == ["task", "state", "time", "cost"]
    assert any(line.split()[:2] == ["export-csv.resolve", "pending"] for line in lines)
