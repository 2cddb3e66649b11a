"""A task's worktree: set up before its agent starts, checked for progress to resume (after
a shutdown or crash) and for leftover conflict markers.

Setup: the files git does not track that the work needs (``copy_files`` globs, e.g.
``.env``) are copied from the user's checkout, then the ``setup`` command (e.g. ``uv sync``,
``npm ci``) runs in the worktree, confined like the merge gate
(:mod:`~claudecluster_mcp.confined`). A failure ends the task with the command's output
instead of starting a confused agent.

Copying never leaves the two trees (defense in depth, the settings already refuse ``..``
and absolute globs): a match whose real path is outside the checkout (a symlink to
``~/.ssh/id_rsa``, or a directory link out of it) is refused, and so is a destination
reached through a symlink of the worktree (a committed ``config -> /etc`` would otherwise
redirect the write). Files git tracks are left to git; the copies are kept out of the
task's commit (:func:`copied_paths`).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import anyio

from .confined import run_confined
from .errors import RepositoryError
from .isolation import SandboxPolicy
from .models import ACTIVE_STATES, Plan, Task, TaskState
from .store import Store
from .workspace import git, rev_parse

__all__ = [
    "SetupResult",
    "conflict_markers",
    "copied_paths",
    "copy_files",
    "drop_interrupted_writes",
    "has_progress",
    "requeue_interrupted",
    "set_up",
]

_OUTPUT_IN_REASON = 1500
_CONFLICT_MARKER = re.compile(r"^(<{7}|>{7})( |$)", re.MULTILINE)


@dataclass(frozen=True)
class SetupResult:
    """What setting up a worktree did."""

    ok: bool
    seconds: float
    copied: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    command: list[str] | None = None
    returncode: int | None = None
    output: str = ""

    def reason(self) -> str:
        """Why the task failed (for a failed setup): the command, its exit, its output's tail."""
        what = " ".join(self.command) if self.command else "copy_files"
        exit_text = f"exit {self.returncode}" if self.returncode is not None else "did not finish"
        tail = "\n".join([*self.notes, self.output.strip()]).strip()[-_OUTPUT_IN_REASON:]
        return f"setup failed ({what}: {exit_text}):\n{tail}"

    def event(self) -> dict[str, object]:
        """The task log's record of it."""
        return {
            "ok": self.ok,
            "seconds": round(self.seconds, 3),
            "copied": self.copied,
            "notes": self.notes,
            "command": self.command,
            "returncode": self.returncode,
            "output": self.output[-4000:],
        }


def _matches(root: Path, globs: Sequence[str]) -> Iterator[tuple[str, list[Path]]]:
    for glob in globs:
        if Path(glob).is_absolute() or ".." in Path(glob).parts:
            raise RepositoryError(f"copy_files: {glob!r} leaves the repository; refused")
        yield glob, sorted(root.glob(glob))


def _files_under(path: Path) -> Iterator[Path]:
    if not path.is_dir() or path.is_symlink():
        yield path
        return
    for folder, dirs, files in os.walk(path):  # links to directories are not followed
        dirs[:] = [d for d in dirs if d != ".git"]
        yield from (Path(folder) / name for name in (*files, *(d for d in dirs if (Path(folder) / d).is_symlink())))


def _inside(path: Path, root: Path) -> bool:
    return path == root or path.is_relative_to(root)


def _copy_plan(repo: Path, globs: Sequence[str]) -> tuple[list[tuple[Path, str]], list[str]]:
    """(source file, relative path) pairs to copy, and notes; refuses what leaves ``repo``."""
    root = repo.resolve()
    pairs: list[tuple[Path, str]] = []
    notes: list[str] = []
    for glob, found in _matches(root, globs):
        if not found:
            notes.append(f"copy_files: {glob!r} matched nothing in {root}")
        for match in found:
            for source in _files_under(match):
                relative = source.relative_to(root).as_posix()
                if relative == ".git" or relative.startswith(".git/"):
                    continue
                real = source.resolve()
                if not _inside(real, root) or _inside(real, root / ".git"):
                    raise RepositoryError(
                        f"copy_files: {relative} leads to {real}, outside the repository {root} (or into .git); refused"
                    )
                if real.is_file():
                    pairs.append((real, relative))
    return pairs, notes


async def copied_paths(repo: Path, worktree: Path, globs: Sequence[str]) -> list[str]:
    """The paths :func:`copy_files` copies into ``worktree`` (those git does not track
    there): what the task's commit leaves out, so that a copied ``.env`` is never merged."""
    if not globs:
        return []
    try:
        pairs, _ = await anyio.to_thread.run_sync(_copy_plan, repo, globs)
    except (RepositoryError, OSError):
        return []  # refused: nothing was copied
    return sorted({relative for _, relative in pairs} - await _tracked(worktree, [r for _, r in pairs]))


async def _tracked(worktree: Path, paths: Sequence[str]) -> set[str]:
    if not paths:
        return set()
    listed = await git(worktree, "ls-files", "-z", "--", *(f":(literal){path}" for path in paths))
    return {name for name in listed.stdout.split("\0") if name}


async def copy_files(repo: Path, worktree: Path, globs: Sequence[str]) -> tuple[list[str], list[str]]:
    """Copy what ``globs`` match in ``repo`` (the user's checkout) to the same places in
    ``worktree``, except files git tracks there. Returns (copied paths, notes); raises
    :class:`RepositoryError` for a source or destination outside its tree."""
    pairs, notes = await anyio.to_thread.run_sync(_copy_plan, repo, globs)
    if not pairs:
        return [], notes
    tracked = await _tracked(worktree, [rel for _, rel in pairs])
    todo = [(source, rel) for source, rel in pairs if rel not in tracked]
    notes += [f"copy_files: {rel} is tracked by git; not copied" for rel in sorted({r for _, r in pairs} & tracked)]
    await anyio.to_thread.run_sync(_copy, worktree, todo)
    return [rel for _, rel in todo], notes


def _copy(worktree: Path, todo: Sequence[tuple[Path, str]]) -> None:
    root = worktree.resolve()
    for source, relative in todo:
        target = root / relative
        if target.is_symlink() or not _inside(target.parent.resolve(), root):
            raise RepositoryError(f"copy_files: {relative} would be written through a symlink of the worktree; refused")
        target.parent.mkdir(parents=True, exist_ok=True)
        if not _inside(target.parent.resolve(), root):
            raise RepositoryError(f"copy_files: {relative} would be written outside the worktree; refused")
        shutil.copy2(source, target)


async def set_up(
    repo: Path,
    worktree: Path,
    *,
    globs: Sequence[str],
    command: Sequence[str] | None,
    timeout: float,
    sandbox: SandboxPolicy | None,
    env: Mapping[str, str],
) -> SetupResult:
    """Copy ``globs`` into ``worktree``, then run ``command`` there (confined, with ``env``)."""
    started = time.monotonic()
    try:
        copied, notes = await copy_files(repo, worktree, globs)
    except (RepositoryError, OSError) as exc:
        return SetupResult(ok=False, seconds=time.monotonic() - started, notes=[str(exc)])
    if not command:
        return SetupResult(ok=True, seconds=time.monotonic() - started, copied=copied, notes=notes)
    ran = await run_confined(command, worktree, timeout=timeout, sandbox=sandbox, env=env)
    return SetupResult(
        ok=ran.ok,
        seconds=time.monotonic() - started,
        copied=copied,
        notes=notes,
        command=list(command),
        returncode=ran.returncode,
        output=ran.output,
    )


async def has_progress(task: Task) -> bool:
    """True when an interrupted run left something to resume: a session, and changes in its
    worktree or commits beyond its base."""
    if not (task.session_id and task.worktree and task.base_commit and task.worktree.is_dir()):
        return False
    with contextlib.suppress(Exception):
        dirty = await git(task.worktree, "status", "--porcelain")
        head = await rev_parse(task.worktree, "HEAD")
        return bool(dirty.stdout.strip()) or head != task.base_commit
    return False


async def requeue_interrupted(store: Store, plan: Plan, task: Task) -> None:
    """The engine is shutting down: the task goes back to the queue, to be resumed by the
    next process that opens this repository if its agent got anywhere."""
    with contextlib.suppress(Exception):
        current = await store.task(plan.id, task.id)
        if current.state in ACTIVE_STATES or current.state is TaskState.READY:
            progressed = await has_progress(current)
            reason = "interrupted by shutdown" + ("; resuming its session" if progressed else "")
            await store.move(plan.id, task.id, TaskState.PENDING, reason=reason, resume=progressed)


async def conflict_markers(worktree: Path) -> list[str]:
    """Changed or new files of ``worktree`` that still hold conflict markers."""
    files = await git(worktree, "diff", "--name-only", "-z", "HEAD", "--")
    untracked = await git(worktree, "ls-files", "--others", "--exclude-standard", "-z")
    leftover = []
    for name in {n for n in (files.stdout + untracked.stdout).split("\0") if n}:
        path = worktree / name
        with contextlib.suppress(OSError, UnicodeDecodeError):
            if path.is_file() and _CONFLICT_MARKER.search(path.read_text()):
                leftover.append(name)
    return sorted(leftover)


# Claude Code writes a file to "<name>.tmp.<its pid>.<6 random bytes, hex>", then renames it.
_WRITE_STAGING = re.compile(r"\.tmp\.\d+\.[0-9a-f]{12}$")


async def drop_interrupted_writes(worktree: Path) -> list[str]:
    """Remove the staging files of file writes an interrupted agent was killed in the middle
    of (untracked files named like Claude Code's ``<name>.tmp.<pid>.<hex>``) before its session
    resumes: the session does not know of them, and they would be committed with the task's
    work. Returns their names."""
    untracked = await git(worktree, "ls-files", "--others", "--exclude-standard", "-z", check=False)
    dropped = [name for name in untracked.stdout.split("\0") if _WRITE_STAGING.search(name)]
    for name in dropped:
        with contextlib.suppress(FileNotFoundError):
            (worktree / name).unlink()
    return dropped
