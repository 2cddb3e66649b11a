"""When a failed agent run is tried again: the retry policy as a pure function, and the
pool-wide pause that a model rate limit imposes on every agent start (adaptive: short at
first, backing off while a probe agent keeps being rate-limited)."""

from __future__ import annotations

import random
from dataclasses import dataclass

from .outcome import AgentOutcome, OutcomeStatus
from .settings import EngineSettings

__all__ = [
    "AGE_SHARE",
    "FIRST_RATE_LIMIT_PAUSE",
    "WAKE_AFTER",
    "RateLimitPause",
    "RetryDecision",
    "decide_retry",
    "pause_length",
]

FIRST_RATE_LIMIT_PAUSE = 1.0  #: the first pause of a rate-limit incident of unknown length (s)
#: A pause of unknown length is at most this share of the incident's age (then the cap):
#: the storm's end is noticed after a delay in proportion to how long it lasted.
AGE_SHARE = 0.15
#: When an incident ends, an agent whose Claude Code still waits longer than this (s) to
#: retry a 429 itself is stopped and its session resumed at once (a restart takes ~1-2 s).
WAKE_AFTER = 3.0

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
    """The pool-wide rate-limit incident: no agent starts while it is on.

    A 429 opens an incident and pauses the pool: for the retry-after when it is known, else
    for :func:`pause_length` of the incident's consecutive strikes and age (short at first,
    backing off with jitter, never more than about a sixth of the incident's age, nor the
    cap). 429s of other agents while the incident is on are part of it: they extend a known
    retry-after, they never stack. When the pause ends ONE agent starts, the probe; as soon
    as a request of its gets through (:meth:`answered`) the incident is over and the pool
    resumes in steps ``stagger`` apart that double: the probe was the first step, 2 agents
    start at once, then 4, 8, … (a pool of 20 is full again after 4 steps, not 19). A probe
    that is rate-limited too is a new strike: a longer pause, then another probe. Claude
    Code's own ``api_retry`` of a 429 in a running agent (:meth:`retrying`) holds new starts for
    its retry delay, or until that agent gets an answer; but only one agent retries for the
    pool: another agent that meets a 429 meanwhile, or while an incident is on, is to be
    parked (stopped, to resume after the incident), so that a storm costs one agent's
    retries and the probes, not every agent's retries. An answer to an agent that was
    retrying a 429 ends an incident like the probe's; an agent whose Claude Code is then still
    waiting out a long retry delay is to be woken (:meth:`take_woken`: stopped, its session
    resumed now).

    Every method takes the clock (epoch seconds): the policy is pure apart from its state
    and the random source of the jitter."""

    def __init__(self, stagger: float, first: float = 1.0, cap: float = 10.0, rng: random.Random | None = None) -> None:
        self.stagger = stagger
        self.first = first
        self.cap = cap
        self.rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        self.until = 0.0  #: no agent starts before this time (epoch seconds)
        self.strikes = 0  #: consecutive 429s of the incident that each needed a pause
        self.incident = False  #: paused, or waiting for the probe to get through
        self.since = 0.0  #: when the incident began
        self.probe: str | None = None  #: the agent started to probe the limit
        self._probe_deadline = 0.0
        self._holds: dict[str, float] = {}  # running agent → end of its CLI retry delay
        self._stagger_until = 0.0
        self._step = 1  # agents the current step of a restart admits…
        self._step_left = 1  # …and how many of them may still start
        self._woken: list[str] = []

    def rate_limited(self, ref: str, clock: float, retry_after: float | None = None) -> float:
        """The run of agent ``ref`` ended on a 429; returns when the pool may start again."""
        self._holds.pop(ref, None)
        if ref == self.probe or not self.incident:
            if not self.incident:
                self.since = clock
            self.probe = None
            self.incident = True
            self.strikes += 1
            length = pause_length(self.strikes, retry_after, self.first, self.cap, self.rng, age=clock - self.since)
            self.until = max(self.until, clock + length)
        elif retry_after:  # the same incident, told how long: honour it, without stacking
            self.until = max(self.until, clock + retry_after)
        return max(self.until, clock)

    def retrying(self, ref: str, clock: float, delay: float) -> bool:
        """Claude Code in agent ``ref`` waits ``delay`` s to retry a 429 itself: admit no
        new agent meanwhile. True when ``ref`` is to be parked instead: another agent
        already retries a 429 (until it is answered or ends), or an incident is on and
        ``ref`` is neither its probe nor the agent that was retrying already."""
        if any(other != ref for other in self._holds):
            return True
        if self.incident and ref != self.probe and ref not in self._holds:
            return True
        self._holds[ref] = max(self._holds.get(ref, 0.0), clock + delay)
        return False

    def answered(self, ref: str, clock: float) -> bool:
        """A model request of agent ``ref`` got through. True when that resumes the pool."""
        retried = self._holds.pop(ref, None) is not None
        if ref != self.probe and not (retried and self.incident):
            return False
        # The limit is lifted: Claude Code's own retry delays no longer hold the pool, and
        # an agent still waiting out a long one is better restarted now.
        self._woken += [other for other, end in self._holds.items() if end > clock + WAKE_AFTER]
        self._holds.clear()
        self._resume(clock)
        return True

    def _resume(self, clock: float) -> None:
        self.probe = None
        self.incident = False
        self.strikes = 0
        self.until = max(self.until, clock)  # staggered restart from now on (see settle)
        self._stagger_until = clock
        self._step = self._step_left = 2

    def take_woken(self) -> list[str]:
        """The agents to wake since the last call (see the class docstring)."""
        woken, self._woken = self._woken, []
        return woken

    def finished(self, ref: str, clock: float) -> bool:
        """Agent ``ref`` ended (not on a 429): a probe that ends so was not rate-limited."""
        self._holds.pop(ref, None)
        return self.answered(ref, clock) if ref == self.probe else False

    def wait_for(self, clock: float) -> float:
        """Seconds until the next agent may start (0: now). During an incident its pauses
        and probes decide, not an agent's own retry delays."""
        hold = 0.0 if self.incident else max(self._holds.values(), default=0.0)
        if self.probe is not None:
            if clock < self._probe_deadline:
                return max(self._probe_deadline - clock, hold - clock)
            self._resume(clock)  # no verdict in time: stop waiting for it (proves nothing)
        return max(0.0, self.until - clock, self._stagger_until - clock, hold - clock)

    def started(self, clock: float, ref: str = "") -> None:
        """Agent ``ref`` started at ``clock``: the first start after a pause is the probe;
        during the restart after one, the start that completes a step makes the next,
        twice as big, wait ``stagger``."""
        if self.incident:
            self.probe = ref
            self._probe_deadline = clock + max(self.cap, self.first)
        elif self.until and self.stagger:
            self._step_left -= 1
            if self._step_left <= 0:
                self._step *= 2
                self._step_left = self._step
                self._stagger_until = clock + self.stagger

    def settle(self, clock: float) -> None:
        """Forget a pause that is over once the staggered restart is through."""
        if self.until and not self.incident and clock >= max(self.until, self._stagger_until):
            self.until = 0.0

    def describe(self, clock: float) -> str:
        """What the pool is doing about a rate limit, for people (empty when nothing)."""
        if self.incident:
            strikes = f"{self.strikes} strike{'s' if self.strikes != 1 else ''}"
            since = f"rate limited for {clock - self.since:.0f} s ({strikes})"
            if self.probe is not None:
                return f"{since}: one agent is probing the model; the others wait"
            return f"{since}: no agent starts for {max(0.0, self.until - clock):.0f} s, then one probes the model"
        hold = max(self._holds.values(), default=0.0)
        if hold > clock:
            return f"rate limited: Claude Code retries a request in {hold - clock:.0f} s; no new agent starts meanwhile"
        return ""


def pause_length(
    strikes: int,
    retry_after: float | None,
    first: float,
    cap: float,
    rng: random.Random | random.SystemRandom,
    age: float = float("inf"),
) -> float:
    """Pure: how long the pool pauses after the ``strikes``-th consecutive 429 of an
    incident that began ``age`` seconds ago. A known ``retry_after`` is honoured as it is;
    otherwise ``first`` doubling per strike, jittered up to twice that (so that pools do not
    retry in lockstep), but at most :data:`AGE_SHARE` of the age (jittered up to 1.5 times
    that, at least ``first``), and never more than ``cap``."""
    if retry_after:
        return retry_after
    base = first * 2 ** max(strikes - 1, 0)
    young = max(first, AGE_SHARE * age)
    return min(cap, rng.uniform(base, 2 * base), rng.uniform(young, 1.5 * young))
