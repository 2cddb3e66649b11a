"""The stream-json parser on pty transcripts recorded from real `claude` runs.

`tests/data/*.pty` are raw pty bytes kept by the runner (CRLF line ends, the CLI's closing
cursor escape). Other pty artefacts seen in the field (coloured stderr lines, a terminal
reset glued to the start of a JSON line by older CLIs) are spliced into them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from claudecluster_mcp.events import (
    AgentEvent,
    AssistantText,
    InitEvent,
    OtherEvent,
    ResultEvent,
    StderrLine,
    StreamParser,
    ToolResult,
    ToolUse,
    parse_event,
    strip_terminal_escapes,
)

DATA = Path(__file__).parent / "data"
# Written by Claude Code 2.1.197 on SIGINT/SIGTERM, glued to the next JSON line.
TERMINAL_RESET = b"\x1b[?1006l\x1b[?1003l\x1b(B\x0f\x1b[>4m\x1b[<u\x1b[?25h\x1b7\x1b[r\x1b8\x1b]0;\x07"
COLOURED_STDERR = b'\x1b[0m\x1b[31mCould not parse message into JSON: {"type":"mess\x1b[0m\r\n'


def transcript(name: str) -> bytes:
    return (DATA / f"{name}.pty").read_bytes()


def parse_all(data: bytes, chunk: int | None = None) -> list[AgentEvent]:
    parser = StreamParser()
    events: list[AgentEvent] = []
    step = chunk or len(data) or 1
    for start in range(0, len(data), step):
        events += parser.feed(data[start : start + step])
    return events + parser.close()


def kinds(events: list[AgentEvent]) -> list[str]:
    return [e.kind for e in events]


def test_recorded_write_run_parses_into_typed_events() -> None:
    data = transcript("write_hello")
    assert b"\r\n" in data and data.endswith(b"\x1b[?25h")

    events = parse_all(data)

    assert kinds(events) == ["init", "text", "tool_use", "tool_result", "text", "result"]
    init, text, tool, tool_result, final, result = events
    assert isinstance(init, InitEvent) and init.claude_code_version == "2.1.332"
    assert isinstance(text, AssistantText) and text.text == "Writing hello.txt."
    assert isinstance(tool, ToolUse) and tool.name == "Write"
    assert tool.input["file_path"].endswith("/hello.txt")
    assert isinstance(tool_result, ToolResult) and tool_result.tool_use_id == tool.id
    assert not tool_result.is_error
    assert isinstance(final, AssistantText) and final.text == "done"
    assert isinstance(result, ResultEvent) and result.succeeded
    assert result.num_turns == 2 and result.total_cost_usd > 0
    assert result.session_id == init.session_id


@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_lines_split_across_reads_give_the_same_events(chunk: int) -> None:
    data = transcript("write_hello")

    assert parse_all(data, chunk) == parse_all(data)


def test_lf_only_output_parses_the_same_as_crlf() -> None:
    data = transcript("write_hello")

    assert parse_all(data.replace(b"\r\n", b"\n")) == parse_all(data)


def test_coloured_stderr_lines_become_stderr_events() -> None:
    lines = transcript("write_hello").split(b"\r\n")
    data = b"\r\n".join([lines[0], COLOURED_STDERR.rstrip(b"\r\n"), *lines[1:]])

    events = parse_all(data)

    stderr = [e for e in events if isinstance(e, StderrLine)]
    assert [e.text for e in stderr] == ['Could not parse message into JSON: {"type":"mess']
    assert kinds([e for e in events if not isinstance(e, StderrLine)])[-1] == "result"


def test_escape_sequences_glued_to_json_are_stripped() -> None:
    lines = transcript("write_hello").split(b"\r\n")
    result_line = next(i for i, line in enumerate(lines) if b'"type":"result"' in line)
    lines[result_line] = TERMINAL_RESET + lines[result_line]

    events = parse_all(b"\r\n".join(lines), chunk=5)

    assert isinstance(events[-1], ResultEvent) and events[-1].succeeded
    assert not any(isinstance(e, StderrLine) for e in events)


def test_result_line_not_starting_with_type_is_still_a_result() -> None:
    # The CLI's result object starts with "duration_api_ms", not "type".
    lines = [line for line in transcript("write_hello").split(b"\r\n") if b'"type":"result"' in line]
    assert lines and lines[0].startswith(b'{"duration_api_ms"')

    assert isinstance(parse_all(lines[0])[0], ResultEvent)


def test_background_task_run_has_two_results() -> None:
    events = parse_all(transcript("background_two_results"))

    results = [e for e in events if isinstance(e, ResultEvent)]
    assert [r.result for r in results] == ["started in background", "background finished"]
    assert [r.num_turns for r in results] == [2, 1]
    # Cost is a running total; turns are per result.
    assert results[1].total_cost_usd > results[0].total_cost_usd
    assert sum(isinstance(e, InitEvent) for e in events) == 2
    others = {e.subtype for e in events if isinstance(e, OtherEvent)}
    assert {"task_started", "task_notification"} <= others


def test_api_error_is_success_subtype_but_a_failure() -> None:
    events = parse_all(transcript("api_error_500"))

    result = events[-1]
    assert isinstance(result, ResultEvent)
    assert result.subtype == "success" and result.is_error and not result.succeeded
    assert result.api_error_status == 500
    assert result.terminal_reason == "api_error"
    synthetic = [e for e in events if isinstance(e, AssistantText)]
    assert synthetic and synthetic[0].is_api_error


def test_partial_final_line_is_flushed_on_close() -> None:
    parser = StreamParser()
    assert parser.feed(b'{"type":"system","subtype":"init","session_id":"s1"}') == []

    events = parser.close()

    assert events == [InitEvent(session_id="s1")]


def test_junk_and_non_event_json_are_stderr() -> None:
    events = parse_all(b'[1,2]\r\n{"no_type":1}\r\nplain text\r\n{broken\r\n\r\n')

    assert [e.text for e in events if isinstance(e, StderrLine)] == [
        "[1,2]",
        '{"no_type":1}',
        "plain text",
        "{broken",
    ]


def test_invalid_utf8_does_not_break_the_stream() -> None:
    events = parse_all(b"\xff\xfe garbage\r\n" + transcript("write_hello"))

    assert kinds(events)[0] == "stderr" and kinds(events)[-1] == "result"


def test_unknown_event_types_are_kept_raw() -> None:
    (event,) = parse_event({"type": "rate_limit_event", "info": {"status": "allowed"}})

    assert isinstance(event, OtherEvent)
    assert event.type == "rate_limit_event" and event.raw["info"] == {"status": "allowed"}


def test_strip_terminal_escapes() -> None:
    assert strip_terminal_escapes("\x1b[1;31mred\x1b[0m\r") == "red"
    assert strip_terminal_escapes("\x1b]0;title\x07x\x1b]8;;url\x1b\\y") == "xy"
    assert strip_terminal_escapes(TERMINAL_RESET.decode() + "{}") == "{}"
