"""Crash recovery and the repository lease.

One engine per repository (:class:`EngineLease`, a ``flock`` the kernel drops when the
process dies). When an engine opens a repository, :func:`recover` makes the store true again
after a process died holding it: it settles half-done ref updates from the merge journal,
has the placement kill what is left of interrupted agent runs, re-queues (or resumes) their
tasks, stops gates left running and removes their worktrees, re-queues merges, records a
conflicted task as merged once its resolve task is, and hands the running plans back to the
scheduler.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Any

from .errors import EngineBusyError
from .merge import reap_gates
from .merge_queue import MergeQueue
from .models import ACTIVE_STATES, PlanState, Task, TaskState
from .placement import AgentPlacement, RunRecord
from .scheduler import Scheduler
from .store import Store
from .task_runner import has_progress
from .workspace import git

__all__ = ["EngineLease", "recover"]


class EngineLease:
    """An exclusive ``flock`` on the repository's engine lock file, held while an engine is
    open: two engines on one repository would recover (kill) each other's agents and race
    on its refs. The kernel releases it when the process dies, so a crash never leaves it."""

    def __init__(self, path: Path, repo: Path) -> None:
        self.path = path
        self.repo = repo
        self._fd: int | None = None

    def __enter__(self) -> EngineLease:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise EngineBusyError(
                f"another claudecluster engine (pid {holder}) is running plans in {self.repo}; "
                "use that one (its MCP tools, or stop it) — read-only commands such as status work meanwhile"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the lock
            self._fd = None


async def recover(
    repo: Path, store: Store, placement: AgentPlacement, merges: MergeQueue, scheduler: Scheduler
) -> None:
    """Make the store true again after a process died holding it (see the module docstring)."""
    await reap_gates(repo)
    for entry in await store.open_merges():
        await _settle_journal(repo, store, merges, entry)
    for plan in await store.plans([PlanState.RUNNING]):
        tasks = await store.tasks(plan.id)
        for task in tasks:
            if task.state in ACTIVE_STATES:
                await _requeue(store, placement, task)
            elif task.state is TaskState.READY:
                await store.move(plan.id, task.id, TaskState.PENDING)
            elif task.state is TaskState.SUCCEEDED:
                await merges.enqueue(plan.id, task.id)
            elif task.state is TaskState.CONFLICTED:
                await _settle_resolved(store, task, tasks)
        scheduler.activate(plan.id)


async def _settle_journal(repo: Path, store: Store, merges: MergeQueue, entry: dict[str, Any]) -> None:
    """A ref update recorded as started: done if the ref holds the new commit, else undone."""
    tip = (await git(repo, "rev-parse", "--verify", "--quiet", entry["ref"], check=False)).stdout.strip()
    done = tip == entry["new"]
    await store.end_merge(entry["seq"], "done" if done else "undone")
    if done and entry["tasks"]:  # every task the update landed (a batch lands several)
        await merges.landed(entry["plan_id"], entry["tasks"], tip)
    elif done:  # the final merge of a plan into its target branch
        plan = await store.plan(entry["plan_id"])
        if plan.state is not PlanState.MERGED:
            record = {"plan_id": plan.id, "target": entry["ref"], "previous_tip": entry["old"], "new_tip": tip}
            await store.update_plan(plan.id, state=PlanState.MERGED, final_merge={**record, "recovered": True})


async def _settle_resolved(store: Store, task: Task, tasks: list[Task]) -> None:
    """A conflicted task whose resolve task is merged is merged too (the engine died between
    recording the one and the other)."""
    resolver = next((t for t in tasks if t.resolves == task.id and t.state is TaskState.MERGED), None)
    if resolver is not None:
        reason = f"resolved by {resolver.id}"
        await store.move(task.plan_id, task.id, TaskState.MERGED, merge_commit=resolver.merge_commit, reason=reason)


async def _requeue(store: Store, placement: AgentPlacement, task: Task) -> None:
    if task.run_id:
        await placement.reap(RunRecord(task.run_id, task.pid, task.pid_started))
    progressed = await has_progress(task)
    await store.move(
        task.plan_id,
        task.id,
        TaskState.PENDING,
        reason="interrupted: the engine stopped" + ("; resuming its session" if progressed else ""),
        resume=progressed,
        pid=None,
    )
