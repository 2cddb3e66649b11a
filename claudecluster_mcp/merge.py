"""Merging a commit into a branch without a working tree: check, gate, compare-and-swap.

``git merge-tree --write-tree`` computes the merge (and its conflicts) from objects alone;
``git commit-tree`` makes the merge commit; an optional gate command runs on a detached
worktree of the candidate; ``git update-ref <ref> <new> <old>`` moves the branch only if
nobody moved it meanwhile. A journal callback records the update before it happens, so a
crash half-way can be completed or undone, never applied twice.
"""

from __future__ import annotations

import enum
import shutil
import subprocess
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import anyio

from .workspace import (
    add_worktree,
    git,
    identity_args,
    remove_worktree,
    rev_parse,
    update_ref,
)

__all__ = ["GateResult", "MergeOutcome", "MergeResult", "merge_into", "merge_tree", "run_gate"]

Journal = Callable[[str, str, str], Awaitable[int]]  # (ref, old, new) -> entry number
JournalEnd = Callable[[int, str], Awaitable[None]]  # (entry number, "done" | "undone")


class MergeOutcome(enum.StrEnum):
    """What happened to a merge."""

    MERGED = "merged"
    ALREADY_MERGED = "already_merged"
    CONFLICT = "conflict"
    GATE_FAILED = "gate_failed"


@dataclass(frozen=True)
class MergeCheck:
    """The result of ``git merge-tree --write-tree``."""

    clean: bool
    tree: str
    conflicts: list[str]


@dataclass(frozen=True)
class GateResult:
    """A gate command's verdict on a merge candidate."""

    ok: bool
    returncode: int | None
    output: str


@dataclass(frozen=True)
class MergeResult:
    """The outcome of :func:`merge_into`."""

    outcome: MergeOutcome
    old_tip: str
    new_tip: str | None = None
    conflicts: list[str] = field(default_factory=list)
    gate: GateResult | None = None


async def merge_tree(repo: Path, ours: str, theirs: str) -> MergeCheck:
    """Merge two commits in memory; lists conflicted paths."""
    result = await git(
        repo,
        "merge-tree",
        "--write-tree",
        "--name-only",
        "--no-messages",
        "-z",
        ours,
        theirs,
        ok_codes=(0, 1),
    )
    parts = [p for p in result.stdout.split("\0") if p]
    return MergeCheck(clean=result.returncode == 0, tree=parts[0].strip(), conflicts=sorted(set(parts[1:])))


async def run_gate(repo: Path, commit: str, argv: Sequence[str], *, timeout: float = 600) -> GateResult:
    """Run ``argv`` (no shell) in a detached worktree of ``commit``; keep its output's tail."""
    workdir = Path(tempfile.mkdtemp(prefix="claudecluster-gate-"))
    tree = workdir / "tree"
    try:
        await add_worktree(repo, tree, commit=commit)
        try:
            with anyio.fail_after(timeout):
                done = await anyio.run_process(
                    list(argv),
                    cwd=tree,
                    check=False,
                    stdin=subprocess.DEVNULL,
                    stderr=subprocess.STDOUT,
                )
        except TimeoutError:
            return GateResult(ok=False, returncode=None, output=f"gate command timed out after {timeout:g}s")
        except OSError as exc:
            return GateResult(ok=False, returncode=None, output=f"gate command could not run: {exc}")
        output = done.stdout.decode(errors="replace")[-4000:]
        return GateResult(ok=done.returncode == 0, returncode=done.returncode, output=output)
    finally:
        with anyio.CancelScope(shield=True):
            await remove_worktree(repo, tree)
            shutil.rmtree(workdir, ignore_errors=True)


async def merge_into(
    repo: Path,
    branch: str,
    commit: str,
    message: str,
    *,
    gate: Sequence[str] | None = None,
    gate_timeout: float = 600,
    journal: Journal | None = None,
    journal_end: JournalEnd | None = None,
    base: str | None = None,
    tip_hint: str | None = None,
) -> MergeResult:
    """Merge ``commit`` into ``branch`` (a ``refs/heads/…`` name) without touching any
    working tree. Fast-forwards when ``commit`` already contains the tip; otherwise makes a
    two-parent merge commit. Retries if the branch moves under it.

    ``base`` (the commit ``commit`` was built on, an ancestor of the branch) and
    ``tip_hint`` (the branch tip as last seen) let the common cases skip git calls; the
    compare-and-swap of the final ref update keeps them honest."""
    ref = branch if branch.startswith("refs/") else f"refs/heads/{branch}"
    while True:
        tip = tip_hint or await rev_parse(repo, ref)
        tip_hint = None  # trusted once; a failed compare-and-swap re-reads the ref
        if base is None or tip != base:
            base = (await git(repo, "merge-base", tip, commit, ok_codes=(0, 1))).stdout.strip()
        if base == commit:
            return MergeResult(MergeOutcome.ALREADY_MERGED, old_tip=tip, new_tip=tip)
        if base == tip:
            new = commit
        else:
            check = await merge_tree(repo, tip, commit)
            if not check.clean:
                return MergeResult(MergeOutcome.CONFLICT, old_tip=tip, conflicts=check.conflicts)
            made = await git(
                repo,
                *(await identity_args(repo)),
                "commit-tree",
                check.tree,
                "-p",
                tip,
                "-p",
                commit,
                "-m",
                message,
            )
            new = made.stdout.strip()
        if gate:
            verdict = await run_gate(repo, new, gate, timeout=gate_timeout)
            if not verdict.ok:
                return MergeResult(MergeOutcome.GATE_FAILED, old_tip=tip, gate=verdict)
        entry = await journal(ref, tip, new) if journal else 0
        if await update_ref(repo, ref, new, tip, message):
            if journal_end:
                await journal_end(entry, "done")
            return MergeResult(MergeOutcome.MERGED, old_tip=tip, new_tip=new)
        if journal_end:
            await journal_end(entry, "undone")
