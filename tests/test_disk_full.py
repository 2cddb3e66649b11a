"""A full disk: the task that hits it fails with a reason that says so, nothing merged is lost,
the engine keeps going, and once there is space again the next plans run as usual.

Real small disks where we may mount them (a tmpfs, as root); elsewhere those tests are
skipped with the reason. A full state database is made real without root (SQLite's own
``max_page_count`` gives the same SQLITE_FULL a full disk gives), and git's reason-less
write failures are checked against the file system's free space."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from claudecluster_mcp import diskfull
from claudecluster_mcp.claude_cli import ClaudeBinary
from claudecluster_mcp.diskfull import disk_full, looks_full, until_written
from claudecluster_mcp.engine import Cluster, EngineSettings
from claudecluster_mcp.errors import GitError, StoreError
from claudecluster_mcp.model_server import ScriptedModelServer
from claudecluster_mcp.models import PlanStatus, TaskState
from claudecluster_mcp.scenario import bash_turn, marker_rule, marker_task, write_turn
from claudecluster_mcp.store import Store

pytestmark = pytest.mark.anyio

StartServer = Callable[[dict[str, Any]], ScriptedModelServer]
Settings = Callable[..., EngineSettings]
Git = Callable[..., str]
Mount = Callable[[str, int], Path]

# What git 2.x prints when a checkout runs out of space: no errno, no "No space left".
GIT_CHECKOUT_FULL = (
    "git worktree add failed in /r: error: unable to write file big.bin\n"
    "fatal: Could not reset index file to revision 'HEAD'."
)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Mount]:
    """``small_disk(name, megabytes)``: a fresh tmpfs of that size at ``tmp_path/name``
    (needs root, or CAP_SYS_ADMIN); unmounted after the test."""
    mounted: list[Path] = []

    def mount(name: str, megabytes: int) -> Path:
        path = tmp_path / name
        path.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={megabytes}m,mode=0755", "tmpfs", str(path)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.strip() or 'not root'})")
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(disk: Path, *, leave: int) -> Path:
    """Take all but ``leave`` bytes of ``disk``; remove the returned file to give them back."""
    stat = os.statvfs(disk)
    filler = disk / "filler"
    with filler.open("wb") as f:
        os.posix_fallocate(f.fileno(), 0, stat.f_bavail * stat.f_frsize - leave)
    return filler


async def _run(cluster: Cluster, tasks: list[dict[str, Any]]) -> PlanStatus:
    plan = (await cluster.plan("work", tasks)).plan
    await cluster.dispatch(plan.id)
    with anyio.fail_after(90):
        return await cluster.wait(plan.id)


@pytest.mark.claude
async def test_a_full_disk_while_creating_a_worktree_fails_that_task_only(
    claude: ClaudeBinary,
    repo: Path,
    model_server: StartServer,
    engine_settings: Settings,
    small_disk: Mount,
    git: Git,
) -> None:
    (repo / "big.bin").write_bytes(os.urandom(1_000_000))  # every checkout needs a megabyte
    git(repo, "add", "big.bin")
    git(repo, "-c", "user.name=T", "-c", "user.email=t@example.invalid", "commit", "-qm", "big")
    disk = small_disk("state-disk", 4)
    server = model_server({"rules": [marker_rule(m, write_turn(f"{m}.txt", f"{m}\n")) for m in ("A", "B", "C")]})
    settings = engine_settings(server, state_dir=disk / "state")
    async with Cluster.open(repo, workers=1, settings=settings, claude=claude) as cluster:
        first = await _run(cluster, [marker_task("A")])
        assert first.task("A").state is TaskState.MERGED

        with anyio.fail_after(30):  # a merged task's worktree goes right after its merge
            while first.task("A").worktree.exists():  # type: ignore[union-attr]  # noqa: ASYNC110
                await anyio.sleep(0.05)
        filler = fill(disk, leave=300_000)
        second = await _run(cluster, [marker_task("B"), marker_task("after-B", "B")])
        b, after = second.task("B"), second.task("after-B")
        assert b.state is TaskState.FAILED
        assert b.reason.startswith("disk full while creating the task's worktree"), b.reason
        assert "need about 1.0 MB" in b.reason and "unable to write file big.bin" in b.reason
        assert (after.state, after.reason) == (TaskState.BLOCKED, "dependency B did not merge")
        # What git had checked out is gone again: the space is not kept.
        assert git(repo, "worktree", "list", "--porcelain").count("worktree ") == 1
        assert os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize >= 200_000

        filler.unlink()  # space again: the engine goes on as usual
        assert (await _run(cluster, [marker_task("C")])).task("C").state is TaskState.MERGED
        assert (await cluster.merge(first.plan.id)).kind == "fast-forward"

    assert (repo / "A.txt").read_text() == "A\n" and git(repo, "fsck", "--no-dangling") == ""


@pytest.mark.claude
async def test_a_full_disk_while_committing_keeps_the_work_and_what_was_merged(
    claude: ClaudeBinary,
    model_server: StartServer,
    engine_settings: Settings,
    small_disk: Mount,
    make_repo: Callable[[Path], Path],
    git: Git,
) -> None:
    disk = small_disk("repo-disk", 6)
    repo = make_repo(disk / "repo")  # its .git (objects, the state database) on the small disk
    server = model_server(
        {
            "rules": [
                marker_rule("A", write_turn("A.txt", "A\n")),
                marker_rule("big", bash_turn("head -c 2000000 /dev/urandom > big.bin")),
                marker_rule("C", write_turn("C.txt", "C\n")),
            ]
        }
    )
    async with Cluster.open(repo, workers=1, settings=engine_settings(server), claude=claude) as cluster:
        first = await _run(cluster, [marker_task("A")])
        assert first.task("A").state is TaskState.MERGED
        integration = git(repo, "rev-parse", first.plan.integration_branch)

        filler = fill(disk, leave=1_000_000)
        big = (await _run(cluster, [marker_task("big")])).task("big")
        assert big.state is TaskState.FAILED
        assert big.reason.startswith(
            f"disk full while committing the agent's work (its changes are still in {big.worktree}"
        )
        assert big.worktree is not None and (big.worktree / "big.bin").stat().st_size == 2_000_000
        # Git's half-written object would have kept the disk full: removed.
        assert not list((repo / ".git" / "objects").glob("??/tmp_obj_*"))
        assert git(repo, "rev-parse", first.plan.integration_branch) == integration

        filler.unlink()
        assert (await _run(cluster, [marker_task("C")])).task("C").state is TaskState.MERGED
        assert (await cluster.merge(first.plan.id)).kind == "fast-forward"

    assert (repo / "A.txt").read_text() == "A\n" and git(repo, "fsck", "--no-dangling") == ""


@pytest.mark.claude
async def test_injected_enospc_from_git_fails_the_task_where_no_disk_can_be_mounted(
    claude: ClaudeBinary,
    repo: Path,
    model_server: StartServer,
    engine_settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    git: Git,
) -> None:
    # The same paths as the tmpfs tests, with git's own words injected at the one git call
    # that meets the full disk (for machines where mounting is not allowed).
    real_add, real_commit = diskfull.add_worktree, diskfull.commit_all

    async def add_worktree(repo: Path, path: Path, branch: str | None = None, **kw: Any) -> Path:
        if path.name == "no-room":
            await real_add(repo, path, branch, **kw)  # a half-done checkout, as git leaves it
            raise GitError(GIT_CHECKOUT_FULL)
        return await real_add(repo, path, branch, **kw)

    async def commit_all(worktree: Path, message: str, **kw: Any) -> bool:
        if worktree.name == "no-commit":
            raise GitError("git add --all failed: fatal: unable to write loose object file: No space left on device")
        return await real_commit(worktree, message, **kw)

    monkeypatch.setattr(diskfull, "add_worktree", add_worktree)
    monkeypatch.setattr(diskfull, "commit_all", commit_all)
    monkeypatch.setattr(diskfull, "free_space", lambda path: (4096, 100))
    rules = [marker_rule(m, write_turn(f"{m}.txt", f"{m}\n")) for m in ("A", "no-room", "no-commit")]
    async with Cluster.open(
        repo, workers=1, settings=engine_settings(model_server({"rules": rules})), claude=claude
    ) as cluster:
        status = await _run(cluster, [marker_task("A"), marker_task("no-room", "A"), marker_task("no-commit", "A")])
    no_room, no_commit = status.task("no-room"), status.task("no-commit")
    assert status.task("A").state is TaskState.MERGED
    assert no_room.state is TaskState.FAILED and no_room.reason.startswith(
        "disk full while creating the task's worktree"
    )
    assert no_commit.state is TaskState.FAILED
    assert no_commit.reason.startswith("disk full while committing the agent's work (its changes are still in ")
    assert no_commit.worktree is not None and (no_commit.worktree / "no-commit.txt").exists()
    assert "no-room" not in git(repo, "worktree", "list")


async def _fill_store(store: Store) -> None:
    """Make the state database full the way a full disk does (SQLITE_FULL on growth)."""
    async with store.transaction() as db, db.execute("PRAGMA page_count") as cursor:
        row = await cursor.fetchone()
        assert row is not None
        await db.execute(f"PRAGMA max_page_count = {row[0]}")
    for size in (2000, 200, 1):  # to the last byte: not even a small event fits
        with pytest.raises(StoreError) as full:
            while True:
                await store.append_event("filler", None, "filler", {"text": "x" * size})
        assert disk_full(full.value) and "the disk is full (sqlite: database or disk is full)" in str(full.value)


async def _make_room(store: Store) -> None:
    async with store.transaction() as db:
        await db.execute("PRAGMA max_page_count = 1073741823")


@pytest.mark.claude
async def test_a_full_state_database_fails_the_running_task_and_the_engine_goes_on(
    claude: ClaudeBinary,
    repo: Path,
    model_server: StartServer,
    engine_settings: Settings,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = model_server(
        {
            "rules": [
                marker_rule("A", write_turn("A.txt", "A\n", latency=2)),  # slow: the database fills meanwhile
                marker_rule("C", write_turn("C.txt", "C\n")),
            ]
        }
    )
    async with Cluster.open(repo, workers=2, settings=engine_settings(server), claude=claude) as cluster:
        plan = (await cluster.plan("two", [marker_task("A"), marker_task("B", "A")])).plan
        await cluster.dispatch(plan.id)
        with anyio.fail_after(60):
            while (await cluster.task(plan.id, "A")).state is not TaskState.RUNNING:
                await cluster.changed(0.2)
        await _fill_store(cluster.store)
        with anyio.fail_after(60):  # the agent's next event cannot be stored: its task fails, once it can be
            while f"cannot record the failure of task {plan.id}/A" not in caplog.text:  # noqa: ASYNC110
                await anyio.sleep(0.1)
        await _make_room(cluster.store)
        with anyio.fail_after(60):
            status = await cluster.wait(plan.id)
        a, b = status.task("A"), status.task("B")
        assert a.state is TaskState.FAILED and a.reason.startswith("disk full while the agent ran"), a.reason
        assert "cannot be written: the disk is full" in a.reason
        assert (b.state, b.reason) == (TaskState.BLOCKED, "dependency A did not merge")
        assert (await _run(cluster, [marker_task("C")])).task("C").state is TaskState.MERGED


async def test_a_record_is_retried_until_the_disk_has_room(tmp_path: Path) -> None:
    async with Store.open(tmp_path / "state.db") as store:
        await _fill_store(store)
        written: list[int] = []

        async def record() -> None:
            await store.append_event("p", None, "outcome", {"text": "y" * 4000})
            written.append(1)

        async with anyio.create_task_group() as tg:
            tg.start_soon(until_written, record, "an outcome")
            await anyio.sleep(1.5)
            assert written == []
            await _make_room(store)
        assert written == [1]
        # Not a full disk: not retried.
        with pytest.raises(StoreError, match="no such table"):
            await until_written(lambda: _broken(store), "x")


async def _broken(store: Store) -> None:
    async with store.transaction() as db:
        await db.execute("SELECT * FROM no_such_table")


def test_git_write_failures_without_a_reason_are_judged_by_the_free_space(tmp_path: Path) -> None:
    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    bare = GitError(GIT_CHECKOUT_FULL)
    assert looks_full(bare, [tmp_path], need=free + 10**9)
    assert not looks_full(bare, [tmp_path], need=1)  # there is room: something else went wrong
    assert looks_full(GitError("fatal: unable to write loose object file: No space left on device"), [tmp_path])
    assert looks_full(OSError(errno.ENOSPC, "No space left on device"), [])
    assert looks_full(OSError(errno.EDQUOT, "Disk quota exceeded"), [])
    assert not looks_full(GitError("fatal: not a git repository"), [tmp_path], need=free + 10**9)
