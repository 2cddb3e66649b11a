"""The engine: plans become task DAGs, tasks become real Claude Code agents in git
worktrees, and finished branches go through one merge queue into the plan's integration
branch. One :class:`Cluster` per repository; every operation is safe to call from many
clients at once, and all state lives in the repository's store, so a killed process
loses nothing (see :meth:`Cluster._recover`).

::

    async with Cluster.open(repo, workers=4) as cluster:
        status = await cluster.plan("goal", tasks=[...])
        await cluster.dispatch(status.plan.id)
        await cluster.wait(status.plan.id)
        await cluster.merge(status.plan.id)
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import re
import secrets
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import psutil
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .agent import (
    AgentOutcome,
    AgentRun,
    AgentSpec,
    ClaudeBinary,
    OutcomeStatus,
    PermissionMode,
    find_claude,
    run_tmpdir,
)
from .errors import ConfigError, EngineBusyError, NotFoundError, PlanValidationError, StateError
from .events import (
    AgentEvent,
    ApiRetry,
    AssistantText,
    ResultEvent,
    StderrLine,
    ToolResult,
    ToolUse,
)
from .graph import TaskGraph, file_overlap_warnings, validate_tasks
from .merge import MergeOutcome, merge_into, merge_tree
from .models import (
    ACTIVE_STATES,
    FINAL_STATES,
    MergePolicy,
    Plan,
    PlanState,
    PlanStatus,
    Task,
    TaskKind,
    TaskSpec,
    TaskState,
)
from .planner import plan_with_claude
from .proctree import ProcessTree
from .store import Registry, Store, StoredEvent, now, state_db_path
from .workspace import (
    add_worktree,
    changed_files,
    check_branch_name,
    commit_all,
    current_branch,
    git,
    identity_args,
    is_ancestor,
    remove_worktree,
    repo_root,
    require_clean,
    rev_parse,
    update_ref,
    worktree_of_branch,
)

__all__ = [
    "STATUS_FOCUS",
    "Cluster",
    "EngineSettings",
    "FinalMerge",
    "RetryDecision",
    "decide_retry",
    "default_state_dir",
]

MAX_WORKERS = 64
#: Plans bigger than this list only the tasks that need attention in dispatch/cancel answers.
STATUS_FOCUS = 50


def default_state_dir() -> Path:
    """``$XDG_STATE_HOME/claudecluster`` (worktrees, agent logs, the plan registry)."""
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "claudecluster"


class EngineSettings(BaseModel):
    """How agents run and how their work is merged. Everything has a sensible default."""

    model_config = ConfigDict(extra="forbid")

    workers: int = Field(default=4, ge=1, le=MAX_WORKERS)
    model: str | None = None
    permission_mode: PermissionMode = "acceptEdits"
    allowed_tools: list[str] = Field(default_factory=list)
    disallowed_tools: list[str] = Field(default_factory=list)
    max_turns: int | None = Field(default=None, ge=1)
    max_budget_usd: float | None = Field(default=None, gt=0)
    wall_timeout: float = Field(default=3600.0, gt=0)
    inactivity_timeout: float = Field(default=600.0, gt=0)
    memory_limit_mb: int | None = Field(default=None, gt=0)
    cancel_grace: float = Field(default=5.0, ge=0)
    max_attempts: int = Field(default=3, ge=1, description="tries per task for transient failures")
    retry_backoff: float = Field(default=5.0, ge=0, description="first retry delay (s); doubles")
    rate_limit_pause: float = Field(default=30.0, ge=0, description="pool pause when retry-after is unknown")
    max_rate_limit_pauses: int = Field(default=20, ge=0)
    restart_stagger: float = Field(default=1.0, ge=0, description="gap between agent starts after a pause")
    merge_policy: MergePolicy = MergePolicy.RESOLVE
    gate: list[str] | None = Field(default=None, description="command run on each merge candidate")
    gate_timeout: float = Field(default=600.0, gt=0)
    gate_retries: int = Field(default=0, ge=0, description="re-runs of a task whose merge failed the gate")
    agent_env: dict[str, str] = Field(default_factory=dict, description="extra environment for agents")
    claude_config_dir: Path | None = Field(default=None, description="isolated Claude config for agents")
    state_dir: Path = Field(default_factory=default_state_dir)
    serialize_overlaps: bool = False


@dataclass(frozen=True)
class RetryDecision:
    """Whether a failed attempt is retried, and after how long."""

    retry: bool
    delay: float = 0.0


_TRANSIENT_STATUSES = frozenset({OutcomeStatus.CRASHED, OutcomeStatus.TIMED_OUT})


def decide_retry(outcome: AgentOutcome, attempts: int, settings: EngineSettings) -> RetryDecision:
    """Pure retry policy: crashes, timeouts and server-side API errors (5xx, 529, no status
    = connection) are retried with exponential backoff until ``max_attempts``; everything
    else (max turns, budget, 4xx, permission problems) is final."""
    if attempts >= settings.max_attempts:
        return RetryDecision(False)
    transient = outcome.status in _TRANSIENT_STATUSES or (
        outcome.status is OutcomeStatus.FAILED
        and outcome.final_text is not None
        and (outcome.api_error_status is None or outcome.api_error_status >= 500)
        and outcome.reason.startswith("API Error")
    )
    if not transient:
        return RetryDecision(False)
    return RetryDecision(True, settings.retry_backoff * 2 ** (attempts - 1))


class FinalMerge(BaseModel):
    """What :meth:`Cluster.merge` did (or, with ``dry_run``, would do)."""

    plan_id: str
    target: str
    kind: str = Field(description="fast-forward | merge | up-to-date | conflict")
    dry_run: bool
    previous_tip: str | None
    new_tip: str | None
    conflicts: list[str] = Field(default_factory=list)
    undo: str | None = Field(default=None, description="command that undoes the merge")
    tasks: dict[str, str] = Field(default_factory=dict, description="task id → state")


def _summary(event: AgentEvent) -> str:
    if isinstance(event, ToolUse):
        detail = event.input.get("file_path") or event.input.get("command") or event.input.get("pattern") or ""
        return f"{event.name} {str(detail)[:120]}".strip()
    if isinstance(event, AssistantText):
        return event.text.strip().splitlines()[0][:160] if event.text.strip() else "…"
    if isinstance(event, ApiRetry):
        return f"waiting to retry the model API ({event.error or event.error_status})"
    if isinstance(event, ResultEvent):
        return f"result: {event.subtype}"
    return event.kind


_CONFLICT_MARKER = re.compile(r"^(<{7}|>{7})( |$)", re.MULTILINE)


class Cluster:
    """The engine for one repository. Create with :meth:`open`."""

    def __init__(
        self,
        repo: Path,
        store: Store,
        settings: EngineSettings,
        claude: ClaudeBinary,
        tg: TaskGroup,
    ) -> None:
        self.repo = repo
        self.store = store
        self.settings = settings
        self.claude = claude
        self._tg = tg
        self.registry = Registry(settings.state_dir / "registry.db")
        self._wake = anyio.Event()
        self._changed = anyio.Event()
        self._active: set[str] = set()  # plans the scheduler works on
        self._only: dict[str, set[str]] = {}  # plan → task ids dispatched (when restricted)
        self._starting: set[str] = set()  # task refs handed to a runner, not yet finished
        self._runs: dict[str, AgentRun] = {}
        self._paused_until = 0.0
        self._stagger_until = 0.0
        self._rate_limit_pauses: dict[str, int] = {}
        self._policies: dict[str, MergePolicy] = {}
        self._tips: dict[str, str] = {}  # integration tips as this process last moved them
        self._lengths: dict[str, dict[str, float]] = {}
        merge_send, merge_recv = anyio.create_memory_object_stream[tuple[str, str]](math.inf)
        self._merge_send: MemoryObjectSendStream[tuple[str, str]] = merge_send
        self._merge_recv: MemoryObjectReceiveStream[tuple[str, str]] = merge_recv
        self._queued_merges: set[tuple[str, str]] = set()
        self._closing = False

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
    ) -> AsyncIterator[Cluster]:
        """Open the cluster of a repository: recover what a previous process left, then
        schedule. Leaving the block stops running agents; their tasks are re-queued."""
        settings = settings or EngineSettings()
        if workers is not None:
            settings = settings.model_copy(update={"workers": _check_workers(workers)})
        root = await repo_root(Path(repo))
        if claude is None:
            claude = await anyio.to_thread.run_sync(find_claude)
        db_path = await state_db_path(root)
        with _EngineLease(db_path.parent / "engine.lock", root):
            async with Store.open(db_path) as store, anyio.create_task_group() as tg:
                cluster = cls(root, store, settings, claude, tg)
                await cluster._recover()
                tg.start_soon(cluster._scheduler)
                tg.start_soon(cluster._merger)
                try:
                    yield cluster
                finally:
                    cluster._closing = True
                    cluster._merge_send.close()
                    tg.cancel_scope.cancel()

    def set_workers(self, count: int) -> None:
        """Resize the agent pool (1 to 64); takes effect at once for new starts."""
        self.settings = self.settings.model_copy(update={"workers": _check_workers(count)})
        self._kick()

    @property
    def workers(self) -> int:
        """Size of the agent pool."""
        return self.settings.workers

    @property
    def running(self) -> int:
        """Agents running now."""
        return len(self._starting)

    def _kick(self) -> None:
        self._wake.set()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()
        self._kick()

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
    ) -> PlanStatus:
        """Validate and store a plan. The base is ``base_ref`` (default: the branch checked
        out now); an integration branch is created there; ``target`` (default: that branch)
        is where :meth:`merge` puts the result. Without ``tasks``, a read-only Claude Code
        planning run splits the goal into tasks."""
        if not goal.strip():
            raise ConfigError("the goal is empty")
        if tasks is None:
            specs = await plan_with_claude(
                self.repo,
                goal,
                claude=self.claude,
                env=self.settings.agent_env,
                config_dir=self.settings.claude_config_dir,
                model=self.settings.model,
                log_dir=self.settings.state_dir / "logs" / "planner" / secrets.token_hex(4),
            )
        else:
            specs = _parse_tasks(tasks)
        validate_tasks(specs)
        overlaps = file_overlap_warnings(specs)
        warnings = [message for _, _, message in overlaps]
        if self.settings.serialize_overlaps and overlaps:
            specs = _serialize(specs, overlaps)
            warnings = [w + " (serialized by an added dependency)" for w in warnings]
        branch_now = await current_branch(self.repo)
        base_ref = base_ref or branch_now or "HEAD"
        base_commit = await rev_parse(self.repo, base_ref)
        target = target or (base_ref if base_ref != "HEAD" else branch_now)
        if target is None:
            raise ConfigError("HEAD is detached: name the target branch for the final merge")
        await check_branch_name(self.repo, target)
        plan_id = "p" + secrets.token_hex(4)
        integration = f"claudecluster/{plan_id}/integration"
        stamp = now()
        plan = Plan(
            id=plan_id,
            repo=self.repo,
            goal=goal,
            base_ref=base_ref,
            base_commit=base_commit,
            target_branch=target,
            integration_branch=integration,
            merge_policy=merge_policy or self.settings.merge_policy,
            gate=list(gate) if gate is not None else self.settings.gate,
            warnings=warnings,
            created_at=stamp,
            updated_at=stamp,
        )
        order = TaskGraph(specs).topological_order()
        by_id = {s.id: s for s in specs}
        stored = [Task(**by_id[tid].model_dump(), plan_id=plan_id, created_at=stamp, updated_at=stamp) for tid in order]
        if not await update_ref(self.repo, f"refs/heads/{integration}", base_commit, None, "claudecluster: plan"):
            raise StateError(f"branch {integration} already exists")
        await self.store.create_plan(plan, stored)
        await anyio.to_thread.run_sync(self.registry.register, plan_id, self.repo)
        return await self.status(plan_id)

    # -- dispatch, status, wait, cancel --------------------------------------------------------

    async def dispatch(self, plan_id: str, task_ids: Iterable[str] | None = None) -> PlanStatus:
        """Start running a plan (or only ``task_ids`` of it); returns at once."""
        plan = await self.store.plan(plan_id)
        if plan.state in (PlanState.CANCELLED, PlanState.MERGED):
            raise StateError(f"plan {plan_id} is {plan.state.value}; it cannot be dispatched")
        if task_ids is not None:
            wanted = set(task_ids)
            known = {t.id for t in await self.store.tasks(plan_id)}
            if unknown := wanted - known:
                raise NotFoundError(
                    f"plan {plan_id} has no task {', '.join(sorted(unknown))} (tasks: {', '.join(sorted(known))})"
                )
            self._only.setdefault(plan_id, set()).update(wanted)
        elif plan.state is PlanState.RUNNING and plan_id in self._active and plan_id not in self._only:
            # Already running in full: nothing changes, no scheduler pass needed.
            return await self.status(plan_id, focus=STATUS_FOCUS)
        else:
            self._only.pop(plan_id, None)
        if plan.state is not PlanState.RUNNING:
            await self.store.update_plan(plan_id, state=PlanState.RUNNING)
        self._active.add(plan_id)
        self._kick()
        return await self.status(plan_id, focus=STATUS_FOCUS)

    async def status(
        self,
        plan_id: str,
        *,
        task_id: str | None = None,
        focus: int | None = None,
        wait: float = 0,
        until_finished: bool = False,
        on_progress: Callable[[int, int, str], Awaitable[None]] | None = None,
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

    async def _long_poll(
        self,
        plan_id: str,
        wait: float,
        until_finished: bool,
        on_progress: Callable[[int, int, str], Awaitable[None]] | None,
    ) -> None:
        before = [(r.id, r.state) for r in await self.store.task_rows(plan_id)]
        deadline = anyio.current_time() + wait
        while anyio.current_time() < deadline:
            rows = await self.store.task_rows(plan_id)
            if all(r.state in FINAL_STATES for r in rows):
                return
            if not until_finished and [(r.id, r.state) for r in rows] != before:
                return
            if on_progress is not None:
                done = sum(r.state in FINAL_STATES for r in rows)
                running = sum(r.state in ACTIVE_STATES for r in rows)
                await on_progress(done, len(rows), f"{done}/{len(rows)} tasks final, {running} running")
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
        """Wait until every task of the plan is final (or ``timeout`` s); returns the status."""
        await self.store.plan(plan_id)  # NotFoundError for an unknown id
        with anyio.move_on_after(timeout):
            while True:
                changed = self._changed
                if await self.store.unfinished(plan_id) == 0:
                    await self._settle(plan_id)
                    break
                if (await self.store.plan(plan_id)).state in (PlanState.DONE, PlanState.CANCELLED):
                    break
                with anyio.move_on_after(1.0):
                    await changed.wait()
        return await self.status(plan_id)

    async def changed(self, timeout: float) -> None:
        """Return when any task changes state, or after ``timeout`` seconds."""
        with anyio.move_on_after(timeout):
            await self._changed.wait()

    async def cancel(self, plan_id: str, task_id: str | None = None) -> PlanStatus:
        """Cancel a whole plan, or one task of it. Running agents are stopped (no process
        survives); waiting tasks are cancelled; dependents of a cancelled task are blocked."""
        tasks = await self.store.tasks(plan_id)
        if task_id is not None:
            await self.store.task(plan_id, task_id)  # NotFoundError naming the tasks
            tasks = [t for t in tasks if t.id == task_id]
        else:
            await self.store.update_plan(plan_id, state=PlanState.CANCELLED)
            self._active.discard(plan_id)
        for task in tasks:
            run = self._runs.get(task.ref)
            if run is not None:
                run.cancel("cancelled by request")
            elif task.state in (TaskState.PENDING, TaskState.READY, TaskState.SUCCEEDED):
                with contextlib.suppress(StateError):
                    await self.store.move(plan_id, task.id, TaskState.CANCELLED, reason="cancelled by request")
        if task_id is None:
            with anyio.move_on_after(self.settings.cancel_grace + 10):
                while any(ref.startswith(plan_id + "/") for ref in self._starting):  # noqa: ASYNC110
                    await anyio.sleep(0.05)
        self._notify()
        return await self.status(plan_id, focus=STATUS_FOCUS)

    # -- the scheduler ------------------------------------------------------------------------

    async def _scheduler(self) -> None:
        # A full pass reads every task of every active plan; it is needed only after a state
        # change (a kick) or when a retry delay or rate-limit pause ends. In between, every
        # 2 s, only look for plans cancelled from another process.
        due = 0.0
        self._wake = anyio.Event()
        while True:
            if self._wake.is_set() or time.time() >= due:
                self._wake = anyio.Event()
                due = time.time() + await self._schedule_once()
            else:
                await self._stop_cancelled()
            with anyio.move_on_after(min(2.0, max(0.0, due - time.time()))):
                await self._wake.wait()
            # State changes come in bursts (a merge moves a task, unblocks others, …): let the
            # burst land so that one pass serves it, instead of one pass per change.
            await anyio.sleep(0.005)

    async def _stop_cancelled(self) -> None:
        for plan_id in list(self._active):
            if (await self.store.plan(plan_id)).state is PlanState.CANCELLED:
                # Cancelled from elsewhere (another process wrote the store): stop its agents.
                self._active.discard(plan_id)
                for ref, run in list(self._runs.items()):
                    if ref.startswith(plan_id + "/"):
                        run.cancel("plan cancelled")

    async def _schedule_once(self) -> float:
        """One pass: promote, block, and start what fits. Returns the longest sensible sleep."""
        clock = time.time()
        next_wake = 3600.0  # no deadline: only a kick starts the next full pass
        candidates: list[tuple[tuple[int, float, int], str, str]] = []
        await self._stop_cancelled()
        for plan_id in list(self._active):
            rows = await self.store.task_rows(plan_id)
            state = {t.id: t.state for t in rows}
            # A conflicted task lives on through its resolve task; when that one failed, it is dead.
            resolution = {t.resolves: t.state for t in rows if t.resolves}
            policy = self._policies.get(plan_id)
            if policy is None:
                policy = self._policies[plan_id] = (await self.store.plan(plan_id)).merge_policy
            lengths = self._path_lengths(plan_id, rows)
            only = self._only.get(plan_id)
            for row in rows:
                current = row.state
                if current is TaskState.PENDING:
                    failed = [d for d in row.deps if _is_dead(state.get(d), policy, resolution.get(d))]
                    if failed:
                        await self.store.move(
                            plan_id, row.id, TaskState.BLOCKED, reason=f"dependency {failed[0]} did not merge"
                        )
                        state[row.id] = TaskState.BLOCKED
                        self._notify()
                        continue
                    if all(state.get(d) is TaskState.MERGED for d in row.deps) and (only is None or row.id in only):
                        if row.not_before and row.not_before > clock:
                            next_wake = min(next_wake, row.not_before - clock)
                            continue
                        await self.store.move(plan_id, row.id, TaskState.READY)
                        current = state[row.id] = TaskState.READY
                if current is TaskState.READY and f"{plan_id}/{row.id}" not in self._starting:
                    key = (-row.priority.rank, -lengths.get(row.id, 1.0), row.seq)
                    candidates.append((key, plan_id, row.id))
            if all(s in FINAL_STATES for s in state.values()):
                await self._settle(plan_id)
        if clock < self._paused_until:
            return min(next_wake, self._paused_until - clock)
        candidates.sort(key=lambda item: item[0])
        free = self.settings.workers - len(self._starting)
        for _, plan_id, task_id in candidates[: max(free, 0)]:
            if clock < self._stagger_until:
                return min(next_wake, self._stagger_until - clock)
            self._starting.add(f"{plan_id}/{task_id}")
            self._tg.start_soon(self._start_task, plan_id, task_id)
            if self._paused_until and self.settings.restart_stagger:
                # Coming out of a rate-limit pause: start agents one by one.
                self._stagger_until = clock + self.settings.restart_stagger
        if clock >= self._stagger_until and self._paused_until:
            self._paused_until = 0.0
        return next_wake

    def _path_lengths(self, plan_id: str, rows: Sequence[Any]) -> dict[str, float]:
        cached = self._lengths.get(plan_id)
        if cached is None or len(cached) != len(rows):
            cached = self._lengths[plan_id] = TaskGraph(rows).critical_path_lengths()
        return cached

    async def _settle(self, plan_id: str) -> None:
        """Mark a plan whose tasks are all final as done."""
        plan = await self.store.plan(plan_id)
        if plan.state is PlanState.RUNNING:
            await self.store.update_plan(plan_id, state=PlanState.DONE)
        self._active.discard(plan_id)
        self._notify()

    async def _start_task(self, plan_id: str, task_id: str) -> None:
        try:
            plan = await self.store.plan(plan_id)
            task = await self.store.task(plan_id, task_id)
        except BaseException:
            self._starting.discard(f"{plan_id}/{task_id}")
            raise
        await self._run_task(plan, task)

    # -- one task ---------------------------------------------------------------------------

    def _worktree_path(self, plan_id: str, task_id: str) -> Path:
        return self.settings.state_dir / "worktrees" / plan_id / task_id

    async def _prepare(self, plan: Plan, task: Task) -> tuple[Path, str, bool]:
        """Create the task's worktree on its branch from the integration tip (or keep it to
        resume an interrupted session). Returns (worktree, base commit, resuming)."""
        branch = f"claudecluster/{plan.id}/{task.id}"
        worktree = self._worktree_path(plan.id, task.id)
        if task.resume and task.session_id and task.base_commit and worktree.is_dir():
            return worktree, task.base_commit, True
        await remove_worktree(self.repo, worktree)
        tip = self._tips.get(plan.id) or await rev_parse(self.repo, f"refs/heads/{plan.integration_branch}")
        await git(self.repo, "update-ref", "-m", "claudecluster: task branch", f"refs/heads/{branch}", tip)
        await add_worktree(self.repo, worktree, branch)
        if task.kind is TaskKind.RESOLVE and task.resolves:
            original = await self.store.task(plan.id, task.resolves)
            assert original.commit is not None
            # Leave the conflicted merge in the worktree for the agent to finish.
            identity = await identity_args(self.repo)
            await git(worktree, *identity, "merge", "--no-commit", "--no-ff", original.commit, ok_codes=(0, 1))
        return worktree, tip, False

    def _prompt(self, plan: Plan, task: Task) -> str:
        if task.kind is TaskKind.RESOLVE:
            return task.prompt
        text = task.prompt
        if task.reason.startswith("gate failed"):
            text += f"\n\nA previous attempt failed the project's checks:\n{task.reason}\nFix that too."
        return (
            f"{text}\n\n(You are one of several agents working in parallel towards: {plan.goal}. "
            "Do only this task. Your changes are committed for you when you finish: do not run "
            "git commit, git checkout or git merge.)"
        )

    async def _run_task(self, plan: Plan, task: Task) -> None:
        run: AgentRun | None = None
        try:
            worktree, base, resuming = await self._prepare(plan, task)
            run = AgentRun(
                AgentSpec(
                    prompt=(
                        "You were interrupted. Continue the task where you left off."
                        if resuming
                        else self._prompt(plan, task)
                    ),
                    cwd=worktree,
                    model=self.settings.model,
                    permission_mode=self.settings.permission_mode,
                    allowed_tools=self.settings.allowed_tools,
                    disallowed_tools=self.settings.disallowed_tools,
                    max_turns=self.settings.max_turns,
                    max_budget_usd=self.settings.max_budget_usd,
                    resume=task.session_id if resuming else None,
                    env=self.settings.agent_env,
                    config_dir=self.settings.claude_config_dir,
                    wall_timeout=self.settings.wall_timeout,
                    inactivity_timeout=self.settings.inactivity_timeout,
                    memory_limit_mb=self.settings.memory_limit_mb,
                    cancel_grace=self.settings.cancel_grace,
                    log_path=self.settings.state_dir / "logs" / plan.id / f"{task.id}.{task.attempts + 1}.log",
                ),
                claude=self.claude,
                on_start=lambda pid, started: self.store.update_task(plan.id, task.id, pid=pid, pid_started=started),
            )
            task = await self.store.move(
                plan.id,
                task.id,
                TaskState.RUNNING,
                attempts=task.attempts + (0 if resuming else 1),
                run_id=run.run_id,
                session_id=run.session_id,
                branch=f"claudecluster/{plan.id}/{task.id}",
                base_commit=base,
                worktree=worktree,
                started_at=now(),
                not_before=None,
                resume=False,
                last_activity="starting",
            )
            self._runs[task.ref] = run
            self._notify()
            outcome = await self._supervise(plan, task, run)
            await self._finish(plan, task, outcome, worktree, base)
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True):
                # The engine is shutting down: the task goes back to the queue, to be
                # resumed by the next process that opens this repository.
                with contextlib.suppress(Exception):
                    current = await self.store.task(plan.id, task.id)
                    if current.state in ACTIVE_STATES or current.state is TaskState.READY:
                        await self.store.move(
                            plan.id,
                            task.id,
                            TaskState.PENDING,
                            reason="interrupted by shutdown",
                            resume=True,
                        )
            raise
        except Exception as exc:  # a failure of ours (git, store): the task fails, others go on
            with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                current = await self.store.task(plan.id, task.id)
                target = TaskState.FAILED if current.state in ACTIVE_STATES else TaskState.BLOCKED
                await self.store.move(plan.id, task.id, target, reason=f"claudecluster error: {exc}")
            if not isinstance(exc, (StateError, NotFoundError)):
                import logging

                logging.getLogger(__name__).exception("task %s failed inside the engine", task.ref)
        finally:
            self._runs.pop(task.ref, None)
            self._starting.discard(task.ref)
            self._notify()

    async def _supervise(self, plan: Plan, task: Task, run: AgentRun) -> AgentOutcome:
        """Run the agent while recording its events and live progress in the store."""
        send, receive = anyio.create_memory_object_stream[AgentEvent](math.inf)
        run._on_event = send.send_nowait  # the runner calls it synchronously from its reader

        async def record() -> None:
            async with receive:
                async for event in receive:
                    if isinstance(event, StderrLine):
                        continue
                    data = event.model_dump(mode="json", exclude={"raw"})
                    for key in ("text", "content"):
                        if isinstance(data.get(key), str) and len(data[key]) > 2000:
                            data[key] = data[key][:2000] + "…"
                    await self.store.append_event(plan.id, task.id, event.kind, data)
                    fields: dict[str, Any] = {"last_activity": _summary(event), "turns": run.turns}
                    if isinstance(event, ApiRetry) and task.state is TaskState.RUNNING:
                        with contextlib.suppress(StateError):
                            await self.store.move(plan.id, task.id, TaskState.WAITING)
                            task.state = TaskState.WAITING
                    elif isinstance(event, (AssistantText, ToolResult)) and task.state is TaskState.WAITING:
                        with contextlib.suppress(StateError):
                            await self.store.move(plan.id, task.id, TaskState.RUNNING)
                            task.state = TaskState.RUNNING
                    await self.store.update_task(plan.id, task.id, **fields)

        async with anyio.create_task_group() as tg:
            tg.start_soon(record)
            with send:
                outcome = await run.run()
        return outcome

    async def _finish(self, plan: Plan, task: Task, outcome: AgentOutcome, worktree: Path, base: str) -> None:
        results = {
            "turns": outcome.num_turns,
            "cost_usd": task.cost_usd + outcome.cost_usd,
            "input_tokens": task.input_tokens + outcome.usage.input_tokens,
            "output_tokens": task.output_tokens + outcome.usage.output_tokens,
            "session_id": outcome.session_id,
            "pid": None,
            "finished_at": now(),
        }
        if outcome.ok:
            if task.kind is TaskKind.RESOLVE:
                leftover = await _conflict_markers(worktree)
                if leftover:
                    await self.store.move(
                        plan.id,
                        task.id,
                        TaskState.FAILED,
                        reason=f"conflict markers remain in {', '.join(leftover)}",
                        **results,
                    )
                    return
            committed = await commit_all(worktree, _commit_message(plan, task, outcome))
            head = await rev_parse(worktree, "HEAD")
            files = await changed_files(self.repo, base, head)
            await self.store.move(
                plan.id,
                task.id,
                TaskState.SUCCEEDED,
                commit=head,
                changed_files=files,
                reason="" if committed or files else "succeeded with no changes",
                last_activity="done",
                **results,
            )
            await self._enqueue_merge(plan.id, task.id)
            return
        if outcome.status is OutcomeStatus.CANCELLED:
            await self.store.move(plan.id, task.id, TaskState.CANCELLED, reason=outcome.reason, **results)
            return
        if outcome.status is OutcomeStatus.RATE_LIMITED:
            pauses = self._rate_limit_pauses.get(task.ref, 0) + 1
            self._rate_limit_pauses[task.ref] = pauses
            if pauses <= self.settings.max_rate_limit_pauses:
                pause = outcome.retry_after_s or self.settings.rate_limit_pause
                self._paused_until = max(self._paused_until, time.time() + pause)
                await self.store.append_event(plan.id, task.id, "pool_paused", {"seconds": pause})
                # A rate limit is not the task's fault: it does not use up an attempt.
                await self.store.move(
                    plan.id,
                    task.id,
                    TaskState.PENDING,
                    reason=f"rate limited: {outcome.reason}",
                    attempts=task.attempts - 1,
                    not_before=self._paused_until,
                    **results,
                )
                return
        decision = decide_retry(outcome, task.attempts, self.settings)
        if decision.retry:
            await self.store.move(
                plan.id,
                task.id,
                TaskState.PENDING,
                reason=f"retrying: {outcome.reason}",
                not_before=time.time() + decision.delay,
                **results,
            )
            return
        final = TaskState.TIMED_OUT if outcome.status is OutcomeStatus.TIMED_OUT else TaskState.FAILED
        await self.store.move(plan.id, task.id, final, reason=outcome.reason or outcome.status.value, **results)

    # -- the merge queue ----------------------------------------------------------------------

    async def _enqueue_merge(self, plan_id: str, task_id: str) -> None:
        if (plan_id, task_id) not in self._queued_merges:
            self._queued_merges.add((plan_id, task_id))
            await self._merge_send.send((plan_id, task_id))

    async def _merger(self) -> None:
        async with self._merge_recv:
            async for plan_id, task_id in self._merge_recv:
                self._queued_merges.discard((plan_id, task_id))
                try:
                    with anyio.CancelScope(shield=True):
                        await self._merge_task(plan_id, task_id)
                except Exception as exc:
                    import logging

                    logging.getLogger(__name__).exception("merging %s/%s failed", plan_id, task_id)
                    with contextlib.suppress(Exception):
                        await self.store.move(plan_id, task_id, TaskState.CONFLICTED, reason=f"merge failed: {exc}")
                self._notify()

    async def _merge_task(self, plan_id: str, task_id: str) -> None:
        plan = await self.store.plan(plan_id)
        task = await self.store.task(plan_id, task_id)
        if task.state is not TaskState.SUCCEEDED or task.commit is None:
            return
        result = await merge_into(
            self.repo,
            plan.integration_branch,
            task.commit,
            f"Merge task {task.id}: {task.title or task.id}\n\nclaudecluster plan {plan.id}",
            gate=plan.gate,
            gate_timeout=self.settings.gate_timeout,
            journal=lambda ref, old, new: self.store.begin_merge(plan.id, task.id, ref, old, new),
            journal_end=self.store.end_merge,
            base=task.base_commit,
            tip_hint=self._tips.get(plan.id),
        )
        if result.new_tip:
            self._tips[plan.id] = result.new_tip
        if result.outcome in (MergeOutcome.MERGED, MergeOutcome.ALREADY_MERGED):
            await self._mark_merged(plan, task, result.new_tip)
        elif result.outcome is MergeOutcome.GATE_FAILED:
            assert result.gate is not None
            reason = f"gate failed (exit {result.gate.returncode}):\n{result.gate.output[-1500:]}"
            await self.store.move(plan.id, task.id, TaskState.GATE_FAILED, reason=reason)
            if task.attempts <= self.settings.gate_retries:
                await self.store.move(plan.id, task.id, TaskState.PENDING, reason=reason)
        else:
            await self._conflict(plan, task, result.conflicts)

    async def _mark_merged(self, plan: Plan, task: Task, tip: str | None) -> None:
        await self.store.move(plan.id, task.id, TaskState.MERGED, merge_commit=tip, last_activity="merged")
        if task.resolves:
            with contextlib.suppress(StateError):
                await self.store.move(
                    plan.id,
                    task.resolves,
                    TaskState.MERGED,
                    merge_commit=tip,
                    reason=f"resolved by {task.id}",
                )
        if task.worktree is not None:
            # Off the merge queue's path: the next merge need not wait for the files to go.
            self._tg.start_soon(remove_worktree, self.repo, task.worktree)

    async def _conflict(self, plan: Plan, task: Task, files: list[str]) -> None:
        listed = ", ".join(files)
        if plan.merge_policy is MergePolicy.RESOLVE and task.kind is TaskKind.TASK:
            resolve_id = await self._free_id(plan.id, f"{task.id}.resolve")
            merged = [t for t in await self.store.tasks(plan.id) if t.state is TaskState.MERGED]
            touching = [t for t in merged if set(t.changed_files) & set(files)] or merged
            others = "\n".join(f"- {t.id} ({t.title or t.id}): {t.prompt}" for t in touching[-5:])
            prompt = (
                f"[claudecluster:resolve] {task.id}\n"
                f"This worktree holds an unfinished git merge of task {task.id!r} into the plan's "
                f"integration branch. These files have conflicts: {listed}.\n\n"
                f"Task {task.id!r} ({task.title or task.id}) was asked to:\n{task.prompt}\n\n"
                f"The integration branch already holds the work of:\n{others or '- (nothing else)'}\n\n"
                "Edit the conflicted files so that both intents are kept and every conflict marker "
                "(<<<<<<<, =======, >>>>>>>) is gone. Do not run git commit: claudecluster concludes "
                "the merge when you finish."
            )
            stamp = now()
            await self.store.add_task(
                Task(
                    plan_id=plan.id,
                    id=resolve_id,
                    title=f"Resolve conflicts of {task.id}",
                    prompt=prompt,
                    kind=TaskKind.RESOLVE,
                    resolves=task.id,
                    priority=task.priority,
                    category=task.category,
                    files=files,
                    created_at=stamp,
                    updated_at=stamp,
                )
            )
            await self.store.move(
                plan.id,
                task.id,
                TaskState.CONFLICTED,
                reason=f"conflicts in {listed}; resolving in {resolve_id}",
            )
            return
        branch = f"claudecluster/{plan.id}/{task.id}"
        await self.store.move(
            plan.id,
            task.id,
            TaskState.CONFLICTED,
            reason=(
                f"conflicts in {listed}. To resolve by hand: git switch {plan.integration_branch} && "
                f"git merge {branch} (fix the files, then git commit)"
            ),
        )

    async def _free_id(self, plan_id: str, wanted: str) -> str:
        existing = {t.id for t in await self.store.tasks(plan_id)}
        candidate, n = wanted, 1
        while candidate in existing:
            n += 1
            candidate = f"{wanted}{n}"
        return candidate

    # -- the final merge ----------------------------------------------------------------------

    async def merge(self, plan_id: str, target: str | None = None, *, dry_run: bool = False) -> FinalMerge:
        """Merge the plan's integration branch into ``target`` (default: the plan's target
        branch): fast-forward when possible, else a merge commit after a clean merge-tree
        check. Refuses a dirty checked-out target; records the previous tip for undo."""
        status = await self.status(plan_id)
        plan = status.plan
        unfinished = [t.id for t in status.tasks if t.state not in FINAL_STATES]
        if unfinished:
            raise StateError(f"plan {plan_id} is still running (tasks {', '.join(unfinished)}); wait for it first")
        target = target or plan.target_branch
        await check_branch_name(self.repo, target)
        ref = f"refs/heads/{target}"
        source = await rev_parse(self.repo, f"refs/heads/{plan.integration_branch}")
        exists = (await git(self.repo, "rev-parse", "--verify", "--quiet", ref, check=False)).returncode == 0
        previous = await rev_parse(self.repo, ref) if exists else None
        report = FinalMerge(
            plan_id=plan_id,
            target=target,
            kind="fast-forward",
            dry_run=dry_run,
            previous_tip=previous,
            new_tip=source,
            tasks={t.id: t.state.value for t in status.tasks},
        )
        if previous is not None and await is_ancestor(self.repo, source, previous):
            return report.model_copy(update={"kind": "up-to-date", "new_tip": previous})
        if previous is not None and not await is_ancestor(self.repo, previous, source):
            check = await merge_tree(self.repo, previous, source)
            if not check.clean:
                return report.model_copy(update={"kind": "conflict", "new_tip": None, "conflicts": check.conflicts})
            report = report.model_copy(update={"kind": "merge", "new_tip": None})
        if dry_run:
            return report
        checked_out = await worktree_of_branch(self.repo, target)
        message = f"Merge claudecluster plan {plan.id}: {plan.goal[:60]}"
        if checked_out is not None:
            await require_clean(checked_out, f"merging plan {plan_id} into {target}")
            args = ["merge", "--no-edit", "-m", message, plan.integration_branch]
            await git(checked_out, *args)
        elif report.kind == "merge":
            assert previous is not None
            tree = (await merge_tree(self.repo, previous, source)).tree
            made = await git(self.repo, "commit-tree", tree, "-p", previous, "-p", source, "-m", message)
            if not await update_ref(self.repo, ref, made.stdout.strip(), previous, message):
                raise StateError(f"{target} moved during the merge; run merge again")
        elif not await update_ref(self.repo, ref, source, previous, message):
            raise StateError(f"{target} moved during the merge; run merge again")
        new_tip = await rev_parse(self.repo, ref)
        undo = f"git update-ref refs/heads/{target} {previous} {new_tip}" if previous else f"git branch -D {target}"
        report = report.model_copy(update={"new_tip": new_tip, "undo": undo})
        await self.store.update_plan(plan_id, state=PlanState.MERGED, final_merge=report.model_dump(mode="json"))
        return report

    # -- recovery -----------------------------------------------------------------------------

    async def _recover(self) -> None:
        """Make the store true again after a process died holding it: settle half-done ref
        updates, kill leftover agents, re-queue (or resume) interrupted tasks, re-queue
        merges, and continue the plans that were running."""
        for entry in await self.store.open_merges():
            tip = (await git(self.repo, "rev-parse", "--verify", "--quiet", entry["ref"], check=False)).stdout.strip()
            done = tip == entry["new"]
            await self.store.end_merge(entry["seq"], "done" if done else "undone")
            if done and entry["task_id"]:
                task = await self.store.task(entry["plan_id"], entry["task_id"])
                if task.state is TaskState.SUCCEEDED:
                    plan = await self.store.plan(entry["plan_id"])
                    await self._mark_merged(plan, task, tip)
        for plan in await self.store.plans([PlanState.RUNNING]):
            for task in await self.store.tasks(plan.id):
                if task.state in ACTIVE_STATES:
                    await anyio.to_thread.run_sync(_kill_leftovers, task)
                    progressed = await self._has_progress(task)
                    await self.store.move(
                        plan.id,
                        task.id,
                        TaskState.PENDING,
                        reason="interrupted: the engine stopped" + ("; resuming its session" if progressed else ""),
                        resume=progressed,
                        pid=None,
                    )
                elif task.state is TaskState.READY:
                    await self.store.move(plan.id, task.id, TaskState.PENDING)
                elif task.state is TaskState.SUCCEEDED:
                    await self._enqueue_merge(plan.id, task.id)
            self._active.add(plan.id)

    async def _has_progress(self, task: Task) -> bool:
        if not (task.session_id and task.worktree and task.base_commit and task.worktree.is_dir()):
            return False
        with contextlib.suppress(Exception):
            dirty = await git(task.worktree, "status", "--porcelain")
            head = await rev_parse(task.worktree, "HEAD")
            return bool(dirty.stdout.strip()) or head != task.base_commit
        return False


class _EngineLease:
    """An exclusive ``flock`` on the repository's engine lock file, held while a Cluster is
    open: two engines on one repository would recover (kill) each other's agents and race
    on its refs. The kernel releases it when the process dies, so a crash never leaves it."""

    def __init__(self, path: Path, repo: Path) -> None:
        self.path = path
        self.repo = repo
        self._fd: int | None = None

    def __enter__(self) -> _EngineLease:
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


def _kill_leftovers(task: Task) -> None:
    """Kill what is left of an agent run a dead process supervised (by pid + start time and
    by the run's environment tag)."""
    if not task.run_id:
        return
    tree = ProcessTree(root=task.pid or -1, tag=task.run_id, everywhere=True)
    if task.pid and task.pid_started:
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(task.pid)
            if abs(proc.create_time() - task.pid_started) < 1.0:
                tree.seen[task.pid] = proc.create_time()
                for child in proc.children(recursive=True):
                    with contextlib.suppress(psutil.Error):
                        tree.seen[child.pid] = child.create_time()
    tree.root = -1  # we are not its parent: nothing of ours to leave for ptyprocess
    tree.kill_all()
    shutil.rmtree(run_tmpdir(task.run_id), ignore_errors=True)


async def _conflict_markers(worktree: Path) -> list[str]:
    files = await git(worktree, "diff", "--name-only", "-z", "HEAD", "--")
    untracked = await git(worktree, "ls-files", "--others", "--exclude-standard", "-z")
    leftover = []
    for name in {n for n in (files.stdout + untracked.stdout).split("\0") if n}:
        path = worktree / name
        with contextlib.suppress(OSError, UnicodeDecodeError):
            if path.is_file() and _CONFLICT_MARKER.search(path.read_text()):
                leftover.append(name)
    return sorted(leftover)


def _commit_message(plan: Plan, task: Task, outcome: AgentOutcome) -> str:
    title = task.title or task.id
    summary = (outcome.final_text or "").strip()[:1000]
    return f"{title}\n\n{summary}\n\nclaudecluster plan {plan.id}, task {task.id}".replace("\n\n\n", "\n\n")


def _is_dead(state: TaskState | None, policy: MergePolicy, resolution: TaskState | None = None) -> bool:
    """True when a dependency in ``state`` will never be merged (``resolution``: the state of
    its resolve task, if it has one)."""
    if state is None:
        return False
    if state is TaskState.CONFLICTED:
        if policy is MergePolicy.REPORT:
            return True
        return resolution is not None and resolution in FINAL_STATES and resolution is not TaskState.MERGED
    return state in FINAL_STATES and state is not TaskState.MERGED


def _check_workers(count: int) -> int:
    if not 1 <= count <= MAX_WORKERS:
        raise ConfigError(f"workers must be between 1 and {MAX_WORKERS}, not {count}")
    return count


def _parse_tasks(tasks: Sequence[TaskSpec | Mapping[str, Any]]) -> list[TaskSpec]:
    specs: list[TaskSpec] = []
    problems: list[str] = []
    for index, item in enumerate(tasks):
        try:
            specs.append(item if isinstance(item, TaskSpec) else TaskSpec.model_validate(item))
        except ValidationError as exc:
            label = item.get("id", f"#{index + 1}") if isinstance(item, Mapping) else f"#{index + 1}"
            for err in exc.errors():
                where = ".".join(str(p) for p in err["loc"]) or "task"
                problems.append(f"task {label}: {where}: {err['msg']}")
    if problems:
        raise PlanValidationError("invalid plan: " + "; ".join(problems))
    return specs


def _serialize(specs: list[TaskSpec], overlaps: list[tuple[str, str, str]]) -> list[TaskSpec]:
    order = {tid: i for i, tid in enumerate(TaskGraph(specs).topological_order())}
    extra: dict[str, set[str]] = {}
    for a, b, _ in overlaps:
        first, second = sorted((a, b), key=order.__getitem__)
        extra.setdefault(second, set()).add(first)
    return [s.model_copy(update={"deps": [*s.deps, *sorted(extra.get(s.id, set()) - set(s.deps))]}) for s in specs]
