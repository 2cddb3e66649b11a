"""Building an agent's argv and environment from its spec."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from claudecluster_mcp.agent_spec import AgentSpec, agent_env, build_argv
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
