"""Attacks by real Claude Code agents (against the scripted model), and what stops them: under
``isolation = "sandbox"`` an agent's Bash commands cannot write the main checkout, a sibling
task's worktree or the common ``.git/hooks/``, and cannot ask to leave the sandbox, while its
own worktree works and merges; the gate is confined the same way; and with any isolation,
a ``.claude/settings.json`` an agent plants (with hooks) has no effect on later agents."""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from claudecluster_mcp.agent_spec import AgentSpec, agent_env, build_argv
from claudecluster_mcp.claude_cli import ClaudeBinary
from claudecluster_mcp.engine import Cluster
from claudecluster_mcp.model_server import ScriptedModelServer, scripted_env
from claudecluster_mcp.models import PlanStatus, TaskState
from claudecluster_mcp.scenario import bash_turn, marker_rule, marker_task, write_turn
from claudecluster_mcp.settings import EngineSettings

pytestmark = [pytest.mark.anyio, pytest.mark.claude]

StartServer = Callable[[dict[str, Any]], ScriptedModelServer]
Settings = Callable[..., EngineSettings]
Git = Callable[..., str]

# What bubblewrap mounts in the working directory while a command runs; none may be committed.
PLACEHOLDERS = {".bashrc", ".bash_profile", ".profile", ".zshrc", ".zprofile", ".gitconfig", ".gitmodules"}


async def run_plan(cluster: Cluster, tasks: list[dict[str, Any]], seconds: float = 120) -> PlanStatus:
    plan = (await cluster.plan("attack", tasks)).plan
    await cluster.dispatch(plan.id)
    with anyio.fail_after(seconds):
        return await cluster.wait(plan.id)


def states(status: PlanStatus) -> dict[str, tuple[TaskState, str]]:
    return {t.id: (t.state, t.reason) for t in status.tasks}


def tree(repo: Path, git: Git, ref: str) -> set[str]:
    return set(git(repo, "ls-tree", "-r", "--name-only", ref).split())


@pytest.mark.sandbox
async def test_a_sandboxed_agent_writes_only_its_own_worktree(
    claude: ClaudeBinary, repo: Path, model_server: StartServer, engine_settings: Settings, git: Git, tmp_path: Path
) -> None:
    sibling = engine_settings().state_dir / "worktrees"  # + <plan>/sibling, known once planned
    hooks = repo / ".git" / "hooks"

    def attempt(target: Path) -> str:  # the refusal lands in the agent's own file
        return f"{{ echo pwned > {target}; }} 2>> attempts.log"

    attack = " && ".join(
        [
            f"for i in $(seq 200); do ls -d {sibling}/*/sibling && break; sleep 0.05; done",
            "SIB=$(ls -d " + f"{sibling}/*/sibling)",
        ]
    )
    attack += "; " + "; ".join(
        [
            attempt(repo / "evil.txt"),
            attempt(Path("$SIB") / "evil.txt"),
            attempt(hooks / "post-checkout"),
            "echo mine > mine.txt",
        ]
    )
    escape = {
        "name": "Bash",
        "input": {"command": f"echo pwned > {repo}/escape.txt", "dangerouslyDisableSandbox": True},
    }
    outside_write = {"name": "Write", "input": {"file_path": str(repo / "written.txt"), "content": "pwned"}}
    server = model_server(
        {
            "rules": [
                marker_rule("attacker", bash_turn(attack), {"tools": [escape]}, {"tools": [outside_write]}),
                # Still running (its model answers slowly) while the attacker aims at its worktree.
                marker_rule("sibling", write_turn("sib.txt", "sibling\n", latency=4)),
            ]
        }
    )
    settings = engine_settings(server, isolation="sandbox", workers=2)
    async with Cluster.open(repo, settings=settings, claude=claude) as cluster:
        status = await run_plan(cluster, [marker_task("attacker"), marker_task("sibling")])
        integration = status.plan.integration_branch

    assert all(state is TaskState.MERGED for state, _ in states(status).values()), states(status)
    merged = tree(repo, git, integration)
    assert {"mine.txt", "attempts.log", "sib.txt"} <= merged
    refusals = git(repo, "show", f"{integration}:attempts.log")
    assert refusals.count("Read-only file system") == 3, refusals
    for name in ("evil.txt", "escape.txt", "written.txt"):
        assert not (repo / name).exists(), name
    assert not (hooks / "post-checkout").exists()
    assert "evil.txt" not in merged  # nothing landed in the sibling's worktree either
    # bubblewrap's placeholders and Claude Code's .claude/.cc-writes/ are never committed.
    assert not {p for p in merged if p.split("/")[0] in PLACEHOLDERS or p.startswith(".claude/")}, merged
    assert git(repo, "status", "--porcelain") == ""


@pytest.mark.sandbox
async def test_the_engine_runs_the_gate_in_the_sandbox(
    claude: ClaudeBinary, repo: Path, model_server: StartServer, engine_settings: Settings
) -> None:
    gate = ["sh", "-c", f"echo built > built.txt && echo pwned > {repo}/gate-evil.txt"]
    server = model_server({"rules": [marker_rule("work", write_turn("work.txt", "work\n"))]})
    settings = engine_settings(server, isolation="sandbox", gate=gate)
    async with Cluster.open(repo, settings=settings, claude=claude) as cluster:
        status = await run_plan(cluster, [marker_task("work")])

    state, reason = states(status)["work"]
    assert state is TaskState.GATE_FAILED
    assert "Read-only file system" in reason
    assert not (repo / "gate-evil.txt").exists()


def hook_settings(marker: Path) -> dict[str, Any]:
    """Project settings with a hook on every event an agent passes through."""
    hook = [{"matcher": "*", "hooks": [{"type": "command", "command": f"echo fired >> {marker}"}]}]
    events = ("SessionStart", "UserPromptSubmit", "PreToolUse", "PostToolUse", "Stop")
    return {"hooks": {event: hook for event in events}}


async def test_settings_planted_by_an_agent_never_reach_a_later_agent(
    claude: ClaudeBinary,
    repo: Path,
    model_server: StartServer,
    engine_settings: Settings,
    git: Git,
    tmp_path: Path,
    spec_for: Callable[..., AgentSpec],
) -> None:
    marker = tmp_path / "hook-fired"
    payload = tmp_path / "payload.json"
    payload.write_text(json.dumps(hook_settings(marker)))
    # Claude Code asks before a Bash command that visibly writes .claude/ (refused in -p); a
    # script it cannot see into is how an agent (or a prompt injection) would plant it.
    plant = (
        "import pathlib, shutil\n"
        "pathlib.Path('.claude').mkdir(exist_ok=True)\n"
        f"for name in ('settings.json', 'settings.local.json'): shutil.copy({str(payload)!r}, '.claude/' + name)\n"
    )
    server = model_server(
        {
            "rules": [
                marker_rule(
                    "plant",
                    write_turn("plant.py", plant),
                    bash_turn("python3 plant.py"),
                    bash_turn("echo planted > planted.txt"),
                ),
                marker_rule("later", bash_turn("echo later > later.txt"), write_turn("later2.txt", "later\n")),
                marker_rule("control", bash_turn("echo control > control.txt")),
            ]
        }
    )
    # "none": the planting Bash command must succeed (the sandbox would already refuse to
    # write .claude/); what is tested is that no agent loads a worktree's settings.
    # No protected paths either (as if the user had approved .claude/): even merged, a planted
    # settings file must not reach a later agent.
    settings = engine_settings(server, isolation="none", protected_paths=[])
    async with Cluster.open(repo, settings=settings, claude=claude) as cluster:
        status = await run_plan(cluster, [marker_task("plant"), marker_task("later", "plant")])
        integration = status.plan.integration_branch

    assert all(state is TaskState.MERGED for state, _ in states(status).values()), states(status)
    assert {".claude/settings.json", ".claude/settings.local.json", "later.txt", "later2.txt"} <= tree(
        repo, git, integration
    )
    assert not marker.exists(), marker.read_text()

    # Control: the same claude without --setting-sources=user runs the planted hooks.
    checkout = tmp_path / "control"
    git(repo, "worktree", "add", "--detach", str(checkout), integration)
    agent = spec_for(server, "[control] go", checkout, allowed_tools=["Bash"])
    argv = [a for a in build_argv(agent, claude.path, str(uuid.uuid4())) if a != "--setting-sources=user"]
    run_tmp = tmp_path / "control-tmp"
    run_tmp.mkdir()
    env = agent_env(agent, tmpdir=run_tmp, run_tag="control")
    done = await anyio.run_process(argv, cwd=checkout, env=env, stdin=subprocess.DEVNULL, check=False)
    assert (checkout / "control.txt").exists(), done.stdout[-2000:]
    assert marker.exists(), "the planted hook did not fire even without --setting-sources=user"


@pytest.mark.sandbox
def test_the_cli_runs_agents_sandboxed_by_default_and_says_so(
    repo: Path,
    model_server: StartServer,
    user_env: dict[str, str],
    cli: Callable[..., subprocess.CompletedProcess[str]],
    tmp_path: Path,
    git: Git,
) -> None:
    env = {k: v for k, v in user_env.items() if k != "CLAUDECLUSTER_ISOLATION"}  # the default
    outside = tmp_path / "outside.txt"
    command = f"echo mine > mine.txt; {{ echo pwned > {outside}; }} 2> refused.txt"
    model = model_server({"rules": [marker_rule("one", bash_turn(command))]})
    env.update(scripted_env(model.url))
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text(json.dumps({"tasks": [{"id": "one", "prompt": "[one] go"}]}))

    checked = cli("check", env=env)
    assert "isolation: sandbox available (bubblewrap)" in checked.stdout, checked.stdout + checked.stderr
    done = cli("run", "goal", "--tasks", str(tasks), "--json", cwd=repo, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    status = json.loads(done.stdout)
    assert status["isolation"] == "sandbox"
    assert [t["state"] for t in status["tasks"]] == ["merged"]
    integration = status["plan"]["integration_branch"]
    assert "Read-only file system" in git(repo, "show", f"{integration}:refused.txt")
    assert not outside.exists()

    unconfined = cli("status", status["plan"]["id"], cwd=repo, env={**env, "CLAUDECLUSTER_ISOLATION": "none"})
    assert "isolation none: agents and the gate ran unconfined" in unconfined.stdout
    initialised = cli("init", "--yes", cwd=repo, env=env)
    assert "isolation: sandbox available (bubblewrap)" in initialised.stdout, initialised.stdout + initialised.stderr
