"""How an agent run ended: :class:`AgentOutcome` and the pure :func:`decide_outcome`.

The last ``result`` event decides success (``is_error`` counts, not ``subtype``: the CLI
reports API errors as ``subtype: success``); our own stop reasons (cancel, timeouts,
memory cap) take precedence; a process that ends without a result crashed.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from .events import AgentEvent, ApiRetry, AssistantText, ResultEvent, ToolUse, Usage

__all__ = [
    "AgentOutcome",
    "OutcomeStatus",
    "RunState",
    "decide_outcome",
    "ended_on_api_error",
    "verdict_events",
]


class OutcomeStatus(enum.StrEnum):
    """How an agent run ended."""

    SUCCEEDED = "succeeded"  #: the CLI reported success (result event, not is_error)
    FAILED = "failed"  #: the CLI reported an error (API error, max turns, budget, memory cap…)
    CANCELLED = "cancelled"  #: we were asked to stop it
    TIMED_OUT = "timed_out"  #: wall-clock or inactivity timeout
    RATE_LIMITED = "rate_limited"  #: the model API refused with a rate/usage limit
    CRASHED = "crashed"  #: the process ended without any result


class RunState(enum.StrEnum):
    """Live state of a run, for progress displays."""

    STARTING = "starting"
    RUNNING = "running"
    TOOL = "tool"  #: a tool call is executing
    WAITING = "waiting"  #: the CLI is waiting to retry the model API (api_retry)
    STOPPING = "stopping"
    FINISHED = "finished"


class AgentOutcome(BaseModel):
    """The typed, truthful result of one agent run."""

    run_id: str
    status: OutcomeStatus
    reason: str = ""
    exit_code: int | None = None
    signal: int | None = None
    session_id: str | None = None
    model: str | None = None
    num_turns: int = 0
    cost_usd: float = 0.0
    usage: Usage = Field(default_factory=Usage)
    duration_s: float = 0.0
    final_text: str | None = None
    structured_output: Any = None
    permission_denials: list[dict[str, Any]] = Field(default_factory=list)
    api_error: bool = False
    """The run ended on a model API error (see :func:`ended_on_api_error`); the HTTP status,
    when there was a response, is in :attr:`api_error_status`."""
    api_error_status: int | None = None
    retry_after_s: float | None = None
    started_at: datetime
    log_path: Path | None = None
    pids: list[int] = Field(default_factory=list)
    killed_pids: list[int] = Field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when the agent succeeded."""
        return self.status is OutcomeStatus.SUCCEEDED


_RATE_LIMIT_TEXT = re.compile(r"\b429\b|rate.?limit|usage limit", re.IGNORECASE)


def decide_outcome(
    result: ResultEvent | None,
    *,
    exit_code: int | None,
    signal_number: int | None,
    stopped: tuple[OutcomeStatus, str] | None,
    stderr_tail: list[str],
    last_retry: ApiRetry | None = None,
) -> tuple[OutcomeStatus, str]:
    """Pure decision of a run's status and reason from what was observed."""
    if stopped is not None:
        return stopped
    if result is not None:
        if result.succeeded:
            return OutcomeStatus.SUCCEEDED, ""
        text = result.result or "; ".join(result.errors) or f"{result.subtype} ({result.terminal_reason})"
        limited = result.api_error_status == 429 or result.api_error_type == "rate_limit_error"
        if limited or (result.terminal_reason == "api_error" and _RATE_LIMIT_TEXT.search(text)):
            return OutcomeStatus.RATE_LIMITED, text
        if last_retry is not None and last_retry.error == "rate_limit" and result.api_error_status is None:
            return OutcomeStatus.RATE_LIMITED, text
        return OutcomeStatus.FAILED, text
    how = f"was killed by signal {signal_number}" if signal_number else f"exited with code {exit_code}"
    detail = " | ".join(line for line in stderr_tail[-3:] if line)
    return OutcomeStatus.CRASHED, f"claude {how} without a result" + (f": {detail}" if detail else "")


def verdict_events(kept: list[AgentEvent], event: AgentEvent) -> list[AgentEvent]:
    """Pure: of a stream's events so far (``kept``, then ``event``), the few that decide
    :func:`ended_on_api_error` as the whole stream would: the last result and the last model
    output, in their order. A run keeps these instead of every event."""
    if not isinstance(event, ResultEvent | AssistantText | ToolUse):
        return kept
    result = isinstance(event, ResultEvent)
    return [e for e in kept if isinstance(e, ResultEvent) != result] + [event]


def ended_on_api_error(events: Sequence[AgentEvent], *, stopped: bool = False) -> bool:
    """Pure: did a run with these ``events`` end on a model API error?

    Yes when its final result says so (``terminal_reason == "api_error"`` or an
    ``api_error_status``), or when its last assistant message is the CLI's synthetic API-error
    message: older CLIs report ``terminal_reason: "completed"`` for the same failure, and a
    run that dies before its result has only that message. A run we stopped ended on our
    stop, not on the API; a later normal message means the CLI got past the error.
    """
    if stopped:
        return False
    result: ResultEvent | None = None
    output_after_result = False
    synthetic_last = False
    for event in events:
        if isinstance(event, ResultEvent):
            result, output_after_result = event, False
        elif isinstance(event, AssistantText | ToolUse):
            output_after_result = True
            synthetic_last = isinstance(event, AssistantText) and event.is_api_error
    if result is not None and not output_after_result:
        if result.succeeded:
            return False
        if result.terminal_reason == "api_error" or result.api_error_status is not None:
            return True
    return synthetic_last
