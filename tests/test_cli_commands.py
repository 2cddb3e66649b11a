"""The plan-level CLI commands as a user runs them, after a real run: status, logs, export,
merge, cancel, workers, init — plus configuration precedence and errors."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
import yaml

from claudecluster_mcp.config import load_config
from claudecluster_mcp.engine import Cluster, EngineSettings
from claudecluster_mcp.errors import ConfigError
from claudecluster_mcp.model_server import ScriptedModelServer, scripted_env
from claudecluster_mcp.scenario import marker_rule, write_turn

Cli = Callable[..., subprocess.CompletedProcess[str]]


def cli_state_dir(env: dict[str, str]) -> Path:
    """Where `claudecluster` keeps its state for a user with this environment."""
    return Path(env["HOME"]) / ".local" / "state" / "claudecluster"


@pytest.mark.claude
def test_run_json_then_status_logs_export_and_merge(
    tmp_path: Path,
    user_env: dict[str, str],
    cli: Cli,
    repo: Path,
    model_server: Callable[[dict[str, Any]], ScriptedModelServer],
) -> None:
    model = model_server({"rules": [marker_rule("w", write_turn("w.txt", "w\n"))]})
    env = {**user_env, **scripted_env(model.url)}
    (tmp_path / "tasks.yaml").write_text(yaml.safe_dump({"tasks": [{"id": "w", "title": "W", "prompt": "[w] go"}]}))

    ran = cli("run", "write w", "--tasks", str(tmp_path / "tasks.yaml"), "--json", cwd=repo, env=env)
    assert ran.returncode == 0, ran.stderr
    report = json.loads(ran.stdout)
    plan_id = report["plan"]["id"]
    assert [t["state"] for t in report["tasks"]] == ["merged"]

    listed = cli("status", "--json", cwd=repo, env=env)
    assert [p["plan_id"] for p in json.loads(listed.stdout)] == [plan_id]
    one = cli("status", plan_id, cwd=repo, env=env)
    assert "merged" in one.stdout and "w" in one.stdout
    logs = cli("logs", f"{plan_id}:w", cwd=repo, env=env)
    assert "tool_use" in logs.stdout and "Write" in logs.stdout
    markdown = cli("export", "md", cwd=repo, env=env)
    assert f"# Plan {plan_id}: write w" in markdown.stdout and "| w | merged |" in markdown.stdout
    html = cli("export", "html", "--plan", plan_id, "-o", str(tmp_path / "r.html"), cwd=repo, env=env)
    assert html.returncode == 0 and "<svg" in (tmp_path / "r.html").read_text()
    dry = cli("merge", plan_id, "--dry-run", cwd=repo, env=env)
    assert "would be merged into main (fast-forward)" in dry.stdout and not (repo / "w.txt").exists()
    merged = cli("merge", plan_id, cwd=repo, env=env)
    assert merged.returncode == 0 and (repo / "w.txt").read_text() == "w\n"
    # From another directory, the plan id alone is enough (the registry knows the repository).
    elsewhere = cli("status", plan_id, cwd=tmp_path, env=env)
    assert elsewhere.returncode == 0 and "merged" in elsewhere.stdout


def test_init_writes_config_and_registers_the_server(repo: Path, user_env: dict[str, str], cli: Cli) -> None:
    (repo / ".mcp.json").write_text(json.dumps({"mcpServers": {"other": {"command": "x"}}}))

    done = cli("init", "--yes", "--workers", "3", "--gate", "pytest -q", "--model", "sonnet", cwd=repo, env=user_env)

    assert done.returncode == 0, done.stderr
    config = load_config(repo)
    assert (config.workers, config.gate, config.model) == (3, ["pytest", "-q"], "sonnet")
    servers = json.loads((repo / ".mcp.json").read_text())["mcpServers"]
    assert set(servers) == {"other", "claudecluster"} and servers["claudecluster"]["args"] == ["serve"]
    assert "claude 2.1.332" in done.stdout
    assert "authentication: none found" in done.stdout  # an empty HOME, no key: said before a run
    again = cli("init", "--yes", cwd=repo, env=user_env)
    assert again.returncode == 2 and "exists; use --force" in again.stderr
    workers = cli("workers", "set", "7", cwd=repo, env=user_env)
    assert workers.returncode == 0 and load_config(repo).workers == 7
    shown = cli("workers", cwd=repo, env=user_env)
    assert "workers: 7" in shown.stdout


def test_config_precedence_flags_env_file_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("CLAUDECLUSTER_"):
            monkeypatch.delenv(key)
    assert load_config(tmp_path).workers == 4
    (tmp_path / "claudecluster.toml").write_text('workers = 6\nmerge_policy = "report"\n')
    assert load_config(tmp_path).workers == 6
    monkeypatch.setenv("CLAUDECLUSTER_WORKERS", "8")
    assert load_config(tmp_path).workers == 8
    assert load_config(tmp_path, workers=2).workers == 2
    assert load_config(tmp_path).merge_policy.value == "report"

    (tmp_path / "claudecluster.toml").write_text("wokers = 3\n")
    with pytest.raises(ConfigError, match=r"wokers .*Extra inputs are not permitted"):
        load_config(tmp_path)
    (tmp_path / "claudecluster.toml").write_text("workers = [\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(tmp_path)
    monkeypatch.setenv("CLAUDECLUSTER_WORKERS", "lots")
    (tmp_path / "claudecluster.toml").unlink()
    with pytest.raises(ConfigError, match=r"workers .*CLAUDECLUSTER_WORKERS"):
        load_config(tmp_path)


def test_cancel_a_plan_from_the_command_line(repo: Path, user_env: dict[str, str], cli: Cli) -> None:

    async def make_plan() -> str:
        settings = EngineSettings(state_dir=cli_state_dir(user_env))
        async with Cluster.open(repo, settings=settings) as cluster:
            return (await cluster.plan("later", [{"id": "a", "prompt": "x"}, {"id": "b", "prompt": "y"}])).plan.id

    plan_id = anyio.run(make_plan)

    one = cli("cancel", f"{plan_id}:a", cwd=repo, env=user_env)
    status = cli("status", plan_id, "--json", cwd=repo, env=user_env)
    assert one.returncode == 0 and f"cancelled {plan_id}:a" in one.stdout
    assert {t["id"]: t["state"] for t in json.loads(status.stdout)["tasks"]} == {"a": "cancelled", "b": "pending"}
    whole = cli("cancel", plan_id, cwd=repo, env=user_env)
    assert whole.returncode == 0
    assert json.loads(cli("status", plan_id, "--json", cwd=repo, env=user_env).stdout)["plan"]["state"] == "cancelled"


def test_cancel_while_another_engine_runs_the_repository(repo: Path, user_env: dict[str, str], cli: Cli) -> None:
    settings = EngineSettings(state_dir=cli_state_dir(user_env))

    async def cancel_while_open() -> tuple[subprocess.CompletedProcess[str], subprocess.CompletedProcess[str], str]:
        # This process holds the repository's engine lease, as `claudecluster run` would.
        async with Cluster.open(repo, settings=settings) as cluster:
            plan_id = (await cluster.plan("busy", [{"id": "a", "prompt": "x"}])).plan.id
            one = await anyio.to_thread.run_sync(lambda: cli("cancel", f"{plan_id}:a", cwd=repo, env=user_env))
            whole = await anyio.to_thread.run_sync(lambda: cli("cancel", plan_id, cwd=repo, env=user_env))
            return one, whole, (await cluster.status(plan_id)).plan.state.value

    one, whole, state = anyio.run(cancel_while_open)

    assert one.returncode == 2 and one.stderr.count("\n") == 1
    assert "another claudecluster engine" in one.stderr and "cancel the whole plan" in one.stderr
    assert whole.returncode == 0 and "marked cancelled" in whole.stdout
    assert state == "cancelled"
