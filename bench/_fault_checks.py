"""The fault suite's verdict on a run (see bench/_faults.py): the invariants — merged, lost,
merged twice, final with a reason naming the fault, processes left — and, per fault kind, how
often it happened, was seen by the engine, and what it cost."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from _faults import KINDS, SIGNS, Run

from claudecluster_mcp.models import FINAL_STATES, TaskState


@dataclass
class Outcome:
    """The invariants and the time lost, per fault kind."""

    total: int
    merged: int
    lost: list[str]
    merged_twice: list[str]
    unexplained: list[str]  # final but not merged, with no fault named
    not_merged: dict[str, str]  # task id → state: reason
    leftover_pids: list[int]
    per_kind: dict[str, dict[str, Any]]
    makespan: float

    @property
    def merged_share(self) -> float:
        return self.merged / self.total


def check(run: Run) -> Outcome:
    """The invariants of a run: merged, lost, merged twice, explained, processes left."""
    tasks = run.tasks
    merged = [t for t in tasks.values() if t.state is TaskState.MERGED]
    lost = [t.id for t in tasks.values() if t.state not in FINAL_STATES]
    lost += [t.id for t in merged if f"{t.id}.txt" not in run.integration_files]
    twice = [t for t, n in run.journal.items() if n > 1]
    if run.first_parent_commits != len(merged):
        twice.append(f"{run.first_parent_commits} first-parent commits for {len(merged)} merged tasks")
    not_merged = {t.id: f"{t.state.value}: {t.reason}" for t in tasks.values() if t.state is not TaskState.MERGED}
    unexplained = [t for t in not_merged if not _explained(run, t)]
    return Outcome(
        total=len(tasks),
        merged=len(merged),
        lost=lost,
        merged_twice=twice,
        unexplained=unexplained,
        not_merged=not_merged,
        leftover_pids=run.leftover_pids,
        per_kind=_per_kind(run),
        makespan=run.makespan,
    )


def _reasons(run: Run, task_id: str) -> str:
    return "\n".join(str(e["data"].get("reason", "")) for e in run.events.get(task_id, []) if e["kind"] == "state")


def _explained(run: Run, task_id: str) -> bool:
    task = run.tasks[task_id]
    if task.state is TaskState.BLOCKED:
        found = re.search(r"dependency (\S+) did not merge", task.reason)
        return found is not None and found.group(1) in run.tasks and _explained(run, found.group(1))
    kind = run.injected.faults.get(task_id, (None, 0))[0]
    return kind is not None and re.search(SIGNS[kind], task.reason) is not None


def _span(events: list[Any]) -> float | None:
    """Seconds from a task's first start to its merge."""
    times = [(e["data"].get("state"), e["at"]) for e in events if e["kind"] == "state"]
    start = next((at for s, at in times if s == "running"), None)
    end = next((at for s, at in times if s == "merged"), None)
    if start is None or end is None:
        return None
    return (_stamp(end) - _stamp(start)).total_seconds()


def _stamp(value: Any) -> datetime:
    return value if isinstance(value, datetime) else datetime.fromisoformat(str(value))


def _per_kind(run: Run) -> dict[str, dict[str, Any]]:
    """Per fault kind: injected (it happened: a task blocked before it ran never met its
    fault), seen by the engine (a reason names it), merged, time lost (the faulted tasks'
    start-to-merge time beyond the median of the unfaulted ones)."""
    clean = sorted(s for t, evs in run.events.items() if t not in run.injected.faults and (s := _span(evs)) is not None)
    typical = clean[len(clean) // 2] if clean else 0.0
    rows: dict[str, dict[str, Any]] = {}
    for kind in KINDS:
        targets = [t for t in run.injected.of(kind) if t in run.faulted]
        spans = [s for t in targets if (s := _span(run.events.get(t, []))) is not None]
        rows[kind] = {
            "injected": len(targets),
            "seen": sum(bool(re.search(SIGNS[kind], _reasons(run, t))) for t in targets),
            "merged": sum(run.tasks[t].state is TaskState.MERGED for t in targets),
            "lost_s": round(sum(max(0.0, s - typical) for s in spans), 1),
        }
    # Tasks without a fault that were retried anyway (e.g. a start so slow under load that it
    # hit the inactivity timeout), or paused for another task's 429.
    unfaulted = [t for t in run.tasks if t not in run.injected.faults]
    retried = sum(bool(re.search(r"retrying|rate limited", _reasons(run, t))) for t in unfaulted)
    rows["(none)"] = {
        "injected": 0,
        "seen": retried,
        "merged": sum(run.tasks[t].state is TaskState.MERGED for t in unfaulted),
        "lost_s": 0.0,
        "typical_s": round(typical, 1),
    }
    return rows
