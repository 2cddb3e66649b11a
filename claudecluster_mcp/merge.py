"""Merging a commit into a branch without a working tree: check, gate, compare-and-swap.

``git merge-tree --write-tree`` computes the merge (and its conflicts) from objects alone;
``git commit-tree`` makes the merge commit (:func:`merge_onto`); an optional gate command
runs on a detached worktree of the candidate (:func:`run_gate`, confined like an agent:
scrubbed environment, private TMPDIR, and under a
:class:`~claudecluster_mcp.isolation.SandboxPolicy` a read-only file system except its
worktree); ``git update-ref <ref> <new> <old>`` moves the branch only if nobody moved it
meanwhile (:func:`advance`). A journal callback records the update before it happens, so a
crash half-way can be completed or undone, never applied twice.

:func:`merge_into` is the three steps for one commit; the merge queue's batches
(:mod:`~claudecluster_mcp.batch`) chain :func:`merge_onto` over several and land them with
one :func:`advance`.
"""

from __future__ import annotations

import enum
import hashlib
import shutil
import tempfile
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from tempfile import gettempdir

import anyio

from .confined import run_confined
from .isolation import SandboxPolicy, require_isolation
from .proctree import RUN_TAG_VAR, ProcessTree
from .workspace import (
    add_worktree,
    git,
    identity_args,
    remove_worktree,
    rev_parse,
    update_ref,
)

__all__ = [
    "GateResult",
    "MergeOutcome",
    "MergeResult",
    "Step",
    "advance",
    "merge_into",
    "merge_onto",
    "merge_tree",
    "reap_gates",
    "run_gate",
]

Journal = Callable[[str, str, str], Awaitable[int]]  # (ref, old, new) -> entry number
JournalEnd = Callable[[int, str], Awaitable[None]]  # (entry number, "done" | "undone")
Stage = Callable[[str], Awaitable[None]]  # told what the merge does next, for progress


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
    seconds: float = 0.0


@dataclass(frozen=True)
class MergeResult:
    """The outcome of :func:`merge_into` (``gate``: the gate's verdict, when it ran)."""

    outcome: MergeOutcome
    old_tip: str
    new_tip: str | None = None
    conflicts: list[str] = field(default_factory=list)
    gate: GateResult | None = None
    fast_forward: bool = False


@dataclass(frozen=True)
class Step:
    """One commit merged onto another in memory (:func:`merge_onto`): ``MERGED`` with the
    commit that holds both (``new``; the commit itself when it fast-forwards),
    ``ALREADY_MERGED`` (``new`` is the tip) or ``CONFLICT``."""

    outcome: MergeOutcome
    new: str | None
    fast_forward: bool = False
    conflicts: list[str] = field(default_factory=list)


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


async def run_gate(
    repo: Path,
    commit: str,
    argv: Sequence[str],
    *,
    timeout: float = 600,
    sandbox: SandboxPolicy | None = None,
    env: Mapping[str, str] | None = None,
) -> GateResult:
    """Run ``argv`` (no shell) in a detached worktree of ``commit``; keep its output's tail.

    The gate runs code the agents wrote, so it gets what an agent gets and no more
    (:func:`~claudecluster_mcp.confined.run_confined`): the agents' environment allow-list
    without model credentials (never the server's tokens), a private TMPDIR removed
    afterwards, and with ``sandbox`` a file system read-only except its worktree, its TMPDIR
    and the policy's paths, and no network unless the policy allows some. ``env`` (the
    task's ``CLAUDECLUSTER_*`` variables) is added. On timeout or cancellation the gate's
    whole process group is killed."""
    if sandbox is not None:
        require_isolation("sandbox")
    workdir = Path(tempfile.mkdtemp(prefix=_gate_dir_prefix(repo)))
    tree, tmpdir = workdir / "tree", workdir / "tmp"
    tmpdir.mkdir(mode=0o700)
    try:
        await add_worktree(repo, tree, commit=commit)
        tagged = {**(env or {}), RUN_TAG_VAR: _gate_tag(repo)}  # found by reap_gates after a crash
        ran = await run_confined(argv, tree, timeout=timeout, sandbox=sandbox, env=tagged, tmpdir=tmpdir)
        output = ran.output if ran.returncode is not None else f"gate command {ran.output}"
        return GateResult(ok=ran.ok, returncode=ran.returncode, output=output[-4000:], seconds=ran.seconds)
    finally:
        with anyio.CancelScope(shield=True):
            await remove_worktree(repo, tree)
            shutil.rmtree(workdir, ignore_errors=True)


def _gate_tag(repo: Path) -> str:
    """The environment tag of every gate run in ``repo`` (one engine per repository at a time,
    so a tagged process found when an engine opens it is a leftover)."""
    return "gate-" + hashlib.sha256(str(repo.resolve()).encode()).hexdigest()[:16]


def _gate_dir_prefix(repo: Path) -> str:
    return f"claudecluster-{_gate_tag(repo)}-"


async def reap_gates(repo: Path) -> list[int]:
    """Clean up after gates whose engine was killed: kill what is left of them (found by
    their environment tag: an unconfined gate runs on after the engine dies) and remove their
    temporary directories and detached worktrees (found by their names, which hold the same
    tag). Returns the pids killed."""
    prefix = _gate_dir_prefix(repo)
    listed = await git(repo, "worktree", "list", "--porcelain", check=False)
    trees = [Path(line[len("worktree ") :]) for line in listed.stdout.splitlines() if line.startswith("worktree ")]
    left = {tree.parent for tree in trees if tree.parent.name.startswith(prefix)}
    left |= set(Path(gettempdir()).glob(prefix + "*"))
    if not left:  # a gate's directory outlives its process: without one, no gate is left either
        return []
    killed = await anyio.to_thread.run_sync(ProcessTree(root=-1, tag=_gate_tag(repo), everywhere=True).kill_all)
    for workdir in left:
        await remove_worktree(repo, workdir / "tree")
        shutil.rmtree(workdir, ignore_errors=True)
    return killed


async def merge_onto(
    repo: Path, tip: str, commit: str, message: str, *, base: str | None = None, on_stage: Stage | None = None
) -> Step:
    """``commit`` merged onto ``tip`` without touching a ref or a working tree: a
    fast-forward when ``commit`` contains ``tip``, else a two-parent merge commit (with a
    fallback identity where git has none) after a clean ``merge-tree``. ``base``, when it
    is ``tip``, saves the ``merge-base`` call."""
    if base is None or tip != base:
        base = (await git(repo, "merge-base", tip, commit, ok_codes=(0, 1))).stdout.strip()
    if base == commit:
        return Step(MergeOutcome.ALREADY_MERGED, new=tip)
    if base == tip:
        return Step(MergeOutcome.MERGED, new=commit, fast_forward=True)
    if on_stage:
        await on_stage(f"checking {commit[:12]} against {tip[:12]} for conflicts")
    check = await merge_tree(repo, tip, commit)
    if not check.clean:
        return Step(MergeOutcome.CONFLICT, new=None, conflicts=check.conflicts)
    identity = await identity_args(repo)
    made = await git(repo, *identity, "commit-tree", check.tree, "-p", tip, "-p", commit, "-m", message)
    return Step(MergeOutcome.MERGED, new=made.stdout.strip())


async def advance(
    repo: Path,
    ref: str,
    new: str,
    old: str,
    message: str,
    *,
    journal: Journal | None = None,
    journal_end: JournalEnd | None = None,
    checkout: Path | None = None,
) -> bool:
    """Move ``ref`` from ``old`` to ``new`` (compare-and-swap); False if it was not at
    ``old``. Journalled (entry before, closed ``done``/``undone`` after) and shielded from
    cancellation: it happens entirely or not at all. With ``checkout`` (the worktree that
    has ``ref`` checked out) the move is a ``git merge --ff-only`` there, which updates its
    files."""
    with anyio.CancelScope(shield=True):
        entry = await journal(ref, old, new) if journal else 0
        try:
            moved = await _advance(repo, ref, new, old, message, checkout)
        except BaseException:
            if journal_end:
                await journal_end(entry, "undone")
            raise
        if journal_end:
            await journal_end(entry, "done" if moved else "undone")
    return moved


async def merge_into(
    repo: Path,
    branch: str,
    commit: str,
    message: str,
    *,
    gate: Sequence[str] | None = None,
    gate_timeout: float = 600,
    gate_sandbox: SandboxPolicy | None = None,
    gate_fast_forward: bool = True,
    on_stage: Stage | None = None,
    gate_env: Mapping[str, str] | None = None,
    journal: Journal | None = None,
    journal_end: JournalEnd | None = None,
    base: str | None = None,
    tip_hint: str | None = None,
    checkout: Path | None = None,
    dry_run: bool = False,
) -> MergeResult:
    """Merge ``commit`` into ``branch`` (a ``refs/heads/…`` name): :func:`merge_onto` its
    tip, the gate, then :func:`advance`. Retries if the branch moves under it.

    The merge commit and the gate touch no ref, so they can be cancelled at any point; the
    ref update, with its journal entries, is shielded from cancellation and happens
    entirely or not at all. Without ``checkout`` no working tree is touched; with it (the
    worktree that has ``branch`` checked out) the ref moves by ``git merge --ff-only`` to
    the prepared commit there, which updates its files. ``dry_run`` stops before the gate;
    ``gate_sandbox`` confines the gate and ``gate_env`` is added to its environment
    (:func:`run_gate`); ``gate_fast_forward=False`` runs it only on a new merge commit (a
    fast-forward lands a commit that was gated before). ``on_stage`` is told each step
    (conflict check, gate, ref update) as it begins.

    ``base`` (the commit ``commit`` was built on, an ancestor of the branch) and
    ``tip_hint`` (the branch tip as last seen) let the common cases skip git calls; the
    compare-and-swap of the final ref update keeps them honest."""
    ref = branch if branch.startswith("refs/") else f"refs/heads/{branch}"
    while True:
        tip = tip_hint or await rev_parse(repo, ref)
        tip_hint = None  # trusted once; a failed compare-and-swap re-reads the ref
        step = await merge_onto(repo, tip, commit, message, base=base, on_stage=on_stage)
        base = None
        if step.outcome is MergeOutcome.ALREADY_MERGED:
            return MergeResult(MergeOutcome.ALREADY_MERGED, old_tip=tip, new_tip=tip)
        if step.outcome is MergeOutcome.CONFLICT:
            return MergeResult(MergeOutcome.CONFLICT, old_tip=tip, conflicts=step.conflicts)
        assert step.new is not None
        new, fast_forward = step.new, step.fast_forward
        if dry_run:
            return MergeResult(MergeOutcome.MERGED, old_tip=tip, new_tip=new, fast_forward=fast_forward)
        verdict = None
        if gate and (gate_fast_forward or not fast_forward):
            if on_stage:
                await on_stage(f"running the gate on {new[:12]}: {' '.join(gate)}")
            verdict = await run_gate(repo, new, gate, timeout=gate_timeout, sandbox=gate_sandbox, env=gate_env)
            if not verdict.ok:
                return MergeResult(MergeOutcome.GATE_FAILED, old_tip=tip, gate=verdict)
        if on_stage:
            await on_stage(f"moving {ref} to {new[:12]}")
        if await advance(repo, ref, new, tip, message, journal=journal, journal_end=journal_end, checkout=checkout):
            return MergeResult(MergeOutcome.MERGED, old_tip=tip, new_tip=new, fast_forward=fast_forward, gate=verdict)


async def _advance(repo: Path, ref: str, new: str, old: str, message: str, checkout: Path | None) -> bool:
    """Move ``ref`` from ``old`` to ``new``; False if it was not at ``old``."""
    if checkout is None:
        return await update_ref(repo, ref, new, old, message)
    if await rev_parse(checkout, "HEAD") != old:
        return False
    # The user's own checkout: their hooks run as for any merge they make (see workspace).
    await git(checkout, "merge", "--ff-only", "--quiet", new, user_hooks=True)
    return True
