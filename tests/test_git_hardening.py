"""Engine git runs only git: planted hooks, fsmonitor commands, filter and merge drivers and
inherited GIT_* variables take no part. Each test plants the real thing in the repository
(and shows that the user's own git does run it), then drives the engine's git functions."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from claudecluster_mcp.claude_cli import ClaudeBinary
from claudecluster_mcp.engine import Cluster
from claudecluster_mcp.errors import GitError
from claudecluster_mcp.githarden import driver_overrides, git_environment, needs_driver_scan
from claudecluster_mcp.merge import merge_tree
from claudecluster_mcp.model_server import ScriptedModelServer
from claudecluster_mcp.models import TaskSpec, TaskState
from claudecluster_mcp.scenario import marker_rule, write_turn
from claudecluster_mcp.settings import EngineSettings
from claudecluster_mcp.workspace import (
    add_worktree,
    changed_files,
    commit_all,
    identity_args,
    is_dirty,
    remove_worktree,
    rev_parse,
)
from claudecluster_mcp.workspace import git as engine_git

pytestmark = pytest.mark.anyio

Git = Callable[..., str]
IDENTITY = ["-c", "user.name=Test", "-c", "user.email=test@example.invalid"]


def marker_script(path: Path, marker: Path, *, passthrough: bool = False) -> Path:
    """An executable that records each run in ``marker`` (and copies stdin to stdout if asked)."""
    path.write_text(f'#!/bin/sh\necho "$0 $*" >> {marker}\n' + ("exec cat\n" if passthrough else "exit 0\n"))
    path.chmod(0o755)
    return path


def plant_hook(repo: Path, name: str, marker: Path) -> None:
    marker_script(repo / ".git" / "hooks" / name, marker)


async def test_a_post_checkout_hook_never_runs_when_the_engine_adds_a_worktree(repo: Path, tmp_path: Path) -> None:
    marker = tmp_path / "hook-ran"
    plant_hook(repo, "post-checkout", marker)

    worktree = await add_worktree(repo, tmp_path / "wt", commit="HEAD")
    await remove_worktree(repo, worktree)
    assert not marker.exists()

    # The plant is real: the user's own checkout runs it.
    await engine_git(repo, "checkout", "--quiet", "HEAD", user_hooks=True)
    assert marker.exists()


async def test_commit_hooks_never_run_when_the_engine_commits(repo: Path, tmp_path: Path) -> None:
    marker = tmp_path / "hook-ran"
    for hook in ("pre-commit", "commit-msg", "post-commit", "post-index-change"):
        plant_hook(repo, hook, marker)
    worktree = await add_worktree(repo, tmp_path / "wt", commit="HEAD")
    (worktree / "new.txt").write_text("new\n")

    assert await commit_all(worktree, "engine commit")
    assert not marker.exists()

    await engine_git(repo, *IDENTITY, "commit", "--quiet", "--allow-empty", "-m", "user commit", user_hooks=True)
    assert marker.exists()


async def test_a_planted_fsmonitor_command_never_runs_in_engine_git(repo: Path, tmp_path: Path, git: Git) -> None:
    marker = tmp_path / "fsmonitor-ran"
    monitor = marker_script(tmp_path / "fsmonitor", marker)
    git(repo, "config", "core.fsmonitor", str(monitor))

    worktree = await add_worktree(repo, tmp_path / "wt", commit="HEAD")
    (worktree / "README.md").write_text("changed\n")
    assert await is_dirty(worktree)
    assert await commit_all(worktree, "engine commit")
    assert await changed_files(repo, "HEAD", await rev_parse(worktree, "HEAD")) == ["README.md"]
    await engine_git(repo, "status", "--porcelain")
    await remove_worktree(repo, worktree)
    assert not marker.exists()

    await engine_git(repo, "status", "--porcelain", user_hooks=True)
    assert marker.exists()


async def test_repository_filter_drivers_never_run_in_engine_git(repo: Path, tmp_path: Path, git: Git) -> None:
    marker = tmp_path / "filter-ran"
    driver = marker_script(tmp_path / "filter", marker, passthrough=True)
    (repo / ".gitattributes").write_text("*.txt filter=planted\n")
    (repo / "data.txt").write_text("raw\n")
    git(repo, "add", ".gitattributes", "data.txt")
    git(repo, *IDENTITY, "commit", "-qm", "attributes")
    for key in ("smudge", "clean", "process"):
        git(repo, "config", f"filter.planted.{key}", str(driver))
    git(repo, "config", "filter.planted.required", "true")

    worktree = await add_worktree(repo, tmp_path / "wt", commit="HEAD")
    assert (worktree / "data.txt").read_text() == "raw\n"
    (worktree / "data.txt").write_text("edited\n")
    assert await commit_all(worktree, "engine commit")
    assert not marker.exists()

    # The plant is real: git run the ordinary way starts the driver (which then fails the
    # long-running filter protocol, hence the error).
    (repo / "data.txt").write_text("user edit\n")
    with contextlib.suppress(GitError):
        await engine_git(repo, "add", "data.txt", user_hooks=True)
    assert marker.exists()


async def test_a_repository_merge_driver_never_runs_and_its_paths_conflict(
    repo: Path, tmp_path: Path, git: Git
) -> None:
    marker = tmp_path / "merge-driver-ran"
    driver = marker_script(tmp_path / "merge-driver", marker)
    (repo / ".gitattributes").write_text("*.txt merge=planted\n")
    (repo / "f.txt").write_text("base\n")
    git(repo, "add", ".")
    git(repo, *IDENTITY, "commit", "-qm", "base")
    git(repo, "config", "merge.planted.driver", f"{driver} %O %A %B")
    tips = []
    for side in ("ours", "theirs"):
        git(repo, "checkout", "-q", "-b", side, "main")
        (repo / "f.txt").write_text(f"{side}\n")
        git(repo, *IDENTITY, "commit", "-qam", side)
        tips.append(git(repo, "rev-parse", "HEAD").strip())

    check = await merge_tree(repo, *tips)

    assert not marker.exists()
    assert not check.clean and check.conflicts == ["f.txt"]


async def test_an_inherited_git_dir_does_not_redirect_engine_git(
    repo: Path, tmp_path: Path, make_repo: Callable[[Path], Path], monkeypatch: pytest.MonkeyPatch, git: Git
) -> None:
    elsewhere = make_repo(tmp_path / "elsewhere")
    (elsewhere / "other.txt").write_text("other\n")
    git(elsewhere, "add", "other.txt")
    git(elsewhere, *IDENTITY, "commit", "-qm", "other")
    head = git(repo, "rev-parse", "HEAD").strip()
    monkeypatch.setenv("GIT_DIR", str(elsewhere / ".git"))
    monkeypatch.setenv("GIT_WORK_TREE", str(elsewhere))
    monkeypatch.setenv("GIT_INDEX_FILE", str(elsewhere / ".git" / "index"))

    assert await rev_parse(repo, "HEAD") == head
    worktree = await add_worktree(repo, tmp_path / "wt", commit="HEAD")
    (worktree / "mine.txt").write_text("mine\n")
    assert await commit_all(worktree, "engine commit")

    monkeypatch.delenv("GIT_DIR")
    monkeypatch.delenv("GIT_WORK_TREE")
    monkeypatch.delenv("GIT_INDEX_FILE")
    committed = git(worktree, "show", "--name-only", "--format=", "HEAD").split()
    assert committed == ["mine.txt"]
    assert "mine.txt" not in git(elsewhere, "ls-files")


async def test_the_identity_fallback_still_applies(
    repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, git: Git
) -> None:
    # No identity anywhere git looks: an empty HOME, and a repository git may not guess for.
    monkeypatch.setenv("HOME", str(tmp_path / "nobody"))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    for name in ("GIT_AUTHOR_NAME", "GIT_AUTHOR_EMAIL", "GIT_COMMITTER_NAME", "GIT_COMMITTER_EMAIL", "EMAIL"):
        monkeypatch.delenv(name, raising=False)
    git(repo, "config", "user.useConfigOnly", "true")
    worktree = await add_worktree(repo, tmp_path / "wt", commit="HEAD")
    (worktree / "x.txt").write_text("x\n")

    assert await identity_args(worktree)
    assert await commit_all(worktree, "engine commit")
    author = (await engine_git(worktree, "log", "-1", "--format=%an <%ae>")).stdout.strip()
    assert author == "claudecluster <claudecluster@localhost>"


@pytest.mark.claude
async def test_a_real_engine_run_never_runs_the_repositorys_hooks(
    claude: ClaudeBinary,
    repo: Path,
    tmp_path: Path,
    model_server: Callable[[dict[str, Any]], ScriptedModelServer],
    engine_settings: Callable[..., EngineSettings],
    git: Git,
) -> None:
    marker = tmp_path / "hook-ran"
    # Every hook the engine's worktree creation, commits, gate worktree and ref moves would trigger.
    hooks = ("post-checkout", "pre-commit", "commit-msg", "post-commit", "post-merge", "reference-transaction")
    for hook in hooks:
        plant_hook(repo, hook, marker)
    server = model_server({"rules": [marker_rule("A", write_turn("a.txt", "from A\n"))]})
    settings = engine_settings(server, gate=["true"])

    async with Cluster.open(repo, workers=1, settings=settings, claude=claude) as cluster:
        task = TaskSpec(id="A", title="task A", prompt="[A] do A")
        plan = (await cluster.plan("add a", [task])).plan
        await cluster.dispatch(plan.id)
        with anyio.fail_after(90):
            status = await cluster.wait(plan.id)

    assert status.task("A").state is TaskState.MERGED, status.task("A").reason
    assert git(repo, "show", f"{plan.integration_branch}:a.txt") == "from A\n"
    assert not marker.exists(), marker.read_text()


def test_the_environment_keeps_only_the_identity_of_inherited_git_variables() -> None:
    inherited = {
        "PATH": "/bin",
        "GIT_DIR": "/elsewhere",
        "GIT_SSH_COMMAND": "evil",
        "GIT_CONFIG_COUNT": "1",
        "GIT_CONFIG_KEY_0": "core.hooksPath",
        "GIT_CONFIG_VALUE_0": "/evil",
        "GIT_EXEC_PATH": "/evil",
        "GIT_AUTHOR_NAME": "Ada",
    }

    env = git_environment(base=inherited, overrides=[("filter.x.clean", "")])

    assert env["PATH"] == "/bin" and env["GIT_AUTHOR_NAME"] == "Ada"
    assert not {"GIT_DIR", "GIT_SSH_COMMAND", "GIT_EXEC_PATH"} & env.keys()
    settings = {env[f"GIT_CONFIG_KEY_{i}"]: env[f"GIT_CONFIG_VALUE_{i}"] for i in range(int(env["GIT_CONFIG_COUNT"]))}
    assert settings["core.hooksPath"] == "/dev/null"
    assert settings["core.fsmonitor"] == "false" and settings["filter.x.clean"] == ""
    user = git_environment(base=inherited, hardened=False)
    assert "GIT_CONFIG_COUNT" not in user and "GIT_DIR" not in user


def test_driver_overrides_cover_repository_drivers_and_leave_the_users_own() -> None:
    listing = "\0".join(
        [
            "local", "filter.Evil.Name.smudge",
            "worktree", "merge.m.driver",
            "local", "diff.d.textconv",
            "local", "diff.d.command",
            "global", "filter.lfs.process",
            "system", "merge.sys.driver",
        ]
    ) + "\0"  # fmt: skip

    overrides = dict(driver_overrides(listing))

    assert overrides == {
        "filter.Evil.Name.clean": "",
        "filter.Evil.Name.smudge": "",
        "filter.Evil.Name.process": "",
        "filter.Evil.Name.required": "false",
        "merge.m.driver": "false",
        "diff.d.textconv": "",
        "diff.d.command": "",
    }
    assert driver_overrides("") == []


@pytest.mark.parametrize(
    ("args", "scan"),
    [
        (("rev-parse", "HEAD"), False),
        (("-c", "user.name=x", "commit-tree", "t"), False),
        (("update-ref", "refs/heads/x", "y"), False),
        (("worktree", "add", "p"), True),
        (("-c", "user.name=x", "commit", "-m", "m"), True),
        (("status", "--porcelain"), True),
        (("merge-tree", "a", "b"), True),
    ],
)
def test_commands_that_read_file_contents_get_the_driver_scan(args: tuple[str, ...], scan: bool) -> None:
    assert needs_driver_scan(args) is scan
