"""The task runner's side of the pool's rate-limit incident (:class:`~.retry.RateLimitPause`):
feed it the agents' events, park the agents it says to park, wake those it says to wake,
and put a task stopped by a rate limit back in the queue behind the pause, resuming its
session when it got somewhere."""

from __future__ import annotations

import time
from enum import Enum
from typing import Any

from .events import AgentEvent, ApiRetry, AssistantText, ToolUse
from .models import Plan, Task, TaskState
from .outcome import AgentOutcome, OutcomeStatus
from .placement import AgentHandle
from .retry import FIRST_RATE_LIMIT_PAUSE, RateLimitPause
from .settings import EngineSettings
from .signals import Pulse
from .store import Store
from .task_worktree import has_progress

__all__ = ["RateLimits", "Stop"]


class Stop(Enum):
    """Why the engine stopped an agent that is to go on later."""

    PARKED = "parked"  #: to wait out a rate-limit storm
    WOKEN = "woken"  #: to cut short a retry delay of Claude Code's own once the storm is over


class RateLimits:
    """Rate-limit handling for the agents in ``runs`` (the task runner's live agents)."""

    def __init__(
        self, store: Store, settings: EngineSettings, pause: RateLimitPause, runs: dict[str, AgentHandle], pulse: Pulse
    ) -> None:
        self.store = store
        self.settings = settings
        self.pause = pause
        # Pauses of unknown length start short and back off up to rate_limit_pause.
        pause.cap = settings.rate_limit_pause
        pause.first = min(FIRST_RATE_LIMIT_PAUSE, settings.rate_limit_pause)
        self.runs = runs
        self.pulse = pulse
        self._pauses: dict[str, int] = {}  # task → rate-limit pauses it had
        self._stops: dict[str, Stop] = {}  # agents being stopped to go on later
        self._cancelled: dict[str, str] = {}  # …that were cancelled meanwhile → why

    def cancelling(self, ref: str, reason: str) -> None:
        """Agent ``ref`` is being cancelled: if it was stopping to go on later, the cancel wins."""
        if self._stops.pop(ref, None) is not None:
            self._cancelled[ref] = reason

    def watch(self, ref: str, event: AgentEvent) -> None:
        """Feed the incident: Claude Code retrying a 429 itself holds new starts (or, when
        another agent already does, its agent is parked: stopped now, its session resumed
        after the storm); a model answer means a request got through (and may end the
        incident, waking agents still waiting out a long retry delay)."""
        if isinstance(event, ApiRetry) and (event.error == "rate_limit" or event.error_status == 429):
            if self.pause.retrying(ref, time.time(), event.retry_delay_ms / 1000):
                self._stop(ref, Stop.PARKED, "parked: waiting out a rate-limit storm")
            self.pulse.notify()
        elif (
            (isinstance(event, AssistantText) and not event.is_api_error) or isinstance(event, ToolUse)
        ) and self.pause.answered(ref, time.time()):
            self._wake()
            self.pulse.notify()

    def ended(self, ref: str) -> None:
        """Agent ``ref`` is gone (a probe that ends without a 429 ends the incident)."""
        if self.pause.finished(ref, time.time()):
            self._wake()

    def stopped(self, ref: str, outcome: AgentOutcome) -> tuple[Stop | None, str | None]:
        """Why the ended agent ``ref`` was stopped by us to go on later (None: it was not),
        and the reason of a cancel that came meanwhile."""
        stop = self._stops.pop(ref, None)
        return (stop if outcome.status is OutcomeStatus.CANCELLED else None), self._cancelled.pop(ref, None)

    async def paused(self, plan: Plan, task: Task, outcome: AgentOutcome, results: dict[str, Any]) -> bool:
        """Put a rate-limited task back behind the pool's pause (the first 429 of a storm
        opens the incident, a probe's 429 backs it off, the others join it); False once the
        task has had too many pauses."""
        pauses = self._pauses.get(task.ref, 0) + 1
        self._pauses[task.ref] = pauses
        if pauses > self.settings.max_rate_limit_pauses:
            return False
        clock = time.time()
        until = self.pause.rate_limited(task.ref, clock, outcome.retry_after_s)
        seconds = round(until - clock, 3)
        await self.store.append_event(
            plan.id, task.id, "pool_paused", {"seconds": seconds, "strikes": self.pause.strikes}
        )
        await self.requeue(plan, task, outcome, results, f"rate limited: {outcome.reason}", until)
        return True

    async def requeue(
        self, plan: Plan, task: Task, outcome: AgentOutcome, results: dict[str, Any], reason: str, until: float
    ) -> None:
        """Put a task stopped by a rate limit back to start at ``until``. An agent that got
        somewhere resumes its session (Claude Code ended it cleanly), instead of starting over."""
        resume = await has_progress(task.model_copy(update={"session_id": outcome.session_id or task.session_id}))
        # A rate limit is not the task's fault: it does not use up an attempt (a resumed
        # session goes on with the attempt it belongs to; a new one is a new attempt).
        await self.store.move(
            plan.id,
            task.id,
            TaskState.PENDING,
            reason=reason + ("; resuming its session" if resume else ""),
            attempts=task.attempts if resume else task.attempts - 1,
            not_before=until,
            resume=resume,
            **results,
        )

    def _wake(self) -> None:
        for ref in self.pause.take_woken():
            self._stop(ref, Stop.WOKEN, "woken: the rate-limit storm is over")

    def _stop(self, ref: str, stop: Stop, reason: str) -> None:
        if ref in self.runs and ref not in self._stops:
            self._stops[ref] = stop
            self.runs[ref].cancel(reason)
