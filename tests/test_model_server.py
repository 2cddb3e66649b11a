"""The scripted model server over real HTTP: SSE streams, turn selection, faults, storms."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest

from claudecluster_mcp.model_server import ScriptedModelServer
from claudecluster_mcp.scenario import load_scenario

CWD = "/work/agents/task-7"
SYSTEM = [
    {"type": "text", "text": "You are Claude Code, Anthropic's official CLI for Claude."},
    {
        "type": "text",
        "text": f"<env>\nPrimary working directory: {CWD}\nIs directory a git repo: Yes\n</env>",
    },
]
PROMPT = "Create hello.py that prints a greeting"
WRITE_INPUT = {
    "file_path": "{cwd}/hello.py",
    "content": "def greet(name):\n    return f'hi {name}'\n\nprint({'a': 1})\n",
}
BUILD_RULE: dict[str, Any] = {
    "name": "build-hello",
    "match": "Create hello.py",
    "turns": [
        {"text": "I'll write the file now.", "tools": [{"name": "Write", "input": WRITE_INPUT}]},
        {
            "tools": [
                {"name": "Bash", "input": {"command": "python {cwd}/hello.py"}},
                {"name": "Read", "input": {"file_path": "{cwd}/hello.py"}},
            ]
        },
        {"text": "Done: hello.py prints a greeting.", "input_tokens": 777, "output_tokens": 55},
    ],
}


@contextmanager
def serve(*rules: dict[str, Any], **scenario: Any) -> Iterator[tuple[ScriptedModelServer, httpx.Client]]:
    """A running server for a scenario built from ``rules``, and a client bound to it."""
    data = {"name": "test-scenario", "rules": list(rules) or [BUILD_RULE], **scenario}
    with (
        ScriptedModelServer(load_scenario(data)) as server,
        httpx.Client(base_url=server.url, timeout=10) as client,
    ):
        yield server, client


def body(
    prompt: str = PROMPT,
    *,
    assistant_turns: int = 0,
    stream: bool = True,
    system: Any = SYSTEM,
) -> dict[str, Any]:
    """A Messages API request like Claude Code's, ``assistant_turns`` deep into the dialogue."""
    messages: list[dict[str, Any]] = [{"role": "user", "content": [{"type": "text", "text": prompt}]}]
    for k in range(assistant_turns):
        tool_id = f"toolu_{k}"
        messages.append(
            {
                "role": "assistant",
                "content": [{"type": "tool_use", "id": tool_id, "name": "Bash", "input": {"command": "x"}}],
            }
        )
        messages.append(
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": tool_id, "content": f"result {k}"}],
            }
        )
    request: dict[str, Any] = {
        "model": "claude-sonnet-4-5",
        "max_tokens": 1024,
        "stream": stream,
        "messages": messages,
    }
    if system is not None:
        request["system"] = system
    return request


def session(name: str) -> dict[str, str]:
    return {"x-claude-code-session-id": name}


def sse_events(text: str) -> list[tuple[str, dict[str, Any]]]:
    """Parse an SSE body into ``(event, data)`` pairs, dropping pings."""
    events: list[tuple[str, dict[str, Any]]] = []
    for chunk in text.split("\n\n"):
        if not chunk.strip():
            continue
        fields = dict(line.split(": ", 1) for line in chunk.splitlines())
        data = json.loads(fields["data"])
        assert data["type"] == fields["event"]
        if fields["event"] != "ping":
            events.append((fields["event"], data))
    return events


def assemble(events: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Rebuild content blocks from stream events the way an SDK client does."""
    blocks: dict[int, dict[str, Any]] = {}
    partial: dict[int, str] = {}
    for name, data in events:
        if name == "content_block_start":
            blocks[data["index"]] = dict(data["content_block"])
            partial[data["index"]] = ""
        elif name == "content_block_delta":
            delta = data["delta"]
            if delta["type"] == "text_delta":
                blocks[data["index"]]["text"] += delta["text"]
            else:
                assert delta["type"] == "input_json_delta"
                partial[data["index"]] += delta["partial_json"]
        elif name == "content_block_stop":
            block = blocks[data["index"]]
            if block["type"] == "tool_use":
                block["input"] = json.loads(partial[data["index"]])
    return [blocks[i] for i in sorted(blocks)]


def streamed_blocks(client: httpx.Client, request: dict[str, Any]) -> list[dict[str, Any]]:
    """POST a streaming request and return the content blocks it assembles to."""
    response = client.post("/v1/messages", json=request)
    assert response.status_code == 200, response.text
    return assemble(sse_events(response.text))


def expected_write_input(cwd: str = CWD) -> dict[str, str]:
    return {"file_path": f"{cwd}/hello.py", "content": WRITE_INPUT["content"]}


# -- streaming ----------------------------------------------------------------------------


def test_stream_tool_use_turn() -> None:
    with serve() as (server, client):
        response = client.post("/v1/messages", json=body())
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response.text)

    names = [name for name, _ in events]
    assert names[0] == "message_start"
    assert names[-2:] == ["message_delta", "message_stop"]
    # Two blocks, each start → one or more deltas → stop, in index order.
    middle = names[1:-2]
    assert middle[0] == "content_block_start"
    assert middle.count("content_block_start") == 2
    assert middle.count("content_block_stop") == 2
    assert set(middle) == {"content_block_start", "content_block_delta", "content_block_stop"}
    indices = [data["index"] for name, data in events[1:-2]]
    assert indices == sorted(indices)
    assert middle[indices.index(1) - 1] == "content_block_stop"

    start = events[0][1]["message"]
    assert start["role"] == "assistant"
    assert start["content"] == []
    assert start["model"] == "claude-sonnet-4-5"
    assert start["stop_reason"] is None
    assert start["id"].startswith("msg_")
    assert start["usage"]["input_tokens"] >= 1

    kinds = [data["delta"]["type"] for name, data in events if name == "content_block_delta"]
    assert "text_delta" in kinds and "input_json_delta" in kinds

    text_block, tool_block = assemble(events)
    assert text_block == {"type": "text", "text": "I'll write the file now."}
    assert tool_block["type"] == "tool_use"
    assert tool_block["name"] == "Write"
    assert tool_block["id"].startswith("toolu_")
    # {cwd} came from the system prompt; the code's own braces passed through untouched.
    assert tool_block["input"] == expected_write_input()

    delta = events[-2][1]
    assert delta["delta"]["stop_reason"] == "tool_use"
    assert delta["usage"]["output_tokens"] >= 1

    [record] = server.requests
    assert record.outcome == "ok"
    assert (record.rule, record.turn, record.cwd, record.stream) == ("build-hello", 0, CWD, True)
    assert record.first_user_text == PROMPT


def test_stream_end_turn_with_usage_override() -> None:
    with serve() as (_, client):
        response = client.post("/v1/messages", json=body(assistant_turns=2))
    assert response.status_code == 200
    events = sse_events(response.text)
    assert [name for name, _ in events] == [
        "message_start",
        "content_block_start",
        *["content_block_delta"] * (len(events) - 5),
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert assemble(events) == [{"type": "text", "text": "Done: hello.py prints a greeting."}]
    assert events[0][1]["message"]["usage"]["input_tokens"] == 777
    assert events[-2][1]["delta"]["stop_reason"] == "end_turn"
    assert events[-2][1]["usage"]["output_tokens"] == 55


def test_turn_selected_by_assistant_message_count() -> None:
    with serve() as (server, client):
        # Out of order on purpose: the turn follows the conversation, not the arrival order.
        second = streamed_blocks(client, body(assistant_turns=1))
        first = streamed_blocks(client, body())
        third = streamed_blocks(client, body(assistant_turns=2))
        records = server.requests

    assert [b["name"] for b in first if b["type"] == "tool_use"] == ["Write"]
    assert [b["name"] for b in second] == ["Bash", "Read"]
    assert second[0]["input"] == {"command": f"python {CWD}/hello.py"}
    assert second[1]["input"] == {"file_path": f"{CWD}/hello.py"}
    assert third == [{"type": "text", "text": "Done: hello.py prints a greeting."}]
    assert [r.turn for r in records] == [1, 0, 2]
    assert records[0].tool_results == ("result 0",)


def test_multiple_tool_calls_get_distinct_ids() -> None:
    with serve() as (_, client):
        blocks = streamed_blocks(client, body(assistant_turns=1))
    assert len({b["id"] for b in blocks}) == 2


def test_cwd_without_system_prompt_is_left_as_is() -> None:
    with serve() as (server, client):
        response = client.post("/v1/messages", json=body(stream=False, system=None))
    assert response.status_code == 200
    tool = response.json()["content"][1]
    assert tool["input"]["file_path"] == "{cwd}/hello.py"
    assert server.requests[0].cwd is None


def test_system_as_plain_string() -> None:
    with serve() as (_, client):
        system = "Primary working directory: /srv/proj\n"
        response = client.post("/v1/messages", json=body(stream=False, system=system))
    assert response.json()["content"][1]["input"] == expected_write_input("/srv/proj")


def test_regex_groups_fill_templates() -> None:
    rule = {
        "name": "fix",
        "regex": r"fix (?P<module>\w+)\.py",
        "turns": [
            {
                "text": "Fixing {module} in {cwd}; {unknown} and {} stay.",
                "tools": [{"name": "Edit", "input": {"file_path": "{cwd}/{module}.py", "n": 3}}],
            }
        ],
    }
    with serve(rule) as (_, client):
        response = client.post("/v1/messages", json=body("please fix parser.py", stream=False))
    text, tool = response.json()["content"]
    assert text["text"] == f"Fixing parser in {CWD}; {{unknown}} and {{}} stay."
    assert tool["input"] == {"file_path": f"{CWD}/parser.py", "n": 3}


# -- plain JSON and the other endpoints ---------------------------------------------------


def test_non_streaming_message() -> None:
    with serve() as (server, client):
        response = client.post("/v1/messages", json=body(stream=False))
        final = client.post("/v1/messages", json=body(assistant_turns=2, stream=False))
        records = server.requests
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    message = response.json()
    assert message["type"] == "message"
    assert message["role"] == "assistant"
    assert message["model"] == "claude-sonnet-4-5"
    assert message["stop_reason"] == "tool_use"
    text, tool = message["content"]
    assert text == {"type": "text", "text": "I'll write the file now."}
    assert tool["type"] == "tool_use" and tool["name"] == "Write"
    assert tool["input"] == expected_write_input()
    assert message["usage"]["input_tokens"] >= 1
    assert message["usage"]["output_tokens"] >= 1

    final_message = final.json()
    assert final_message["stop_reason"] == "end_turn"
    assert final_message["usage"]["input_tokens"] == 777
    assert final_message["usage"]["output_tokens"] == 55
    assert [r.stream for r in records] == [False, False]


def test_default_usage_grows_with_text() -> None:
    short = {"name": "short", "match": "short", "turns": [{"text": "ok"}]}
    long = {"name": "long", "match": "long", "turns": [{"text": "word " * 400}]}
    with serve(short, long) as (_, client):
        a = client.post("/v1/messages", json=body("short", stream=False)).json()["usage"]
        b = client.post("/v1/messages", json=body("long " * 400, stream=False)).json()["usage"]
    assert b["output_tokens"] > a["output_tokens"] >= 1
    assert b["input_tokens"] > a["input_tokens"] >= 1


def test_count_tokens() -> None:
    with serve() as (server, client):
        response = client.post("/v1/messages/count_tokens", json=body())
        records = server.requests
    assert response.status_code == 200
    tokens = response.json()["input_tokens"]
    assert isinstance(tokens, int) and tokens >= 1
    assert [r.path for r in records] == ["/v1/messages/count_tokens"]


def test_probes() -> None:
    with serve() as (_, client):
        head = client.head("/")
        get = client.get("/")
        models = client.get("/v1/models")
    assert head.status_code == 200
    assert get.status_code == 200
    assert get.json()["scenario"] == "test-scenario"
    assert models.status_code == 200
    assert [m["type"] for m in models.json()["data"]] == ["model"]


def test_url_is_loopback_with_real_port() -> None:
    with serve() as (server, _):
        assert server.url.startswith("http://127.0.0.1:")
        assert server.port > 0
        assert server.url == f"http://127.0.0.1:{server.port}"


# -- requests the script cannot answer ----------------------------------------------------


def test_unmatched_conversation() -> None:
    with serve() as (server, client):
        client.post("/v1/messages", json=body())
        response = client.post("/v1/messages", json=body("Something nobody scripted"))
        records = server.requests
    assert response.status_code == 400
    error = response.json()
    assert error["type"] == "error"
    assert error["error"]["type"] == "invalid_request_error"
    message = error["error"]["message"]
    assert "request #1" in message
    assert "test-scenario" in message
    assert "Something nobody scripted" in message
    assert records[1].outcome.startswith("unmatched")
    assert records[1].rule is None


def test_turn_beyond_script() -> None:
    with serve() as (server, client):
        response = client.post("/v1/messages", json=body(assistant_turns=3))
        [record] = server.requests
    assert response.status_code == 400
    message = response.json()["error"]["message"]
    assert "build-hello" in message
    assert "turn 4" in message
    assert "3 turns" in message
    assert record.outcome.startswith("unmatched")
    assert record.rule == "build-hello"


def test_bad_json_body() -> None:
    with serve() as (server, client):
        response = client.post("/v1/messages", content=b"{not json", headers={"content-type": "application/json"})
        ok = client.post("/v1/messages", json=body(stream=False))
        records = server.requests
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert ok.status_code == 200
    assert records[0].outcome.startswith("bad request")


@pytest.mark.parametrize("payload", [{"model": "m"}, {"messages": []}, [1, 2]])
def test_request_without_messages(payload: Any) -> None:
    with serve() as (_, client):
        response = client.post("/v1/messages", json=payload)
    assert response.status_code == 400
    assert "messages" in response.json()["error"]["message"]


# -- HTTP faults --------------------------------------------------------------------------


def fault_rule(fault: dict[str, Any], **turn: Any) -> dict[str, Any]:
    return {
        "name": "faulty",
        "match": PROMPT,
        "turns": [{"text": "recovered", "fault": fault, **turn}, {"text": "second turn"}],
    }


@pytest.mark.parametrize(
    ("kind", "status", "error_type"),
    [
        ("rate_limit", 429, "rate_limit_error"),
        ("overloaded", 529, "overloaded_error"),
        ("server_error", 500, "api_error"),
        ("unauthorized", 401, "authentication_error"),
    ],
)
@pytest.mark.parametrize("stream", [True, False])
def test_http_faults(kind: str, status: int, error_type: str, stream: bool) -> None:
    with serve(fault_rule({"type": kind})) as (server, client):
        response = client.post("/v1/messages", json=body(stream=stream))
        [record] = server.requests
    assert response.status_code == status
    error = response.json()
    assert error["type"] == "error"
    assert error["error"]["type"] == error_type
    assert error["error"]["message"]
    assert record.outcome == f"fault: {kind}"
    if kind == "rate_limit":
        assert float(response.headers["retry-after"]) == 1.0
    else:
        assert "retry-after" not in response.headers


def test_rate_limit_retry_after_and_message() -> None:
    fault = {"type": "rate_limit", "retry_after": 7, "message": "too many scripted requests"}
    with serve(fault_rule(fault)) as (_, client):
        response = client.post("/v1/messages", json=body())
    assert response.status_code == 429
    assert response.headers["retry-after"] == "7"
    assert response.json()["error"]["message"] == "too many scripted requests"


def test_fault_times_one_is_per_conversation() -> None:
    with serve(fault_rule({"type": "overloaded", "times": 1})) as (server, client):
        first = client.post("/v1/messages", json=body(), headers=session("A"))
        retry = client.post("/v1/messages", json=body(), headers=session("A"))
        other = client.post("/v1/messages", json=body(), headers=session("B"))
        other_retry = client.post("/v1/messages", json=body(), headers=session("B"))
        records = server.requests
    assert first.status_code == 529
    assert retry.status_code == 200
    assert assemble(sse_events(retry.text)) == [{"type": "text", "text": "recovered"}]
    assert other.status_code == 529
    assert other_retry.status_code == 200
    assert [r.outcome for r in records] == ["fault: overloaded", "ok", "fault: overloaded", "ok"]


def test_fault_times_two() -> None:
    with serve(fault_rule({"type": "server_error", "times": 2})) as (_, client):
        statuses = [client.post("/v1/messages", json=body(), headers=session("S")).status_code for _ in range(3)]
    assert statuses == [500, 500, 200]


def test_fault_times_null_faults_every_attempt() -> None:
    with serve(fault_rule({"type": "rate_limit", "times": None})) as (_, client):
        statuses = [client.post("/v1/messages", json=body(), headers=session("S")).status_code for _ in range(4)]
        later_turn = client.post("/v1/messages", json=body(assistant_turns=1), headers=session("S"))
    assert statuses == [429] * 4
    assert later_turn.status_code == 200


def test_rate_limit_without_retry_after() -> None:
    with serve(fault_rule({"type": "rate_limit", "retry_after": None})) as (_, client):
        response = client.post("/v1/messages", json=body())
    assert response.status_code == 429
    assert "retry-after" not in response.headers


def test_fault_per_rule_is_met_once_by_all_conversations_together() -> None:
    # A restarted agent is a new conversation: per rule, it gets past the fault.
    with serve(fault_rule({"type": "server_error", "times": 2, "per": "rule"})) as (server, client):
        statuses = [
            client.post("/v1/messages", json=body(), headers=session(name)).status_code for name in ("A", "B", "C", "D")
        ]
        records = server.requests
    assert statuses == [500, 500, 200, 200]
    assert [r.outcome for r in records] == ["fault: server_error"] * 2 + ["ok"] * 2


def test_fault_count_without_session_header_uses_first_message() -> None:
    with serve(fault_rule({"type": "overloaded"})) as (_, client):
        first = client.post("/v1/messages", json=body())
        retry = client.post("/v1/messages", json=body())
    assert (first.status_code, retry.status_code) == (529, 200)


# -- stream faults ------------------------------------------------------------------------


def read_stream(
    client: httpx.Client, request: dict[str, Any], **kwargs: Any
) -> tuple[list[tuple[float, str]], Exception | None]:
    """Stream a request; return ``(seconds since send, line)`` pairs and any read error."""
    lines: list[tuple[float, str]] = []
    started = time.monotonic()
    try:
        with client.stream("POST", "/v1/messages", json=request, **kwargs) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                lines.append((time.monotonic() - started, line))
    except (httpx.RemoteProtocolError, httpx.ReadError) as exc:
        return lines, exc
    return lines, None


def event_names(lines: list[tuple[float, str]]) -> list[str]:
    return [line.removeprefix("event: ") for _, line in lines if line.startswith("event: ")]


def test_cut_drops_the_stream_mid_message() -> None:
    with serve(fault_rule({"type": "cut"})) as (server, client):
        lines, error = read_stream(client, body(), headers=session("C"))
        retry, retry_error = read_stream(client, body(), headers=session("C"))
        records = server.requests
    names = event_names(lines)
    assert names[0] == "message_start"
    assert "message_stop" not in names
    assert "message_delta" not in names
    assert isinstance(error, httpx.RemoteProtocolError)
    # times defaults to 1: the retry gets the whole message.
    assert retry_error is None
    assert event_names(retry)[-1] == "message_stop"
    assert [r.outcome for r in records] == ["fault: cut", "ok"]


def test_cut_in_tool_input() -> None:
    rule = {
        "name": "cut-tool",
        "match": PROMPT,
        "turns": [{"tools": [{"name": "Write", "input": WRITE_INPUT}], "fault": {"type": "cut"}}],
    }
    with serve(rule) as (_, client):
        lines, error = read_stream(client, body())
    names = event_names(lines)
    assert "content_block_start" in names
    assert "content_block_stop" not in names
    assert "message_stop" not in names
    assert error is not None


def test_cut_drops_a_non_streamed_answer_half_way() -> None:
    # Claude Code's fallback after a cut stream is a plain request: times 2 cuts both.
    with serve(fault_rule({"type": "cut", "times": 2})) as (server, client):
        cut_stream, stream_error = read_stream(client, body(), headers=session("C"))
        with pytest.raises(httpx.RemoteProtocolError):
            client.post("/v1/messages", json=body(stream=False), headers=session("C"))
        whole = client.post("/v1/messages", json=body(stream=False), headers=session("C"))
        records = server.requests
    assert stream_error is not None and "message_stop" not in event_names(cut_stream)
    assert whole.json()["content"] == [{"type": "text", "text": "recovered"}]
    assert [r.outcome for r in records] == ["fault: cut", "fault: cut", "ok"]


def test_stall_delays_after_message_start() -> None:
    with serve(fault_rule({"type": "stall", "seconds": 1})) as (_, client):
        lines, error = read_stream(client, body())
    assert error is None
    names = event_names(lines)
    assert names[0] == "message_start"
    assert names[-1] == "message_stop"
    start_at = next(t for t, line in lines if line == "event: message_start")
    stop_at = next(t for t, line in lines if line == "event: message_stop")
    assert start_at < 0.7
    assert stop_at >= 0.95
    assert stop_at - start_at >= 0.9
    # Nothing but message_start (and its data line) arrived during the stall.
    early = [line for t, line in lines if t < 0.9 and line]
    assert all("message_start" in line for line in early)


def test_hang_times_out_the_client() -> None:
    with serve(fault_rule({"type": "hang", "seconds": 30})) as (server, client):
        started = time.monotonic()
        with pytest.raises(httpx.ReadTimeout):
            client.post("/v1/messages", json=body(), timeout=httpx.Timeout(5, read=0.4))
        assert time.monotonic() - started < 1.5
        # The server is still serving, and the hang counted as the turn's one faulty attempt.
        retry = client.post("/v1/messages", json=body(stream=False))
        records = server.requests
    assert retry.status_code == 200
    assert retry.json()["content"] == [{"type": "text", "text": "recovered"}]
    assert [r.outcome for r in records] == ["fault: hang", "ok"]


def test_short_hang_ends_with_an_error() -> None:
    with serve(fault_rule({"type": "hang", "seconds": 0.3})) as (_, client):
        started = time.monotonic()
        response = client.post("/v1/messages", json=body())
        elapsed = time.monotonic() - started
    assert elapsed >= 0.3
    assert response.status_code >= 500
    assert response.json()["type"] == "error"


# -- storms and latency -------------------------------------------------------------------


def test_storm_faults_first_requests_of_any_rule() -> None:
    other = {"name": "other", "match": "something else", "turns": [{"text": "other answer"}]}
    storm = {"requests": 3, "fault": {"type": "overloaded"}}
    with serve(BUILD_RULE, other, storm=storm) as (server, client):
        statuses = [
            client.post("/v1/messages", json=body()).status_code,
            client.post("/v1/messages", json=body("something else")).status_code,
            client.post("/v1/messages", json=body("not scripted at all")).status_code,
        ]
        after = [
            client.post("/v1/messages", json=body(stream=False)),
            client.post("/v1/messages", json=body("something else", stream=False)),
        ]
        records = server.requests
    assert statuses == [529, 529, 529]
    assert [r.status_code for r in after] == [200, 200]
    assert after[1].json()["content"] == [{"type": "text", "text": "other answer"}]
    assert [r.outcome for r in records[:3]] == ["storm fault: overloaded"] * 3
    assert [r.outcome for r in records[3:]] == ["ok", "ok"]


def test_storm_rate_limit_has_retry_after() -> None:
    storm = {"requests": 1, "fault": {"type": "rate_limit", "retry_after": 3}}
    with serve(storm=storm) as (_, client):
        first = client.post("/v1/messages", json=body())
        second = client.post("/v1/messages", json=body())
    assert first.status_code == 429
    assert first.headers["retry-after"] == "3"
    assert first.json()["error"]["type"] == "rate_limit_error"
    assert second.status_code == 200


def test_storm_window_faults_every_request_while_it_lasts() -> None:
    storm = {"after": 0.5, "seconds": 0.6, "fault": {"type": "rate_limit", "retry_after": None}}
    with serve(storm=storm) as (server, client):
        assert server.storm_window is None  # its clock starts with the first request
        statuses = []
        for _ in range(6):
            statuses.append(client.post("/v1/messages", json=body(stream=False)).status_code)
            time.sleep(0.25)
        window = server.storm_window
        records = server.requests
    assert window is not None and window[1] - window[0] == pytest.approx(0.6)
    assert window[0] == pytest.approx(records[0].at + 0.5, abs=0.05)
    # 0, 0.25 s: before; 0.5, 0.75, 1.0 s: in it (give or take the requests' own time); then after.
    assert statuses[:2] == [200, 200] and statuses[-1] == 200
    assert statuses.count(429) in (2, 3)
    faulted = [r for r in records if r.outcome == "storm fault: rate_limit"]
    assert all(window[0] <= r.at < window[1] for r in faulted)


def test_turn_latency() -> None:
    rule = {
        "name": "slow",
        "match": PROMPT,
        "turns": [{"text": "slow", "latency": 0.3}, {"text": "fast"}],
    }
    with serve(rule) as (_, client):
        started = time.monotonic()
        slow = client.post("/v1/messages", json=body())
        slow_elapsed = time.monotonic() - started
        started = time.monotonic()
        fast = client.post("/v1/messages", json=body(assistant_turns=1))
        fast_elapsed = time.monotonic() - started
    assert slow.status_code == fast.status_code == 200
    assert slow_elapsed >= 0.3
    assert fast_elapsed < 0.3


def test_default_latency_and_latency_before_fault() -> None:
    rule = {
        "name": "r",
        "match": PROMPT,
        "turns": [{"text": "a", "fault": {"type": "overloaded"}, "latency": 0.3}, {"text": "b"}],
    }
    with serve(rule, default_latency=0.3) as (_, client):
        started = time.monotonic()
        faulted = client.post("/v1/messages", json=body())
        fault_elapsed = time.monotonic() - started
        started = time.monotonic()
        default = client.post("/v1/messages", json=body(assistant_turns=1))
        default_elapsed = time.monotonic() - started
    assert faulted.status_code == 529
    assert fault_elapsed >= 0.3
    assert default.status_code == 200
    assert default_elapsed >= 0.3


def test_cwd_with_spaces_is_substituted_whole() -> None:
    scenario = load_scenario(
        {
            "rules": [
                {
                    "name": "w",
                    "match": "GO",
                    "turns": [{"tools": [{"name": "Write", "input": {"file_path": "{cwd}/x"}}]}],
                }
            ]
        }
    )
    with ScriptedModelServer(scenario) as server:
        answer = httpx.post(
            server.url + "/v1/messages",
            json={
                "model": "m",
                "max_tokens": 10,
                "system": "Primary working directory: /tmp/my repo\nPlatform: linux",
                "messages": [{"role": "user", "content": "GO"}],
            },
            timeout=5,
        )
    assert answer.json()["content"][0]["input"] == {"file_path": "/tmp/my repo/x"}


def test_explicit_zero_latency_overrides_the_default() -> None:
    scenario = load_scenario(
        {
            "default_latency": 2,
            "rules": [{"name": "w", "match": "GO", "turns": [{"text": "hi", "latency": 0}]}],
        }
    )
    with ScriptedModelServer(scenario) as server:
        started = time.monotonic()
        httpx.post(
            server.url + "/v1/messages",
            json={"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "GO"}]},
            timeout=5,
        )
    assert time.monotonic() - started < 1.5


def test_synthetic_assistant_messages_of_a_resumed_session_do_not_advance_the_script() -> None:
    scenario = load_scenario({"rules": [{"name": "r", "match": "GO", "turns": [{"text": "one"}, {"text": "two"}]}]})
    history = [
        {"role": "user", "content": "GO"},
        {"role": "assistant", "content": [{"type": "text", "text": "one"}]},
        {"role": "user", "content": "next"},
        {"role": "assistant", "content": [{"type": "text", "text": "No response requested."}]},
        {"role": "user", "content": "You were interrupted. Continue."},
    ]
    with ScriptedModelServer(scenario) as server:
        answer = httpx.post(
            server.url + "/v1/messages", json={"model": "m", "max_tokens": 10, "messages": history}, timeout=5
        )
    assert answer.json()["content"] == [{"type": "text", "text": "two"}]


def test_a_scripted_cut_logs_no_traceback() -> None:
    seen: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = seen.append  # type: ignore[method-assign]
    uvicorn_errors = logging.getLogger("uvicorn.error")
    with serve(fault_rule({"type": "cut", "times": 2})) as (_, client):
        uvicorn_errors.addHandler(handler)  # after the start: uvicorn sets up its loggers then
        try:
            read_stream(client, body())
            with pytest.raises(httpx.RemoteProtocolError):
                client.post("/v1/messages", json=body(stream=False))
            client.get("/")  # the server has finished with the cut requests
        finally:
            uvicorn_errors.removeHandler(handler)
    assert not [r for r in seen if r.exc_info], [r.getMessage() for r in seen]
