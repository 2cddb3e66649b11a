"""What to run: :class:`AgentSpec`, and the argv and environment it becomes.

The spec is validated and never passed through a shell: every option carries its value
with ``=``, the prompt goes after ``--``, and the environment is an allow-list of the
parent's (minus a parent Claude Code session's own variables) plus the run's settings.
Agents load only the user's Claude Code settings (never a worktree's project or local
settings, which an earlier agent could have written) plus, with a :class:`SandboxPolicy`,
the sandbox settings on argv.
"""

from __future__ import annotations

import json
import os
import tempfile
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .isolation import SandboxPolicy, claude_sandbox_settings
from .proctree import RUN_TAG_VAR

__all__ = [
    "AgentSpec",
    "PermissionMode",
    "agent_env",
    "build_argv",
    "run_tmpdir",
    "scrubbed_env",
]

PermissionMode = Literal["acceptEdits", "auto", "bypassPermissions", "default", "dontAsk", "manual", "plan"]


class AgentSpec(BaseModel):
    """Everything needed to start one agent. Validated; never passed through a shell."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1)
    cwd: Path
    model: str | None = None
    permission_mode: PermissionMode = "acceptEdits"
    allowed_tools: list[str] = Field(default_factory=list)
    disallowed_tools: list[str] = Field(default_factory=list)
    max_turns: int | None = Field(default=None, ge=1)
    max_budget_usd: float | None = Field(default=None, gt=0)
    mcp_config: dict[str, Any] | Path | None = None
    append_system_prompt: str | None = None
    json_schema: dict[str, Any] | None = None
    session_id: str | None = None
    resume: str | None = None
    env: dict[str, str] = Field(default_factory=dict)
    config_dir: Path | None = None
    wall_timeout: float | None = Field(default=3600.0, gt=0)
    inactivity_timeout: float | None = Field(default=600.0, gt=0)
    memory_limit_mb: int | None = Field(default=None, gt=0)
    cancel_grace: float = Field(default=5.0, ge=0)
    log_path: Path | None = None
    #: None: Bash runs unconfined (isolation "none"); else inside Claude Code's sandbox.
    sandbox: SandboxPolicy | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt_has_text(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt is empty")
        return value

    @field_validator("allowed_tools", "disallowed_tools")
    @classmethod
    def _tools_are_names(cls, value: list[str]) -> list[str]:
        for tool in value:
            if not tool or tool.startswith("-") or "," in tool:
                raise ValueError(f"bad tool rule {tool!r}: one rule per item, no commas, not starting with '-'")
        return value

    @field_validator("session_id", "resume")
    @classmethod
    def _uuid_like(cls, value: str | None) -> str | None:
        if value is not None:
            uuid.UUID(value)
        return value


def build_argv(spec: AgentSpec, claude: Path, session_id: str, *, tmpdir: Path | None = None) -> list[str]:
    """The argv for ``spec``: ``--flag=value`` so no value reads as an option; prompt after ``--``.

    ``--strict-mcp-config`` is always passed: otherwise a ``.mcp.json`` in the agent's
    working tree would start its servers without approval. ``--setting-sources=user`` too:
    otherwise ``.claude/settings*.json`` in the worktree (hooks, permissions, an env), which
    an earlier agent may have written and merged, would run with this agent. With
    ``spec.sandbox``, ``--settings`` puts Bash in Claude Code's sandbox, writable only in
    ``spec.cwd``, ``tmpdir`` (the run's TMPDIR) and the policy's paths, and Bash is allowed
    (``disallowed_tools`` still forbids commands).
    """
    argv = [
        str(claude),
        "-p",
        "--output-format=stream-json",
        "--verbose",
        "--strict-mcp-config",
        "--setting-sources=user",
        f"--permission-mode={spec.permission_mode}",
    ]
    if spec.sandbox is not None:
        writable = [spec.cwd, *([tmpdir] if tmpdir is not None else [])]
        settings = claude_sandbox_settings(spec.sandbox, writable)
        argv.append("--settings=" + json.dumps(settings, separators=(",", ":")))
    if spec.resume:
        argv.append(f"--resume={spec.resume}")
    else:
        argv.append(f"--session-id={session_id}")
    if spec.model:
        argv.append(f"--model={spec.model}")
    allowed = list(spec.allowed_tools)
    if spec.sandbox is not None and "Bash" not in allowed:
        # Every Bash command runs in the sandbox (none may leave it), so all of them may run:
        # auto-allow alone still refuses commands the CLI cannot analyse (e.g. `{ …; }`).
        allowed.append("Bash")
    if allowed:
        argv.append("--allowedTools=" + ",".join(allowed))
    if spec.disallowed_tools:
        argv.append("--disallowedTools=" + ",".join(spec.disallowed_tools))
    if spec.max_turns is not None:
        argv.append(f"--max-turns={spec.max_turns}")
    if spec.max_budget_usd is not None:
        argv.append(f"--max-budget-usd={spec.max_budget_usd:g}")
    if isinstance(spec.mcp_config, dict):
        argv.append("--mcp-config=" + json.dumps(spec.mcp_config, separators=(",", ":")))
    elif spec.mcp_config is not None:
        argv.append(f"--mcp-config={spec.mcp_config}")
    if spec.append_system_prompt:
        argv.append(f"--append-system-prompt={spec.append_system_prompt}")
    if spec.json_schema is not None:
        argv.append("--json-schema=" + json.dumps(spec.json_schema, separators=(",", ":")))
    argv += ["--", spec.prompt]
    return argv


# Passed through from the parent environment: basics, locale, TLS and proxies, cloud
# credentials for Bedrock/Vertex, and the user's ANTHROPIC_* / CLAUDE_CODE_* settings.
_ENV_ALLOW = frozenset(
    {
        "PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "TZ", "TMP", "TEMP",
        "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "NODE_EXTRA_CA_CERTS",
        "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY", "http_proxy", "https_proxy",
        "no_proxy", "all_proxy", "XDG_CONFIG_HOME", "XDG_CACHE_HOME", "XDG_DATA_HOME",
        "XDG_STATE_HOME", "XDG_RUNTIME_DIR", "CLAUDE_CONFIG_DIR", "GIT_AUTHOR_NAME",
        "GIT_AUTHOR_EMAIL", "GIT_COMMITTER_NAME", "GIT_COMMITTER_EMAIL", "IS_SANDBOX",
        "API_TIMEOUT_MS", "BASH_DEFAULT_TIMEOUT_MS", "BASH_MAX_TIMEOUT_MS", "MCP_TIMEOUT",
        "MCP_TOOL_TIMEOUT", "MAX_MCP_OUTPUT_TOKENS", "MAX_THINKING_TOKENS", "ENABLE_TOOL_SEARCH",
        "DISABLE_AUTOUPDATER", "DISABLE_TELEMETRY", "DISABLE_ERROR_REPORTING",
        "GOOGLE_APPLICATION_CREDENTIALS", "CLOUD_ML_REGION",
    }
)  # fmt: skip
_ENV_ALLOW_PREFIXES = ("LC_", "ANTHROPIC_", "CLAUDE_CODE_", "AWS_", "VERTEX_REGION_")
# Set by a parent Claude Code session (e.g. when claudecluster runs as its MCP server);
# an agent inheriting them would think it is that session's child.
_ENV_PARENT_SESSION = frozenset(
    {
        "CLAUDECODE", "CLAUDE_CODE_ENTRYPOINT", "CLAUDE_CODE_SSE_PORT", "CLAUDE_CODE_SESSION_ID",
        "CLAUDE_CODE_EXECPATH", "CLAUDE_CODE_MESSAGING_SOCKET", "CLAUDE_CODE_MESSAGING_TOKEN",
        "CLAUDE_CODE_CHILD_SESSION", "CLAUDE_CODE_TOOL_USE_ID", "CLAUDE_CODE_SHELL_HANDOVER_KEY",
        "CLAUDE_CODE_SHELL_HANDOVER_PATH", "CLAUDE_CODE_REMOTE_SESSION_ID",
        "CLAUDE_CODE_HOST_SESSION_ID", "CLAUDE_CODE_LAUNCHED_BY_SESSION_IDS",
        "CLAUDE_CODE_SPAWNED_BY_SERVER", "CLAUDE_CODE_SPAWN_TIMESTAMP_MS",
        "CLAUDE_CODE_SESSION_NAME", "CLAUDE_CODE_SESSION_KIND", "CLAUDE_CODE_SESSION_ORIGIN",
        "CLAUDE_CODE_SESSION_LOG", "CLAUDE_CODE_TASK_LIST_ID", "CLAUDE_CODE_TMPDIR",
        "CLAUDE_CODE_ACTION", "CLAUDE_CODE_TEAMMATE_COMMAND", "CLAUDE_CODE_TMUX_SESSION",
    }
)  # fmt: skip


# What an agent needs to reach the model, and nothing else does (the merge gate gets none).
_ENV_CREDENTIALS = frozenset({"GOOGLE_APPLICATION_CREDENTIALS", "CLOUD_ML_REGION", "IS_SANDBOX"})
_ENV_CREDENTIAL_PREFIXES = ("ANTHROPIC_", "CLAUDE_CODE_", "AWS_", "VERTEX_REGION_")


def scrubbed_env(parent: Mapping[str, str] | None = None, *, credentials: bool = True) -> dict[str, str]:
    """An allow-list of ``parent`` (default ``os.environ``): basics, locale, TLS and proxies,
    minus a parent Claude Code session's variables; with ``credentials``, also the model
    and cloud settings agents need (``ANTHROPIC_*``, ``CLAUDE_CODE_*``, ``AWS_*``, …).
    Tokens and secrets of the server's own environment never pass."""
    source = os.environ if parent is None else parent
    env = {
        key: value
        for key, value in source.items()
        if (key in _ENV_ALLOW or key.startswith(_ENV_ALLOW_PREFIXES)) and key not in _ENV_PARENT_SESSION
    }
    if not credentials:
        env = {
            key: value
            for key, value in env.items()
            if key not in _ENV_CREDENTIALS and not key.startswith(_ENV_CREDENTIAL_PREFIXES)
        }
    env.setdefault("PATH", os.defpath)
    return env


def agent_env(
    spec: AgentSpec,
    *,
    tmpdir: Path,
    run_tag: str,
    parent: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment for an agent: :func:`scrubbed_env` of ``parent`` plus the run's own
    settings, then ``spec.env`` (which wins)."""
    env = scrubbed_env(parent)
    env.update(
        {
            "TMPDIR": str(tmpdir),
            "CLAUDE_CODE_TMPDIR": str(tmpdir),
            "TERM": "dumb",
            "NO_COLOR": "1",
            RUN_TAG_VAR: run_tag,
        }
    )
    if spec.config_dir is not None:
        env["CLAUDE_CONFIG_DIR"] = str(spec.config_dir)
    if spec.permission_mode == "bypassPermissions" and hasattr(os, "geteuid") and os.geteuid() == 0:
        # The CLI refuses bypass mode as root unless told it runs in a sandbox; the caller
        # asked for bypass explicitly, and each agent works in its own worktree.
        env.setdefault("IS_SANDBOX", "1")
    env.update(spec.env)
    return env


def run_tmpdir(run_id: str) -> Path:
    """The private TMPDIR of a run. Derived from the run id (kept short: the CLI puts unix
    sockets in it), so that crash recovery can remove it when the run's supervisor died."""
    return Path(tempfile.gettempdir()) / f"ccrun-{run_id}"
