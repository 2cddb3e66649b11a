"""Every way a `claudecluster` command can fail, as a user sees it: one line on stderr, never a
traceback, exit code 2 for errors a user can act on (``ClusterError``), 130 for Ctrl-C and 70,
with the traceback logged, for bugs. Task groups wrap what their body raises in exception
groups; the CLI's one boundary unwraps them."""

from __future__ import annotations

import importlib
import logging
import pkgutil
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

import claudecluster_mcp
from claudecluster_mcp import commands
from claudecluster_mcp.cli import main
from claudecluster_mcp.errors import ClusterError, ConfigError
from claudecluster_mcp.model_server import ScriptedModelServer, scripted_env

PACKAGE = Path(claudecluster_mcp.__file__).parent

Cli = Callable[..., subprocess.CompletedProcess[str]]


def one_error_line(stderr: str) -> str:
    """The single line a failed command printed (fails if there was anything else)."""
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("claudecluster: error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


def bench_outside_a_checkout(tmp_path: Path, env: dict[str, str]) -> dict[str, str]:
    """An installed copy of the package: no bench/ folder next to it."""
    shutil.copytree(PACKAGE, tmp_path / "site" / "claudecluster_mcp")
    return {**env, "PYTHONPATH": str(tmp_path / "site")}


def bad_mcp_json(tmp_path: Path, env: dict[str, str]) -> dict[str, str]:
    (tmp_path / "repo" / ".mcp.json").write_text("{not json")
    return env


def no_claude(tmp_path: Path, env: dict[str, str]) -> dict[str, str]:
    return {**env, "CLAUDECLUSTER_CLAUDE_BIN": "/nonexistent/claude"}


# (command line, how to prepare the environment, what the one line says); {tmp} is tmp_path,
# which holds bad.yaml (an invalid scenario, and not a tasks file) and the repository.
ERROR_PATHS: list[tuple[list[str], Callable[[Path, dict[str, str]], dict[str, str]] | None, str]] = [
    (["run"], None, "give a goal (and optionally --tasks FILE), or --plan ID"),
    (["run", "g", "--tasks", "{tmp}/bad.yaml"], None, "must hold `tasks:`"),
    (["run", "g", "--tasks", "{tmp}/missing.yaml"], None, "cannot read the tasks file"),
    (["run", "g", "--workers", "0"], None, "workers (flag): Input should be greater than or equal to 1"),
    (["run", "g"], no_claude, "The Claude Code CLI (`claude`) was not found"),
    (["status", "pnope0000"], None, "unknown plan id 'pnope0000'"),
    (["status", "--repo", "{tmp}"], None, "is not a git repository"),
    (["logs", "no-colon"], None, "must be <plan_id>:<task id>"),
    (["logs", "pnope0000:a"], None, "unknown plan id 'pnope0000'"),
    (["cancel", "pnope0000"], None, "unknown plan id 'pnope0000'"),
    (["workers", "set"], None, "workers set needs a number"),
    (["merge", "pnope0000"], None, "unknown plan id 'pnope0000'"),
    (["export", "md"], None, "no claudecluster plans in"),
    (["init", "--yes"], bad_mcp_json, ".mcp.json is not valid JSON"),
    (["check", "--claude", "/nonexistent/claude"], None, "The Claude Code CLI (`claude`) was not found"),
    (["check"], no_claude, "npm ci"),
    (["demo"], no_claude, "The Claude Code CLI (`claude`) was not found"),
    (["bench", "--only", "runner"], bench_outside_a_checkout, "run `claudecluster bench` from a source checkout"),
    (["model-server", "--scenario", "{tmp}/bad.yaml"], None, "bad.yaml is invalid: rules.0.turns"),
    (["serve", "--transport", "http", "--host", "0.0.0.0", "--no-auth"], None, "--no-auth is allowed only on a loop"),
    (["serve", "--token-file", "{tmp}/missing-token"], None, "cannot read the token file"),
]


@pytest.mark.parametrize(
    ("args", "setup", "message"),
    ERROR_PATHS,
    ids=[" ".join(a[:2]) + f"-{i}" for i, (a, _, _) in enumerate(ERROR_PATHS)],
)
def test_every_command_fails_with_one_line_and_exit_2(
    tmp_path: Path,
    repo: Path,
    user_env: dict[str, str],
    cli: Cli,
    args: list[str],
    setup: Callable[[Path, dict[str, str]], dict[str, str]] | None,
    message: str,
) -> None:
    (tmp_path / "bad.yaml").write_text("rules:\n  - name: r\n    match: x\n    turns: []\n")
    env = setup(tmp_path, user_env) if setup else user_env

    done = cli(*[a.replace("{tmp}", str(tmp_path)) for a in args], cwd=repo, env=env)

    assert done.returncode == 2, (done.stdout, done.stderr)
    assert message in one_error_line(done.stderr)


@pytest.mark.claude
def test_a_failing_planner_inside_the_engine_is_one_line_not_an_exception_group(
    repo: Path,
    user_env: dict[str, str],
    cli: Cli,
    model_server: Callable[[dict[str, Any]], ScriptedModelServer],
) -> None:
    # The planning agent runs inside the engine's task group; no rule answers it, so the model
    # API says 400 and the planner raises PlanValidationError from within that group.
    model = model_server({"rules": [{"name": "other", "match": "[never asked]", "turns": [{"text": "no"}]}]})

    done = cli("run", "add a greeting", cwd=repo, env={**user_env, **scripted_env(model.url)})

    assert done.returncode == 2, done.stderr
    line = one_error_line(done.stderr)
    assert "the planning agent failed: API Error: 400" in line and "ExceptionGroup" not in done.stderr


def all_cluster_errors() -> list[type[ClusterError]]:
    """ClusterError and every subclass, wherever defined (every module imported first)."""
    for info in pkgutil.iter_modules(claudecluster_mcp.__path__):
        importlib.import_module(f"claudecluster_mcp.{info.name}")
    found: list[type[ClusterError]] = []
    pending: list[type[ClusterError]] = [ClusterError]
    while pending:
        cls = pending.pop()
        found.append(cls)
        pending += cls.__subclasses__()
    return sorted(set(found), key=lambda cls: cls.__name__)


def test_the_error_tree_is_walked() -> None:
    names = {cls.__name__ for cls in all_cluster_errors()}

    assert {"ClusterError", "PlanValidationError", "EngineBusyError", "ModelUnavailableError", "GitError"} <= names


async def _raise_inside_a_task_group(error: BaseException) -> None:
    async with anyio.create_task_group() as tg:
        tg.start_soon(anyio.sleep_forever)
        raise error


@pytest.mark.parametrize("in_task_group", [False, True], ids=["raised", "in-task-group"])
@pytest.mark.parametrize("error_type", all_cluster_errors(), ids=lambda cls: cls.__name__)
def test_every_cluster_error_is_one_line_from_a_command(
    error_type: type[ClusterError], in_task_group: bool, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    error = error_type(f"{error_type.__name__} happened\n  do this about it")

    async def failing_status(*args: Any, **kwargs: Any) -> int:
        if in_task_group:
            await _raise_inside_a_task_group(error)
        raise error

    monkeypatch.setattr(commands, "status_command", failing_status)

    code = main(["status"])

    assert code == 2
    assert capsys.readouterr().err == f"claudecluster: error: {error_type.__name__} happened; do this about it\n"


def test_several_errors_from_one_group_are_still_one_line(monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    async def failing_status(*args: Any, **kwargs: Any) -> int:
        raise ExceptionGroup("two", [ConfigError("first"), ExceptionGroup("nested", [ConfigError("second")])])

    monkeypatch.setattr(commands, "status_command", failing_status)

    assert main(["status"]) == 2
    assert capsys.readouterr().err == "claudecluster: error: first (and 1 more errors)\n"


@pytest.mark.parametrize(
    "error",
    [RuntimeError("boom"), ExceptionGroup("mixed", [ConfigError("fine"), RuntimeError("boom")])],
    ids=["plain", "mixed-group"],
)
def test_a_bug_is_logged_with_its_traceback_and_exits_70(
    error: Exception, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, capsys: Any
) -> None:
    async def buggy_status(*args: Any, **kwargs: Any) -> int:
        await _raise_inside_a_task_group(error)
        return 0

    monkeypatch.setattr(commands, "status_command", buggy_status)

    with caplog.at_level(logging.ERROR):
        code = main(["status"])

    assert code == 70
    [record] = [r for r in caplog.records if r.name == "claudecluster_mcp.cli"]
    assert "bug in claudecluster" in record.getMessage() and record.exc_info is not None
    assert "claudecluster: error:" not in capsys.readouterr().err


def test_ctrl_c_inside_a_task_group_exits_130(monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    async def interrupted_status(*args: Any, **kwargs: Any) -> int:
        raise BaseExceptionGroup("interrupted", [KeyboardInterrupt()])

    monkeypatch.setattr(commands, "status_command", interrupted_status)

    assert main(["status"]) == 130
    assert capsys.readouterr().err.startswith("claudecluster: interrupted — agents stopped")
