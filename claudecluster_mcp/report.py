"""Reports of a plan: JSON, Markdown, and one self-contained HTML page (a timeline of tasks
on worker slots, the dependency graph, per-task outcome, turns, cost, tokens, setup time,
diffstat, the merge result, failures with their reasons, and what agents were denied). One
colour per task state and one elapsed-time format serve them and the terminal's table
(:mod:`~claudecluster_mcp.table`)."""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .denials import common_denial, warning_lines
from .graph import TaskGraph
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
    "state_colour",
    "to_html",
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


def _redacted(status: PlanStatus) -> PlanStatus:
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
    status = _redacted(status)
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
            f"{task.attempts} | {task.turns} | {elapsed_text(task)} | {_setup_text(task)} | ${task.cost_usd:.4f} | "
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


def _setup_text(task: Task) -> str:
    return f"{task.setup_s:.1f}s" if task.setup_s is not None else "-"


def _slots(tasks: list[Task]) -> list[tuple[Task, int, float, float]]:
    """Tasks that ran, placed on worker slots (greedy by start time): (task, slot, start, end)."""
    ran = sorted((t for t in tasks if t.started_at), key=lambda t: t.started_at or datetime.now(UTC))
    if not ran:
        return []
    origin = min(t.started_at for t in ran if t.started_at).timestamp()
    now = datetime.now(UTC).timestamp()
    ends: list[float] = []
    placed = []
    for task in ran:
        assert task.started_at is not None
        start = task.started_at.timestamp() - origin
        end = (task.finished_at.timestamp() if task.finished_at else now) - origin
        slot = next((i for i, e in enumerate(ends) if e <= start + 1e-3), len(ends))
        if slot == len(ends):
            ends.append(end)
        else:
            ends[slot] = end
        placed.append((task, slot, start, max(end, start + 0.05)))
    return placed


def _gantt(tasks: list[Task]) -> str:
    placed = _slots(tasks)
    if not placed:
        return '<p class="empty">No task has run yet.</p>'
    span = max(end for *_, end in placed) or 1.0
    slots = max(slot for _, slot, _, _ in placed) + 1
    width, row, left = 900, 26, 70
    scale = (width - left - 10) / span
    parts = [f'<svg class="gantt" width="{width}" height="{slots * row + 30}" role="img" aria-label="timeline">']
    for slot in range(slots):
        parts.append(f'<text x="4" y="{slot * row + 17}" class="axis">slot {slot + 1}</text>')
    for task, slot, start, end in placed:
        x, w = left + start * scale, max(2.0, (end - start) * scale)
        colour = state_colour(task.state)
        title = html.escape(f"{task.id}: {task.state.value}, {start:.1f}s → {end:.1f}s")
        parts.append(
            f'<g class="bar" data-task="{html.escape(task.id)}"><title>{title}</title>'
            f'<rect x="{x:.1f}" y="{slot * row + 3}" width="{w:.1f}" height="{row - 6}" rx="3" fill="{colour}"/>'
            f'<text x="{x + 4:.1f}" y="{slot * row + 17}" class="label">{html.escape(task.id)}</text></g>'
        )
    for tick in range(0, int(span) + 1, max(1, int(span // 10) or 1)):
        x = left + tick * scale
        parts.append(f'<text x="{x:.1f}" y="{slots * row + 20}" class="axis">{tick}s</text>')
    parts.append("</svg>")
    return "".join(parts)


def _dag(tasks: list[Task]) -> str:
    if not tasks:
        return ""
    graph = TaskGraph(tasks)
    depth: dict[str, int] = {}
    for tid in graph.topological_order():
        depth[tid] = 1 + max((depth[d] for d in graph.tasks[tid].deps if d in depth), default=-1)
    layers: dict[int, list[str]] = {}
    for tid, level in depth.items():
        layers.setdefault(level, []).append(tid)
    box_w, box_h, gap_x, gap_y = 150, 34, 60, 18
    pos = {
        tid: (20 + level * (box_w + gap_x), 20 + i * (box_h + gap_y))
        for level, ids in layers.items()
        for i, tid in enumerate(ids)
    }
    width = 40 + (max(layers) + 1) * (box_w + gap_x)
    height = 40 + max(len(ids) for ids in layers.values()) * (box_h + gap_y)
    parts = [f'<svg class="dag" width="{width}" height="{height}" role="img" aria-label="dependency graph">']
    parts.append(
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="6" markerHeight="6" '
        'orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#667"/></marker></defs>'
    )
    for tid, task in graph.tasks.items():
        for dep in task.deps:
            if dep in pos:
                (x1, y1), (x2, y2) = pos[dep], pos[tid]
                parts.append(
                    f'<line class="edge" x1="{x1 + box_w}" y1="{y1 + box_h / 2}" x2="{x2}" y2="{y2 + box_h / 2}" '
                    'stroke="#667" marker-end="url(#arrow)"/>'
                )
    for tid, (x, y) in pos.items():
        task = graph.tasks[tid]
        state = getattr(task, "state", TaskState.PENDING)
        parts.append(
            f'<g class="node" data-task="{html.escape(tid)}"><rect x="{x}" y="{y}" width="{box_w}" height="{box_h}" '
            f'rx="6" fill="{state_colour(state)}"/><text x="{x + 8}" y="{y + 21}" class="label">'
            f"{html.escape(tid)}</text></g>"
        )
    parts.append("</svg>")
    return "".join(parts)


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;margin:24px;color:#1f2933;background:#fff}
h1{font-size:20px;margin:0 0 4px} h2{font-size:16px;margin:28px 0 8px}
.meta{color:#52606d} .cards{display:flex;gap:12px;flex-wrap:wrap;margin:14px 0}
.card{border:1px solid #d9e2ec;border-radius:8px;padding:8px 14px;min-width:110px}
.card b{display:block;font-size:18px}
table{border-collapse:collapse;width:100%} th,td{border-bottom:1px solid #e4e7eb;padding:5px 8px;text-align:left}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.state{display:inline-block;padding:1px 8px;border-radius:10px;color:#fff;font-size:12px}
svg text.label{fill:#fff;font-size:12px} svg text.axis{fill:#52606d;font-size:11px}
.reason{color:#b42318;white-space:pre-wrap;font-family:ui-monospace,monospace;font-size:12px}
.empty{color:#7b8794}
"""


def to_html(status: PlanStatus, stats: dict[str, Diffstat] | None = None, isolation: str | None = None) -> str:
    """One self-contained HTML page (inline CSS and SVG, no scripts, nothing fetched;
    secrets redacted)."""
    stats = stats or {}
    status = _redacted(status)
    plan = status.plan
    e = html.escape
    rows = []
    for task in status.tasks:
        stat = stats.get(task.id)
        colour = state_colour(task.state)
        resolve = " <small>(resolve)</small>" if task.kind.value == "resolve" else ""
        rows.append(
            f'<tr data-task="{e(task.id)}"><td>{e(task.id)}{resolve}'
            f"<br><small>{e(task.title)}</small></td>"
            f'<td><span class="state" style="background:{colour}">{e(state_text(task))}</span></td>'
            f'<td class="num">{task.attempts}</td><td class="num">{task.turns}</td>'
            f'<td class="num">{elapsed_text(task)}</td><td class="num">{_setup_text(task)}</td>'
            f'<td class="num">${task.cost_usd:.4f}</td>'
            f'<td class="num">{task.input_tokens + task.output_tokens:,}</td>'
            f"<td>{f'{stat.files} files +{stat.added} -{stat.removed}' if stat else '-'}</td>"
            f"<td>{e(', '.join(task.deps) or '-')}</td></tr>"
        )
    problems = [t for t in status.tasks if t.state not in (TaskState.MERGED, TaskState.PENDING) and t.reason]
    problem_html = "".join(
        f'<li><b>{e(t.id)}</b> ({e(t.state.value)})<div class="reason">{e(t.reason)}</div></li>' for t in problems
    )
    warnings = warning_lines(status.tasks)
    warning_html = "".join(f"<li>{e(w)}</li>" for w in warnings)
    merge = plan.final_merge
    merge_html = (
        f'<p id="merge">Merged into <b>{e(str(merge.get("target")))}</b> ({e(str(merge.get("kind")))}): '
        f"{e(str(merge.get('previous_tip') or '')[:10])} → {e(str(merge.get('new_tip') or '')[:10])}. "
        f"Undo: <code>{e(str(merge.get('undo')))}</code></p>"
        if merge
        else '<p id="merge" class="empty">Not merged into a target branch yet.</p>'
    )
    cards = "".join(
        f'<div class="card"><b>{value}</b>{e(label)}</div>'
        for label, value in [
            ("tasks", len(status.tasks)),
            ("merged", status.counts.get("merged", 0)),
            ("failed", sum(status.counts.get(s, 0) for s in ("failed", "timed_out", "conflicted", "gate_failed"))),
            ("cost", f"${status.total_cost_usd:.4f}"),
            ("tokens", f"{status.total_tokens:,}"),
            *([("merge batches", plan.merge_batches), ("gate runs", plan.gate_runs)] if plan.gate else []),
        ]
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>claudecluster plan {e(plan.id)}</title>
<style>{_CSS}</style></head><body>
<h1>Plan {e(plan.id)}: {e(plan.goal)}</h1>
<p class="meta">{e(str(plan.repo))} · base {e(plan.base_commit[:10])} ({e(plan.base_ref)}) ·
integration branch {e(plan.integration_branch)} · target {e(plan.target_branch)} ·
state <b>{e(plan.state.value)}</b>{f' · <b id="isolation">{e(isolation_text(isolation))}</b>' if isolation else ""}</p>
<div class="cards">{cards}</div>
<h2>Timeline on worker slots</h2>
<section id="timeline">{_gantt(status.tasks)}</section>
<h2>Dependency graph</h2>
<section id="graph">{_dag(status.tasks)}</section>
<h2>Tasks</h2>
<table id="tasks"><thead><tr><th>task</th><th>state</th><th>attempts</th><th>turns</th><th>time</th><th>setup</th>
<th>cost</th><th>tokens</th><th>diff</th><th>depends on</th></tr></thead><tbody>{"".join(rows)}</tbody></table>
<h2>Merge</h2>
{merge_html}
<h2>Problems</h2>
{f'<ul id="problems">{problem_html}</ul>' if problems else '<p id="problems" class="empty">None.</p>'}
<h2>Warnings</h2>
{f'<ul id="warnings">{warning_html}</ul>' if warnings else '<p id="warnings" class="empty">None.</p>'}
</body></html>
"""
