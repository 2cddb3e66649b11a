"""Plans, tasks and their states.

A plan is a goal split into tasks that form a DAG. Task states move along one table of
allowed transitions (:data:`TRANSITIONS`); the store refuses any other move::

    pending → ready → running ⇄ waiting
    running → succeeded | failed | timed_out | cancelled | pending (retry)
    succeeded → merged | conflicted | gate_failed | pending (gate retry) | failed (merge error)
    succeeded → held (touches protected paths) → succeeded (approved) | cancelled (rejected)
    pending/ready → blocked (a dependency failed) | cancelled
    ready → failed (its agent could not be started: e.g. a full disk while creating its worktree)
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .errors import ConfigError
from .limits import (
    MAX_ARG_STRLEN,
    MAX_FILE_GLOBS_PER_PLAN,
    MAX_FILES_PER_TASK,
    MAX_GLOB_LENGTH,
    MAX_GOAL_BYTES,
    MAX_PROMPT_BYTES,
    MAX_STORED_TASK_ID_LENGTH,
    MAX_TASK_ID_LENGTH,
    MAX_TASKS_PER_PLAN,
    MAX_TITLE_LENGTH,
    TASK_ID_PATTERN,
    ref_format_problem,
    task_id_problem,
)
from .limits import utf8_size as _size

__all__ = [
    "ACTIVE_STATES",
    "FINAL_STATES",
    "MAX_ARG_STRLEN",
    "MAX_FILES_PER_TASK",
    "MAX_FILE_GLOBS_PER_PLAN",
    "MAX_GLOB_LENGTH",
    "MAX_GOAL_BYTES",
    "MAX_PROMPT_BYTES",
    "MAX_STORED_TASK_ID_LENGTH",
    "MAX_TASKS_PER_PLAN",
    "MAX_TASK_ID_LENGTH",
    "MAX_TITLE_LENGTH",
    "TASK_ID_PATTERN",
    "TRANSITIONS",
    "Category",
    "MergePolicy",
    "Plan",
    "PlanState",
    "PlanStatus",
    "Priority",
    "Task",
    "TaskKind",
    "TaskSpec",
    "TaskState",
    "ref_format_problem",
    "split_task_ref",
    "task_id_problem",
]


class Priority(enum.StrEnum):
    """How urgent a task is; the scheduler starts higher priorities first."""

    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"
    CRITICAL = "critical"

    @property
    def rank(self) -> int:
        """0 for low … 3 for critical."""
        return list(Priority).index(self)


class Category(enum.StrEnum):
    """What kind of work a task is."""

    CODE = "code"
    TEST = "test"
    REFACTOR = "refactor"
    ANALYZE = "analyze"
    DOCUMENT = "document"


class TaskKind(enum.StrEnum):
    """A task from the plan, or one the merge queue created to resolve a conflict."""

    TASK = "task"
    RESOLVE = "resolve"


class MergePolicy(enum.StrEnum):
    """What the merge queue does with a conflict."""

    RESOLVE = "resolve"  #: start a resolve task (an agent in a worktree holding the conflict)
    REPORT = "report"  #: mark the task conflicted, with files and commands to resolve by hand


class TaskState(enum.StrEnum):
    """Where a task is. One comment per member says what holds in that state."""

    PENDING = "pending"  #: waiting for its dependencies to be merged (or for a retry delay)
    READY = "ready"  #: dependencies merged; waiting for a free agent slot
    RUNNING = "running"  #: an agent process is working on it
    WAITING = "waiting"  #: its agent is waiting out a model rate limit
    SUCCEEDED = "succeeded"  #: the agent succeeded; its branch is queued for merging
    FAILED = "failed"  #: the agent failed for good (retries exhausted or not retryable)
    TIMED_OUT = "timed_out"  #: the agent hit a timeout on its last attempt
    CANCELLED = "cancelled"  #: cancelled by request
    BLOCKED = "blocked"  #: a dependency failed, so it will never run
    MERGED = "merged"  #: its work is on the plan's integration branch
    CONFLICTED = "conflicted"  #: its branch conflicts with the integration branch
    GATE_FAILED = "gate_failed"  #: the gate command failed on the merge candidate
    HELD = "held"  #: its changes touch protected paths: merged only once the user approves


FINAL_STATES = frozenset(
    {
        TaskState.FAILED,
        TaskState.TIMED_OUT,
        TaskState.CANCELLED,
        TaskState.BLOCKED,
        TaskState.MERGED,
        TaskState.CONFLICTED,
        TaskState.GATE_FAILED,
    }
)
ACTIVE_STATES = frozenset({TaskState.RUNNING, TaskState.WAITING})

_S = TaskState
TRANSITIONS: dict[TaskState, frozenset[TaskState]] = {
    _S.PENDING: frozenset({_S.READY, _S.BLOCKED, _S.CANCELLED}),
    _S.READY: frozenset({_S.RUNNING, _S.PENDING, _S.BLOCKED, _S.CANCELLED, _S.FAILED}),
    _S.RUNNING: frozenset({_S.WAITING, _S.SUCCEEDED, _S.FAILED, _S.TIMED_OUT, _S.CANCELLED, _S.PENDING}),
    _S.WAITING: frozenset({_S.RUNNING, _S.SUCCEEDED, _S.FAILED, _S.TIMED_OUT, _S.CANCELLED, _S.PENDING}),
    # A succeeded task's branch waits in the merge queue. A failed gate sends it back to its
    # agent (pending) while retries last; an unexpected merge error fails it.
    _S.SUCCEEDED: frozenset({_S.MERGED, _S.CONFLICTED, _S.GATE_FAILED, _S.CANCELLED, _S.PENDING, _S.FAILED, _S.HELD}),
    # Held for approval: approved goes back to the merge queue, rejected is cancelled.
    _S.HELD: frozenset({_S.SUCCEEDED, _S.CANCELLED}),
    _S.GATE_FAILED: frozenset(),
    # A conflict is merged once its resolve task is.
    _S.CONFLICTED: frozenset({_S.MERGED}),
    _S.FAILED: frozenset(),
    _S.TIMED_OUT: frozenset(),
    _S.CANCELLED: frozenset(),
    _S.BLOCKED: frozenset(),
    _S.MERGED: frozenset(),
}


class PlanState(enum.StrEnum):
    """Where a plan is."""

    PLANNED = "planned"  #: stored, not dispatched
    RUNNING = "running"  #: dispatched; tasks are being worked on
    DONE = "done"  #: every task reached a final state
    CANCELLED = "cancelled"  #: cancelled by request
    MERGED = "merged"  #: the integration branch was merged into the target branch
    FAILED = "failed"  #: an engine error ended it; ``reason`` says which


class TaskSpec(BaseModel):
    """A task as a caller gives it (the shape of the `plan` tool's `tasks` items)."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(description="unique within the plan: letters, digits, '.', '_', '-' (max 48)")
    title: str = ""
    prompt: str
    deps: list[str] = Field(default_factory=list)
    priority: Priority = Priority.MEDIUM
    category: Category = Category.CODE
    files: list[str] = Field(default_factory=list, description="globs of the files it will touch")

    @field_validator("id")
    @classmethod
    def _id_is_safe(cls, value: str) -> str:
        problem = task_id_problem(value)
        if problem is not None:
            raise ValueError(problem)
        return value

    @field_validator("prompt")
    @classmethod
    def _prompt_fits(cls, value: str) -> str:
        if _size(value) > MAX_PROMPT_BYTES:
            raise ValueError(
                f"the prompt is {_size(value) / 1024:.1f} KiB; the limit is {MAX_PROMPT_BYTES // 1024} KiB "
                "(MAX_PROMPT_BYTES: it goes on the agent's command line)"
            )
        return value

    @field_validator("title")
    @classmethod
    def _title_fits(cls, value: str) -> str:
        if len(value) > MAX_TITLE_LENGTH:
            raise ValueError(f"the title has {len(value)} characters; the limit is {MAX_TITLE_LENGTH}")
        return value

    @field_validator("files")
    @classmethod
    def _files_fit(cls, value: list[str]) -> list[str]:
        if len(value) > MAX_FILES_PER_TASK:
            raise ValueError(
                f"{len(value)} file globs; the limit is {MAX_FILES_PER_TASK} per task (MAX_FILES_PER_TASK): "
                "use directory globs such as 'src/**'"
            )
        for glob in value:
            if not glob.strip() or len(glob) > MAX_GLOB_LENGTH:
                raise ValueError(f"file glob {glob[:60]!r} must be non-empty and at most {MAX_GLOB_LENGTH} characters")
        return value


class Task(TaskSpec):
    """A stored task with its live state and results."""

    model_config = ConfigDict(extra="ignore")

    # A stored task was checked as a TaskSpec when it was planned, or derived by the engine
    # (resolve tasks: longer ids, prompts it composed); reading it back re-checks only that
    # its id can be in a branch name.
    @field_validator("id")
    @classmethod
    def _id_is_safe(cls, value: str) -> str:
        problem = task_id_problem(value, max_length=MAX_STORED_TASK_ID_LENGTH)
        if problem is not None:
            raise ValueError(problem)
        return value

    @field_validator("prompt", "title", "files")
    @classmethod
    def _stored_as_is(cls, value: Any) -> Any:
        return value

    plan_id: str
    kind: TaskKind = TaskKind.TASK
    state: TaskState = TaskState.PENDING
    attempts: int = 0
    reason: str = ""
    branch: str | None = None
    base_commit: str | None = None
    commit: str | None = None
    merge_commit: str | None = None
    worktree: Path | None = None
    session_id: str | None = None
    run_id: str | None = None
    pid: int | None = None
    pid_started: float | None = None
    turns: int = 0
    cost_usd: float = 0.0
    input_tokens: int = 0
    output_tokens: int = 0
    changed_files: list[str] = Field(default_factory=list)
    resolves: str | None = None
    resume: bool = False
    last_activity: str = ""
    not_before: float | None = None
    approved: bool = False
    setup_s: float | None = None  #: seconds its worktree setup took (copy_files and setup), all attempts
    warnings: list[str] = Field(default_factory=list)  #: what its agent was denied, and the rule that allows it
    merge_batch: int | None = None  #: the plan's merge batch that landed it (1, 2, …)
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    updated_at: datetime

    @property
    def elapsed_s(self) -> float | None:
        """Seconds the task has run: until it finished, or until now while it is active."""
        if self.started_at is None:
            return None
        active = self.state in ACTIVE_STATES or self.finished_at is None
        end = datetime.now(UTC) if active else self.finished_at
        assert end is not None
        return (end - self.started_at).total_seconds()

    @property
    def ref(self) -> str:
        """The task's global id: ``<plan id>/<task id>``."""
        return f"{self.plan_id}/{self.id}"


def split_task_ref(ref: str) -> tuple[str, str]:
    """``<plan id>:<task id>`` (or ``<plan id>/<task id>``) → (plan id, task id)."""
    for separator in (":", "/"):
        plan_id, found, local = ref.partition(separator)
        if found and plan_id and local:
            return plan_id, local
    raise ConfigError(f"task id {ref!r} must be <plan_id>:<task id>, e.g. p1a2b3c4d:api")


class Plan(BaseModel):
    """A goal, its tasks, and where their work goes."""

    id: str
    repo: Path
    goal: str
    state: PlanState = PlanState.PLANNED
    base_ref: str
    base_commit: str
    target_branch: str
    integration_branch: str
    merge_policy: MergePolicy = MergePolicy.RESOLVE
    gate: list[str] | None = None
    warnings: list[str] = Field(default_factory=list)
    final_merge: dict[str, Any] | None = None
    reason: str = ""
    max_cost_usd: float | None = None  #: no agent starts once the plan's tasks cost this much
    max_tokens: int | None = None  #: … or used this many tokens
    merge_batches: int = 0  #: with a gate: landings of its merge queue (one compare-and-swap each)
    gate_runs: int = 0  #: runs of its gate (batches, their bisection, the final merge)
    created_at: datetime
    updated_at: datetime


class PlanStatus(BaseModel):
    """A plan with its tasks (in topological order) and counts by state."""

    plan: Plan
    tasks: list[Task]
    counts: dict[str, int]
    total_cost_usd: float = 0.0
    total_tokens: int = 0
    omitted: int = Field(default=0, description="tasks not listed (big plans list only those needing attention)")

    @property
    def finished(self) -> bool:
        """True when every task is in a final state."""
        return sum(self.counts.values()) > 0 and all(TaskState(s) in FINAL_STATES for s in self.counts)

    def task(self, task_id: str) -> Task:
        """The task with this id (``KeyError`` if none)."""
        for task in self.tasks:
            if task.id == task_id:
                return task
        raise KeyError(task_id)
