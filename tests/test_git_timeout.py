"""Every git command has a timeout; on expiry git and everything it started are killed.

The hanging thing is planted for real. Engine git runs no hook, so for it: a config
include that is a FIFO nobody writes (git blocks opening it, as on a stuck filesystem).
The user's own git (``user_hooks=True``) runs hooks: for it, a hook that sleeps and has a
child of its own.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import psutil
import pytest

from claudecluster_mcp.errors import GitError
from claudecluster_mcp.workspace import DEFAULT_GIT_TIMEOUT, add_worktree, git, set_git_timeout

pytestmark = pytest.mark.anyio

IDENTITY = ["-c", "user.name=Test", "-c", "user.email=test@example.invalid"]


@pytest.fixture
def short_git_timeout() -> Iterator[float]:
    previous = set_git_timeout(1.5)
    yield 1.5
    set_git_timeout(previous)


def plant_hanging_hook(repo: Path, hook: str, pid_dir: Path) -> None:
    """A hook that records its own pid, its parent's (git) and its child's, then hangs."""
    path = repo / ".git" / "hooks" / hook
    path.write_text(
        "#!/bin/sh\n"
        f"echo $$ > {pid_dir}/hook.pid\n"
        f"echo $PPID > {pid_dir}/git.pid\n"
        "sleep 300 &\n"
        f"echo $! > {pid_dir}/sleep.pid\n"
        "wait\n"
    )
    path.chmod(0o755)


def plant_stuck_config(repo: Path, tmp_path: Path) -> None:
    """Make every git command in ``repo`` block reading its config: an include that is a FIFO."""
    fifo = tmp_path / "config.fifo"
    os.mkfifo(fifo)
    subprocess.run(["git", "-C", str(repo), "config", "include.path", str(fifo)], check=True)


def git_processes_in(repo: Path, grace: float = 2.0) -> list[int]:
    """Living git processes started for ``repo`` (by their command line), after ``grace`` s."""
    deadline = time.monotonic() + grace
    while True:
        found = []
        for proc in psutil.process_iter(["cmdline"]):
            cmdline = proc.info["cmdline"] or []
            if cmdline[:1] == ["git"] and str(repo) in cmdline and alive(proc.pid):
                found.append(proc.pid)
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def survivors(pid_dir: Path, grace: float = 2.0) -> list[str]:
    """The hook's processes (by the pids it recorded) still alive after ``grace`` seconds
    (SIGKILL is delivered asynchronously: a killed process may take a moment to die)."""
    pids = {name: int((pid_dir / f"{name}.pid").read_text()) for name in ("hook", "git", "sleep")}
    deadline = time.monotonic() + grace
    while (alive_now := [name for name, pid in pids.items() if alive(pid)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return alive_now


async def test_a_stuck_git_makes_worktree_add_time_out_with_a_clear_error(
    repo: Path, tmp_path: Path, short_git_timeout: float
) -> None:
    plant_stuck_config(repo, tmp_path)

    started = time.monotonic()
    with pytest.raises(GitError) as caught:
        await add_worktree(repo, tmp_path / "wt", commit="HEAD")
    elapsed = time.monotonic() - started

    message = str(caught.value)
    assert "git worktree add --quiet timed out after 1.5s" in message
    assert str(repo) in message and "hook" in message and "index.lock" in message
    assert elapsed < short_git_timeout + 2
    assert git_processes_in(repo) == []


async def test_a_hanging_user_hook_times_out_and_everything_it_started_is_killed(
    repo: Path, tmp_path: Path, short_git_timeout: float
) -> None:
    plant_hanging_hook(repo, "pre-commit", tmp_path)

    with pytest.raises(GitError, match=r"git commit --allow-empty -m timed out after 1\.5s"):
        await git(repo, *IDENTITY, "commit", "--allow-empty", "-m", "x", user_hooks=True)

    assert survivors(tmp_path) == []


async def test_the_timeout_keyword_overrides_the_default_and_names_the_command(repo: Path, tmp_path: Path) -> None:
    plant_hanging_hook(repo, "pre-commit", tmp_path)
    assert set_git_timeout(DEFAULT_GIT_TIMEOUT) == DEFAULT_GIT_TIMEOUT == 120

    with pytest.raises(GitError, match=r"git commit --allow-empty -m timed out after 0\.5s"):
        await git(repo, *IDENTITY, "commit", "--allow-empty", "-m", "x", timeout=0.5, user_hooks=True)

    assert survivors(tmp_path) == []


async def test_a_cancelled_git_command_leaves_no_process(repo: Path, tmp_path: Path) -> None:
    plant_hanging_hook(repo, "pre-commit", tmp_path)

    with anyio.move_on_after(1) as scope:
        await git(repo, *IDENTITY, "commit", "--allow-empty", "-m", "x", user_hooks=True)

    assert scope.cancelled_caught
    assert survivors(tmp_path) == []


async def test_a_cancelled_engine_git_command_leaves_no_process(repo: Path, tmp_path: Path) -> None:
    plant_stuck_config(repo, tmp_path)

    with anyio.move_on_after(1) as scope:
        await git(repo, "status", "--porcelain")

    assert scope.cancelled_caught
    assert git_processes_in(repo) == []


async def test_commands_within_the_timeout_are_unaffected(repo: Path) -> None:
    result = await git(repo, "rev-parse", "HEAD", timeout=10)

    assert len(result.stdout.strip()) == 40


@pytest.mark.parametrize("seconds", [0, -1])
def test_a_timeout_must_be_positive(seconds: float) -> None:
    with pytest.raises(ValueError, match="positive"):
        set_git_timeout(seconds)
