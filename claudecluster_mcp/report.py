"""Reports of a plan: JSON and Markdown (the HTML page is :mod:`~claudecluster_mcp.report_html`),
with per-task outcome, turns, cost, tokens, setup time, diffstat, the merge result, failures
with their reasons, and what agents were denied. One colour per task state and one
elapsed-time format serve them, the HTML page and the terminal's table
(:mod:`~claudecluster_mcp.table`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .denials import common_denial, warning_lines
from .models import PlanStatus, Task, TaskState
from .redact import redact, redact_data
from .workspace import git

__all__ = [
    "STATE_COLOURS",
    "Diffstat",
    "diffstats",
    "elapsed_text",
    "event_line",
    "isolation_text",
    "redacted",
    "setup_text",
    "state_colour",
    "state_text",
    "to_json",
    "to_markdown",
]

STATE_COLOURS = {
    TaskState.MERGED: "#2e9d57",
    TaskState.SUCCEEDED: "#3b82c4",
    TaskState.RUNNING: "#e0a526",
    TaskState.WAITING: "#e07b26",
    TaskState.READY: "#9aa5b1",
    TaskState.PENDING: "#c5ccd3",
    TaskState.CONFLICTED: "#9b4dca",
    TaskState.GATE_FAILED: "#c43b6a",
    TaskState.FAILED: "#d64545",
    TaskState.TIMED_OUT: "#d64545",
    TaskState.CANCELLED: "#7b8794",
    TaskState.BLOCKED: "#a0a0a0",
    TaskState.HELD: "#b8860b",
}


def state_colour(state: TaskState) -> str:
    """The colour of a task state (``#rrggbb``), in the HTML report and the terminal alike."""
    return STATE_COLOURS.get(state, "#888888")


def elapsed_text(task: Task) -> str:
    """How long a task has run (until now while it runs), e.g. ``4.2s`` or ``73s``; ``-`` if
    it has not started."""
    seconds = task.elapsed_s
    if seconds is None:
        return "-"
    return f"{seconds:.0f}s" if seconds >= 10 else f"{seconds:.1f}s"


def merge_queue_text(status: PlanStatus) -> str:
    """How the merge queue landed a gated plan's tasks: batches and gate runs ("" without a
    gate)."""
    plan = status.plan
    if not plan.gate and not plan.gate_runs:
        return ""
    merged, batches, runs = status.counts.get("merged", 0), plan.merge_batches, plan.gate_runs
    return (
        f"{merged} task{'s' * (merged != 1)} merged in {batches} batch{'es' * (batches != 1)}; "
        f"{runs} gate run{'s' * (runs != 1)}"
    )


def state_text(task: Task) -> str:
    """A task's state, with the merge batch that landed it."""
    batch = f" (batch {task.merge_batch})" if task.merge_batch and task.state is TaskState.MERGED else ""
    return task.state.value + batch


@dataclass(frozen=True)
class Diffstat:
    """What a task's commit changed."""

    files: int
    added: int
    removed: int


async def diffstats(repo: Path, tasks: list[Task]) -> dict[str, Diffstat]:
    """``git diff --numstat`` of each task's commit against its base."""
    stats: dict[str, Diffstat] = {}
    for task in tasks:
        if not (task.commit and task.base_commit) or task.commit == task.base_commit:
            continue
        result = await git(repo, "diff", "--numstat", task.base_commit, task.commit, "--", check=False)
        added = removed = files = 0
        for line in result.stdout.splitlines():
            parts = line.split("\t")
            if len(parts) == 3:
                files += 1
                added += int(parts[0]) if parts[0].isdigit() else 0
                removed += int(parts[1]) if parts[1].isdigit() else 0
        stats[task.id] = Diffstat(files, added, removed)
    return stats


def event_line(event: dict[str, Any]) -> str:
    """One line for an agent event from the store (for logs), secrets redacted."""
    data = event["data"]
    at = event["at"][11:19]
    kind = event["kind"]
    if kind == "text":
        detail = data.get("text", "")
    elif kind == "tool_use":
        detail = f"{data.get('name')} {_short(data.get('input'))}"
    elif kind == "tool_result":
        detail = ("error: " if data.get("is_error") else "") + str(data.get("content", ""))
    elif kind == "state":
        detail = data.get("state", "") + (f" ({data['reason']})" if data.get("reason") else "")
    elif kind == "result":
        detail = f"{data.get('subtype')} turns={data.get('num_turns')} cost=${data.get('total_cost_usd', 0):.4f}"
    elif kind == "setup":
        ran = " ".join(data.get("command") or []) or "copy_files"
        detail = f"{ran}: {'ok' if data.get('ok') else 'FAILED'} in {data.get('seconds')}s"
        detail += f"; copied {', '.join(data['copied'])}" if data.get("copied") else ""
        detail += f"; {' '.join(data.get('notes') or [])} {str(data.get('output', ''))[-300:]}"
    elif kind == "gate":
        verdict = "passed" if data.get("ok") else f"FAILED (exit {data.get('exit')})"
        on = ", ".join(data.get("tasks") or []) or "the final merge"
        detail = f"{verdict} on {on} in {data.get('seconds')}s"
    elif kind == "warning":
        detail = data.get("text", "")
    else:
        detail = _short(data)
    return f"{at} {kind:<12} {' '.join(redact(str(detail)).split())[:400]}"


def _short(value: Any) -> str:
    text = redact(str(value))
    return text if len(text) <= 200 else text[:200] + "…"


def isolation_text(isolation: str | None) -> str:
    """How agents were confined, for reports ("" when unknown)."""
    if isolation == "none":
        return "isolation none: agents and the gate ran unconfined"
    return f"isolation {isolation}" if isolation else ""


def _task_dict(task: Task, stat: Diffstat | None) -> dict[str, Any]:
    data = task.model_dump(
        mode="json",
        include={
            "id", "title", "kind", "state", "deps", "priority", "category", "attempts", "turns",
            "cost_usd", "input_tokens", "output_tokens", "reason", "branch", "commit",
            "merge_commit", "changed_files", "started_at", "finished_at", "setup_s", "warnings", "merge_batch",
        },
    )  # fmt: skip
    data["diffstat"] = stat.__dict__ if stat else None
    return data


def redacted(status: PlanStatus) -> PlanStatus:
    """``status`` with secrets redacted from every string (goal, prompts, reasons, …)."""
    return PlanStatus.model_validate(redact_data(status.model_dump(mode="json")))


def to_json(status: PlanStatus, stats: dict[str, Diffstat] | None = None, isolation: str | None = None) -> str:
    """The whole plan as JSON (secrets redacted)."""
    stats = stats or {}
    plan = status.plan.model_dump(mode="json")
    report = {
        "plan": plan,
        "isolation": isolation,
        "counts": status.counts,
        "total_cost_usd": round(status.total_cost_usd, 6),
        "total_tokens": status.total_tokens,
        "notice": common_denial(status.tasks),
        "tasks": [_task_dict(t, stats.get(t.id)) for t in status.tasks],
    }
    return json.dumps(redact_data(report), indent=2)


def to_markdown(status: PlanStatus, stats: dict[str, Diffstat] | None = None, isolation: str | None = None) -> str:
    """A Markdown report: summary, a task table, failures, and the merge result (secrets
    redacted)."""
    stats = stats or {}
    status = redacted(status)
    plan = status.plan
    lines = [
        f"# Plan {plan.id}: {plan.goal}",
        "",
        f"- Repository: `{plan.repo}`, base `{plan.base_commit[:10]}` ({plan.base_ref}), "
        f"integration branch `{plan.integration_branch}`, target `{plan.target_branch}`",
        f"- State: **{plan.state.value}**; tasks: " + ", ".join(f"{n} {s}" for s, n in sorted(status.counts.items())),
        f"- Cost: ${status.total_cost_usd:.4f}; tokens: {status.total_tokens:,}",
        *([f"- Merge queue: {text}"] if (text := merge_queue_text(status)) else []),
        *(
            [f"- Isolation: **{isolation}**" + (" (agents and the gate ran unconfined)" if isolation == "none" else "")]
            if isolation
            else []
        ),
        "",
        "| task | state | attempts | turns | time | setup | cost | tokens | diff | depends on |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for task in status.tasks:
        stat = stats.get(task.id)
        diff = f"{stat.files} files +{stat.added} -{stat.removed}" if stat else "-"
        lines.append(
            f"| {task.id}{' (resolve)' if task.kind.value == 'resolve' else ''} | {state_text(task)} | "
            f"{task.attempts} | {task.turns} | {elapsed_text(task)} | {setup_text(task)} | ${task.cost_usd:.4f} | "
            f"{task.input_tokens + task.output_tokens:,} | {diff} | {', '.join(task.deps) or '-'} |"
        )
    failures = [t for t in status.tasks if t.state not in (TaskState.MERGED, TaskState.PENDING) and t.reason]
    if failures:
        lines += ["", "## Problems", ""]
        lines += [f"- **{t.id}** ({t.state.value}): {t.reason}" for t in failures]
    warnings = warning_lines(status.tasks)
    if warnings:
        lines += ["", "## Warnings", "", *(f"- {w}" for w in warnings)]
    if plan.final_merge:
        merge = plan.final_merge
        lines += [
            "",
            "## Merge",
            "",
            f"Merged into `{merge.get('target')}` ({merge.get('kind')}): "
            f"`{(merge.get('previous_tip') or '')[:10]}` → `{(merge.get('new_tip') or '')[:10]}`. "
            f"Undo: `{merge.get('undo')}`",
        ]
    return "\n".join(lines) + "\n"


def setup_text(task: Task) -> str:
    """A task's setup time, or ``-``."""
    return f"{task.setup_s:.1f}s" if task.setup_s is not None else "-"
