"""Running one task: prepare its worktree on the integration tip and set it up (copy_files,
setup), start its agent through the placement with its own block of ports, record the
agent's events, progress and denials, then commit its work and queue it for merging — or
decide, from the outcome, to retry, pause the pool for a rate limit, or fail.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from pathlib import Path
from typing import Any

import anyio

from .agent_spec import AgentSpec
from .denials import DenialWatch
from .diskfull import add_worktree_or_full, commit_or_full, disk_full, until_written
from .errors import ClusterError, DiskFullError, NotFoundError, StateError, leaves
from .event_log import EventLog
from .events import AgentEvent
from .merge_queue import MergeQueue
from .models import ACTIVE_STATES, Plan, Task, TaskKind, TaskState
from .outcome import AgentOutcome, OutcomeStatus
from .placement import AgentHandle, AgentPlacement
from .ports import PORTS, PortBlocks, fleet_env
from .proctree import RUN_TAG_VAR
from .prompts import RESUME_PROMPT, commit_message, task_prompt
from .rate_limits import RateLimits, Stop
from .redact import private_dir, redactor, register_secrets
from .retry import RateLimitPause, decide_retry
from .settings import EngineSettings
from .signals import Pulse
from .store import Store, now
from .task_worktree import (
    conflict_markers,
    copied_paths,
    drop_interrupted_writes,
    has_progress,
    requeue_interrupted,
    set_up,
)
from .workspace import (
    changed_files,
    changes_fingerprint,
    git,
    identity_args,
    remove_worktree,
    rev_parse,
)

__all__ = ["TaskRunner", "has_progress"]

logger = logging.getLogger(__name__)
_NO_SESSION = "No conversation found with session ID"  # claude --resume of a session it never saved


class TaskRunner:
    """Runs tasks of one repository's plans as agents; ``runs`` holds the live ones."""

    def __init__(
        self,
        repo: Path,
        store: Store,
        settings: EngineSettings,
        placement: AgentPlacement,
        pulse: Pulse,
        pause: RateLimitPause,
        merges: MergeQueue,
        ports: PortBlocks = PORTS,
    ) -> None:
        self.repo = repo
        self.store = store
        self.settings = settings
        self.placement = placement
        self.pulse = pulse
        self.merges = merges
        self.runs: dict[str, AgentHandle] = {}
        self.limits = RateLimits(store, settings, pause, self.runs, pulse)
        self.ports = ports
        self._setups: dict[str, anyio.CancelScope] = {}  # tasks whose worktree is being set up
        self._stop_reasons: dict[str, str] = {}
        self._halted: dict[str, str] = {}  # plan → why none of its agents may start
        # Once per engine, not per run: the agents' secrets and the private state directories.
        register_secrets(settings.agent_env)
        self.events = EventLog(store, redactor(settings.agent_env), self.limits)
        state = settings.state_dir
        for directory in (state, state / "logs", state / "worktrees"):
            private_dir(directory)

    def cancel(self, plan_id: str, task_id: str | None = None, reason: str = "cancelled by request") -> bool:
        """Stop the running agent (or the worktree setup) of a task, or of every task of the
        plan; False if none runs."""

        def wanted(ref: str) -> bool:
            return ref == f"{plan_id}/{task_id}" or (task_id is None and ref.startswith(plan_id + "/"))

        for ref, scope in list(self._setups.items()):
            if wanted(ref):
                self._stop_reasons[ref] = reason
                scope.cancel()
        for ref, run in list(self.runs.items()):
            if wanted(ref):
                self.limits.cancelling(ref, reason)
                run.cancel(reason)
        return any(wanted(ref) for ref in [*self._setups, *self.runs])

    def halt(self, plan_id: str, reason: str) -> None:
        """No more agent of the plan starts: its tasks handed over are cancelled with ``reason``."""
        self._halted[plan_id] = reason

    async def run(self, plan_id: str, task_id: str) -> None:
        """Run one task to its next state; never raises for a failure of the task itself."""
        try:
            plan = await self.store.plan(plan_id)
            task = await self.store.task(plan_id, task_id)
        except ClusterError:  # gone or unreadable: the scheduler's next pass sees to the plan
            logger.exception("cannot start task %s/%s", plan_id, task_id)
            return
        try:
            await self._attempt(plan, task)
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True):
                await requeue_interrupted(self.store, plan, task)
            raise
        except Exception as exc:  # a failure of ours (git, store, a full disk): the task fails, others go on
            cause = leaves(exc)[0]
            reason = str(cause) if isinstance(cause, DiskFullError) else f"claudecluster error: {cause}"
            await _record_failure(self.store, plan, task, reason)
            if not isinstance(cause, (StateError, NotFoundError, DiskFullError)):
                logger.exception("task %s failed inside the engine", task.ref)
        finally:
            self.runs.pop(task.ref, None)
            self.limits.ended(task.ref)
            self.pulse.notify()

    async def _attempt(self, plan: Plan, task: Task) -> None:
        with self.ports.block(self.settings.port_base, self.settings.ports_per_task) as port_base:
            await self._attempt_with(plan, task, fleet_env(plan.id, task.id, port_base))

    async def _attempt_with(self, plan: Plan, task: Task, fleet: dict[str, str]) -> None:
        worktree, base, resuming = await self._prepare(plan, task)
        send, receive = anyio.create_memory_object_stream[AgentEvent](math.inf)
        with send, receive:  # closed on every path, also when the agent never starts
            options = self.settings.agent_options()
            spec = AgentSpec(
                prompt=RESUME_PROMPT if resuming else task_prompt(plan, task),
                cwd=worktree,
                resume=task.session_id if resuming else None,
                log_path=self.settings.state_dir / "logs" / plan.id / f"{task.id}.{task.attempts + 1}.log",
                **{**options, "env": {**options["env"], **fleet}},
            )

            async def started(pid: int, at: float) -> None:
                # The session exists once claude runs: a crash during setup leaves none to resume.
                await self.store.update_task(plan.id, task.id, pid=pid, pid_started=at, session_id=handle.session_id)

            handle = self.placement.agent(spec, on_event=send.send_nowait, on_start=started)
            task = await self.store.move(
                plan.id,
                task.id,
                TaskState.RUNNING,
                attempts=task.attempts + (0 if resuming else 1),
                run_id=handle.run_id,
                session_id=handle.session_id if resuming else None,
                branch=f"claudecluster/{plan.id}/{task.id}",
                base_commit=base,
                worktree=worktree,
                started_at=now(),
                not_before=None,
                resume=False,
                last_activity="starting" if resuming else "setting up",
            )
            # Tagged as the agent's run: crash recovery sweeps what a setup left, too.
            tagged = {**fleet, RUN_TAG_VAR: handle.run_id}
            if not resuming and not await self._set_up(plan, task, worktree, tagged):
                return
            halted = self._halted.get(plan.id)  # its plan's budget was reached meanwhile
            if halted is not None:
                await self.store.move(plan.id, task.id, TaskState.CANCELLED, reason=halted, finished_at=now())
                return
            self.runs[task.ref] = handle
            self.pulse.notify()
            # Unconfined, an agent can write the user's checkout: notice it (_written_outside).
            before = await changes_fingerprint(self.repo) if self.settings.isolation == "none" else None
            denials = DenialWatch(sandboxed=self.settings.isolation != "none")
            private_dir(self.settings.state_dir / "logs" / plan.id)  # the agent's transcript goes there
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self.events.record, plan, task, handle, receive, denials)
                    with send:
                        outcome = await handle.run()
            except Exception as exc:
                full = [leaf for leaf in leaves(exc) if disk_full(leaf)]
                if full:
                    raise DiskFullError(f"disk full while the agent ran (its transcript or events): {full[0]}") from exc
                raise
        await self.events.warn(plan, task, denials.result(outcome.permission_denials))
        outside = await self._written_outside(before) if before is not None else []
        if resuming and _NO_SESSION in outcome.reason:
            # Killed before Claude Code saved its session, the run looked like progress (a
            # resolve task's worktree holds its unfinished merge from the start): run afresh.
            reason = f"could not resume ({outcome.reason}); starting afresh"
            await self.store.move(plan.id, task.id, TaskState.PENDING, reason=reason, resume=False, pid=None)
            return
        await self._finish(plan, task, outcome, worktree, base, outside)

    async def _set_up(self, plan: Plan, task: Task, worktree: Path, env: dict[str, str]) -> bool:
        """Copy files into the new worktree and run the setup command; False (the task
        failed or was cancelled) when its agent must not start."""
        settings = self.settings
        if not settings.copy_files and not settings.setup:
            return True
        scope = self._setups[task.ref] = anyio.CancelScope()
        try:
            with scope:
                result = await set_up(
                    self.repo,
                    worktree,
                    globs=settings.copy_files,
                    command=settings.setup,
                    timeout=settings.setup_timeout,
                    sandbox=settings.sandbox_policy(),
                    env=env,
                )
        finally:
            self._setups.pop(task.ref, None)
        if scope.cancel_called:
            reason = self._stop_reasons.pop(task.ref, "cancelled during its setup")
            await self.store.move(plan.id, task.id, TaskState.CANCELLED, reason=reason, finished_at=now())
            return False
        await self.store.append_event(plan.id, task.id, "setup", result.event())
        setup_s = round((task.setup_s or 0.0) + result.seconds, 3)
        if not result.ok:
            fields: dict[str, Any] = {"setup_s": setup_s, "finished_at": now(), "last_activity": "setup failed"}
            await self.store.move(plan.id, task.id, TaskState.FAILED, reason=result.reason(), **fields)
            return False
        await self.store.update_task(plan.id, task.id, setup_s=setup_s, last_activity="starting")
        return True

    async def _prepare(self, plan: Plan, task: Task) -> tuple[Path, str, bool]:
        """Create the task's worktree on its branch from the integration tip (or keep it to
        resume an interrupted session). Returns (worktree, base commit, resuming)."""
        branch = f"claudecluster/{plan.id}/{task.id}"
        worktree = self.settings.state_dir / "worktrees" / plan.id / task.id
        if task.resume and task.session_id and task.base_commit and worktree.is_dir():
            await drop_interrupted_writes(worktree)
            return worktree, task.base_commit, True
        await remove_worktree(self.repo, worktree)
        tip = await self.merges.integration_tip(plan)
        await git(self.repo, "update-ref", "-m", "claudecluster: task branch", f"refs/heads/{branch}", tip)
        await add_worktree_or_full(self.repo, worktree, branch, tip)
        if task.kind is TaskKind.RESOLVE and task.resolves:
            original = await self.store.task(plan.id, task.resolves)
            assert original.commit is not None
            # Leave the conflicted merge in the worktree for the agent to finish.
            identity = await identity_args(self.repo)
            await git(worktree, *identity, "merge", "--no-commit", "--no-ff", original.commit, ok_codes=(0, 1))
        return worktree, tip, False

    async def _written_outside(self, before: dict[str, tuple[int, int]]) -> list[str]:
        """Files of the user's checkout written while the agent ran (under ``none``, where
        nothing stops it): its task is held instead of merged. Edits of your own made at the
        same time look the same, and hold the task too, for you to approve."""
        after = await changes_fingerprint(self.repo)
        return sorted(name for name in after.keys() | before.keys() if after.get(name) != before.get(name))

    async def _finish(
        self, plan: Plan, task: Task, outcome: AgentOutcome, worktree: Path, base: str, outside: list[str]
    ) -> None:
        results = {
            "turns": outcome.num_turns,
            "cost_usd": task.cost_usd + outcome.cost_usd,
            "input_tokens": task.input_tokens + outcome.usage.input_tokens,
            "output_tokens": task.output_tokens + outcome.usage.output_tokens,
            "session_id": outcome.session_id,
            "pid": None,
            "finished_at": now(),
        }
        stop, cancelled = self.limits.stopped(task.ref, outcome)
        if outcome.ok:
            await self._succeeded(plan, task, outcome, worktree, base, results, outside)
        elif stop is Stop.WOKEN:
            await self.limits.requeue(plan, task, outcome, results, "woken after a rate-limit storm", time.time())
        elif stop is Stop.PARKED or outcome.status is OutcomeStatus.RATE_LIMITED:
            if not await self.limits.paused(plan, task, outcome, results):
                reason = f"rate limited (more than {self.settings.max_rate_limit_pauses} pauses): {outcome.reason}"
                await self.store.move(plan.id, task.id, TaskState.FAILED, reason=reason, **results)
        elif outcome.status is OutcomeStatus.CANCELLED:
            reason = cancelled or outcome.reason
            await self.store.move(plan.id, task.id, TaskState.CANCELLED, reason=reason, **results)
        else:
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
            else:
                final = TaskState.TIMED_OUT if outcome.status is OutcomeStatus.TIMED_OUT else TaskState.FAILED
                await self.store.move(plan.id, task.id, final, reason=outcome.reason or outcome.status.value, **results)

    async def _succeeded(
        self,
        plan: Plan,
        task: Task,
        outcome: AgentOutcome,
        worktree: Path,
        base: str,
        results: dict[str, Any],
        outside: list[str],
    ) -> None:
        if task.kind is TaskKind.RESOLVE:
            leftover = await conflict_markers(worktree)
            if leftover:
                reason = f"conflict markers remain in {', '.join(leftover)}"
                await self.store.move(plan.id, task.id, TaskState.FAILED, reason=reason, **results)
                return
        copies = await copied_paths(self.repo, worktree, self.settings.copy_files)
        try:
            committed = await commit_or_full(self.repo, worktree, commit_message(plan, task, outcome), exclude=copies)
        except DiskFullError as exc:
            fail = functools.partial(self.store.move, plan.id, task.id, TaskState.FAILED, reason=str(exc), **results)
            await until_written(fail, f"the failure of task {task.ref}")
            return
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
        if outside:
            listed = ", ".join(outside[:10]) + (f" and {len(outside) - 10} more" if len(outside) > 10 else "")
            reason = (
                f"the repository's checkout changed while this agent ran unconfined (isolation none): {listed}; "
                f"check those files, then approve (claudecluster approve {plan.id}:{task.id}) or reject it"
            )
            await self.store.move(plan.id, task.id, TaskState.HELD, reason=reason)
            return
        await self.merges.enqueue(plan.id, task.id)


async def _record_failure(store: Store, plan: Plan, task: Task, reason: str) -> None:
    """End a task that failed inside the engine: failed (or blocked, if it was not about to
    run). On a full disk the record is retried until it is written (or the engine stops):
    the task keeps its slot meanwhile, so it is not started again and again."""

    async def write() -> None:
        current = await store.task(plan.id, task.id)
        runnable = current.state in ACTIVE_STATES or current.state is TaskState.READY
        await store.move(plan.id, task.id, TaskState.FAILED if runnable else TaskState.BLOCKED, reason=reason)

    try:
        await until_written(write, f"the failure of task {task.ref}")
    except (StateError, NotFoundError):
        pass
    except Exception:  # the task stays where it was; recovery sees to it on the next open
        logger.exception("cannot record the failure of task %s", task.ref)
