"""A full disk, recognised wherever it shows up, and the space git leaves behind after one.

A full disk reaches the engine in several disguises: an ``OSError`` with ``ENOSPC`` (or
``EDQUOT``), SQLite's ``SQLITE_FULL`` inside a :class:`~claudecluster_mcp.errors.StoreError`,
git saying "No space left on device" — or git saying only "unable to write file x" or
"couldn't write '….lock'", with no reason at all (checkout and ref updates drop the errno).
:func:`looks_full` reads all of them; for git's bare write failures it asks the file systems
involved whether the write could have fitted.

A git command that ran out of space leaves its half-written object behind
(``objects/??/tmp_obj_*``): the disk stays full after the failure. :func:`reclaim_git_temp`
removes such leftovers — only files no process has open, so never a write in progress.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import TypeVar

import anyio
import psutil

from .errors import ClusterError, DiskFullError, StoreError
from .workspace import add_worktree, commit_all, git, git_common_dir, remove_worktree

__all__ = [
    "add_worktree_or_full",
    "checkout_size",
    "commit_or_full",
    "disk_full",
    "free_space",
    "looks_full",
    "megabytes",
    "reclaim_git_temp",
    "until_written",
]

logger = logging.getLogger(__name__)

_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_FULL_TEXT = ("no space left on device", "disk quota exceeded", "out of diskspace", "database or disk is full")
# Git's write failures that do not say why (checkout, index and ref lock writes).
_BARE_WRITE_FAILURE = re.compile(
    r"unable to write|couldn't write|could not write|cannot write|write error|short write|"
    r"could not reset index file|unable to create",
    re.IGNORECASE,
)
#: Below this much free space (or this many free inodes) a file system counts as full.
NEARLY_FULL_BYTES = 1024 * 1024
NEARLY_FULL_INODES = 16

T = TypeVar("T")


def _chain(exc: BaseException) -> Iterable[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def disk_full(exc: BaseException) -> bool:
    """True when ``exc`` (or what caused it) says that a disk or quota is full."""
    for link in _chain(exc):
        if isinstance(link, DiskFullError):
            return True
        if isinstance(link, OSError) and link.errno in _FULL_ERRNOS:
            return True
        code = getattr(link, "sqlite_errorcode", None)
        if isinstance(link, sqlite3.Error) and isinstance(code, int) and code & 0xFF == sqlite3.SQLITE_FULL:
            return True
        if any(text in str(link).lower() for text in _FULL_TEXT):
            return True
    return False


def free_space(path: Path) -> tuple[int, int]:
    """(bytes, inodes) an unprivileged writer may still use on the file system of ``path``
    (its nearest existing ancestor)."""
    for candidate in (path, *path.parents):
        with contextlib.suppress(OSError):
            stat = os.statvfs(candidate)
            return stat.f_bavail * stat.f_frsize, stat.f_favail if stat.f_files else NEARLY_FULL_INODES
    return 0, 0


def looks_full(exc: BaseException, paths: Iterable[Path], need: int = 0) -> bool:
    """True when ``exc`` is a full disk: it says so, or it is one of git's write failures
    that give no reason while a file system of ``paths`` has less than ``need`` bytes (at
    least :data:`NEARLY_FULL_BYTES`) or almost no inodes left."""
    if disk_full(exc):
        return True
    if not _BARE_WRITE_FAILURE.search(str(exc)):
        return False
    for path in paths:
        space, inodes = free_space(path)
        if space < max(need, NEARLY_FULL_BYTES) or inodes < NEARLY_FULL_INODES:
            return True
    return False


async def checkout_size(repo: Path, commit: str) -> int:
    """Bytes the files of ``commit`` take when checked out (blob sizes; 0 if unknown)."""
    with contextlib.suppress(Exception):
        listing = await git(repo, "ls-tree", "-r", "-l", "-z", "--full-tree", commit)
        total = 0
        for entry in listing.stdout.split("\0"):
            fields = entry.split(None, 4)
            if len(fields) >= 4 and fields[3].isdigit():
                total += int(fields[3])
        return total
    return 0


def _open_files() -> set[str]:
    """Every file some process of ours has open now."""
    found: set[str] = set()
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            found.update(f.path for f in proc.open_files())
    return found


def _git_temp_files(git_dir: Path) -> list[Path]:
    objects = git_dir / "objects"
    return [*objects.glob("??/tmp_obj_*"), *objects.glob("pack/tmp_*"), *objects.glob("tmp_objdir-*")]


def reclaim_git_temp(git_dir: Path, *, since: float | None = None, min_age: float = 0.0, dry_run: bool = False) -> int:
    """Remove git's temporary object files under ``git_dir`` that no process has open and
    that were last written after ``since`` (a failed command's leftovers) or at least
    ``min_age`` seconds ago. Returns the bytes freed (or, with ``dry_run``, that would be)."""
    now = time.time()
    candidates = []
    for path in _git_temp_files(git_dir):
        with contextlib.suppress(OSError):
            stat = path.lstat()
            if (since is not None and stat.st_mtime >= since - 1) or now - stat.st_mtime >= min_age:
                candidates.append((path, stat.st_blocks * 512))
    if not candidates:
        return 0
    busy = _open_files()
    freed = 0
    for path, size in candidates:
        if str(path) in busy:
            continue
        try:
            if not dry_run:
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink()
            freed += size
        except OSError:
            continue
    return freed


async def add_worktree_or_full(repo: Path, worktree: Path, branch: str, tip: str) -> None:
    """:func:`~claudecluster_mcp.workspace.add_worktree`; on a full disk, what git left is
    removed and :class:`DiskFullError` says how much the checkout needs and how much is free."""
    try:
        await add_worktree(repo, worktree, branch)
    except (ClusterError, OSError) as exc:
        with anyio.CancelScope(shield=True):
            await remove_worktree(repo, worktree)
        need = await checkout_size(repo, tip)
        if not looks_full(exc, [worktree.parent, await git_common_dir(repo)], need):
            raise
        free = free_space(worktree.parent)[0]
        raise DiskFullError(
            f"disk full while creating the task's worktree {worktree} (its files need about {megabytes(need)}; "
            f"{megabytes(free)} free there now): {exc}"
        ) from exc


async def commit_or_full(repo: Path, worktree: Path, message: str, *, exclude: Sequence[str] = ()) -> bool:
    """:func:`~claudecluster_mcp.workspace.commit_all`; on a full disk, git's half-written
    objects of this commit are removed (they would keep the disk full) and
    :class:`DiskFullError` says that the work is still in the worktree."""
    started = time.time()
    try:
        return await commit_all(worktree, message, exclude=exclude)
    except ClusterError as exc:
        git_dir = await git_common_dir(repo)
        if not looks_full(exc, [git_dir, worktree]):
            raise
        freed = await anyio.to_thread.run_sync(lambda: reclaim_git_temp(git_dir, since=started))
        cleaned = f"; {megabytes(freed)} of git's half-written objects removed" if freed else ""
        raise DiskFullError(
            f"disk full while committing the agent's work (its changes are still in {worktree}{cleaned}): {exc}"
        ) from exc


def megabytes(size: int) -> str:
    """``size`` bytes, for people."""
    return f"{size / 2**20:.1f} MB"


async def until_written(write: Callable[[], Awaitable[T]], what: str, *, longest: float = 30.0) -> T:
    """Run ``write`` (a store write recording an outcome), and again, with a growing pause
    (up to ``longest`` s), while it fails on a full disk: the outcome must not be lost, nor
    the engine die of it. The first attempt is shielded from cancellation (a final state is
    written even as the engine stops); the retries are not (a full disk must not keep it
    from stopping). Other errors end it."""
    try:
        with anyio.CancelScope(shield=True):
            return await write()
    except StoreError as exc:
        if not disk_full(exc):
            raise
        logger.warning("the disk is full: cannot record %s yet; retrying until there is space (%s)", what, exc)
    delay = 1.0
    while True:
        await anyio.sleep(delay)
        delay = min(delay * 2, longest)
        try:
            return await write()
        except StoreError as exc:
            if not disk_full(exc):
                raise
