"""The merge queue: finished task branches go into the plan's integration branch one at a
time, in the order they finished, through :func:`~claudecluster_mcp.merge.merge_into`
(conflict pre-check, optional gate, journalled compare-and-swap). The final merge of a plan
into its target branch goes through the same function.

A conflict becomes a resolve task (policy ``resolve``) or a clear report (``report``); a
failed gate sends the task back to its agent with the gate's output while retries last; an
unexpected error ends the task ``failed`` with the reason, so its dependents are blocked and
the plan settles. Cancelling a task while it merges stops its gate at once; once its ref
update has begun, the merge completes and the task is recorded as merged: store and refs
always agree.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Iterator
from pathlib import Path

import anyio
from anyio.abc import TaskGroup, TaskStatus
from pydantic import BaseModel, Field

from .diskfull import looks_full, until_written
from .errors import StateError
from .merge import MergeOutcome, MergeResult, merge_into
from .models import FINAL_STATES, MergePolicy, Plan, PlanState, PlanStatus, Task, TaskKind, TaskState
from .ports import PORTS, fleet_env
from .progress import Progress, ticking
from .prompts import GATE_FAILED_PREFIX, merge_message, resolve_prompt
from .settings import EngineSettings, protected
from .signals import Pulse
from .store import Store, now
from .workspace import (
    check_target_branch,
    git,
    remove_worktree,
    require_clean,
    rev_parse,
    update_ref,
    worktree_of_branch,
)

__all__ = ["FinalMerge", "MergeQueue"]

logger = logging.getLogger(__name__)


class FinalMerge(BaseModel):
    """What :meth:`Cluster.merge` did (or, with ``dry_run``, would do)."""

    plan_id: str
    target: str
    kind: str = Field(description="fast-forward | merge | up-to-date | conflict | gate_failed")
    dry_run: bool
    previous_tip: str | None
    new_tip: str | None
    conflicts: list[str] = Field(default_factory=list)
    undo: str | None = Field(default=None, description="command that undoes the merge")
    gate_output: str | None = Field(
        default=None, description="the tail of the gate's output, when it failed on the merge commit"
    )
    tasks: dict[str, str] = Field(default_factory=dict, description="task id → state")


class MergeQueue:
    """One repository's merge queue; :meth:`run` is its long-lived worker."""

    def __init__(self, repo: Path, store: Store, settings: EngineSettings, pulse: Pulse) -> None:
        self.repo = repo
        self.store = store
        self.settings = settings
        self.pulse = pulse
        self.tips: dict[str, str] = {}  # integration tips as this process last moved them
        send, receive = anyio.create_memory_object_stream[tuple[str, str]](math.inf)
        self._send, self._receive = send, receive
        self._queued: set[tuple[str, str]] = set()
        self._current: tuple[str, str] | None = None
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
        return self._current is not None and self._current[0] == plan_id and task_id in (None, self._current[1])

    def cancel(self, plan_id: str, task_id: str | None = None) -> bool:
        """Stop the merge of the task (or of any task of the plan) if it is in progress;
        :meth:`run` then records the task as cancelled, or as merged if its ref had moved."""
        if self.merging(plan_id, task_id) and self._scope is not None:
            self._scope.cancel()
            return True
        return False

    def close(self) -> None:
        """No more merges: :meth:`run` ends once the queue is empty (a queue that never ran
        is closed at once)."""
        self._send.close()
        if self._cleanup is None:
            self._receive.close()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Merge queued tasks one at a time until :meth:`close`."""
        async with anyio.create_task_group() as self._cleanup, self._receive:
            task_status.started()
            async for plan_id, task_id in self._receive:
                self._queued.discard((plan_id, task_id))
                self._current, self._scope = (plan_id, task_id), anyio.CancelScope()
                try:
                    await self._merge(plan_id, task_id, self._scope)
                except Exception as exc:
                    logger.exception("merging %s/%s failed", plan_id, task_id)
                    reason = f"merge failed: {exc}"
                    if looks_full(exc, [self.repo]):
                        reason = f"disk full while merging (its work stays on claudecluster/{plan_id}/{task_id}): {exc}"
                    fail = functools.partial(self.store.move, plan_id, task_id, TaskState.FAILED, reason=reason)
                    with contextlib.suppress(StateError):
                        await until_written(fail, f"the failed merge of {plan_id}/{task_id}")
                finally:
                    self._current = self._scope = None
                self.pulse.notify()

    async def _merge(self, plan_id: str, task_id: str, scope: anyio.CancelScope) -> None:
        plan = await self.store.plan(plan_id)
        task = await self.store.task(plan_id, task_id)
        if task.state is not TaskState.SUCCEEDED or task.commit is None:
            return
        touched = [] if task.approved else protected(task.changed_files, self.settings.protected_paths)
        if touched:
            await self.store.move(plan.id, task.id, TaskState.HELD, reason=_held_reason(plan, task, touched))
            return
        result: MergeResult | None = None
        with scope, self._gate_env(plan, task) as gate_env:
            result = await merge_into(
                self.repo,
                plan.integration_branch,
                task.commit,
                merge_message(plan, task),
                gate=plan.gate,
                gate_timeout=self.settings.gate_timeout,
                gate_sandbox=self.settings.sandbox_policy(),
                gate_env=gate_env,
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

    @contextlib.contextmanager
    def _gate_env(self, plan: Plan, task: Task) -> Iterator[dict[str, str] | None]:
        """The gate's ``CLAUDECLUSTER_*`` variables, with a block of ports held while it runs."""
        if not plan.gate:
            yield None
            return
        with PORTS.block(self.settings.port_base, self.settings.ports_per_task) as port_base:
            yield fleet_env(plan.id, task.id, port_base)

    async def _record(self, plan: Plan, task: Task, result: MergeResult) -> None:
        if result.new_tip:
            self.tips[plan.id] = result.new_tip
        if result.outcome in (MergeOutcome.MERGED, MergeOutcome.ALREADY_MERGED):
            await self.mark_merged(plan, task, result.new_tip)
        elif result.outcome is MergeOutcome.GATE_FAILED:
            assert result.gate is not None
            reason = f"{GATE_FAILED_PREFIX} (exit {result.gate.returncode}):\n{result.gate.output[-1500:]}"
            # One guarded move: a retried task is never seen final in between.
            retry = task.attempts <= self.settings.gate_retries
            await self.store.move(
                plan.id, task.id, TaskState.PENDING if retry else TaskState.GATE_FAILED, reason=reason
            )
        else:
            await self._conflict(plan, task, result.conflicts)

    async def mark_merged(self, plan: Plan, task: Task, tip: str | None) -> None:
        """Record a task (and the conflicted task it resolves) as merged at ``tip``."""
        await self.store.move(plan.id, task.id, TaskState.MERGED, merge_commit=tip, last_activity="merged")
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
        target branch) through the same :func:`merge_into` as every task: fast-forward when
        possible, else a merge commit after a clean merge-tree check, which must pass the
        plan's gate (a fast-forward lands the integration tip, gated already); journalled; a
        checked-out target must be clean and has its files updated. ``on_progress`` hears
        each stage, and a heartbeat while the gate runs."""
        plan = status.plan
        unfinished = [t.id for t in status.tasks if t.state not in FINAL_STATES]
        if unfinished:
            raise StateError(f"plan {plan.id} is still running (tasks {', '.join(unfinished)}); wait for it first")
        target = await check_target_branch(self.repo, target or plan.target_branch)
        ref = f"refs/heads/{target}"
        source = await rev_parse(self.repo, f"refs/heads/{plan.integration_branch}")
        exists = (await git(self.repo, "rev-parse", "--verify", "--quiet", ref, check=False)).returncode == 0
        previous = await rev_parse(self.repo, ref) if exists else None
        report = FinalMerge(
            plan_id=plan.id,
            target=target,
            kind="fast-forward",
            dry_run=dry_run,
            previous_tip=previous,
            new_tip=source,
            tasks={t.id: t.state.value for t in status.tasks},
        )
        if previous is None:
            return await self._create_target(report, plan, ref, source)
        checkout = await worktree_of_branch(self.repo, target)
        if checkout is not None and not dry_run:
            await require_clean(checkout, f"merging plan {plan.id} into {target}")
        async with ticking(on_progress) as ticker:
            result = await merge_into(
                self.repo,
                ref,
                source,
                merge_message(plan),
                gate=plan.gate,
                gate_timeout=self.settings.gate_timeout,
                gate_sandbox=self.settings.sandbox_policy(),
                gate_fast_forward=False,
                on_stage=ticker.stage,
                journal=lambda ref, old, new: self.store.begin_merge(plan.id, None, ref, old, new),
                journal_end=self.store.end_merge,
                tip_hint=previous,
                checkout=checkout,
                dry_run=dry_run,
            )
        if result.outcome is MergeOutcome.CONFLICT:
            return report.model_copy(update={"kind": "conflict", "new_tip": None, "conflicts": result.conflicts})
        if result.outcome is MergeOutcome.GATE_FAILED:
            output = result.gate.output[-2000:] if result.gate is not None else ""
            return report.model_copy(update={"kind": "gate_failed", "new_tip": None, "gate_output": output})
        if result.outcome is MergeOutcome.ALREADY_MERGED:
            return report.model_copy(update={"kind": "up-to-date", "new_tip": previous})
        kind = "fast-forward" if result.fast_forward else "merge"
        if dry_run:
            return report.model_copy(update={"kind": kind, "new_tip": source if result.fast_forward else None})
        assert result.new_tip is not None
        undo = f"git update-ref {ref} {result.old_tip} {result.new_tip}"
        report = report.model_copy(update={"kind": kind, "new_tip": result.new_tip, "undo": undo})
        await self.store.update_plan(plan.id, state=PlanState.MERGED, final_merge=report.model_dump(mode="json"))
        return report

    async def _create_target(self, report: FinalMerge, plan: Plan, ref: str, source: str) -> FinalMerge:
        if report.dry_run:
            return report
        if not await update_ref(self.repo, ref, source, None, merge_message(plan)):
            raise StateError(f"{report.target} appeared during the merge; run merge again")
        report = report.model_copy(update={"undo": f"git branch -D {report.target}"})
        await self.store.update_plan(plan.id, state=PlanState.MERGED, final_merge=report.model_dump(mode="json"))
        return report


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
