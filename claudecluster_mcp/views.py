"""What the MCP tools return: one output model per tool, each built from what the engine
reports (:class:`~claudecluster_mcp.models.PlanStatus`, :class:`~claudecluster_mcp.models.Task`,
:class:`~claudecluster_mcp.engine.FinalMerge`), never assembled by hand.

Every view has a one-line :meth:`summary` for the host model to read; programs read the
structured content (the model's JSON), whose schema is the tool's output schema.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from .denials import common_denial
from .engine import Cluster
from .merge_queue import FinalMerge
from .models import PlanStatus, Task, TaskState
from .report import event_line
from .store import StoredEvent

__all__ = [
    "LogsView",
    "PlanSummary",
    "PlanView",
    "StatusView",
    "TaskView",
    "WorkersView",
    "merge_summary",
    "summary_of",
]


class TaskView(BaseModel):
    """A task as the tools report it."""

    task_id: str = Field(description="global id: <plan_id>:<task id>")
    id: str
    title: str
    kind: str
    state: TaskState
    deps: list[str]
    priority: str
    category: str
    attempts: int
    elapsed_s: float | None
    turns: int
    cost_usd: float
    input_tokens: int
    output_tokens: int
    last_activity: str
    reason: str
    branch: str | None
    commit: str | None
    merge_commit: str | None
    changed_files: list[str]
    setup_s: float | None = Field(default=None, description="seconds its worktree setup took")
    warnings: list[str] = Field(default_factory=list, description="what its agent was denied, and the rule to allow it")
    merge_batch: int | None = Field(default=None, description="the plan's merge batch that landed it (1, 2, …)")

    @classmethod
    def of(cls, task: Task) -> TaskView:
        """The view of a stored task."""
        elapsed = task.elapsed_s
        return cls(
            task_id=f"{task.plan_id}:{task.id}",
            id=task.id,
            title=task.title,
            kind=task.kind.value,
            state=task.state,
            deps=task.deps,
            priority=task.priority.value,
            category=task.category.value,
            attempts=task.attempts,
            elapsed_s=None if elapsed is None else round(elapsed, 1),
            turns=task.turns,
            cost_usd=round(task.cost_usd, 6),
            input_tokens=task.input_tokens,
            output_tokens=task.output_tokens,
            last_activity=task.last_activity,
            reason=task.reason,
            branch=task.branch,
            commit=task.commit,
            merge_commit=task.merge_commit,
            changed_files=task.changed_files,
            setup_s=task.setup_s,
            warnings=task.warnings,
            merge_batch=task.merge_batch,
        )


class PlanView(BaseModel):
    """A stored plan (the `plan` tool): its id, where its work goes, and its tasks in
    dependency order."""

    plan_id: str
    repo: str
    goal: str
    state: str
    base_commit: str
    integration_branch: str
    target_branch: str
    warnings: list[str]
    max_cost_usd: float | None = Field(default=None, description="the plan's cost budget (USD)")
    max_tokens: int | None = Field(default=None, description="the plan's token budget")
    tasks: list[TaskView]

    @classmethod
    def of(cls, status: PlanStatus) -> PlanView:
        """The view of a freshly stored plan."""
        plan = status.plan
        return cls(
            plan_id=plan.id,
            repo=str(plan.repo),
            goal=plan.goal,
            state=plan.state.value,
            base_commit=plan.base_commit,
            integration_branch=plan.integration_branch,
            target_branch=plan.target_branch,
            warnings=plan.warnings,
            max_cost_usd=plan.max_cost_usd,
            max_tokens=plan.max_tokens,
            tasks=[TaskView.of(t) for t in status.tasks],
        )

    def summary(self) -> str:
        """One line for humans."""
        order = " → ".join(t.id for t in self.tasks)
        warn = f"; {len(self.warnings)} warning(s): {' | '.join(self.warnings)}" if self.warnings else ""
        return f"plan {self.plan_id}: {len(self.tasks)} tasks ({order}); dispatch it to start{warn}"


class PlanSummary(BaseModel):
    """One line per plan, for `status` without ids."""

    plan_id: str
    repo: str
    goal: str
    state: str
    counts: dict[str, int]
    total_cost_usd: float = 0.0

    @classmethod
    def of(cls, status: PlanStatus) -> PlanSummary:
        """The summary of one entry of :meth:`Cluster.overview`."""
        plan = status.plan
        return cls(
            plan_id=plan.id,
            repo=str(plan.repo),
            goal=plan.goal,
            state=plan.state.value,
            counts=status.counts,
            total_cost_usd=round(status.total_cost_usd, 6),
        )


class StatusView(BaseModel):
    """Live state of a plan (or of one task), with counts and totals (`status`, `dispatch`,
    `cancel`); without ids, `plans` lists every plan of the open repositories instead."""

    plan_id: str | None = None
    goal: str = ""
    state: str = ""
    reason: str = Field(default="", description="why the plan failed or ended early (its budget reached)")
    notice: str = Field(default="", description="a denial every task that ran hit, said once")
    finished: bool = False
    counts: dict[str, int] = Field(default_factory=dict)
    total_cost_usd: float = 0.0
    total_tokens: int = 0
    merge_batches: int = Field(default=0, description="landings of the plan's merge queue (one ref update each)")
    gate_runs: int = Field(default=0, description="runs of the plan's gate (batches, their bisection, final merge)")
    workers: int = 0
    agents_running: int = 0
    rate_limit: str = Field(default="", description="what the pool does while the model refuses requests (429)")
    tasks: list[TaskView] = Field(default_factory=list)
    tasks_omitted: int = Field(default=0, description="tasks left out of `tasks` (pending or merged, big plans)")
    final_merge: dict[str, Any] | None = None
    plans: list[PlanSummary] = Field(default_factory=list)
    isolation: str = Field(default="", description="how the engine confines agents and the gate: sandbox | none")

    @classmethod
    def of(
        cls, status: PlanStatus, *, workers: int, agents_running: int, isolation: str = "", rate_limit: str = ""
    ) -> StatusView:
        """The view of a plan's status, with its repository's pool (and its rate-limit state)
        and isolation level."""
        return cls(
            isolation=isolation,
            rate_limit=rate_limit,
            plan_id=status.plan.id,
            goal=status.plan.goal,
            state=status.plan.state.value,
            reason=status.plan.reason,
            notice=common_denial(status.tasks) or "",
            finished=status.finished,
            counts=status.counts,
            total_cost_usd=round(status.total_cost_usd, 6),
            total_tokens=status.total_tokens,
            merge_batches=status.plan.merge_batches,
            gate_runs=status.plan.gate_runs,
            workers=workers,
            agents_running=agents_running,
            tasks=[TaskView.of(t) for t in status.tasks],
            tasks_omitted=status.omitted,
            final_merge=status.plan.final_merge,
        )

    @classmethod
    def of_cluster(cls, status: PlanStatus, cluster: Cluster) -> StatusView:
        """The view of a plan's status in the engine that runs it."""
        return cls.of(
            status,
            workers=cluster.workers,
            agents_running=cluster.running,
            isolation=cluster.settings.isolation,
            rate_limit=cluster.rate_limit,
        )

    @classmethod
    def listing(cls, overview: Sequence[PlanStatus]) -> StatusView:
        """Every plan of :meth:`Cluster.overview` results, one summary each."""
        return cls(plans=[PlanSummary.of(s) for s in overview])

    def summary(self) -> str:
        """One line for humans."""
        if self.plan_id is None:
            if not self.plans:
                return "no plans yet: create one with the plan tool"
            return f"{len(self.plans)} plan(s): " + "; ".join(f"{p.plan_id} {p.state} {p.counts}" for p in self.plans)
        counts = ", ".join(f"{n} {s}" for s, n in sorted(self.counts.items()))
        return (
            f"plan {self.plan_id} {self.state}{' (finished)' if self.finished else ''}"
            f"{f' ({self.reason})' if self.reason else ''}: {counts}; "
            f"{self.agents_running} agents running; ${self.total_cost_usd:.4f}, {self.total_tokens:,} tokens"
            f"{f'; {self.gate_runs} gate runs, {self.merge_batches} merge batches' if self.gate_runs else ''}"
            f"{f'; {self.notice}' if self.notice else ''}"
            f"{f'; {self.rate_limit}' if self.rate_limit else ''}"
            f"{'; isolation none: agents run unconfined' if self.isolation == 'none' else ''}"
        )


class LogsView(BaseModel):
    """A task's recorded agent events, oldest first (`logs`)."""

    task_id: str
    state: TaskState
    lines: list[str]
    transcript: str | None = Field(description="path of the raw agent transcript of the last attempt")

    @classmethod
    def of(cls, task: Task, events: Sequence[StoredEvent], transcript: Path | None) -> LogsView:
        """The view of a task's events and transcript."""
        return cls(
            task_id=f"{task.plan_id}:{task.id}",
            state=task.state,
            lines=[event_line(e) for e in events],
            transcript=str(transcript) if transcript is not None else None,
        )

    def summary(self) -> str:
        """The log itself, as text."""
        return f"{self.task_id} ({self.state.value}), last {len(self.lines)} events:\n" + "\n".join(self.lines)


class WorkersView(BaseModel):
    """The agent pool (`workers`)."""

    workers: int = Field(description="pool size for repositories without their own `workers` setting")
    agents_running: int
    repositories: list[str]
    pools: dict[str, int] = Field(default_factory=dict, description="pool size of each open repository")

    def summary(self) -> str:
        """One line for humans."""
        return f"{self.workers} agent slots, {self.agents_running} running"


def merge_summary(merge: FinalMerge) -> str:
    """One line saying what the `merge` tool did (or, dry, would do)."""
    if merge.kind == "conflict":
        return f"plan {merge.plan_id} conflicts with {merge.target} in: {', '.join(merge.conflicts)}; nothing changed"
    if merge.kind == "gate_failed":
        return f"plan {merge.plan_id} merged with {merge.target} fails the gate; nothing changed:\n{merge.gate_output}"
    verb = "would be" if merge.dry_run else "was"
    return f"plan {merge.plan_id} {verb} merged into {merge.target} ({merge.kind}); undo: {merge.undo or '-'}"


def summary_of(value: BaseModel) -> str:
    """The readable line of any tool result."""
    if isinstance(value, FinalMerge):
        return merge_summary(value)
    summary = getattr(value, "summary", None)
    return str(summary()) if callable(summary) else value.model_dump_json()
