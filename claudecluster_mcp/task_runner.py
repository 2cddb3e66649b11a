"""Running one task: prepare its worktree on the integration tip, start its agent through
the placement, record the agent's events and progress, then commit its work and queue it for
merging — or decide, from the outcome, to retry, pause the pool for a rate limit, or fail.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import time
from pathlib import Path
from typing import Any

import anyio

from .agent_spec import AgentSpec
from .errors import ClusterError, NotFoundError, StateError
from .events import AgentEvent, ApiRetry, AssistantText, ResultEvent, StderrLine, ToolResult, ToolUse
from .merge_queue import MergeQueue
from .models import ACTIVE_STATES, Plan, Task, TaskKind, TaskState
from .outcome import AgentOutcome, OutcomeStatus
from .placement import AgentHandle, AgentPlacement
from .prompts import RESUME_PROMPT, commit_message, task_prompt
from .redact import private_dir, redact, redactor, register_secrets
from .retry import FIRST_RATE_LIMIT_PAUSE, RateLimitPause, decide_retry
from .settings import EngineSettings
from .signals import Pulse
from .store import Store, now
from .workspace import (
    add_worktree,
    changed_files,
    changes_fingerprint,
    commit_all,
    git,
    identity_args,
    remove_worktree,
    rev_parse,
)

__all__ = ["TaskRunner", "has_progress"]

logger = logging.getLogger(__name__)
_CONFLICT_MARKER = re.compile(r"^(<{7}|>{7})( |$)", re.MULTILINE)


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
    ) -> None:
        self.repo = repo
        self.store = store
        self.settings = settings
        self.placement = placement
        self.pulse = pulse
        self.pause = pause
        # Pauses of unknown length start short and back off up to rate_limit_pause.
        pause.cap = settings.rate_limit_pause
        pause.first = min(FIRST_RATE_LIMIT_PAUSE, settings.rate_limit_pause)
        self.merges = merges
        self.runs: dict[str, AgentHandle] = {}
        self._rate_limit_pauses: dict[str, int] = {}
        self._parked: set[str] = set()  # agents stopped to wait out a rate-limit storm
        self._cancelled: dict[str, str] = {}  # parked agents cancelled before they ended → why
        # Once per engine, not per run: the agents' secrets and the private state directories.
        register_secrets(settings.agent_env)
        self._secrets = redactor(settings.agent_env)
        state = settings.state_dir
        for directory in (state, state / "logs", state / "worktrees"):
            private_dir(directory)

    def cancel(self, plan_id: str, task_id: str | None = None, reason: str = "cancelled by request") -> bool:
        """Stop the running agent of a task (or every agent of the plan); False if none runs."""
        found = False
        for ref, run in list(self.runs.items()):
            if ref == f"{plan_id}/{task_id}" or (task_id is None and ref.startswith(plan_id + "/")):
                if ref in self._parked:  # stopping already, to be resumed: the cancel wins
                    self._parked.discard(ref)
                    self._cancelled[ref] = reason
                run.cancel(reason)
                found = True
        return found

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
                await _requeue_interrupted(self.store, plan, task)
            raise
        except Exception as exc:  # a failure of ours (git, store): the task fails, others go on
            with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                current = await self.store.task(plan.id, task.id)
                target = TaskState.FAILED if current.state in ACTIVE_STATES else TaskState.BLOCKED
                await self.store.move(plan.id, task.id, target, reason=f"claudecluster error: {exc}")
            if not isinstance(exc, (StateError, NotFoundError)):
                logger.exception("task %s failed inside the engine", task.ref)
        finally:
            self.runs.pop(task.ref, None)
            self.pause.finished(task.ref, time.time())
            self.pulse.notify()

    async def _attempt(self, plan: Plan, task: Task) -> None:
        worktree, base, resuming = await self._prepare(plan, task)
        send, receive = anyio.create_memory_object_stream[AgentEvent](math.inf)
        with send, receive:  # closed on every path, also when the agent never starts
            spec = AgentSpec(
                prompt=RESUME_PROMPT if resuming else task_prompt(plan, task),
                cwd=worktree,
                resume=task.session_id if resuming else None,
                log_path=self.settings.state_dir / "logs" / plan.id / f"{task.id}.{task.attempts + 1}.log",
                **self.settings.agent_options(),
            )
            handle = self.placement.agent(
                spec,
                on_event=send.send_nowait,
                on_start=lambda pid, started: self.store.update_task(plan.id, task.id, pid=pid, pid_started=started),
            )
            task = await self.store.move(
                plan.id,
                task.id,
                TaskState.RUNNING,
                attempts=task.attempts + (0 if resuming else 1),
                run_id=handle.run_id,
                session_id=handle.session_id,
                branch=f"claudecluster/{plan.id}/{task.id}",
                base_commit=base,
                worktree=worktree,
                started_at=now(),
                not_before=None,
                resume=False,
                last_activity="starting",
            )
            self.runs[task.ref] = handle
            self.pulse.notify()
            # Unconfined, an agent can write the user's checkout: notice it (_written_outside).
            before = await changes_fingerprint(self.repo) if self.settings.isolation == "none" else None
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._record, plan, task, handle, receive)
                with send:
                    outcome = await handle.run()
        outside = await self._written_outside(before) if before is not None else []
        await self._finish(plan, task, outcome, worktree, base, outside)

    async def _prepare(self, plan: Plan, task: Task) -> tuple[Path, str, bool]:
        """Create the task's worktree on its branch from the integration tip (or keep it to
        resume an interrupted session). Returns (worktree, base commit, resuming)."""
        branch = f"claudecluster/{plan.id}/{task.id}"
        worktree = self.settings.state_dir / "worktrees" / plan.id / task.id
        if task.resume and task.session_id and task.base_commit and worktree.is_dir():
            return worktree, task.base_commit, True
        await remove_worktree(self.repo, worktree)
        tip = await self.merges.integration_tip(plan)
        await git(self.repo, "update-ref", "-m", "claudecluster: task branch", f"refs/heads/{branch}", tip)
        await add_worktree(self.repo, worktree, branch)
        if task.kind is TaskKind.RESOLVE and task.resolves:
            original = await self.store.task(plan.id, task.resolves)
            assert original.commit is not None
            # Leave the conflicted merge in the worktree for the agent to finish.
            identity = await identity_args(self.repo)
            await git(worktree, *identity, "merge", "--no-commit", "--no-ff", original.commit, ok_codes=(0, 1))
        return worktree, tip, False

    async def _record(self, plan: Plan, task: Task, handle: AgentHandle, receive: Any) -> None:
        """Store the agent's events and live progress as they come, secrets redacted (before
        any truncation, so that a cut never leaves half a secret)."""
        private_dir(self.settings.state_dir / "logs" / plan.id)
        secrets = self._secrets
        async with receive:
            async for event in receive:
                if isinstance(event, StderrLine):
                    continue
                data = secrets.data(event.model_dump(mode="json", exclude={"raw"}))
                for key in ("text", "content"):
                    if isinstance(data.get(key), str) and len(data[key]) > 2000:
                        data[key] = data[key][:2000] + "…"
                await self.store.append_event(plan.id, task.id, event.kind, data)
                self._watch_rate_limit(task.ref, event)
                target = _state_after(event, task.state)
                if target is not None:
                    with contextlib.suppress(StateError):
                        await self.store.move(plan.id, task.id, target)
                        task.state = target
                await self.store.update_task(plan.id, task.id, last_activity=summary(event), turns=handle.turns)

    def _watch_rate_limit(self, ref: str, event: AgentEvent) -> None:
        """Feed the pool's rate-limit incident: Claude Code retrying a 429 itself holds new
        starts (or, when another agent already does, its agent is parked: stopped now, its
        session resumed after the storm); a model answer means a request got through (and
        ends the incident)."""
        if isinstance(event, ApiRetry) and (event.error == "rate_limit" or event.error_status == 429):
            if self.pause.retrying(ref, time.time(), event.retry_delay_ms / 1000) and ref in self.runs:
                self._parked.add(ref)
                self.runs[ref].cancel("parked: waiting out a rate-limit storm")
            self.pulse.notify()
        elif (
            (isinstance(event, AssistantText) and not event.is_api_error) or isinstance(event, ToolUse)
        ) and self.pause.answered(ref, time.time()):
            self.pulse.notify()

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
        parked = outcome.status is OutcomeStatus.CANCELLED and task.ref in self._parked
        self._parked.discard(task.ref)
        cancelled = self._cancelled.pop(task.ref, None)
        if outcome.ok:
            await self._succeeded(plan, task, outcome, worktree, base, results, outside)
        elif parked or outcome.status is OutcomeStatus.RATE_LIMITED:
            if not await self._paused(plan, task, outcome, results):
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
            leftover = await _conflict_markers(worktree)
            if leftover:
                reason = f"conflict markers remain in {', '.join(leftover)}"
                await self.store.move(plan.id, task.id, TaskState.FAILED, reason=reason, **results)
                return
        committed = await commit_all(worktree, commit_message(plan, task, outcome))
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

    async def _paused(self, plan: Plan, task: Task, outcome: AgentOutcome, results: dict[str, Any]) -> bool:
        """Put a rate-limited task back behind the pool's pause (the first 429 of a storm
        opens the incident, a probe's 429 backs it off, the others join it); False once the
        task has had too many pauses. An agent that got somewhere resumes its session after
        the pause (Claude Code ended it cleanly on the 429), instead of starting over."""
        pauses = self._rate_limit_pauses.get(task.ref, 0) + 1
        self._rate_limit_pauses[task.ref] = pauses
        if pauses > self.settings.max_rate_limit_pauses:
            return False
        clock = time.time()
        until = self.pause.rate_limited(task.ref, clock, outcome.retry_after_s)
        seconds = round(until - clock, 3)
        await self.store.append_event(
            plan.id, task.id, "pool_paused", {"seconds": seconds, "strikes": self.pause.strikes}
        )
        resume = await has_progress(task.model_copy(update={"session_id": outcome.session_id or task.session_id}))
        # A rate limit is not the task's fault: it does not use up an attempt (a resumed
        # session goes on with the attempt it belongs to; a new one is a new attempt).
        await self.store.move(
            plan.id,
            task.id,
            TaskState.PENDING,
            reason=f"rate limited: {outcome.reason}" + ("; resuming its session" if resume else ""),
            attempts=task.attempts if resume else task.attempts - 1,
            not_before=until,
            resume=resume,
            **results,
        )
        return True


def summary(event: AgentEvent) -> str:
    """One line of what an agent event says (the task's last activity), secrets redacted."""
    if isinstance(event, ToolUse):
        detail = event.input.get("file_path") or event.input.get("command") or event.input.get("pattern") or ""
        return f"{event.name} {redact(str(detail))[:120]}".strip()
    if isinstance(event, AssistantText):
        return redact(event.text.strip().splitlines()[0])[:160] if event.text.strip() else "…"
    if isinstance(event, ApiRetry):
        return f"waiting to retry the model API ({event.error or event.error_status})"
    if isinstance(event, ResultEvent):
        return f"result: {event.subtype}"
    return event.kind


def _state_after(event: AgentEvent, state: TaskState) -> TaskState | None:
    """Waiting while the CLI waits to retry the model API; running again once it answers."""
    if isinstance(event, ApiRetry) and state is TaskState.RUNNING:
        return TaskState.WAITING
    if isinstance(event, (AssistantText, ToolResult)) and state is TaskState.WAITING:
        return TaskState.RUNNING
    return None


async def has_progress(task: Task) -> bool:
    """True when an interrupted run left something to resume: a session, and changes in its
    worktree or commits beyond its base."""
    if not (task.session_id and task.worktree and task.base_commit and task.worktree.is_dir()):
        return False
    with contextlib.suppress(Exception):
        dirty = await git(task.worktree, "status", "--porcelain")
        head = await rev_parse(task.worktree, "HEAD")
        return bool(dirty.stdout.strip()) or head != task.base_commit
    return False


async def _requeue_interrupted(store: Store, plan: Plan, task: Task) -> None:
    """The engine is shutting down: the task goes back to the queue, to be resumed by the
    next process that opens this repository if its agent got anywhere."""
    with contextlib.suppress(Exception):
        current = await store.task(plan.id, task.id)
        if current.state in ACTIVE_STATES or current.state is TaskState.READY:
            progressed = await has_progress(current)
            reason = "interrupted by shutdown" + ("; resuming its session" if progressed else "")
            await store.move(plan.id, task.id, TaskState.PENDING, reason=reason, resume=progressed)


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
