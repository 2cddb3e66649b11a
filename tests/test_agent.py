"""The agent runner with the real `claude` CLI against the scripted model server."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import psutil
import pytest

from claudecluster_mcp.agent import AgentRun, run_agent
from claudecluster_mcp.agent_spec import AgentSpec
from claudecluster_mcp.claude_cli import ClaudeBinary
from claudecluster_mcp.errors import AgentError, ClaudeNotFoundError
from claudecluster_mcp.events import AgentEvent, ApiRetry, InitEvent, ToolUse
from claudecluster_mcp.model_server import ScriptedModelServer
from claudecluster_mcp.outcome import OutcomeStatus, RunState
from claudecluster_mcp.proctree import RUN_TAG_VAR
from claudecluster_mcp.scenario import bash_turn, marker_rule, write_turn

pytestmark = [pytest.mark.anyio, pytest.mark.claude]

StartServer = Callable[[dict[str, Any]], ScriptedModelServer]
SpecFor = Callable[..., AgentSpec]

WRITE_HELLO = {
    "name": "write",
    "rules": [
        {
            "name": "hello",
            "match": "WRITE-HELLO",
            "turns": [write_turn("hello.txt", "hello\n", text="Writing hello.txt."), {"text": "done"}],
        }
    ],
}


def processes_tagged(run_id: str) -> list[int]:
    tagged = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(RUN_TAG_VAR) == run_id and proc.status() != psutil.STATUS_ZOMBIE:
                tagged.append(proc.pid)
        except psutil.Error:
            continue
    return tagged


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def test_write_tool_creates_the_file_and_reports_the_run(
    claude: ClaudeBinary, repo: Path, model_server: StartServer, spec_for: SpecFor
) -> None:
    server = model_server(WRITE_HELLO)
    events: list[AgentEvent] = []
    run = AgentRun(spec_for(server, "WRITE-HELLO please", repo), claude=claude, on_event=events.append)

    outcome = await run.run()

    assert outcome.status is OutcomeStatus.SUCCEEDED, outcome.reason
    assert (repo / "hello.txt").read_text() == "hello\n"
    assert outcome.exit_code == 0
    assert outcome.num_turns == 2
    assert outcome.final_text == "done"
    assert not outcome.api_error
    assert outcome.cost_usd > 0
    assert outcome.usage.input_tokens > 0 and outcome.usage.output_tokens > 0
    init = next(e for e in events if isinstance(e, InitEvent))
    assert outcome.session_id == init.session_id == run.session_id
    assert [e.name for e in events if isinstance(e, ToolUse)] == ["Write"]
    assert run.state is RunState.FINISHED
    # The raw pty transcript is kept, and the per-run TMPDIR is gone.
    assert outcome.log_path is not None and b'"type":"result"' in outcome.log_path.read_bytes()
    assert run.tmpdir is not None and not run.tmpdir.exists()
    assert [r.outcome for r in server.requests] == ["ok", "ok"]


async def test_multi_turn_bash_read_and_edit(
    claude: ClaudeBinary, repo: Path, model_server: StartServer, spec_for: SpecFor
) -> None:
    server = model_server(
        {
            "rules": [
                marker_rule(
                    "BASH-EDIT",
                    bash_turn("printf 'alpha\\nbeta\\n' > notes.txt"),
                    {"tools": [{"name": "Read", "input": {"file_path": "{cwd}/notes.txt"}}]},
                    {
                        "tools": [
                            {
                                "name": "Edit",
                                "input": {
                                    "file_path": "{cwd}/notes.txt",
                                    "old_string": "beta",
                                    "new_string": "gamma",
                                },
                            }
                        ]
                    },
                )
            ]
        }
    )
    spec = spec_for(server, "[BASH-EDIT] the notes", repo, allowed_tools=["Bash"])

    outcome = await run_agent(spec, claude=claude)

    assert outcome.status is OutcomeStatus.SUCCEEDED, outcome.reason
    assert (repo / "notes.txt").read_text() == "alpha\ngamma\n"
    assert outcome.num_turns == 4
    # The model saw the real tool results: the Read result holds the Bash-written text.
    read_result = server.requests[2].tool_results[0]
    assert "alpha" in read_result and "beta" in read_result


async def test_cancel_during_bash_leaves_no_process_alive(
    claude: ClaudeBinary, repo: Path, model_server: StartServer, spec_for: SpecFor
) -> None:
    sleeper = "python3 -c 'import time; time.sleep(120)'"
    command = (
        f"({sleeper} & echo $! > bg.pid) ; "  # backgrounded
        f"(setsid {sleeper} & echo $! > daemon.pid) ; "  # double-forked into its own session
        f"echo $$ > shell.pid; {sleeper}"  # the foreground command the CLI waits for
    )
    server = model_server({"rules": [marker_rule("LONG-BASH", bash_turn(command))]})
    run = AgentRun(
        spec_for(server, "[LONG-BASH] go", repo, allowed_tools=["Bash"], cancel_grace=3),
        claude=claude,
    )
    outcome = None

    async def cancel_when_started() -> None:
        pid_files = [repo / "bg.pid", repo / "daemon.pid", repo / "shell.pid"]
        with anyio.fail_after(30):
            while not all(p.exists() and p.read_text().strip() for p in pid_files):  # noqa: ASYNC110
                await anyio.sleep(0.1)
        await anyio.sleep(0.3)
        run.cancel()

    async with anyio.create_task_group() as tg:
        tg.start_soon(cancel_when_started)
        outcome = await run.run()

    assert outcome.status is OutcomeStatus.CANCELLED
    tool_pids = [int((repo / name).read_text()) for name in ("bg.pid", "daemon.pid", "shell.pid")]
    for pid in [*tool_pids, *outcome.pids]:
        assert not alive(pid), f"process {pid} of the cancelled run survived"
    assert processes_tagged(run.run_id) == []


async def test_wall_clock_timeout_stops_the_run(
    claude: ClaudeBinary, repo: Path, model_server: StartServer, spec_for: SpecFor
) -> None:
    server = model_server({"rules": [marker_rule("WALL", bash_turn("python3 -c 'import time; time.sleep(120)'"))]})
    spec = spec_for(server, "[WALL] clock", repo, allowed_tools=["Bash"], wall_timeout=4, cancel_grace=1)

    with anyio.fail_after(30):
        outcome = await run_agent(spec, claude=claude)

    assert outcome.status is OutcomeStatus.TIMED_OUT
    assert "wall-clock timeout" in outcome.reason
    assert 4 <= outcome.duration_s < 20
    assert not any(alive(pid) for pid in outcome.pids)


async def test_inactivity_timeout_catches_a_stalled_model(
    claude: ClaudeBinary, repo: Path, model_server: StartServer, spec_for: SpecFor
) -> None:
    # The CLI itself would wait 300 s for a stalled stream.
    server = model_server(
        {"rules": [marker_rule("STALL", {"text": "never", "fault": {"type": "stall", "seconds": 600}})]}
    )
    spec = spec_for(server, "[STALL] now", repo, inactivity_timeout=3, cancel_grace=1)

    with anyio.fail_after(30):
        outcome = await run_agent(spec, claude=claude)

    assert outcome.status is OutcomeStatus.TIMED_OUT
    assert "inactivity timeout" in outcome.reason
    assert not outcome.api_error
    assert outcome.duration_s < 15


async def test_http_429_is_rate_limited(
    claude: ClaudeBinary, repo: Path, model_server: StartServer, spec_for: SpecFor
) -> None:
    server = model_server(
        {
            "rules": [
                marker_rule("LIMITED", {"text": "x", "fault": {"type": "rate_limit", "retry_after": 1, "times": None}})
            ]
        }
    )

    outcome = await run_agent(spec_for(server, "[LIMITED] call", repo), claude=claude)

    assert outcome.status is OutcomeStatus.RATE_LIMITED
    assert outcome.api_error and outcome.api_error_status == 429
    assert "429" in outcome.reason


async def test_cli_retries_show_as_waiting_then_rate_limited(
    claude: ClaudeBinary, repo: Path, model_server: StartServer, spec_for: SpecFor
) -> None:
    server = model_server(
        {
            "rules": [
                marker_rule("RETRY", {"text": "x", "fault": {"type": "rate_limit", "retry_after": 1, "times": None}})
            ]
        }
    )
    states: list[RunState] = []
    run: AgentRun

    def watch(event: AgentEvent) -> None:
        states.append(run.state)

    spec = spec_for(server, "[RETRY] call", repo, env={"CLAUDE_CODE_MAX_RETRIES": "1"})
    run = AgentRun(spec, claude=claude, on_event=watch)

    outcome = await run.run()

    retries = [e for e in run.events if isinstance(e, ApiRetry)]
    assert len(retries) == 1 and retries[0].error_status == 429
    assert RunState.WAITING in states
    assert outcome.status is OutcomeStatus.RATE_LIMITED
    assert outcome.retry_after_s is not None and outcome.retry_after_s > 0
    assert len(server.requests) == 2


@pytest.mark.parametrize(
    ("fault", "expected"),
    [("server_error", "500"), ("overloaded", "529"), ("unauthorized", "API key")],
)
async def test_api_errors_fail_with_a_reason_and_are_marked_as_api_errors(
    claude: ClaudeBinary,
    repo: Path,
    model_server: StartServer,
    spec_for: SpecFor,
    fault: str,
    expected: str,
) -> None:
    server = model_server({"rules": [marker_rule("BROKEN", {"text": "x", "fault": {"type": fault, "times": None}})]})

    outcome = await run_agent(spec_for(server, "[BROKEN] api", repo), claude=claude)

    assert outcome.status is OutcomeStatus.FAILED
    assert expected in outcome.reason
    assert outcome.exit_code == 1
    assert outcome.api_error


async def test_unreachable_model_api_is_an_api_error_without_a_status(
    claude: ClaudeBinary, repo: Path, model_server: StartServer, spec_for: SpecFor, free_port: Callable[[], int]
) -> None:
    server = model_server(WRITE_HELLO)
    spec = spec_for(server, "WRITE-HELLO", repo, env={"ANTHROPIC_BASE_URL": f"http://127.0.0.1:{free_port()}"})

    outcome = await run_agent(spec, claude=claude)

    assert outcome.status is OutcomeStatus.FAILED
    assert outcome.api_error and outcome.api_error_status is None
    assert server.requests == []


async def test_unmatched_request_fails_naming_the_request(
    claude: ClaudeBinary, repo: Path, model_server: StartServer, spec_for: SpecFor
) -> None:
    server = model_server(WRITE_HELLO)

    outcome = await run_agent(spec_for(server, "something unscripted", repo), claude=claude)

    assert outcome.status is OutcomeStatus.FAILED
    assert "matches no rule" in outcome.reason
    assert server.requests[0].outcome.startswith("unmatched")


async def test_max_turns_is_a_failure(
    claude: ClaudeBinary, repo: Path, model_server: StartServer, spec_for: SpecFor
) -> None:
    server = model_server(WRITE_HELLO)

    outcome = await run_agent(spec_for(server, "WRITE-HELLO once", repo, max_turns=1), claude=claude)

    assert outcome.status is OutcomeStatus.FAILED
    assert "maximum number of turns" in outcome.reason
    assert not outcome.api_error


async def test_permission_denials_are_reported(
    claude: ClaudeBinary, repo: Path, model_server: StartServer, spec_for: SpecFor
) -> None:
    server = model_server({"rules": [marker_rule("DENIED", bash_turn("echo hi > denied.txt"))]})

    outcome = await run_agent(spec_for(server, "[DENIED] bash", repo, permission_mode="dontAsk"), claude=claude)

    assert outcome.status is OutcomeStatus.SUCCEEDED
    assert [d["tool_name"] for d in outcome.permission_denials] == ["Bash"]
    assert not (repo / "denied.txt").exists()


async def test_memory_cap_stops_the_run(
    claude: ClaudeBinary, repo: Path, model_server: StartServer, spec_for: SpecFor
) -> None:
    # claude alone needs ~200 MB, so a 50 MB cap trips while the model is stalled.
    server = model_server({"rules": [marker_rule("MEMORY", {"text": "x", "fault": {"type": "stall", "seconds": 600}})]})
    spec = spec_for(server, "[MEMORY] hog", repo, memory_limit_mb=50, cancel_grace=1)

    with anyio.fail_after(30):
        outcome = await run_agent(spec, claude=claude)

    assert outcome.status is OutcomeStatus.FAILED
    assert "memory cap exceeded" in outcome.reason


async def test_repo_mcp_json_is_not_started(
    claude: ClaudeBinary, repo: Path, model_server: StartServer, spec_for: SpecFor, tmp_path: Path
) -> None:
    # A hostile .mcp.json in the task's repo would run its command without approval.
    marker = tmp_path / "mcp-server-started"
    planted = {"mcpServers": {"evil": {"command": "touch", "args": [str(marker)]}}}
    (repo / ".mcp.json").write_text(json.dumps(planted))
    server = model_server(WRITE_HELLO)
    events: list[AgentEvent] = []

    outcome = await run_agent(spec_for(server, "WRITE-HELLO", repo), claude=claude, on_event=events.append)

    assert outcome.status is OutcomeStatus.SUCCEEDED, outcome.reason
    assert not marker.exists()
    init = next(e for e in events if isinstance(e, InitEvent))
    assert init.mcp_servers == []


async def test_prompt_starting_with_a_dash_is_a_prompt_not_a_flag(
    claude: ClaudeBinary, repo: Path, model_server: StartServer, spec_for: SpecFor
) -> None:
    server = model_server(WRITE_HELLO)

    outcome = await run_agent(spec_for(server, "--help WRITE-HELLO", repo), claude=claude)

    assert outcome.status is OutcomeStatus.SUCCEEDED, outcome.reason
    assert (repo / "hello.txt").exists()


async def test_missing_binary_is_a_clear_error(repo: Path, spec_for: SpecFor, model_server: StartServer) -> None:
    server = model_server(WRITE_HELLO)
    gone = ClaudeBinary(path=Path("/nonexistent/claude"), version="2.1.332")

    with pytest.raises(ClaudeNotFoundError, match="npm ci"):
        await run_agent(spec_for(server, "WRITE-HELLO", repo), claude=gone)


async def test_agent_env_has_no_parent_session_variables(
    claude: ClaudeBinary,
    repo: Path,
    model_server: StartServer,
    spec_for: SpecFor,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CLAUDECODE", "1")
    monkeypatch.setenv("CLAUDE_CODE_ENTRYPOINT", "cli")
    monkeypatch.setenv("SOME_SECRET_TOKEN", "hunter2")
    server = model_server({"rules": [marker_rule("ENV", bash_turn("env > env.txt"))]})

    outcome = await run_agent(spec_for(server, "[ENV] dump", repo, allowed_tools=["Bash"]), claude=claude)

    assert outcome.status is OutcomeStatus.SUCCEEDED, outcome.reason
    seen = dict(line.split("=", 1) for line in (repo / "env.txt").read_text().splitlines() if "=" in line)
    assert "SOME_SECRET_TOKEN" not in seen
    assert seen.get("CLAUDE_CODE_ENTRYPOINT") != "cli"
    assert seen.get("ANTHROPIC_BASE_URL") == server.url
    assert os.environ["CLAUDECODE"] == "1"  # the parent's own environment is untouched


async def test_background_task_run_waits_for_the_last_result(
    claude: ClaudeBinary, repo: Path, model_server: StartServer, spec_for: SpecFor
) -> None:
    # A backgrounded Bash command makes the CLI emit a result, keep running until the
    # command ends, then run another turn and emit a second result.
    command = "python3 -c 'import time; time.sleep(2)'; echo finished > bg-done.txt"
    server = model_server(
        {
            "rules": [
                {
                    "name": "BACKGROUND",
                    "match": "BACKGROUND",
                    "turns": [
                        {"tools": [{"name": "Bash", "input": {"command": command, "run_in_background": True}}]},
                        {"text": "started in background"},
                        {"text": "background finished"},
                    ],
                }
            ]
        }
    )

    outcome = await run_agent(spec_for(server, "BACKGROUND job", repo, allowed_tools=["Bash"]), claude=claude)

    assert outcome.status is OutcomeStatus.SUCCEEDED, outcome.reason
    assert outcome.final_text == "background finished"
    assert outcome.num_turns == 3  # 2 before the first result + 1 after
    assert (repo / "bg-done.txt").read_text() == "finished\n"


async def test_a_prompt_too_long_for_the_command_line_says_so(
    claude: ClaudeBinary, repo: Path, spec_for: SpecFor, model_server: StartServer
) -> None:
    server = model_server({"rules": [marker_rule("LONG")]})
    # Linux refuses any single argument over 128 KiB (MAX_ARG_STRLEN) with E2BIG.
    spec = spec_for(server, "[LONG] " + "x" * 200_000, repo)
    with pytest.raises(AgentError, match="longer than the system allows; shorten"):
        await run_agent(spec, claude=claude)
