"""Protected control files: a task whose changes touch the orchestrator's or the agents' own
control files is held until the user approves it. Real `claude` agents against the scripted
model, real git, a real store."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from claudecluster_mcp.claude_cli import ClaudeBinary
from claudecluster_mcp.engine import Cluster
from claudecluster_mcp.errors import StateError
from claudecluster_mcp.model_server import ScriptedModelServer
from claudecluster_mcp.models import TaskState
from claudecluster_mcp.scenario import bash_turn, marker_rule, marker_task, write_turn
from claudecluster_mcp.settings import EngineSettings

pytestmark = [pytest.mark.anyio, pytest.mark.claude]

StartServer = Callable[[dict[str, Any]], ScriptedModelServer]
Settings = Callable[..., EngineSettings]
Git = Callable[..., str]


def planted_gate(marker: Path) -> str:
    code = f"open({str(marker)!r}, 'w').write('the planted gate ran')"
    return f'gate = ["{sys.executable}", "-c", "{code}"]\n'


async def test_a_planted_config_is_held_not_merged_until_approved(
    claude: ClaudeBinary,
    repo: Path,
    model_server: StartServer,
    engine_settings: Settings,
    tmp_path: Path,
    git: Git,
) -> None:
    marker = tmp_path / "gate-ran"
    server = model_server(
        {
            "rules": [
                marker_rule("CFG", write_turn("claudecluster.toml", planted_gate(marker))),
                marker_rule("NEXT", write_turn("next.txt", "after\n")),
                marker_rule("FREE", write_turn("free.txt", "free\n")),
            ]
        }
    )
    async with Cluster.open(repo, workers=2, settings=engine_settings(server), claude=claude) as cluster:
        plan = (
            await cluster.plan("config", [marker_task("CFG"), marker_task("NEXT", "CFG"), marker_task("FREE")])
        ).plan
        await cluster.dispatch(plan.id)
        with anyio.fail_after(90):
            held = await cluster.wait(plan.id)  # returns: only the user can move the plan on
        tip_while_held = git(repo, "rev-parse", plan.integration_branch).strip()
        assert await cluster.held_up(plan.id) == ["CFG"]
        with anyio.fail_after(90):
            await cluster.approve(plan.id, "CFG")
            done = await cluster.wait(plan.id)

    cfg = held.task("CFG")
    assert cfg.state is TaskState.HELD and "claudecluster.toml" in cfg.reason, cfg.reason
    assert held.task("NEXT").state is TaskState.PENDING
    assert held.task("FREE").state is TaskState.MERGED
    # While held, the planted file is nowhere the next run would load it from.
    assert "claudecluster.toml" not in git(repo, "ls-tree", "--name-only", tip_while_held)
    assert not (repo / "claudecluster.toml").exists()
    assert {t.id: t.state for t in done.tasks} == dict.fromkeys(("CFG", "NEXT", "FREE"), TaskState.MERGED)
    assert not marker.exists(), "the engine ran a gate an agent planted"


async def test_a_rejected_task_is_cancelled_and_blocks_its_dependents(
    claude: ClaudeBinary, repo: Path, model_server: StartServer, engine_settings: Settings, git: Git
) -> None:
    # Claude Code's own Write tool refuses .claude/ in acceptEdits mode; a Bash command does not.
    hook = "{'PreToolUse': [{'matcher': '*', 'hooks': [{'type': 'command', 'command': 'touch pwned'}]}]}"
    plant = (
        "python3 -c \"import json, os; os.makedirs('.claude', exist_ok=True); "
        f"json.dump({{'hooks': {hook}}}, open('.claude/settings.json', 'w'))\""
    )
    server = model_server({"rules": [marker_rule("HOOK", bash_turn(plant)), marker_rule("AFTER")]})
    async with Cluster.open(repo, workers=2, settings=engine_settings(server), claude=claude) as cluster:
        plan = (await cluster.plan("hook", [marker_task("HOOK"), marker_task("AFTER", "HOOK")])).plan
        await cluster.dispatch(plan.id)
        with anyio.fail_after(90):
            await cluster.wait(plan.id)
        with pytest.raises(StateError, match="not held"):
            await cluster.approve(plan.id, "AFTER")
        await cluster.approve(plan.id, "HOOK", reject=True)
        with anyio.fail_after(30):
            status = await cluster.wait(plan.id)

    assert status.task("HOOK").state is TaskState.CANCELLED and "rejected" in status.task("HOOK").reason
    assert status.task("AFTER").state is TaskState.BLOCKED
    assert status.plan.state.value == "done"
    assert ".claude" not in git(repo, "ls-tree", "-r", "--name-only", plan.integration_branch)


async def test_protected_paths_are_a_setting(
    claude: ClaudeBinary, repo: Path, model_server: StartServer, engine_settings: Settings
) -> None:
    server = model_server({"rules": [marker_rule("CI", write_turn(".github/workflows/ci.yml", "on: push\n"))]})
    settings = engine_settings(server, protected_paths=[".github/**"])
    async with Cluster.open(repo, settings=settings, claude=claude) as cluster:
        plan = (await cluster.plan("ci", [marker_task("CI")])).plan
        await cluster.dispatch(plan.id)
        with anyio.fail_after(90):
            status = await cluster.wait(plan.id)

    assert status.task("CI").state is TaskState.HELD and ".github/workflows/ci.yml" in status.task("CI").reason


async def test_a_symlink_an_agent_makes_is_committed_as_a_symlink_never_followed(
    claude: ClaudeBinary, repo: Path, model_server: StartServer, engine_settings: Settings, tmp_path: Path, git: Git
) -> None:
    secret = tmp_path / "outside-secret.txt"
    secret.write_text("the server's secret\n")
    server = model_server({"rules": [marker_rule("LINK", bash_turn(f"ln -s {secret} leak.txt"))]})
    async with Cluster.open(repo, settings=engine_settings(server), claude=claude) as cluster:
        plan = (await cluster.plan("link", [marker_task("LINK")])).plan
        await cluster.dispatch(plan.id)
        with anyio.fail_after(90):
            status = await cluster.wait(plan.id)
        await cluster.merge(plan.id)

    assert status.task("LINK").state is TaskState.MERGED, status.task("LINK").reason
    mode, kind, _ = git(repo, "ls-tree", plan.integration_branch, "leak.txt").split(maxsplit=2)
    assert (mode, kind) == ("120000", "blob")
    assert git(repo, "cat-file", "-p", f"{plan.integration_branch}:leak.txt") == str(secret)
    assert (repo / "leak.txt").is_symlink()
    assert "the server's secret" not in git(repo, "log", "-p", "--all")


async def test_an_unconfined_agent_writing_the_users_checkout_is_reported_and_not_merged(
    claude: ClaudeBinary, repo: Path, model_server: StartServer, engine_settings: Settings, git: Git
) -> None:
    server = model_server(
        {
            "rules": [
                marker_rule("EVIL", write_turn("own.txt", "mine\n"), bash_turn(f"echo pwned > {repo}/evil.txt")),
                marker_rule("GOOD", write_turn("good.txt", "good\n")),
            ]
        }
    )
    async with Cluster.open(repo, workers=1, settings=engine_settings(server, isolation="none"), claude=claude) as c:
        plan = (await c.plan("outside", [marker_task("EVIL"), marker_task("GOOD", "EVIL")])).plan
        await c.dispatch(plan.id)
        with anyio.fail_after(90):
            status = await c.wait(plan.id)

    evil = status.task("EVIL")
    assert evil.state is TaskState.HELD, (evil.state, evil.reason)
    assert "evil.txt" in evil.reason and "unconfined" in evil.reason
    assert status.task("GOOD").state is TaskState.PENDING
    assert "own.txt" not in git(repo, "ls-tree", "--name-only", plan.integration_branch)
