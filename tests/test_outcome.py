"""Deciding how a run ended, from what was observed (pure; recorded transcripts)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from claudecluster_mcp.events import (
    AgentEvent,
    ApiRetry,
    AssistantText,
    ResultEvent,
    StderrLine,
    StreamParser,
    ToolResult,
    ToolUse,
)
from claudecluster_mcp.outcome import OutcomeStatus, decide_outcome, ended_on_api_error, verdict_events

DATA = Path(__file__).parent / "data"


def result(**fields: object) -> ResultEvent:
    return ResultEvent.model_validate({"subtype": "success", "is_error": False, **fields})


@pytest.mark.parametrize(
    ("observed", "status", "reason_part"),
    [
        ({"result": result()}, OutcomeStatus.SUCCEEDED, ""),
        (
            {
                "result": result(
                    is_error=True,
                    result="API Error: 500",
                    api_error_status=500,
                    terminal_reason="api_error",
                )
            },
            OutcomeStatus.FAILED,
            "500",
        ),
        (
            {"result": result(is_error=True, result="Request rejected (429)", api_error_status=429)},
            OutcomeStatus.RATE_LIMITED,
            "429",
        ),
        (
            {
                "result": result(
                    is_error=True,
                    result="Claude AI usage limit reached",
                    terminal_reason="api_error",
                )
            },
            OutcomeStatus.RATE_LIMITED,
            "usage limit",
        ),
        (
            {
                "result": result(
                    is_error=True,
                    result="API Error: retries exhausted",
                    terminal_reason="api_error",
                ),
                "last_retry": ApiRetry(error="rate_limit", error_status=429),
            },
            OutcomeStatus.RATE_LIMITED,
            "retries",
        ),
        (
            {
                "result": result(
                    subtype="error_max_turns",
                    is_error=True,
                    errors=["Reached maximum number of turns (1)"],
                )
            },
            OutcomeStatus.FAILED,
            "maximum number of turns",
        ),
        (
            {"result": result(subtype="error_during_execution", is_error=True, terminal_reason="aborted_tools")},
            OutcomeStatus.FAILED,
            "aborted_tools",
        ),
        (
            {"result": None, "exit_code": 1, "stderr_tail": ["boom"]},
            OutcomeStatus.CRASHED,
            "exited with code 1",
        ),
        ({"result": None, "exit_code": 0}, OutcomeStatus.CRASHED, "without a result"),
        ({"result": None, "signal_number": 9}, OutcomeStatus.CRASHED, "signal 9"),
        (
            {"result": result(), "stopped": (OutcomeStatus.CANCELLED, "cancelled by request")},
            OutcomeStatus.CANCELLED,
            "cancelled",
        ),
        (
            {"result": None, "stopped": (OutcomeStatus.TIMED_OUT, "wall-clock timeout")},
            OutcomeStatus.TIMED_OUT,
            "wall-clock",
        ),
    ],
)
def test_decide_outcome(observed: dict[str, object], status: OutcomeStatus, reason_part: str) -> None:
    args: dict[str, object] = {
        "exit_code": None,
        "signal_number": None,
        "stopped": None,
        "stderr_tail": [],
    }
    args.update(observed)
    decided_status, reason = decide_outcome(args.pop("result"), **args)  # type: ignore[arg-type]

    assert decided_status is status
    assert reason_part in reason


def recorded(name: str) -> bytes:
    return (DATA / f"{name}.pty").read_bytes()


def events_of(data: bytes) -> list[AgentEvent]:
    parser = StreamParser()
    return parser.feed(data) + parser.close()


def replace_result(data: bytes, old: bytes, new: bytes) -> bytes:
    lines = data.split(b"\r\n")
    at = next(i for i, line in enumerate(lines) if b'"type":"result"' in line)
    assert old in lines[at]
    lines[at] = lines[at].replace(old, new)
    return b"\r\n".join(lines)


def without_result(data: bytes) -> bytes:
    return b"\r\n".join(line for line in data.split(b"\r\n") if b'"type":"result"' not in line)


def test_a_recorded_http_500_run_ended_on_an_api_error() -> None:
    events = events_of(recorded("api_error_500"))

    assert ended_on_api_error(events)
    # Not when we had already stopped the run ourselves.
    assert not ended_on_api_error(events, stopped=True)


@pytest.mark.parametrize("name", ["write_hello", "background_two_results"])
def test_recorded_successful_runs_did_not_end_on_an_api_error(name: str) -> None:
    assert not ended_on_api_error(events_of(recorded(name)))


def test_older_cli_result_without_api_markers_is_caught_by_the_synthetic_message() -> None:
    # Claude Code 2.1.197 said terminal_reason "completed" for an API error.
    data = replace_result(recorded("api_error_500"), b'"terminal_reason":"api_error"', b'"terminal_reason":"completed"')
    data = replace_result(data, b'"api_error_status":500', b'"api_error_status":null')
    events = events_of(data)
    result = events[-1]
    assert isinstance(result, ResultEvent) and result.terminal_reason == "completed"
    assert result.api_error_status is None

    assert ended_on_api_error(events)


def test_a_crash_right_after_the_api_error_message_is_an_api_error() -> None:
    events = events_of(without_result(recorded("api_error_500")))
    assert not any(isinstance(e, ResultEvent) for e in events)

    assert ended_on_api_error(events)


def test_a_result_naming_only_an_error_status_is_an_api_error() -> None:
    assert ended_on_api_error([result(is_error=True, result="Request rejected (429)", api_error_status=429)])


@pytest.mark.parametrize(
    "final",
    [
        result(subtype="error_max_turns", is_error=True, terminal_reason="max_turns"),
        result(subtype="error_max_budget_usd", is_error=True, terminal_reason="budget_exhausted"),
        result(is_error=True, result="API Error: 500 in the test log", terminal_reason="completed"),
    ],
)
def test_other_failures_are_not_api_errors(final: ResultEvent) -> None:
    # The last of these mentions "API Error" in its text: the text is not the evidence.
    events = [*events_of(recorded("write_hello"))[:-1], final]

    assert not ended_on_api_error(events)


def test_a_later_segment_that_succeeds_clears_an_earlier_api_error() -> None:
    failed = events_of(recorded("api_error_500"))
    succeeded = events_of(recorded("write_hello"))

    assert not ended_on_api_error(failed + succeeded)
    assert ended_on_api_error(succeeded + failed)


_STREAM_EVENTS: list[AgentEvent] = [
    ResultEvent(subtype="success", is_error=False),
    ResultEvent(subtype="success", is_error=True, terminal_reason="api_error"),
    ResultEvent(subtype="error_during_execution", is_error=True),
    ResultEvent(subtype="success", is_error=True, api_error_status=500),
    AssistantText(text="working on it"),
    AssistantText(text="API Error: 500", is_api_error=True),
    ToolUse(id="t1", name="Bash"),
    ToolResult(tool_use_id="t1"),
    StderrLine(text="warning"),
]


@settings(max_examples=300, derandomize=True)
@given(st.lists(st.sampled_from(_STREAM_EVENTS), max_size=12))
def test_the_few_events_a_run_keeps_decide_an_api_error_as_the_whole_stream_would(events: list[AgentEvent]) -> None:
    kept: list[AgentEvent] = []
    for event in events:
        kept = verdict_events(kept, event)

    assert len(kept) <= 2
    assert ended_on_api_error(kept) == ended_on_api_error(events)
