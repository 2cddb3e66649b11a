"""The one source of settings: how agents run, how many at once, how their work is merged.

:class:`EngineSettings` is what the engine runs with; ``claudecluster.toml`` and
``CLAUDECLUSTER_*`` (see :mod:`claudecluster_mcp.config`) load into the same fields, and each
agent's :class:`~claudecluster_mcp.agent.AgentSpec` takes its agent fields from it
(:meth:`EngineSettings.agent_options`) instead of copying them one by one.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .agent_spec import PermissionMode
from .errors import ConfigError
from .isolation import Isolation, SandboxPolicy
from .models import MergePolicy

__all__ = ["MAX_WORKERS", "PROTECTED_PATHS", "EngineSettings", "check_workers", "default_state_dir", "protected"]

MAX_WORKERS = 64
#: The orchestrator's and the agents' own control files: changing them changes what runs next.
PROTECTED_PATHS = ("claudecluster.toml", ".mcp.json", ".claude/**")

# EngineSettings field → AgentSpec field, for every setting an agent run takes as is.
_AGENT_FIELDS = {
    "model": "model",
    "permission_mode": "permission_mode",
    "allowed_tools": "allowed_tools",
    "disallowed_tools": "disallowed_tools",
    "max_turns": "max_turns",
    "max_budget_usd": "max_budget_usd",
    "agent_env": "env",
    "claude_config_dir": "config_dir",
    "wall_timeout": "wall_timeout",
    "inactivity_timeout": "inactivity_timeout",
    "memory_limit_mb": "memory_limit_mb",
    "cancel_grace": "cancel_grace",
}


def default_state_dir() -> Path:
    """``$XDG_STATE_HOME/claudecluster`` (worktrees, agent logs, the plan registry)."""
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "claudecluster"


class EngineSettings(BaseModel):
    """How agents run and how their work is merged. Everything has a sensible default."""

    model_config = ConfigDict(extra="forbid")

    workers: int = Field(default=4, ge=1, le=MAX_WORKERS, description="agents running at once")
    model: str | None = Field(default=None, description="Claude model or alias for agents (default: claude's)")
    permission_mode: PermissionMode = Field(default="acceptEdits", description="permission mode of agents")
    allowed_tools: list[str] = Field(default_factory=list, description='extra tool rules, e.g. "Bash(pytest *)"')
    disallowed_tools: list[str] = Field(default_factory=list, description="tool rules agents may not use")
    max_turns: int | None = Field(default=None, ge=1, description="turn limit per agent run")
    max_budget_usd: float | None = Field(default=None, gt=0, description="cost limit per agent run (USD)")
    wall_timeout: float = Field(default=3600.0, gt=0, description="seconds an agent may run")
    inactivity_timeout: float = Field(default=600.0, gt=0, description="seconds without agent output")
    memory_limit_mb: int | None = Field(default=None, gt=0, description="memory cap of an agent's processes (MB)")
    cancel_grace: float = Field(default=5.0, ge=0, description="seconds a cancelled agent gets to stop")
    max_attempts: int = Field(default=3, ge=1, description="tries per task for transient failures")
    retry_backoff: float = Field(default=5.0, ge=0, description="first retry delay (s); doubles")
    # 10 s, not longer: a storm's end is noticed ~5 s after it on average (~12 s with 30 s),
    # for one probe request every 10 s while it lasts; 60 pauses then span ~10 minutes.
    rate_limit_pause: float = Field(
        default=10.0,
        ge=0,
        description="longest pool pause when retry-after is unknown (pauses start at 1 s and back off)",
    )
    max_rate_limit_pauses: int = Field(default=60, ge=0, description="rate-limit pauses per task before it fails")
    restart_stagger: float = Field(
        default=0.5, ge=0, description="gap between the doubling steps (2, 4, 8, … agents) of a restart after a pause"
    )
    merge_policy: MergePolicy = Field(default=MergePolicy.RESOLVE, description="resolve | report conflicts")
    gate: list[str] | None = Field(default=None, description="command run on each merge candidate (argv)")
    gate_timeout: float = Field(default=600.0, gt=0, description="seconds a gate run may take")
    gate_retries: int = Field(
        default=1, ge=0, description="re-runs of a task whose merge failed the gate (told the gate's output)"
    )
    merge_batch_size: int = Field(
        default=8, ge=1, le=100, description="candidates merged and gated together when a plan has a gate"
    )
    setup: list[str] | None = Field(default=None, description="command run in each new worktree before its agent")
    setup_timeout: float = Field(default=600.0, gt=0, description="seconds a setup run may take")
    copy_files: list[str] = Field(default_factory=list, description="globs copied from your checkout to new worktrees")
    port_base: int = Field(default=20000, ge=1024, le=65535, description="first port of the agents' port blocks")
    ports_per_task: int = Field(default=10, ge=1, le=1000, description="ports in each running agent's block")
    max_cost_usd: float | None = Field(default=None, gt=0, description="cost budget of a plan (USD)")
    max_tokens: int | None = Field(default=None, gt=0, description="token budget of a plan")
    budget_stop: Literal["now", "finish"] = Field(
        default="now", description="when a plan's budget is reached: stop its running agents now, or let them finish"
    )
    agent_env: dict[str, str] = Field(default_factory=dict, description="extra environment for agents")
    claude_config_dir: Path | None = Field(default=None, description="isolated Claude config dir for agents")
    claude_bin: str | None = Field(default=None, description="path of the claude executable")
    state_dir: Path = Field(default_factory=default_state_dir, description="worktrees, agent logs, plan registry")
    retention_days: float = Field(
        default=30.0,
        ge=0,
        description="days a finished plan's worktrees, logs and events are kept (then gc removes them; 0: keep)",
    )
    serialize_overlaps: bool = Field(default=False, description="make tasks touching the same files sequential")
    protected_paths: list[str] = Field(
        default_factory=lambda: list(PROTECTED_PATHS),
        description="globs of control files a task may change only with the user's approval",
    )
    isolation: Isolation = Field(
        default="sandbox",
        description="sandbox: agents' commands and the gate write only their worktree (bwrap+socat on Linux); "
        "none: unconfined",
    )
    sandbox_write_paths: list[Path] = Field(
        default_factory=list, description="more paths sandboxed commands may write (e.g. package caches)"
    )
    sandbox_allowed_domains: list[str] = Field(
        default_factory=list, description="domains sandboxed commands may reach (default none: no network)"
    )
    placement: Literal["local", "ray"] = Field(
        default="local", description="where agents run: local (this machine) or ray (the nodes of a Ray cluster)"
    )
    ray_address: str | None = Field(default=None, description="HOST:PORT of the Ray cluster's head (placement ray)")
    ray_allow_public: bool = Field(default=False, description="allow a ray_address outside private networks")

    @field_validator("sandbox_write_paths")
    @classmethod
    def _absolute(cls, value: list[Path]) -> list[Path]:
        paths = [path.expanduser() for path in value]
        if relative := [str(p) for p in paths if not p.is_absolute()]:
            raise ValueError(f"sandbox_write_paths must be absolute (or start with ~): {', '.join(relative)}")
        return paths

    @field_validator("copy_files")
    @classmethod
    def _inside_the_repository(cls, value: list[str]) -> list[str]:
        for glob in value:
            path = PurePosixPath(glob)
            if not glob.strip() or path.is_absolute() or glob.startswith("~") or ".." in path.parts:
                raise ValueError(f"copy_files globs must stay inside the repository (no '..', not absolute): {glob!r}")
        return value

    def sandbox_policy(self) -> SandboxPolicy | None:
        """What sandboxed commands may touch; None when ``isolation`` is ``none``."""
        if self.isolation == "none":
            return None
        return SandboxPolicy(write_paths=self.sandbox_write_paths, allowed_domains=self.sandbox_allowed_domains)

    def agent_options(self) -> dict[str, Any]:
        """The :class:`~claudecluster_mcp.agent.AgentSpec` fields these settings decide."""
        options = {spec_field: getattr(self, field) for field, spec_field in _AGENT_FIELDS.items()}
        return {**options, "sandbox": self.sandbox_policy()}


def protected(files: Iterable[str], globs: Iterable[str]) -> list[str]:
    """The ``files`` (repository-relative) that match a protected glob (``*`` spans ``/``)."""
    patterns = list(globs)
    return sorted(f for f in files if any(fnmatch.fnmatchcase(f, g) for g in patterns))


def check_workers(count: int) -> int:
    """``count`` if it is a valid pool size (1 to :data:`MAX_WORKERS`), else a ConfigError."""
    if not 1 <= count <= MAX_WORKERS:
        raise ConfigError(f"workers must be between 1 and {MAX_WORKERS}, not {count}")
    return count
