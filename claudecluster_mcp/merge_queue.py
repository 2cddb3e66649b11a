"""The merge queue: finished task branches go into the plan's integration branch in the
order they finished. A lone candidate (or any, for a plan without a gate) goes through
:func:`~claudecluster_mcp.merge.merge_into` (conflict pre-check, optional gate, journalled
compare-and-swap); when the plan has a gate, the candidates waiting for it go together, up
to ``merge_batch_size``, through :class:`~claudecluster_mcp.batch.BatchMerge`: gated once,
landed with one compare-and-swap, bisected when the gate fails. The final merge of a plan
into its target branch (:mod:`~claudecluster_mcp.final_merge`) goes through
:func:`merge_into` too.

A conflict becomes a resolve task (policy ``resolve``) or a clear report (``report``); a
failed gate sends the task back to its agent with the gate's output while retries last; an
unexpected error ends the task ``failed`` with the reason, so its dependents are blocked and
the plan settles (a batch that meets one gives its candidates back, to be merged one by
one). Cancelling a task while it merges stops its gate at once (its batch's others go back
to the queue); once its ref update has begun, the merge completes and the task is recorded
as merged: store and refs always agree.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections import deque
from pathlib import Path

import anyio
from anyio.abc import TaskGroup, TaskStatus

from . import final_merge
from .batch import BatchMerge, gate_env, record_gate
from .diskfull import looks_full, until_written
from .errors import StateError
from .final_merge import FinalMerge
from .merge import GateResult, MergeOutcome, MergeResult, merge_into
from .models import MergePolicy, Plan, PlanStatus, Task, TaskKind, TaskState
from .progress import Progress
from .prompts import GATE_FAILED_PREFIX, merge_message, resolve_prompt
from .settings import EngineSettings, protected
from .signals import Pulse
from .store import Store, now
from .workspace import remove_worktree, rev_parse

__all__ = ["FinalMerge", "MergeQueue"]

logger = logging.getLogger(__name__)

Key = tuple[str, str]  # (plan id, task id)


class MergeQueue:
    """One repository's merge queue; :meth:`run` is its long-lived worker."""

    def __init__(self, repo: Path, store: Store, settings: EngineSettings, pulse: Pulse) -> None:
        self.repo = repo
        self.store = store
        self.settings = settings
        self.pulse = pulse
        self.tips: dict[str, str] = {}  # integration tips as this process last moved them
        send, receive = anyio.create_memory_object_stream[Key](math.inf)
        self._send, self._receive = send, receive
        self._queued: set[Key] = set()  # sent or waiting, not yet taken
        self._waiting: deque[Key] = deque()  # received, in merge order
        self._alone: set[Key] = set()  # to merge by itself (it conflicted inside a batch)
        self._current: set[Key] = set()  # being merged
        self._cancelled: set[Key] = set()  # being merged, and asked to stop
        self._scope: anyio.CancelScope | None = None
        self._cleanup: TaskGroup | None = None

    async def integration_tip(self, plan: Plan) -> str:
        """The tip of the plan's integration branch."""
        return self.tips.get(plan.id) or await rev_parse(self.repo, f"refs/heads/{plan.integration_branch}")

    async def enqueue(self, plan_id: str, task_id: str) -> None:
        """Queue a succeeded task for merging (once)."""
        if (plan_id, task_id) not in self._queued:
            self._queued.add((plan_id, task_id))
            await self._send.send((plan_id, task_id))

    def merging(self, plan_id: str, task_id: str | None = None) -> bool:
        """True while the task (or any task of the plan) is being merged."""
        return any(p == plan_id and task_id in (None, t) for p, t in self._current)

    def cancel(self, plan_id: str, task_id: str | None = None) -> bool:
        """Stop the merge of the task (or of any task of the plan) if it is in progress;
        :meth:`run` then records the task as cancelled, or as merged if its ref had moved
        (and gives the others of its batch back to the queue)."""
        if not self.merging(plan_id, task_id) or self._scope is None:
            return False
        self._cancelled |= {(p, t) for p, t in self._current if p == plan_id and task_id in (None, t)}
        self._scope.cancel()
        return True

    def close(self) -> None:
        """No more merges: :meth:`run` ends once the queue is empty (a queue that never ran
        is closed at once)."""
        self._send.close()
        if self._cleanup is None:
            self._receive.close()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Merge queued tasks, a batch (or one) at a time, until :meth:`close`."""
        async with anyio.create_task_group() as self._cleanup, self._receive:
            task_status.started()
            while await self._fill():
                plan_id, task_ids = await self._take()
                self._current, self._scope = {(plan_id, t) for t in task_ids}, anyio.CancelScope()
                try:
                    await self._merge_some(plan_id, task_ids, self._scope)
                finally:
                    self._current, self._cancelled, self._scope = set(), set(), None
                self.pulse.notify()

    async def _fill(self) -> bool:
        """Move what was queued into the waiting line, waiting for one entry if it is
        empty; False once the queue is closed and empty."""
        if not self._waiting:
            try:
                self._waiting.append(await self._receive.receive())
            except anyio.EndOfStream:
                return False
        with contextlib.suppress(anyio.WouldBlock, anyio.EndOfStream):
            while True:
                self._waiting.append(self._receive.receive_nowait())
        return True

    async def _take(self) -> tuple[str, list[str]]:
        """The next candidate and, when its plan has a gate, the next ones of the same plan
        (up to ``merge_batch_size``; none that must merge alone)."""
        first = self._waiting.popleft()
        taken = [first]
        if first not in self._alone:
            with contextlib.suppress(Exception):  # a plan gone: its candidates are skipped
                plan = await self.store.plan(first[0])
                size = self.settings.merge_batch_size if plan.gate else 1
                for key in list(self._waiting):
                    if len(taken) >= size:
                        break
                    if key[0] == first[0] and key not in self._alone:
                        self._waiting.remove(key)
                        taken.append(key)
        self._queued.difference_update(taken)
        self._alone.difference_update(taken)
        return first[0], [task_id for _, task_id in taken]

    def _give_back(self, plan_id: str, tasks: list[Task], alone: list[Task]) -> None:
        """Put a batch's undecided candidates back at the head of the line, in order."""
        for task in reversed(tasks):
            key = (plan_id, task.id)
            self._waiting.appendleft(key)
            self._queued.add(key)
            if task in alone:
                self._alone.add(key)

    async def _merge_some(self, plan_id: str, task_ids: list[str], scope: anyio.CancelScope) -> None:
        plan: Plan | None = None
        tasks: list[Task] = []
        for task_id in task_ids:
            try:
                plan = plan or await self.store.plan(plan_id)
                if (task := await self._admit(plan, task_id)) is not None:
                    tasks.append(task)
            except Exception as exc:
                await self._failed(plan_id, task_id, exc)
        if plan is None or not tasks:
            return
        if len(tasks) == 1:
            try:
                await self._merge(plan, tasks[0], scope)
            except Exception as exc:
                await self._failed(plan_id, tasks[0].id, exc)
        else:
            await self._merge_batch(plan, tasks, scope)

    async def _merge_batch(self, plan: Plan, tasks: list[Task], scope: anyio.CancelScope) -> None:
        batch = BatchMerge(self.repo, self.store, self.settings, self, plan, tasks)
        try:
            with scope:
                await batch.run()
        except Exception:
            logger.exception("a merge batch of %s failed; its candidates merge one by one", plan.id)
            batch.alone += batch.unsettled
        undecided = [t for t in tasks if t in batch.unsettled or t in batch.alone]
        with anyio.CancelScope(shield=True):
            for task in [t for t in undecided if (plan.id, t.id) in self._cancelled]:
                undecided.remove(task)
                with contextlib.suppress(StateError):
                    await self.store.move(plan.id, task.id, TaskState.CANCELLED, reason="cancelled during its merge")
        self._give_back(plan.id, undecided, batch.alone)

    async def _admit(self, plan: Plan, task_id: str) -> Task | None:
        """The task, if it is a merge candidate; a task touching protected paths is held."""
        task = await self.store.task(plan.id, task_id)
        if task.state is not TaskState.SUCCEEDED or task.commit is None:
            return None
        touched = [] if task.approved else protected(task.changed_files, self.settings.protected_paths)
        if touched:
            await self.store.move(plan.id, task.id, TaskState.HELD, reason=_held_reason(plan, task, touched))
            return None
        return task

    async def _failed(self, plan_id: str, task_id: str, exc: Exception) -> None:
        """End a task whose merge met an unexpected error ``failed``, with the reason."""
        logger.error("merging %s/%s failed", plan_id, task_id, exc_info=exc)
        reason = f"merge failed: {exc}"
        if looks_full(exc, [self.repo]):
            reason = f"disk full while merging (its work stays on claudecluster/{plan_id}/{task_id}): {exc}"
        fail = functools.partial(self.store.move, plan_id, task_id, TaskState.FAILED, reason=reason)
        with contextlib.suppress(StateError):
            await until_written(fail, f"the failed merge of {plan_id}/{task_id}")

    async def _merge(self, plan: Plan, task: Task, scope: anyio.CancelScope) -> None:
        """Merge one candidate by itself (:func:`merge_into`)."""
        assert task.commit is not None
        result: MergeResult | None = None
        with scope, gate_env(self.settings, plan, [task.id]) as env:
            result = await merge_into(
                self.repo,
                plan.integration_branch,
                task.commit,
                merge_message(plan, task),
                gate=plan.gate,
                gate_timeout=self.settings.gate_timeout,
                gate_sandbox=self.settings.sandbox_policy(),
                gate_env=env,
                journal=lambda ref, old, new: self.store.begin_merge(plan.id, task.id, ref, old, new),
                journal_end=self.store.end_merge,
                base=task.base_commit,
                tip_hint=self.tips.get(plan.id),
            )
        with anyio.CancelScope(shield=True):
            if result is None:  # cancelled before its ref moved
                await self.store.move(plan.id, task.id, TaskState.CANCELLED, reason="cancelled during its merge")
            else:
                await self._record(plan, task, result)

    async def _record(self, plan: Plan, task: Task, result: MergeResult) -> None:
        if result.gate is not None:
            await record_gate(self.store, plan, [task.id], result.gate)
        if result.new_tip:
            self.tips[plan.id] = result.new_tip
        if result.outcome is MergeOutcome.MERGED:
            # With a gate, each landing is a batch (of one, here); without one there are none.
            number = await self.store.count_merges(plan.id, batches=1) if plan.gate else None
            await self.mark_merged(plan, task, result.new_tip, batch=number)
        elif result.outcome is MergeOutcome.ALREADY_MERGED:
            await self.mark_merged(plan, task, result.new_tip)
        elif result.outcome is MergeOutcome.GATE_FAILED:
            assert result.gate is not None
            await self.gate_failed(plan, task, result.gate)
        else:
            await self._conflict(plan, task, result.conflicts)

    async def gate_failed(self, plan: Plan, task: Task, verdict: GateResult) -> None:
        """Send a task whose merge failed the gate back to its agent with the gate's output
        while ``gate_retries`` last, else end it ``gate_failed``."""
        reason = f"{GATE_FAILED_PREFIX} (exit {verdict.returncode}):\n{verdict.output[-1500:]}"
        # One guarded move: a retried task is never seen final in between.
        retry = task.attempts <= self.settings.gate_retries
        await self.store.move(plan.id, task.id, TaskState.PENDING if retry else TaskState.GATE_FAILED, reason=reason)

    async def landed(self, plan_id: str, task_ids: list[str], tip: str) -> None:
        """Record the tasks a journalled ref update landed (recovery, after a crash between
        the update and its record)."""
        plan = await self.store.plan(plan_id)
        tasks = [await self.store.task(plan_id, task_id) for task_id in task_ids]
        waiting = [task for task in tasks if task.state is TaskState.SUCCEEDED]
        if waiting:
            number = await self.store.count_merges(plan_id, batches=1) if plan.gate else None
            for task in waiting:
                await self.mark_merged(plan, task, tip, batch=number, others=len(task_ids) - 1)

    async def mark_merged(
        self, plan: Plan, task: Task, tip: str | None, *, batch: int | None = None, others: int = 0
    ) -> None:
        """Record a task (and the conflicted task it resolves) as merged at ``tip``, in the
        plan's merge batch ``batch`` with ``others`` more tasks."""
        activity = f"merged in batch {batch} with {others} other{'s' * (others > 1)}" if others else "merged"
        await self.store.move(
            plan.id, task.id, TaskState.MERGED, merge_commit=tip, last_activity=activity, merge_batch=batch
        )
        if task.resolves:
            with contextlib.suppress(StateError):
                await self.store.move(
                    plan.id, task.resolves, TaskState.MERGED, merge_commit=tip, reason=f"resolved by {task.id}"
                )
        if task.worktree is not None:
            if self._cleanup is not None:
                # Off the merge queue's path: the next merge need not wait for the files to go.
                self._cleanup.start_soon(_remove_merged, self.repo, task.worktree)
            else:
                await _remove_merged(self.repo, task.worktree)

    async def _conflict(self, plan: Plan, task: Task, files: list[str]) -> None:
        listed = ", ".join(files)
        if plan.merge_policy is MergePolicy.REPORT or task.kind is not TaskKind.TASK:
            branch = f"claudecluster/{plan.id}/{task.id}"
            reason = (
                f"conflicts in {listed}. To resolve by hand: git switch {plan.integration_branch} && "
                f"git merge {branch} (fix the files, then git commit)"
            )
            await self.store.move(plan.id, task.id, TaskState.CONFLICTED, reason=reason)
            return
        tasks = await self.store.tasks(plan.id)
        # Stored before the task is marked conflicted: an engine killed in between left it.
        resolve_id = next((t.id for t in tasks if t.resolves == task.id), None)
        if resolve_id is None:
            resolve_id = _free_id({t.id for t in tasks}, f"{task.id}.resolve")
            await self.store.add_task(self._resolve_task(plan, task, resolve_id, files, tasks))
        reason = f"conflicts in {listed}; resolving in {resolve_id}"
        await self.store.move(plan.id, task.id, TaskState.CONFLICTED, reason=reason)

    @staticmethod
    def _resolve_task(plan: Plan, task: Task, resolve_id: str, files: list[str], tasks: list[Task]) -> Task:
        merged = [t for t in tasks if t.state is TaskState.MERGED]
        touching = [t for t in merged if set(t.changed_files) & set(files)] or merged
        stamp = now()
        return Task(
            plan_id=plan.id,
            id=resolve_id,
            title=f"Resolve conflicts of {task.id}",
            prompt=resolve_prompt(task, files, touching),
            kind=TaskKind.RESOLVE,
            resolves=task.id,
            priority=task.priority,
            category=task.category,
            files=files,
            created_at=stamp,
            updated_at=stamp,
        )

    async def land(
        self, status: PlanStatus, target: str | None, *, dry_run: bool, on_progress: Progress | None = None
    ) -> FinalMerge:
        """Merge a finished plan's integration branch into ``target`` (default: the plan's
        target branch): see :func:`~claudecluster_mcp.final_merge.land`."""
        return await final_merge.land(
            self.repo, self.store, self.settings, status, target, dry_run=dry_run, on_progress=on_progress
        )


async def _remove_merged(repo: Path, worktree: Path) -> None:
    """A merged task's worktree is of no more use: removed even as the engine stops (else it
    would stay until the retention period ends)."""
    with anyio.CancelScope(shield=True):
        await remove_worktree(repo, worktree)


def _held_reason(plan: Plan, task: Task, touched: list[str]) -> str:
    return (
        f"changes protected paths ({', '.join(touched)}): approve to merge "
        f"(claudecluster approve {plan.id}:{task.id}, or the MCP approve tool) or reject it (--reject)"
    )


def _free_id(existing: set[str], wanted: str) -> str:
    candidate, n = wanted, 1
    while candidate in existing:
        n += 1
        candidate = f"{wanted}{n}"
    return candidate
