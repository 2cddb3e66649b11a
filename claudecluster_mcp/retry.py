"""When a failed agent run is tried again: the retry policy as a pure function, and the
pool-wide pause that a model rate limit imposes on every agent start."""

from __future__ import annotations

import time
from dataclasses import dataclass

from .outcome import AgentOutcome, OutcomeStatus
from .settings import EngineSettings

__all__ = ["RateLimitPause", "RetryDecision", "decide_retry"]

_TRANSIENT_STATUSES = frozenset({OutcomeStatus.CRASHED, OutcomeStatus.TIMED_OUT})


@dataclass(frozen=True)
class RetryDecision:
    """Whether a failed attempt is retried, and after how long."""

    retry: bool
    delay: float = 0.0


def decide_retry(outcome: AgentOutcome, attempts: int, settings: EngineSettings) -> RetryDecision:
    """Pure retry policy: crashes, timeouts and server-side API errors (5xx, 529, no status
    = connection) are retried with exponential backoff until ``max_attempts``; everything
    else (max turns, budget, 4xx, permission problems) is final."""
    if attempts >= settings.max_attempts:
        return RetryDecision(False)
    server_side = outcome.api_error_status is None or outcome.api_error_status >= 500
    transient = outcome.status in _TRANSIENT_STATUSES or (
        outcome.status is OutcomeStatus.FAILED and outcome.api_error and server_side
    )
    if not transient:
        return RetryDecision(False)
    return RetryDecision(True, settings.retry_backoff * 2 ** (attempts - 1))


class RateLimitPause:
    """The pool-wide pause after a model rate limit: no agent starts until it ends, and
    then agents start one by one (``stagger`` apart) so they do not all hit the limit again."""

    def __init__(self, stagger: float) -> None:
        self.stagger = stagger
        self.until = 0.0  #: no agent starts before this time (epoch seconds)
        self._stagger_until = 0.0

    def pause(self, seconds: float) -> float:
        """Pause the pool for (at least) ``seconds``; returns when the pause ends."""
        self.until = max(self.until, time.time() + seconds)
        return self.until

    def wait_for(self, clock: float) -> float:
        """Seconds until the next agent may start (0: now)."""
        return max(0.0, self.until - clock, self._stagger_until - clock)

    def started(self, clock: float) -> None:
        """An agent started at ``clock``: after a pause, the next one waits ``stagger``."""
        if self.until and self.stagger:
            self._stagger_until = clock + self.stagger

    def settle(self, clock: float) -> None:
        """Forget a pause that is over once the staggered restart is through."""
        if self.until and clock >= max(self.until, self._stagger_until):
            self.until = 0.0
