"""The retry policy: which failed attempts are tried again, and after how long."""

from __future__ import annotations

from typing import Any

import pytest

from claudecluster_mcp.outcome import AgentOutcome, OutcomeStatus
from claudecluster_mcp.retry import RetryDecision, decide_retry
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
