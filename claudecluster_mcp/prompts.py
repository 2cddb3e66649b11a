"""What agents are told: the prompt of a task (checked, when the plan is stored, to fit the
agent's command line), of a resolve task, of a resumed run, and the messages of the commits
and merges made for them."""

from __future__ import annotations

from collections.abc import Sequence

from .errors import PlanValidationError
from .graph import TaskGraph
from .limits import MAX_ARG_STRLEN
from .models import Plan, Task, TaskKind, TaskSpec
from .outcome import AgentOutcome
from .redact import redact

__all__ = [
    "GATE_FAILED_PREFIX",
    "RESUME_PROMPT",
    "clip",
    "commit_message",
    "merge_message",
    "resolve_prompt",
    "stored_tasks",
    "task_prompt",
]

RESUME_PROMPT = "You were interrupted. Continue the task where you left off."
GATE_FAILED_PREFIX = "gate failed"


def task_prompt(plan: Plan, task: Task) -> str:
    """The prompt of a task's agent: its own prompt, what a failed gate said last time, and
    its place among the plan's parallel agents."""
    if task.kind is TaskKind.RESOLVE:
        return task.prompt
    text = task.prompt
    if task.reason.startswith(GATE_FAILED_PREFIX):
        text += f"\n\nA previous attempt failed the project's checks:\n{task.reason}\nFix that too."
    return (
        f"{text}\n\n(You are one of several agents working in parallel towards: {plan.goal}. "
        "Do only this task. Your changes are committed for you when you finish: do not run "
        "git commit, git checkout or git merge.)"
    )


def clip(text: str, max_bytes: int) -> str:
    """``text`` cut to at most ``max_bytes`` UTF-8 bytes (on a character boundary), with "…"."""
    data = text.encode("utf-8", "surrogatepass")
    if len(data) <= max_bytes:
        return text
    return data[: max_bytes - 3].decode("utf-8", "ignore") + "…"


def resolve_prompt(task: Task, files: Sequence[str], merged: Sequence[Task]) -> str:
    """The prompt of the agent resolving ``task``'s conflicts in ``files`` with the work of
    the ``merged`` tasks already on the integration branch. Others' prompts and the file list
    are clipped, so that it stays as far below the OS's argument limit as a task prompt."""
    others = "\n".join(f"- {t.id} ({clip(t.title or t.id, 200)}): {clip(t.prompt, 1000)}" for t in merged[-5:])
    return (
        f"[claudecluster:resolve] {task.id}\n"
        f"This worktree holds an unfinished git merge of task {task.id!r} into the plan's "
        f"integration branch. These files have conflicts: {clip(', '.join(files), 4096)}.\n\n"
        f"Task {task.id!r} ({task.title or task.id}) was asked to:\n{task.prompt}\n\n"
        f"The integration branch already holds the work of:\n{others or '- (nothing else)'}\n\n"
        "Edit the conflicted files so that both intents are kept and every conflict marker "
        "(<<<<<<<, =======, >>>>>>>) is gone. Do not run git commit: claudecluster concludes "
        "the merge when you finish."
    )


def commit_message(plan: Plan, task: Task, outcome: AgentOutcome) -> str:
    """The message of the commit holding a task's work: its title and the agent's summary
    (secrets redacted: it goes into the repository's history)."""
    title = task.title or task.id
    summary = redact((outcome.final_text or "").strip())[:1000]
    return f"{title}\n\n{summary}\n\nclaudecluster plan {plan.id}, task {task.id}".replace("\n\n\n", "\n\n")


def merge_message(plan: Plan, task: Task | None = None) -> str:
    """The message of a merge commit: a task into the integration branch, or (without
    ``task``) the plan into its target branch."""
    if task is None:
        return f"Merge claudecluster plan {plan.id}: {plan.goal[:60]}"
    return f"Merge task {task.id}: {task.title or task.id}\n\nclaudecluster plan {plan.id}"


# What one agent prompt, as the engine builds it, may take of the OS's single-argument limit:
# the rest is room for a failed gate's output added on a retry (at most ~6 KiB).
_PROMPT_BUDGET = MAX_ARG_STRLEN - 16 * 1024


def stored_tasks(plan: Plan, specs: list[TaskSpec]) -> list[Task]:
    """The plan's tasks in topological order, each checked to fit the agent's command line
    with the text the engine adds around its prompt."""
    by_id = {s.id: s for s in specs}
    stamp = plan.created_at
    stored = [
        Task(**by_id[tid].model_dump(), plan_id=plan.id, created_at=stamp, updated_at=stamp)
        for tid in TaskGraph(specs).topological_order()
    ]
    for task in stored:
        size = len(task_prompt(plan, task).encode("utf-8", "surrogatepass"))
        if size > _PROMPT_BUDGET:
            raise PlanValidationError(
                f"invalid plan: task {task.id!r}'s prompt with the goal is {size / 1024:.1f} KiB; the limit is "
                f"{_PROMPT_BUDGET // 1024} KiB (MAX_ARG_STRLEN {MAX_ARG_STRLEN // 1024} KiB minus room for gate output)"
            )
    return stored
