"""Building an agent's argv and environment, finding `claude`, and deciding outcomes."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from pydantic import ValidationError

from claudecluster_mcp.agent import (
    CLAUDE_BIN_ENV,
    AgentSpec,
    OutcomeStatus,
    agent_env,
    build_argv,
    decide_outcome,
    find_claude,
)
from claudecluster_mcp.errors import ClaudeNotFoundError, ClaudeVersionError
from claudecluster_mcp.events import ApiRetry, ResultEvent
from claudecluster_mcp.proctree import RUN_TAG_VAR

CLAUDE = Path("/opt/claude")
SESSION = "6f1d1f6e-8c1e-4d3a-9a39-2b5b0f1c2d3e"


def spec(**fields: object) -> AgentSpec:
    return AgentSpec.model_validate({"prompt": "do it", "cwd": "/tmp", **fields})


def test_argv_puts_the_prompt_after_double_dash_and_flags_with_equals() -> None:
    argv = build_argv(
        spec(
            prompt="--dangerously-skip-permissions; rm -rf /",
            model="sonnet",
            allowed_tools=["Bash(git *)", "Read"],
            disallowed_tools=["WebFetch"],
            max_turns=5,
            max_budget_usd=0.5,
            append_system_prompt="--be careful",
        ),
        CLAUDE,
        SESSION,
    )

    assert argv[0] == str(CLAUDE)
    assert argv[-2:] == ["--", "--dangerously-skip-permissions; rm -rf /"]
    options = argv[1:-2]
    assert "--strict-mcp-config" in options
    assert "--output-format=stream-json" in options and "--verbose" in options
    assert f"--session-id={SESSION}" in options
    assert "--model=sonnet" in options
    assert "--allowedTools=Bash(git *),Read" in options
    assert "--disallowedTools=WebFetch" in options
    assert "--max-turns=5" in options and "--max-budget-usd=0.5" in options
    assert "--append-system-prompt=--be careful" in options
    # Every option carries its value with "=": no value can be read as a flag.
    assert all(o.startswith("-") for o in options)


def test_argv_resume_and_mcp_config() -> None:
    config = {"mcpServers": {"x": {"command": "x"}}}

    argv = build_argv(spec(resume=SESSION, mcp_config=config), CLAUDE, SESSION)

    assert f"--resume={SESSION}" in argv and not any(a.startswith("--session-id") for a in argv)
    assert "--mcp-config=" + json.dumps(config, separators=(",", ":")) in argv
    assert "--strict-mcp-config" in argv


@pytest.mark.parametrize(
    "fields",
    [
        {"prompt": "   "},
        {"allowed_tools": ["-x"]},
        {"allowed_tools": ["Bash,Read"]},
        {"session_id": "not-a-uuid"},
        {"max_turns": 0},
        {"permission_mode": "yolo"},
        {"unknown_field": 1},
    ],
)
def test_bad_specs_are_rejected(fields: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        spec(**fields)


PARENT = {
    "PATH": "/usr/bin",
    "HOME": "/home/u",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "ANTHROPIC_BASE_URL": "https://gateway.example",
    "ANTHROPIC_API_KEY": "sk-user",
    "CLAUDE_CODE_USE_BEDROCK": "1",
    "AWS_REGION": "eu-west-1",
    "HTTPS_PROXY": "http://proxy:3128",
    "CLAUDECODE": "1",
    "CLAUDE_CODE_ENTRYPOINT": "cli",
    "CLAUDE_CODE_SSE_PORT": "1234",
    "GITHUB_TOKEN": "ghp_secret",
    "DATABASE_URL": "postgres://secret",
    "PYTHONPATH": "/evil",
}


def test_env_is_an_allow_list_without_parent_session_variables(tmp_path: Path) -> None:
    env = agent_env(spec(), tmpdir=tmp_path, run_tag="run1", parent=PARENT)

    for kept in ("PATH", "HOME", "LANG", "LC_ALL", "HTTPS_PROXY", "AWS_REGION"):
        assert env[kept] == PARENT[kept]
    # The user's gateway, key and provider settings reach the agents.
    assert env["ANTHROPIC_BASE_URL"] == "https://gateway.example"
    assert env["ANTHROPIC_API_KEY"] == "sk-user"
    assert env["CLAUDE_CODE_USE_BEDROCK"] == "1"
    for dropped in ("CLAUDECODE", "CLAUDE_CODE_ENTRYPOINT", "CLAUDE_CODE_SSE_PORT"):
        assert dropped not in env
    for secret in ("GITHUB_TOKEN", "DATABASE_URL", "PYTHONPATH"):
        assert secret not in env
    assert env["TMPDIR"] == env["CLAUDE_CODE_TMPDIR"] == str(tmp_path)
    assert env[RUN_TAG_VAR] == "run1"


def test_spec_env_and_config_dir_override_the_users_settings(tmp_path: Path) -> None:
    s = spec(env={"ANTHROPIC_BASE_URL": "http://127.0.0.1:9"}, config_dir=tmp_path / "cfg")

    env = agent_env(s, tmpdir=tmp_path, run_tag="r", parent=PARENT)

    assert env["ANTHROPIC_BASE_URL"] == "http://127.0.0.1:9"
    assert env["CLAUDE_CONFIG_DIR"] == str(tmp_path / "cfg")


@pytest.mark.skipif(os.geteuid() != 0, reason="the CLI's root check only applies to root")
def test_bypass_permissions_as_root_marks_the_sandbox(tmp_path: Path) -> None:
    assert "IS_SANDBOX" not in agent_env(spec(), tmpdir=tmp_path, run_tag="r", parent=PARENT)

    env = agent_env(spec(permission_mode="bypassPermissions"), tmpdir=tmp_path, run_tag="r", parent=PARENT)

    assert env["IS_SANDBOX"] == "1"


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


def fake_claude(path: Path, version_output: str) -> Path:
    path.write_text(f"#!/bin/sh\necho '{version_output}'\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_find_claude_reports_where_it_looked_and_how_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(CLAUDE_BIN_ENV, "/nonexistent/claude")

    with pytest.raises(ClaudeNotFoundError) as caught:
        find_claude()

    message = str(caught.value)
    assert "/nonexistent/claude" in message and CLAUDE_BIN_ENV in message
    assert "npm ci" in message


def test_find_claude_rejects_a_too_old_version(tmp_path: Path) -> None:
    old = fake_claude(tmp_path / "claude", "2.1.197 (Claude Code)")

    with pytest.raises(ClaudeVersionError, match=r"version 2\.1\.197.*needs 2\.1\.300"):
        find_claude(old)


def test_find_claude_rejects_something_that_is_not_claude(tmp_path: Path) -> None:
    impostor = fake_claude(tmp_path / "claude", "hello")

    with pytest.raises(ClaudeVersionError, match="did not report a Claude Code version"):
        find_claude(impostor)


def test_find_claude_prefers_the_env_var(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    chosen = fake_claude(tmp_path / "my-claude", "2.1.400 (Claude Code)")
    monkeypatch.setenv(CLAUDE_BIN_ENV, str(chosen))

    found = find_claude()

    assert found.path == chosen and found.version == "2.1.400"


def test_find_claude_finds_the_pinned_project_install() -> None:
    found = find_claude()

    assert found.version == "2.1.332"
