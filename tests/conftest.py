"""Shared fixtures: a real git repo, the real `claude` CLI, and the scripted model server."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from claudecluster_mcp.agent_spec import AgentSpec
from claudecluster_mcp.claude_cli import ClaudeBinary, find_claude
from claudecluster_mcp.isolation import sandbox_support
from claudecluster_mcp.model_server import ScriptedModelServer, scripted_env
from claudecluster_mcp.models import Plan, Task
from claudecluster_mcp.scenario import load_scenario
from claudecluster_mcp.settings import EngineSettings
from claudecluster_mcp.store import now


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Tests marked ``sandbox`` need Claude Code's sandbox: skipped with the reason where it
    is missing, except in CI (``CI=true``), where nothing may be skipped silently."""
    if item.get_closest_marker("sandbox") is None:
        return
    support = sandbox_support()
    if not support.available:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI=true but {support.describe()}")
        pytest.skip(support.describe())


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def claude() -> ClaudeBinary:
    """The real Claude Code CLI; `make test` installs the pinned version with `npm ci`."""
    return find_claude()


def make_repo(path: Path) -> Path:
    """A git repository with one commit, as an agent would get it."""
    path.mkdir(parents=True, exist_ok=True)
    env_args = ["-c", "user.name=Test", "-c", "user.email=test@example.invalid"]
    subprocess.run(["git", "init", "-q", "-b", "main", str(path)], check=True)
    (path / "README.md").write_text("# test repo\n")
    subprocess.run(["git", "-C", str(path), "add", "."], check=True)
    subprocess.run(["git", "-C", str(path), *env_args, "commit", "-qm", "init"], check=True)
    return path


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return make_repo(tmp_path / "repo")


@pytest.fixture(name="make_repo")
def make_repo_fixture() -> Callable[[Path], Path]:
    """Make more repositories: ``make_repo(path)``."""
    return make_repo


@pytest.fixture(name="git")
def git_fixture() -> Callable[..., str]:
    """``git(repo, *args)``: run git in ``repo``, return its stdout (fails the test on error)."""

    def run(repo: Path, *args: str) -> str:
        done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=False)
        assert done.returncode == 0, f"git {' '.join(args)}: {done.stderr}"
        return done.stdout

    return run


@pytest.fixture
def free_port() -> Callable[[], int]:
    """``free_port()``: a TCP port on 127.0.0.1 that nothing listens on right now."""

    def pick() -> int:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return int(sock.getsockname()[1])

    return pick


@pytest.fixture
def model_server() -> Iterator[Callable[[dict[str, Any]], ScriptedModelServer]]:
    """Start scripted model servers for scenario dicts; all are stopped after the test."""
    started: list[ScriptedModelServer] = []

    def start(scenario: dict[str, Any]) -> ScriptedModelServer:
        server = ScriptedModelServer(load_scenario(scenario)).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def agent_home(tmp_path: Path) -> Path:
    """An empty HOME for agents: Claude Code's Bash tool sources the user's shell rc files,
    whose side effects (e.g. `pyenv rehash` taking a lock that a cancel test kills) must not
    leak into or out of hermetic runs."""
    home = tmp_path / "agent-home"
    home.mkdir(exist_ok=True)
    return home


@pytest.fixture
def spec_for(tmp_path: Path) -> Callable[..., AgentSpec]:
    """AgentSpec factory: isolated Claude config, scripted-model env, log under tmp_path."""

    def make(server: ScriptedModelServer, prompt: str, cwd: Path, **fields: Any) -> AgentSpec:
        env = {**scripted_env(server.url), "HOME": str(agent_home(tmp_path)), **fields.pop("env", {})}
        fields.setdefault("config_dir", tmp_path / "claude-config")
        fields.setdefault("log_path", tmp_path / "logs" / "run.log")
        return AgentSpec(prompt=prompt, cwd=cwd, env=env, **fields)

    return make


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """The hermetic HOME agents get (see :func:`agent_home`)."""
    return agent_home(tmp_path)


@pytest.fixture
def engine_settings(tmp_path: Path) -> Callable[..., EngineSettings]:
    """EngineSettings factory for agents against a scripted model server: isolated state,
    Claude config and HOME under tmp_path, Bash allowed, short retry delays and timeouts.
    ``engine_settings()`` without a server: the same, for engines that run no agent.

    Isolation is ``none`` unless a test asks for ``sandbox``: these tests are about
    scheduling, merging and recovery, must run where bubblewrap is missing, and their
    probes (a gate writing its pid to tmp_path) write outside the worktree on purpose. The
    sandbox has its own tests (marked ``sandbox``); the whole suite was also run under it."""

    def make(server: ScriptedModelServer | None = None, **overrides: Any) -> EngineSettings:
        model_env = scripted_env(server.url) if server is not None else {}
        values: dict[str, Any] = {
            "state_dir": tmp_path / "state",
            "claude_config_dir": tmp_path / "claude-config",
            "agent_env": {**model_env, "HOME": str(agent_home(tmp_path))},
            "allowed_tools": ["Bash"],
            "isolation": "none",
            "retry_backoff": 0.2,
            "rate_limit_pause": 1.0,
            "restart_stagger": 0.2,
            "inactivity_timeout": 60,
            "wall_timeout": 120,
            "cancel_grace": 2,
        }
        return EngineSettings(**{**values, **overrides})

    return make


@pytest.fixture
def user_env(tmp_path: Path, claude: ClaudeBinary) -> dict[str, str]:
    """The environment a user runs ``claudecluster`` in: no claudecluster settings, the
    hermetic HOME (see :func:`agent_home`; the CLI keeps its state under it), the pinned
    claude, and ``isolation = "none"`` (as in :func:`engine_settings`; a test of the default
    removes ``CLAUDECLUSTER_ISOLATION``)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CLAUDECLUSTER_")}
    return {
        **clean,
        "HOME": str(agent_home(tmp_path)),
        "CLAUDECLUSTER_CLAUDE_BIN": str(claude.path),
        "CLAUDECLUSTER_ISOLATION": "none",
    }


@pytest.fixture
def cli() -> Callable[..., subprocess.CompletedProcess[str]]:
    """``cli(*args, cwd=None, env=None, timeout=120)``: run ``claudecluster *args`` as a user
    would, in a subprocess (``env`` None: this process's environment); never raises on failure."""

    def run(
        *args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "claudecluster_mcp.cli", *args],
            cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, check=False,
        )  # fmt: skip

    return run


# -- stored objects for store-level tests --------------------------------------------------


def _plan(plan_id: str = "p1", repo: Path = Path("/repo"), **fields: Any) -> Plan:
    stamp = now()
    values: dict[str, Any] = {
        "id": plan_id,
        "repo": repo,
        "goal": "make it better",
        "base_ref": "main",
        "base_commit": "a" * 40,
        "target_branch": "main",
        "integration_branch": f"claudecluster/{plan_id}",
        "created_at": stamp,
        "updated_at": stamp,
        **fields,
    }
    return Plan(**values)


def _task(task_id: str, plan_id: str = "p1", **fields: Any) -> Task:
    stamp = now()
    values: dict[str, Any] = {
        "id": task_id,
        "plan_id": plan_id,
        "prompt": f"do {task_id}",
        "run_id": f"run-{task_id}",
        "created_at": stamp,
        "updated_at": stamp,
        **fields,
    }
    return Task(**values)


@pytest.fixture
def make_plan() -> Callable[..., Plan]:
    """``make_plan(plan_id="p1", **fields)``: a Plan with sensible fields."""
    return _plan


@pytest.fixture
def make_task() -> Callable[..., Task]:
    """``make_task(task_id, plan_id="p1", **fields)``: a Task with sensible fields."""
    return _task
