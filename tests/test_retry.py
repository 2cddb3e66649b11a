"""The retry policy: which failed attempts are tried again, and after how long."""

from __future__ import annotations

import random
from typing import Any

import pytest

from claudecluster_mcp.outcome import AgentOutcome, OutcomeStatus
from claudecluster_mcp.retry import AGE_SHARE, WAKE_AFTER, RateLimitPause, RetryDecision, decide_retry, pause_length
from claudecluster_mcp.settings import EngineSettings
from claudecluster_mcp.store import now

SETTINGS = EngineSettings(max_attempts=4, retry_backoff=5.0)

API_500 = "API Error: 500 Internal server error. This is a server-side issue, usually temporary — try again."
API_529 = 'API Error: 529 {"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}'
API_CONNECTION = "API Error: Connection error."
API_400 = "API Error: 400 messages: text content blocks must be non-empty"
API_401 = 'API Error: 401 {"type":"error","error":{"type":"authentication_error"}}'


def outcome(status: OutcomeStatus, reason: str = "", **fields: Any) -> AgentOutcome:
    return AgentOutcome(run_id="run-1", status=status, reason=reason, started_at=now(), **fields)


def api_error(text: str, status: int | None) -> AgentOutcome:
    # The CLI reports API errors as an error result whose text is also the reason.
    return outcome(OutcomeStatus.FAILED, text, final_text=text, api_error_status=status, api_error=True)


CRASHED = outcome(OutcomeStatus.CRASHED, "claude was killed by signal 9 without a result")
TIMED_OUT = outcome(OutcomeStatus.TIMED_OUT, "no output for 600s")
MAX_TURNS = outcome(OutcomeStatus.FAILED, "error_max_turns (max_turns)")
BUDGET = outcome(OutcomeStatus.FAILED, "error_max_budget_usd (budget)")


@pytest.mark.parametrize(
    ("case", "attempts", "expected"),
    [
        # Crashes and timeouts: exponential backoff 5, 10, 20 … until max_attempts (4).
        (CRASHED, 1, RetryDecision(True, 5.0)),
        (CRASHED, 2, RetryDecision(True, 10.0)),
        (CRASHED, 3, RetryDecision(True, 20.0)),
        (CRASHED, 4, RetryDecision(False)),
        (CRASHED, 5, RetryDecision(False)),
        (TIMED_OUT, 1, RetryDecision(True, 5.0)),
        (TIMED_OUT, 3, RetryDecision(True, 20.0)),
        (TIMED_OUT, 4, RetryDecision(False)),
        # Server-side API errors (5xx, 529 overloaded, no status = connection error).
        (api_error(API_500, 500), 1, RetryDecision(True, 5.0)),
        (api_error(API_500, 500), 2, RetryDecision(True, 10.0)),
        (api_error(API_500, 500), 4, RetryDecision(False)),
        (api_error(API_529, 529), 1, RetryDecision(True, 5.0)),
        (api_error(API_529, 529), 3, RetryDecision(True, 20.0)),
        (api_error(API_CONNECTION, None), 1, RetryDecision(True, 5.0)),
        (api_error(API_CONNECTION, None), 4, RetryDecision(False)),
        # Client-side API errors are final.
        (api_error(API_400, 400), 1, RetryDecision(False)),
        (api_error(API_401, 401), 1, RetryDecision(False)),
        (api_error("API Error: 403 forbidden", 403), 1, RetryDecision(False)),
        # Max turns, budget: the agent ran and stopped; running it again would do the same.
        (MAX_TURNS, 1, RetryDecision(False)),
        (BUDGET, 1, RetryDecision(False)),
        # A failure that merely mentions an API error is not one.
        (
            outcome(OutcomeStatus.FAILED, "tests failed", final_text="I saw API Error: 500 in the logs"),
            1,
            RetryDecision(False),
        ),
        # Other statuses are never retried here.
        (outcome(OutcomeStatus.SUCCEEDED), 1, RetryDecision(False)),
        (outcome(OutcomeStatus.CANCELLED, "cancelled by request"), 1, RetryDecision(False)),
        (
            outcome(OutcomeStatus.RATE_LIMITED, "API Error: 429", final_text="API Error: 429", api_error_status=429),
            1,
            RetryDecision(False),
        ),
    ],
)
def test_decide_retry(case: AgentOutcome, attempts: int, expected: RetryDecision) -> None:
    assert decide_retry(case, attempts, SETTINGS) == expected


@pytest.mark.parametrize("case", [CRASHED, TIMED_OUT, api_error(API_500, 500), api_error(API_CONNECTION, None)])
def test_retries_stop_exactly_at_max_attempts(case: AgentOutcome) -> None:
    for max_attempts in (1, 2, 3, 5):
        settings = EngineSettings(max_attempts=max_attempts, retry_backoff=1.0)
        retried = [n for n in range(1, 10) if decide_retry(case, n, settings).retry]
        assert retried == list(range(1, max_attempts))


def test_delay_doubles_from_retry_backoff() -> None:
    settings = EngineSettings(max_attempts=10, retry_backoff=0.25)
    delays = [decide_retry(CRASHED, n, settings).delay for n in range(1, 6)]
    assert delays == [0.25, 0.5, 1.0, 2.0, 4.0]


def test_zero_backoff_retries_at_once() -> None:
    assert decide_retry(TIMED_OUT, 1, EngineSettings(retry_backoff=0)) == RetryDecision(True, 0.0)


def test_default_settings_allow_three_attempts() -> None:
    settings = EngineSettings()
    assert [decide_retry(CRASHED, n, settings).retry for n in (1, 2, 3)] == [True, True, False]


# -- the rate-limit pause: pure length policy, and the incident's state machine -------------

FIRST, CAP = 1.0, 30.0


@pytest.mark.parametrize(
    ("strikes", "retry_after", "low", "high"),
    [
        # Unknown retry-after: short at first, doubling per consecutive 429, jittered, capped.
        (1, None, 1.0, 2.0),
        (2, None, 2.0, 4.0),
        (3, None, 4.0, 8.0),
        (4, None, 8.0, 16.0),
        (5, None, 16.0, 30.0),
        (6, None, 30.0, 30.0),
        (12, None, 30.0, 30.0),
        # A known retry-after is honoured as it is, whatever the strikes.
        (1, 7.0, 7.0, 7.0),
        (5, 0.5, 0.5, 0.5),
        (3, 90.0, 90.0, 90.0),
    ],
)
def test_pause_length(strikes: int, retry_after: float | None, low: float, high: float) -> None:
    rng = random.Random(strikes)
    lengths = [pause_length(strikes, retry_after, FIRST, CAP, rng) for _ in range(200)]
    assert all(low <= n <= high for n in lengths)
    if low < high:  # jittered: not all the same
        assert len(set(lengths)) > 1


def pool() -> RateLimitPause:
    return RateLimitPause(stagger=0.2, first=FIRST, cap=CAP, rng=random.Random(0))


def test_a_storm_is_one_incident_not_one_pause_per_agent() -> None:
    p = pool()
    until = p.rate_limited("a", 100.0)
    assert 101.0 <= until <= 102.0 and p.strikes == 1
    # The other agents' 429s of the same storm join the incident: no stacking, no backoff.
    assert p.rate_limited("b", 100.1) == until
    assert p.rate_limited("c", 100.2) == until
    assert p.strikes == 1
    assert p.wait_for(100.3) == pytest.approx(until - 100.3)
    # …but a known retry-after within the incident extends it.
    assert p.rate_limited("d", 100.4, retry_after=5.0) == pytest.approx(105.4)


def test_after_the_pause_one_agent_probes_and_its_answer_resumes_the_pool() -> None:
    p = pool()
    until = p.rate_limited("a", 100.0)
    assert p.wait_for(until) == 0
    p.started(until, "a")  # the probe
    assert p.probe == "a" and p.wait_for(until + 0.5) > 0  # nobody else starts meanwhile
    assert not p.answered("other", until + 0.6)  # another agent's answer is not the probe's
    assert p.answered("a", until + 1.0)
    assert p.strikes == 0 and not p.incident
    # The pool resumes at once (the probe was its first step), then staggered lightly.
    assert p.wait_for(until + 1.0) == 0
    p.started(until + 1.0, "b")
    p.started(until + 1.0, "c")
    assert p.wait_for(until + 1.0) == pytest.approx(0.2)
    p.settle(until + 2.0)
    assert p.until == 0 and p.wait_for(until + 2.0) == 0


def test_after_a_pause_the_pool_restarts_in_doubling_steps() -> None:
    p = pool()
    until = p.rate_limited("a", 100.0)
    p.started(until, "a")
    p.answered("a", until + 1.0)
    clock, steps = until + 1.0, []
    for _ in range(4):
        clock += p.wait_for(clock)
        started = 0
        while p.wait_for(clock) == 0:
            p.started(clock, f"agent{started}")
            started += 1
        steps.append(started)
    assert steps == [2, 4, 8, 16]  # after the probe's one
    assert clock == pytest.approx(until + 1.0 + 3 * 0.2)
    p.settle(clock + 0.2)
    assert p.wait_for(clock + 0.2) == 0 and p.until == 0


def test_a_rate_limited_probe_backs_off_in_proportion_to_the_incident_s_age() -> None:
    p = pool()
    start = clock = 100.0
    pauses = []
    while clock < start + 600:
        until = p.rate_limited("probe", clock)
        pauses.append((clock - start, until - clock))
        clock = until
        p.started(clock, "probe")
    for age, pause in pauses:
        assert FIRST <= pause <= min(CAP, 1.5 * max(FIRST, AGE_SHARE * age)) + 1e-9, (age, pause)
    assert pauses[-1][1] == pytest.approx(CAP) and p.strikes == len(pauses)
    # A 20 s storm gets a handful of probes, the last one at most ~a fifth of it before its end.
    early = [pause for age, pause in pauses if age < 20]
    assert 5 <= len(early) <= 15 and max(early) <= 4.5
    # A 429 of an agent that ran before the incident does not back it off further.
    strikes = p.strikes
    p.rate_limited("old", clock + 0.1)
    assert p.strikes == strikes


def test_pauses_are_short_while_the_incident_is_young_whatever_the_strikes() -> None:
    rng = random.Random(1)
    assert all(1.0 <= pause_length(8, None, 1.0, 30.0, rng, age=2.0) <= 1.5 for _ in range(100))
    assert all(3.0 <= pause_length(8, None, 1.0, 30.0, rng, age=20.0) <= 4.5 for _ in range(100))
    assert pause_length(8, None, 1.0, 30.0, rng, age=1000.0) == 30.0
    assert pause_length(8, 42.0, 1.0, 30.0, rng, age=2.0) == 42.0  # a known retry-after stands


def test_a_probe_that_ends_without_a_429_resumes_the_pool() -> None:
    p = pool()
    until = p.rate_limited("a", 100.0)
    p.started(until, "b")
    assert p.finished("b", until + 3)
    assert not p.incident and p.strikes == 0


def test_a_silent_probe_stops_holding_the_pool_after_the_cap() -> None:
    p = pool()
    until = p.rate_limited("a", 100.0)
    p.started(until, "a")
    assert p.wait_for(until + CAP - 1) > 0
    assert p.wait_for(until + CAP + 1) <= 0.2 and not p.incident


def test_the_cli_retrying_a_429_holds_new_starts() -> None:
    p = pool()
    p.retrying("a", 100.0, 2.5)
    assert p.wait_for(100.0) == pytest.approx(2.5)
    assert p.wait_for(103.0) == 0  # its retry delay is over
    p.retrying("a", 104.0, 4.0)
    assert p.wait_for(104.5) == pytest.approx(3.5)
    assert not p.answered("a", 105.0)  # it got through: the hold ends (no incident to end)
    assert p.wait_for(105.0) == 0
    p.retrying("b", 106.0, 4.0)
    p.finished("b", 107.0)
    assert p.wait_for(107.0) == 0


def test_one_agent_retries_a_429_for_the_pool_and_the_others_are_parked() -> None:
    p = pool()
    assert p.retrying("a", 100.0, 1.0) is False  # a's Claude Code retries for the pool
    assert p.retrying("b", 100.1, 1.0) is True  # b is parked: stopped, resumed later
    until = p.rate_limited("b", 100.2)  # b's stop opens the incident
    assert p.retrying("a", 101.0, 2.0) is False  # a goes on retrying
    assert p.retrying("d", 101.1, 2.0) is True  # others that meet the 429 are parked
    # During the incident its pauses and probes decide, not a's retry delays.
    assert p.wait_for(until) == 0
    p.started(until, "c")
    assert p.retrying("c", until + 0.5, 1.0) is True  # the probe is parked too: a new strike
    assert p.rate_limited("c", until + 0.6) > until + 0.6 and p.strikes == 2
    # A request of the agent that kept retrying gets through: the incident is over.
    assert p.answered("a", 110.0)
    assert not p.incident and p.strikes == 0


def test_when_the_incident_ends_an_agent_still_in_a_long_cli_retry_delay_is_woken() -> None:
    p = pool()
    assert p.retrying("a", 100.0, 16.0) is False  # a's Claude Code waits 16 s before retrying
    until = p.rate_limited("b", 100.1)
    p.started(until, "c")
    assert p.answered("c", until + 1.0)  # the probe got through: the storm is over
    assert p.take_woken() == ["a"] and p.take_woken() == []
    assert p.wait_for(until + 1.0) == 0  # a's retry delay no longer holds the pool


def test_an_agent_about_to_retry_anyway_is_not_woken() -> None:
    p = pool()
    p.retrying("a", 100.0, 4.0)
    until = p.rate_limited("b", 100.1)
    p.started(until, "c")
    clock = 104.0 - WAKE_AFTER + 0.5  # a retries within WAKE_AFTER: a restart would not be quicker
    assert p.answered("c", clock)
    assert p.take_woken() == []


def test_without_a_rate_limit_nothing_waits() -> None:
    p = pool()
    p.started(100.0, "a")
    p.settle(100.0)
    assert p.wait_for(100.0) == 0 and p.probe is None


def test_what_the_pool_does_about_a_rate_limit_is_said_in_words() -> None:
    p = pool()
    assert p.describe(100.0) == ""
    p.retrying("a", 100.0, 4.0)
    assert p.describe(100.0) == "rate limited: Claude Code retries a request in 4 s; no new agent starts meanwhile"
    until = p.rate_limited("b", 100.5)
    assert p.describe(100.5).startswith("rate limited for 0 s (1 strike): no agent starts for ")
    p.started(until, "c")
    assert p.describe(until + 10) == "rate limited for 11 s (1 strike): one agent is probing the model; the others wait"
    p.answered("c", until + 11)
    assert p.describe(until + 11) == ""
