"""The scheduler: which task runs next. A pass over each active plan promotes tasks whose
dependencies are merged to ``ready``, blocks those whose dependencies never will be, and
starts ready tasks — highest priority, then longest critical path first — while agent slots
are free and no rate-limit pause holds the pool. A plan whose agents have spent its budget
(:mod:`~claudecluster_mcp.budget`) starts no more of them and ends. A plan whose pass fails on
an engine error ends ``failed`` with the reason; the other plans go on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import anyio
from anyio.abc import TaskGroup, TaskStatus

from .budget import Budget
from .diskfull import disk_full
from .graph import TaskGraph
from .models import FINAL_STATES, MergePolicy, PlanState, TaskState
from .retry import RateLimitPause
from .signals import Pulse
from .store import Store
from .task_runner import TaskRunner

__all__ = ["Scheduler", "held_up", "is_dead"]

logger = logging.getLogger(__name__)

Candidate = tuple[tuple[int, float, int], str, str]


class Scheduler:
    """Schedules the tasks of one repository's active plans onto ``workers`` agent slots."""

    def __init__(self, store: Store, runner: TaskRunner, pulse: Pulse, pause: RateLimitPause, workers: int) -> None:
        self.store = store
        self.runner = runner
        self.pulse = pulse
        self.pause = pause
        self.workers = workers
        self.active: set[str] = set()  # plans being worked on
        self.starting: set[str] = set()  # task refs handed to the runner, not yet finished
        self._only: dict[str, set[str]] = {}  # plan → the task ids dispatched (when restricted)
        self._policies: dict[str, MergePolicy] = {}
        self._lengths: dict[str, dict[str, float]] = {}
        self._budgets: dict[str, Budget] = {}
        self._spent: set[str] = set()  # plans whose budget was reached
        self._tg: TaskGroup | None = None

    def activate(self, plan_id: str, only: set[str] | None = None) -> None:
        """Work on a plan (only on ``only`` of its tasks, if given, added to earlier ones)."""
        if only is None:
            self._only.pop(plan_id, None)
        else:
            self._only.setdefault(plan_id, set()).update(only)
        self.active.add(plan_id)
        self.pulse.kick()

    def running_in_full(self, plan_id: str) -> bool:
        """True when the plan is active with all its tasks dispatched."""
        return plan_id in self.active and plan_id not in self._only

    def running(self, plan_id: str) -> bool:
        """True while any task of the plan is with the runner."""
        return any(ref.startswith(plan_id + "/") for ref in self.starting)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Schedule until cancelled. A full pass reads every task of every active plan; it
        runs after a state change (a kick) or when a retry delay or pause ends. In between,
        every 2 s, it only looks for plans cancelled from another process."""
        async with anyio.create_task_group() as self._tg:
            task_status.started()
            due = 0.0
            self.pulse.rearm()
            while True:
                if self.pulse.wake.is_set() or time.time() >= due:
                    self.pulse.rearm()
                    due = time.time() + await self._pass()
                else:
                    await self._stop_cancelled()
                with anyio.move_on_after(min(2.0, max(0.0, due - time.time()))):
                    await self.pulse.wake.wait()
                # State changes come in bursts (a merge moves a task, unblocks others, …): let
                # the burst land so that one pass serves it, instead of one pass per change.
                await anyio.sleep(0.005)

    async def settle(self, plan_id: str) -> None:
        """Mark a plan whose tasks are all final as done."""
        plan = await self.store.plan(plan_id)
        if plan.state is PlanState.RUNNING:
            await self.store.update_plan(plan_id, state=PlanState.DONE)
        self.active.discard(plan_id)
        self.pulse.notify()

    async def _stop_cancelled(self) -> None:
        for plan_id in list(self.active):
            if (await self.store.plan(plan_id)).state in (PlanState.CANCELLED, PlanState.FAILED):
                # Ended from elsewhere (another process wrote the store): stop its agents.
                self.active.discard(plan_id)
                self.runner.cancel(plan_id, reason="plan cancelled")

    async def _pass(self) -> float:
        """One pass: promote, block, and start what fits. Returns the longest sensible sleep."""
        clock = time.time()
        next_wake = 3600.0  # no deadline: only a kick starts the next full pass
        candidates: list[Candidate] = []
        await self._stop_cancelled()
        for plan_id in list(self.active):
            try:
                next_wake = min(next_wake, await self._plan_pass(plan_id, clock, candidates))
            except Exception as exc:
                if not disk_full(exc):
                    await self._fail(plan_id, exc)
                    continue
                # The store cannot write now: nothing is wrong with the plan; try again soon.
                logger.warning("disk full: scheduling plan %s waits for space (%s)", plan_id, exc)
                next_wake = min(next_wake, 5.0)
        wait = self.pause.wait_for(clock)
        if wait:
            return min(next_wake, wait)
        candidates.sort(key=lambda item: item[0])
        for _, plan_id, task_id in candidates[: max(self.workers - len(self.starting), 0)]:
            wait = self.pause.wait_for(clock)
            if wait:
                return min(next_wake, wait)
            self._start(plan_id, task_id)
            self.pause.started(clock, f"{plan_id}/{task_id}")
        self.pause.settle(clock)
        return next_wake

    async def _plan_pass(self, plan_id: str, clock: float, candidates: list[Candidate]) -> float:
        rows = await self.store.task_rows(plan_id)
        state = {t.id: t.state for t in rows}
        # A conflicted task lives on through its resolve task; when that one failed, it is dead.
        resolution = {t.resolves: t.state for t in rows if t.resolves}
        policy = self._policies.get(plan_id)
        if policy is None:
            policy = self._policies[plan_id] = (await self.store.plan(plan_id)).merge_policy
        next_wake = 3600.0
        if await self._budget_reached(plan_id, rows, state):
            if all(s in FINAL_STATES for s in state.values()):
                await self.settle(plan_id)
            return next_wake
        lengths = self._path_lengths(plan_id, rows)
        only = self._only.get(plan_id)
        for row in rows:
            current = row.state
            if current is TaskState.PENDING:
                dead = [d for d in row.deps if is_dead(state.get(d), policy, resolution.get(d))]
                if dead:
                    reason = f"dependency {dead[0]} did not merge"
                    await self.store.move(plan_id, row.id, TaskState.BLOCKED, reason=reason)
                    state[row.id] = TaskState.BLOCKED
                    self.pulse.notify()
                    continue
                if all(state.get(d) is TaskState.MERGED for d in row.deps) and (only is None or row.id in only):
                    if row.not_before and row.not_before > clock:
                        next_wake = min(next_wake, row.not_before - clock)
                        continue
                    await self.store.move(plan_id, row.id, TaskState.READY)
                    current = state[row.id] = TaskState.READY
            if current is TaskState.READY and f"{plan_id}/{row.id}" not in self.starting:
                candidates.append(((-row.priority.rank, -lengths.get(row.id, 1.0), row.seq), plan_id, row.id))
        if all(s in FINAL_STATES for s in state.values()):
            await self.settle(plan_id)
        return next_wake

    async def _budget_reached(self, plan_id: str, rows: Sequence[Any], state: dict[str, TaskState]) -> bool:
        """Once the plan's agents have spent its budget: say so on the plan (once), stop
        its agents from starting (and, with ``budget_stop = "now"``, running), and cancel its
        tasks not started. Tasks whose work is done still merge."""
        budget = self._budgets.get(plan_id)
        if budget is None:
            budget = self._budgets[plan_id] = Budget.of(await self.store.plan(plan_id))
        if not budget.limited:
            return False
        _, cost, tokens = await self.store.tally(plan_id)
        reason = budget.reached(cost, tokens)
        if reason is None:
            return False
        if plan_id not in self._spent:
            self._spent.add(plan_id)
            logger.warning("plan %s: %s", plan_id, reason)
            await self.store.update_plan(plan_id, reason=reason)
            await self.store.append_event(plan_id, None, "budget_reached", {"cost_usd": cost, "tokens": tokens})
            self.runner.halt(plan_id, f"not started: {reason}")
            if self.runner.settings.budget_stop == "now":
                self.runner.cancel(plan_id, reason=f"stopped: {reason}")
        for row in rows:
            if row.state in (TaskState.PENDING, TaskState.READY) and f"{plan_id}/{row.id}" not in self.starting:
                await self.store.move(plan_id, row.id, TaskState.CANCELLED, reason=f"not started: {reason}")
                state[row.id] = TaskState.CANCELLED
                self.pulse.notify()
        return True

    def _start(self, plan_id: str, task_id: str) -> None:
        assert self._tg is not None
        ref = f"{plan_id}/{task_id}"
        self.starting.add(ref)

        async def run() -> None:
            try:
                await self.runner.run(plan_id, task_id)
            finally:
                self.starting.discard(ref)
                self.pulse.notify()

        self._tg.start_soon(run, name=f"task {ref}")

    async def _fail(self, plan_id: str, exc: Exception) -> None:
        """An engine error in a plan's pass ends that plan, never the engine."""
        logger.exception("scheduling plan %s failed; the plan ends", plan_id)
        self.active.discard(plan_id)
        self.runner.cancel(plan_id, reason=f"the plan failed: {exc}")
        await self.store.update_plan(plan_id, state=PlanState.FAILED, reason=f"engine error: {exc}")
        self.pulse.notify()

    def _path_lengths(self, plan_id: str, rows: Sequence[Any]) -> dict[str, float]:
        cached = self._lengths.get(plan_id)
        if cached is None or len(cached) != len(rows):
            cached = self._lengths[plan_id] = TaskGraph(rows).critical_path_lengths()
        return cached


def is_dead(state: TaskState | None, policy: MergePolicy, resolution: TaskState | None = None) -> bool:
    """True when a dependency in ``state`` will never be merged (``resolution``: the state of
    its resolve task, if it has one)."""
    if state is None:
        return False
    if state is TaskState.CONFLICTED:
        if policy is MergePolicy.REPORT:
            return True
        return resolution is not None and resolution in FINAL_STATES and resolution is not TaskState.MERGED
    return state in FINAL_STATES and state is not TaskState.MERGED


_MOVING = frozenset({TaskState.READY, TaskState.RUNNING, TaskState.WAITING, TaskState.SUCCEEDED})


def held_up(rows: Sequence[Any]) -> list[str]:
    """The held tasks a plan waits for, when nothing else can move without the user: no task
    ready, running or awaiting its merge, and every pending task behind a held one. Empty
    when the plan can still progress on its own (or holds nothing)."""
    state = {r.id: r.state for r in rows}
    held = [r.id for r in rows if r.state is TaskState.HELD]
    if not held or any(s in _MOVING for s in state.values()):
        return []
    behind = set(held)
    for row in rows:  # stored in topological order: dependencies come first
        if row.state is TaskState.PENDING and any(d in behind for d in row.deps):
            behind.add(row.id)
    stuck = all(r.id in behind for r in rows if r.state is TaskState.PENDING)
    return held if stuck else []
