"""The HTML report of a plan: one self-contained page (inline CSS and SVG, no scripts,
nothing fetched) with a timeline of tasks on worker slots, the dependency graph, per-task
outcome, turns, cost, tokens, setup time, diffstat, the merge result, failures with their
reasons, and what agents were denied."""

from __future__ import annotations

import html
from datetime import UTC, datetime

from .denials import warning_lines
from .graph import TaskGraph
from .models import PlanStatus, Task, TaskState
from .report import Diffstat, elapsed_text, isolation_text, redacted, setup_text, state_colour, state_text

__all__ = ["to_html"]


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
    status = redacted(status)
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
            f'<td class="num">{elapsed_text(task)}</td><td class="num">{setup_text(task)}</td>'
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
