"""Worktree setup and the fleet's environment: copy_files and the setup command run in every
new worktree before its agent (real `claude` against the scripted model, real git); each
agent, its setup and its gate learn their plan, task and a block of ports no other running
agent holds; copying refuses every way out of the two trees (planted symlinks)."""

from __future__ import annotations

import itertools
import json
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from pydantic import ValidationError

from claudecluster_mcp.claude_cli import ClaudeBinary
from claudecluster_mcp.engine import Cluster, EngineSettings
from claudecluster_mcp.errors import ConfigError, RepositoryError
from claudecluster_mcp.model_server import ScriptedModelServer
from claudecluster_mcp.models import TaskState
from claudecluster_mcp.ports import PortBlocks
from claudecluster_mcp.report import event_line
from claudecluster_mcp.scenario import bash_turn, marker_rule, marker_task
from claudecluster_mcp.task_worktree import copy_files

pytestmark = pytest.mark.anyio

StartServer = Callable[[dict[str, Any]], ScriptedModelServer]
Settings = Callable[..., EngineSettings]
Git = Callable[..., str]

# Each agent records what it sees, then waits until all three are running: their port
# blocks were held at the same time.
_AGENT = (
    "cat .env node_modules/marker > seen-$CLAUDECLUSTER_TASK_ID.txt && "
    "echo $CLAUDECLUSTER_PLAN_ID $CLAUDECLUSTER_PORT_BASE >> seen-$CLAUDECLUSTER_TASK_ID.txt && "
    "echo $CLAUDECLUSTER_PORT_BASE > {ports}/$CLAUDECLUSTER_TASK_ID && "
    "python3 -c 'import os, time; [time.sleep(0.2) for _ in range(300) if len(os.listdir(\"{ports}\")) < 3]'"
)
_SETUP = "import os; os.mkdir('node_modules'); print('installed'); open('node_modules/marker', 'w').write(os.environ['CLAUDECLUSTER_TASK_ID'] + ' ' + os.environ['CLAUDECLUSTER_PORT_BASE'] + '\\n')"  # noqa: E501
_GATE = "import json, os, sys; json.dump({{k: v for k, v in os.environ.items() if k.startswith('CLAUDECLUSTER_')}}, open('{out}/' + os.environ['CLAUDECLUSTER_TASK_ID'] + '.json', 'w'))"  # noqa: E501


@pytest.mark.claude
async def test_setup_copy_files_and_a_port_block_for_each_concurrent_agent(
    claude: ClaudeBinary,
    repo: Path,
    model_server: StartServer,
    engine_settings: Settings,
    git: Git,
    tmp_path: Path,
) -> None:
    (repo / ".gitignore").write_text("node_modules/\n")  # .env is not ignored: the engine keeps it out
    git(repo, "add", ".gitignore")
    git(repo, "-c", "user.name=T", "-c", "user.email=t@example.invalid", "commit", "-qm", "ignore")
    (repo / ".env").write_text("GREETING=hello\n")  # untracked, as it would be
    ports, gates = tmp_path / "ports", tmp_path / "gates"
    ports.mkdir()
    gates.mkdir()
    names = ("a", "b", "c")
    server = model_server({"rules": [marker_rule(n, bash_turn(_AGENT.format(ports=ports))) for n in names]})
    settings = engine_settings(
        server,
        copy_files=[".env"],
        setup=[sys.executable, "-c", _SETUP],
        gate=[sys.executable, "-c", _GATE.format(out=gates)],
        merge_batch_size=1,  # one gate run per task, so each sees its own task's variables
        port_base=41000,
        ports_per_task=10,
    )

    async with Cluster.open(repo, workers=3, settings=settings, claude=claude) as cluster:
        plan = (await cluster.plan("set up", [marker_task(n) for n in names])).plan
        await cluster.dispatch(plan.id)
        with anyio.fail_after(120):
            status = await cluster.wait(plan.id)
        setup_events = await cluster.events(plan.id, "a")

    assert {t.id: t.state for t in status.tasks} == dict.fromkeys(names, TaskState.MERGED), [
        (t.id, t.reason) for t in status.tasks
    ]
    blocks = {n: int((ports / n).read_text()) for n in names}
    starts = sorted(blocks.values())
    assert all(s >= 41000 and (s - 41000) % 10 == 0 for s in starts)
    assert all(b - a >= 10 for a, b in itertools.pairwise(starts)), blocks  # no block overlaps
    for name in names:
        seen = git(repo, "show", f"{plan.integration_branch}:seen-{name}.txt").splitlines()
        # The agent saw the copied .env, the setup's work (with the same port block) and its ids.
        assert seen == ["GREETING=hello", f"{name} {blocks[name]}", f"{plan.id} {blocks[name]}"]
        gate_env = json.loads((gates / f"{name}.json").read_text())
        assert gate_env["CLAUDECLUSTER_PLAN_ID"] == plan.id and gate_env["CLAUDECLUSTER_TASK_ID"] == name
        assert gate_env["CLAUDECLUSTER_TASK_IDS"] == name
        assert int(gate_env["CLAUDECLUSTER_PORT_BASE"]) >= 41000
        assert status.task(name).setup_s is not None and status.task(name).setup_s > 0
    # The copy is never committed, even where .gitignore would not have kept it out.
    assert ".env" not in git(repo, "ls-tree", "-r", "--name-only", plan.integration_branch).split()
    setup = next(e for e in setup_events if e["kind"] == "setup")
    assert setup["data"]["ok"] and setup["data"]["copied"] == [".env"] and "installed" in setup["data"]["output"]
    assert "setup" in event_line(setup) and "ok in" in event_line(setup) and "installed" in event_line(setup)


async def test_a_failing_setup_ends_the_task_with_its_output_and_starts_no_agent(
    repo: Path, model_server: StartServer, engine_settings: Settings, claude: ClaudeBinary
) -> None:
    server = model_server({"rules": [marker_rule("x", bash_turn("true"))]})
    setup = [sys.executable, "-c", "print('resolving dependencies'); raise SystemExit('no such package: frobnicate')"]
    settings = engine_settings(server, setup=setup)

    async with Cluster.open(repo, settings=settings, claude=claude) as cluster:
        plan = (await cluster.plan("broken setup", [marker_task("x"), marker_task("y", "x")])).plan
        await cluster.dispatch(plan.id)
        with anyio.fail_after(60):
            status = await cluster.wait(plan.id)

    x = status.task("x")
    assert x.state is TaskState.FAILED
    assert x.reason.startswith("setup failed") and "exit 1" in x.reason
    assert "resolving dependencies" in x.reason and "no such package: frobnicate" in x.reason
    assert x.setup_s is not None
    assert status.task("y").state is TaskState.BLOCKED
    assert [r for r in server.requests if r.rule] == []  # no agent ever asked the model anything


@pytest.mark.sandbox
async def test_a_sandboxed_setup_writes_its_worktree_and_nothing_outside(
    repo: Path, model_server: StartServer, engine_settings: Settings, claude: ClaudeBinary, tmp_path: Path
) -> None:
    server = model_server({"rules": [marker_rule("x", bash_turn("true"))]})
    outside = tmp_path / "escaped.txt"
    script = f"open('installed.txt', 'w').write('ok'); print('installed'); open({str(outside)!r}, 'w')"
    settings = engine_settings(server, isolation="sandbox", setup=[sys.executable, "-c", script])

    async with Cluster.open(repo, settings=settings, claude=claude) as cluster:
        plan = (await cluster.plan("confined setup", [marker_task("x")])).plan
        await cluster.dispatch(plan.id)
        with anyio.fail_after(60):
            status = await cluster.wait(plan.id)

    x = status.task("x")
    assert x.state is TaskState.FAILED and "installed" in x.reason and "Read-only file system" in x.reason
    assert x.worktree is not None and (x.worktree / "installed.txt").read_text() == "ok"
    assert not outside.exists()


async def test_copy_files_refuses_a_planted_symlink_out_of_the_repository(
    repo: Path, make_repo: Callable[[Path], Path], tmp_path: Path
) -> None:
    secret = tmp_path / "id_rsa"
    secret.write_text("PRIVATE\n")
    (repo / ".env").symlink_to(secret)
    worktree = make_repo(tmp_path / "worktree")

    with pytest.raises(RepositoryError, match=r"\.env leads to .*id_rsa, outside the repository"):
        await copy_files(repo, worktree, [".env"])
    assert not (worktree / ".env").exists()

    # A directory link out of the checkout is refused the same way.
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "local.env").write_text("X=1\n")
    (repo / "conf").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(RepositoryError, match="outside the repository"):
        await copy_files(repo, worktree, ["conf/*.env"])


async def test_copy_files_refuses_to_write_through_a_symlink_of_the_worktree(
    repo: Path, make_repo: Callable[[Path], Path], tmp_path: Path
) -> None:
    (repo / "conf").mkdir()
    (repo / "conf" / "local.env").write_text("X=1\n")
    worktree = make_repo(tmp_path / "worktree")
    outside = tmp_path / "outside"
    outside.mkdir()
    (worktree / "conf").symlink_to(outside)  # as if an agent had committed conf -> elsewhere

    with pytest.raises(RepositoryError, match="through a symlink of the worktree"):
        await copy_files(repo, worktree, ["conf/local.env"])
    assert list(outside.iterdir()) == []


async def test_copy_files_copies_untracked_files_and_leaves_tracked_ones_to_git(
    repo: Path, make_repo: Callable[[Path], Path], tmp_path: Path
) -> None:
    (repo / ".env").write_text("A=1\n")
    (repo / "README.md").write_text("local edit\n")  # tracked: git gives the worktree its own
    (repo / "secrets").mkdir()
    (repo / "secrets" / "dev.key").write_text("k\n")
    worktree = make_repo(tmp_path / "worktree")

    copied, notes = await copy_files(repo, worktree, [".env", "README.md", "secrets", "*.missing"])

    assert copied == [".env", "secrets/dev.key"]
    assert (worktree / ".env").read_text() == "A=1\n" and (worktree / "secrets" / "dev.key").read_text() == "k\n"
    assert (worktree / "README.md").read_text() == "# test repo\n"
    assert any("README.md is tracked" in n for n in notes) and any("'*.missing' matched nothing" in n for n in notes)


@pytest.mark.parametrize("glob", ["../outside/.env", "/etc/passwd", "~/.ssh/id_rsa", "a/../../b"])
def test_settings_refuse_copy_files_globs_leaving_the_repository(glob: str) -> None:
    with pytest.raises(ValidationError, match="copy_files globs must stay inside the repository"):
        EngineSettings(copy_files=[glob])


def _free_ports(count: int) -> int:
    """The first of ``count`` consecutive ports nothing on this machine holds now (other
    processes' connections take ports of the ephemeral range too)."""

    def free(port: int) -> bool:
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                return False
        return True

    return next(base for base in range(42000, 60000, 100) if all(free(p) for p in range(base, base + count)))


def test_port_blocks_are_unique_and_skip_ports_another_program_holds() -> None:
    blocks = PortBlocks()
    base = _free_ports(40)
    with socket.socket() as taken:  # another program listens in the first block
        taken.bind(("127.0.0.1", base + 3))
        taken.listen()
        first = blocks.acquire(base, 10)
        second = blocks.acquire(base, 10)
    assert (first, second) == (base + 10, base + 20)
    blocks.release(first, 10)
    assert blocks.acquire(base, 10) == base  # free again once the listener is gone
    assert blocks.held == frozenset(range(base, base + 10)) | frozenset(range(base + 20, base + 30))
    with pytest.raises(ConfigError, match="no free block of 10 ports"):
        blocks.acquire(65530, 10)
