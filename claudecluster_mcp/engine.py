"""The engine of one repository, as one facade: plans become task DAGs, tasks become real
Claude Code agents in git worktrees, and finished branches go through one merge queue into
the plan's integration branch. Every operation is safe to call from many clients at once,
and all state lives in the repository's store, so a killed process loses nothing.

The path of a goal, module by module: :mod:`~claudecluster_mcp.planner` and
:mod:`~claudecluster_mcp.graph` (goal → validated DAG), :mod:`~claudecluster_mcp.store`
(plans and tasks), :mod:`~claudecluster_mcp.scheduler` (which task next),
:mod:`~claudecluster_mcp.task_runner` (worktree, agent, commit) through
:mod:`~claudecluster_mcp.placement` (where the agent runs), :mod:`~claudecluster_mcp.merge_queue`
(into the integration branch, and finally the target branch), :mod:`~claudecluster_mcp.recovery`
(after a crash).

::

    async with Cluster.open(repo, workers=4) as cluster:
        status = await cluster.plan("goal", tasks=[...])
        await cluster.dispatch(status.plan.id)
        await cluster.wait(status.plan.id)
        await cluster.merge(status.plan.id)
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio

from .claude_cli import ClaudeBinary, find_claude
from .errors import NotFoundError, StateError, single_errors
from .events import activity
from .graph import checked_plan, parse_tasks
from .isolation import require_isolation
from .merge_queue import FinalMerge, MergeQueue
from .models import (
    ACTIVE_STATES,
    FINAL_STATES,
    MergePolicy,
    PlanState,
    PlanStatus,
    Task,
    TaskSpec,
    TaskState,
)
from .new_plan import check_goal, new_plan
from .placement import AgentPlacement, LocalPlacement
from .planner import plan_with_claude
from .preflight import check_model
from .progress import Progress, ticking
from .prompts import stored_tasks
from .recovery import EngineLease, recover
from .registry import Registry
from .retention import GcReport, Retention
from .retry import RateLimitPause
from .scheduler import Scheduler, held_up
from .settings import EngineSettings, check_workers, default_state_dir
from .signals import Pulse, Watcher
from .store import Store, StoredEvent, state_db_path
from .task_runner import TaskRunner
from .workspace import repo_root, update_ref

__all__ = ["STATUS_FOCUS", "Cluster", "EngineSettings", "FinalMerge", "default_state_dir"]

#: Plans bigger than this list only the tasks that need attention in dispatch/cancel answers.
STATUS_FOCUS = 50
_ENDED = (PlanState.DONE, PlanState.CANCELLED, PlanState.FAILED)


class Cluster:
    """The engine for one repository. Create with :meth:`open`."""

    def __init__(self, repo: Path, store: Store, settings: EngineSettings, placement: AgentPlacement) -> None:
        self.repo = repo
        self.store = store
        self.settings = settings
        self.placement = placement
        self.registry = Registry(settings.state_dir / "registry.db")
        self.pulse = Pulse()
        pause = self._pause = RateLimitPause(settings.restart_stagger)
        self.merges = MergeQueue(repo, store, settings, self.pulse)
        self.runner = TaskRunner(repo, store, settings, placement, self.pulse, pause, self.merges)
        self.scheduler = Scheduler(store, self.runner, self.pulse, pause, settings.workers)
        self.retention = Retention(repo, store, settings, self.registry, busy=self._busy)
        self._model_checked = False

    # -- lifecycle --------------------------------------------------------------------------

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        repo: Path | str,
        *,
        workers: int | None = None,
        settings: EngineSettings | None = None,
        claude: ClaudeBinary | None = None,
        placement: AgentPlacement | None = None,
    ) -> AsyncIterator[Cluster]:
        """Open the cluster of a repository: recover what a previous process left, then
        schedule. Leaving the block stops running agents; their tasks are re-queued."""
        settings = settings or EngineSettings()
        if workers is not None:
            settings = settings.model_copy(update={"workers": check_workers(workers)})
        root = await repo_root(Path(repo))
        require_isolation(settings.isolation)
        if placement is None:
            if claude is None:
                claude = await anyio.to_thread.run_sync(find_claude, settings.claude_bin)
            placement = LocalPlacement(claude)
        db_path = await state_db_path(root)
        with single_errors(), EngineLease(db_path.parent / "engine.lock", root):
            async with Store.open(db_path) as store, anyio.create_task_group() as tg:
                cluster = cls(root, store, settings, placement)
                try:
                    await recover(root, store, placement, cluster.merges, cluster.scheduler)
                    await tg.start(cluster.scheduler.run)
                    await tg.start(cluster.merges.run)
                    tg.start_soon(cluster.retention.run)
                    yield cluster
                finally:
                    cluster.merges.close()
                    tg.cancel_scope.cancel()

    def watch(self, watcher: Watcher) -> Callable[[], None]:
        """Call ``watcher`` with every change of this repository's state from now on, right
        after it is committed (see :class:`~claudecluster_mcp.signals.Change`); returns the
        unwatch function. The MCP server's notifications are built on this."""
        return self.store.watchers.watch(watcher)

    @property
    def claude(self) -> ClaudeBinary | None:
        """The ``claude`` binary agents run (for a local placement)."""
        return getattr(self.placement, "claude", None)

    def set_workers(self, count: int) -> None:
        """Resize the agent pool (1 to 64); takes effect at once for new starts."""
        self.settings = self.settings.model_copy(update={"workers": check_workers(count)})
        self.scheduler.workers = count
        self.pulse.kick()

    @property
    def workers(self) -> int:
        """Size of the agent pool."""
        return self.settings.workers

    @property
    def running(self) -> int:
        """Agents running now."""
        return len(self.scheduler.starting)

    @property
    def rate_limit(self) -> str:
        """What the pool is doing about a model rate limit, in words (empty when nothing)."""
        return self._pause.describe(time.time())

    # -- plan -------------------------------------------------------------------------------

    async def plan(
        self,
        goal: str,
        tasks: Sequence[TaskSpec | Mapping[str, Any]] | None = None,
        *,
        base_ref: str | None = None,
        target: str | None = None,
        merge_policy: MergePolicy | None = None,
        gate: Sequence[str] | None = None,
        max_cost_usd: float | None = None,
        max_tokens: int | None = None,
        on_progress: Progress | None = None,
    ) -> PlanStatus:
        """Validate and store a plan. The base is ``base_ref`` (any commit-ish; default: the
        branch checked out now); an integration branch is created there; ``target`` (default:
        the branch checked out now) is where :meth:`merge` puts the result. Without ``tasks``, a
        read-only Claude Code planning run splits the goal, telling ``on_progress`` what it does
        meanwhile. ``max_cost_usd`` / ``max_tokens`` (default: the settings') budget all its
        agents together."""
        check_goal(goal, max_cost_usd, max_tokens)
        # Validation is CPU-bound on big plans: off the event loop, so other sessions go on.
        if tasks is None:
            specs = await self._planned(goal, on_progress)
        else:
            specs = await anyio.to_thread.run_sync(parse_tasks, tasks)
        specs, warnings = await anyio.to_thread.run_sync(
            lambda: checked_plan(specs, serialize=self.settings.serialize_overlaps)
        )
        plan = await new_plan(
            self.repo,
            self.settings,
            goal,
            warnings,
            base_ref=base_ref,
            target=target,
            merge_policy=merge_policy,
            gate=gate,
            max_cost_usd=max_cost_usd,
            max_tokens=max_tokens,
        )
        stored = await anyio.to_thread.run_sync(stored_tasks, plan, specs)
        ref = f"refs/heads/{plan.integration_branch}"
        if not await update_ref(self.repo, ref, plan.base_commit, None, "claudecluster: plan"):
            raise StateError(f"branch {plan.integration_branch} already exists")
        await self.store.create_plan(plan, stored)
        await anyio.to_thread.run_sync(self.registry.register, plan.id, self.repo)
        # What status() would read back, without re-reading thousands of rows on the loop.
        return PlanStatus(plan=plan, tasks=stored, counts={TaskState.PENDING.value: len(stored)})

    async def _check_model(self) -> None:
        """Say once, before the first agent starts, if the model cannot be used (not logged in,
        credentials refused, API unreachable), instead of every agent failing on it."""
        if not self._model_checked:
            await check_model(self.settings, repo=self.repo)
            self._model_checked = True

    async def _planned(self, goal: str, on_progress: Progress | None) -> list[TaskSpec]:
        await self._check_model()
        claude = self.claude if self.claude is not None else await anyio.to_thread.run_sync(find_claude)
        async with ticking(on_progress) as ticker:
            await ticker.stage("the planning agent is reading the repository")
            return await plan_with_claude(
                self.repo,
                goal,
                claude=claude,
                env=self.settings.agent_env,
                config_dir=self.settings.claude_config_dir,
                model=self.settings.model,
                log_dir=self.settings.state_dir / "logs" / "planner" / secrets.token_hex(4),
                on_event=lambda event: ticker.note(f"planning agent: {activity(event)}"),
            )

    # -- dispatch, status, wait, cancel --------------------------------------------------------

    async def dispatch(self, plan_id: str, task_ids: Iterable[str] | None = None) -> PlanStatus:
        """Start running a plan (or only ``task_ids`` of it); returns at once."""
        plan = await self.store.plan(plan_id)
        if plan.state in (PlanState.CANCELLED, PlanState.MERGED, PlanState.FAILED):
            raise StateError(f"plan {plan_id} is {plan.state.value}; it cannot be dispatched")
        only: set[str] | None = None
        if task_ids is not None:
            only = set(task_ids)
            known = {t.id for t in await self.store.tasks(plan_id)}
            if unknown := only - known:
                raise NotFoundError(
                    f"plan {plan_id} has no task {', '.join(sorted(unknown))} (tasks: {', '.join(sorted(known))})"
                )
        await self._check_model()  # after the cheap checks of the caller's arguments
        if only is None and plan.state is PlanState.RUNNING and self.scheduler.running_in_full(plan_id):
            # Already running in full: nothing changes, no scheduler pass needed.
            return await self.status(plan_id, focus=STATUS_FOCUS)
        if plan.state is not PlanState.RUNNING:
            await self.store.update_plan(plan_id, state=PlanState.RUNNING)
        self.scheduler.activate(plan_id, only)
        return await self.status(plan_id, focus=STATUS_FOCUS)

    async def status(
        self,
        plan_id: str,
        *,
        task_id: str | None = None,
        focus: int | None = None,
        wait: float = 0,
        until_finished: bool = False,
        on_progress: Progress | None = None,
    ) -> PlanStatus:
        """The plan, its tasks in order, and counts by state (see :meth:`Store.status` for
        ``task_id`` and ``focus``). With ``wait``, long-poll: answer as soon as a task changes
        state (or, with ``until_finished``, once every task is final), at the latest after
        ``wait`` seconds, calling ``on_progress(done, total, message)`` meanwhile."""
        if task_id is not None:
            await self.store.task(plan_id, task_id)  # NotFoundError naming the plan's tasks
        if wait:
            await self._long_poll(plan_id, wait, until_finished, on_progress)
        return await self.store.status(plan_id, focus=focus, task_id=task_id)

    async def _long_poll(self, plan_id: str, wait: float, until_finished: bool, on_progress: Progress | None) -> None:
        before = [(r.id, r.state) for r in await self.store.task_rows(plan_id)]
        deadline = anyio.current_time() + wait
        last, beats = -1, 0
        while anyio.current_time() < deadline:
            rows = await self.store.task_rows(plan_id)
            if all(r.state in FINAL_STATES for r in rows):
                return
            if not until_finished and [(r.id, r.state) for r in rows] != before:
                return
            if on_progress is not None:
                done = sum(r.state in FINAL_STATES for r in rows)
                running = sum(r.state in ACTIVE_STATES for r in rows)
                # MCP progress must increase: a heartbeat with nothing newly final creeps
                # towards the next whole task without reaching it.
                beats = beats + 1 if done == last else 0
                last = done
                value = done + 1 - 1 / (beats + 1) if beats else done
                await on_progress(value, len(rows), f"{done}/{len(rows)} tasks final, {running} running")
            await self.changed(min(2.0, deadline - anyio.current_time()))

    async def overview(self) -> list[PlanStatus]:
        """Every plan of the repository with counts and totals (no tasks listed)."""
        return await self.store.overview()

    async def task(self, plan_id: str, task_id: str) -> Task:
        """One task (:class:`NotFoundError` naming the plan's tasks if unknown)."""
        return await self.store.task(plan_id, task_id)

    async def events(self, plan_id: str, task_id: str | None = None, *, limit: int | None = None) -> list[StoredEvent]:
        """Recorded events of a plan or one task, oldest first (the last ``limit``)."""
        if task_id is not None:
            await self.store.task(plan_id, task_id)
        return await self.store.events(plan_id, task_id, limit=limit)

    def transcript(self, task: Task) -> Path | None:
        """The raw agent transcript of the task's last attempt, if it exists."""
        path = self.settings.state_dir / "logs" / task.plan_id / f"{task.id}.{task.attempts}.log"
        return path if path.exists() else None

    async def wait(self, plan_id: str, timeout: float | None = None) -> PlanStatus:
        """Wait until every task of the plan is final, or the plan waits for the user to
        approve held tasks (see :meth:`held_up`), or ``timeout`` s; returns the status."""
        await self.store.plan(plan_id)  # NotFoundError for an unknown id
        with anyio.move_on_after(timeout):
            while True:
                if await self.store.unfinished(plan_id) == 0:
                    await self.scheduler.settle(plan_id)
                    break
                if (await self.store.plan(plan_id)).state in _ENDED or await self.held_up(plan_id):
                    break
                await self.changed(1.0)
        return await self.status(plan_id)

    async def changed(self, timeout: float) -> None:
        """Return when any task changes state, or after ``timeout`` seconds."""
        await self.pulse.changed(timeout)

    async def cancel(self, plan_id: str, task_id: str | None = None) -> PlanStatus:
        """Cancel a whole plan, or one task of it. Running agents are stopped (no process
        survives), a merge in progress stops before its ref moves (or completes, if it had
        begun to move it), waiting tasks are cancelled; dependents are blocked."""
        tasks = await self.store.tasks(plan_id)
        if task_id is not None:
            tasks = [await self.store.task(plan_id, task_id)]  # NotFoundError naming the tasks
        else:
            await self.store.update_plan(plan_id, state=PlanState.CANCELLED)
            self.scheduler.active.discard(plan_id)
        for task in tasks:
            if self.runner.cancel(plan_id, task.id) or self.merges.cancel(plan_id, task.id):
                continue  # their owner records the outcome
            if task.state in (TaskState.PENDING, TaskState.READY, TaskState.SUCCEEDED):
                with contextlib.suppress(StateError):
                    await self.store.move(plan_id, task.id, TaskState.CANCELLED, reason="cancelled by request")
        with anyio.move_on_after(self.settings.cancel_grace + 10):
            while self.merges.merging(plan_id, task_id) or (task_id is None and self.scheduler.running(plan_id)):
                await self.pulse.changed(0.05)
        self.pulse.notify()
        return await self.status(plan_id, focus=STATUS_FOCUS)

    async def held_up(self, plan_id: str) -> list[str]:
        """The held tasks the plan waits for, when nothing else can move without the user."""
        return held_up(await self.store.task_rows(plan_id))

    async def approve(self, plan_id: str, task_id: str, *, reject: bool = False) -> PlanStatus:
        """Decide on a task held because its changes touch protected paths: approved, it goes
        back to the merge queue (and will merge like any other); rejected, it is cancelled and
        its dependents are blocked."""
        task = await self.store.task(plan_id, task_id)
        if task.state is not TaskState.HELD:
            raise StateError(f"task {plan_id}:{task_id} is {task.state.value}, not held for approval")
        if reject:
            await self.store.move(plan_id, task_id, TaskState.CANCELLED, reason="rejected: touches protected paths")
        else:
            await self.store.move(plan_id, task_id, TaskState.SUCCEEDED, approved=True, reason="approved")
            await self.merges.enqueue(plan_id, task_id)
        self.pulse.notify()
        return await self.status(plan_id, focus=STATUS_FOCUS)

    # -- the final merge, and cleaning up -------------------------------------------------------

    async def merge(
        self, plan_id: str, target: str | None = None, *, dry_run: bool = False, on_progress: Progress | None = None
    ) -> FinalMerge:
        """Merge the plan's integration branch into ``target`` (default: the plan's target
        branch): fast-forward when possible, else a merge commit after a clean merge-tree
        check, which the plan's gate must pass. Refuses a dirty checked-out target; records
        the previous tip for undo. ``on_progress`` hears the stages (and the gate's heartbeat)."""
        status = await self.store.status(plan_id)
        return await self.merges.land(status, target, dry_run=dry_run, on_progress=on_progress)

    async def collect(self, older_than: timedelta, *, dry_run: bool = False, unmerged: bool = False) -> GcReport:
        """Remove what finished plans older than ``older_than`` left on disk (the engine does
        this by itself every hour for ``retention_days``); see :mod:`~claudecluster_mcp.retention`."""
        return await self.retention.collect(older_than, dry_run=dry_run, unmerged=unmerged)

    def _busy(self, plan_id: str) -> bool:
        return plan_id in self.scheduler.active or self.scheduler.running(plan_id) or self.merges.merging(plan_id)
