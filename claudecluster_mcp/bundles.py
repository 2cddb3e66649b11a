"""Worktree snapshots moved between the engine and a Ray node as git bundles.

The engine stays the only owner of the repository: a node gets a bundle of the task's
worktree (its ``HEAD``, an unfinished merge's other parent, and uncommitted files if there
are any), rebuilds that worktree in a temporary repository, lets the agent work, and sends
back a bundle holding the agent's commits plus one *files commit* whose tree is everything
in the node's worktree (tracked and untracked, ``.gitignore`` respected). The engine then
puts exactly that state into the task's local worktree: ``HEAD`` where the node's was, the
files as the agent left them, uncommitted, and an unfinished merge still unfinished. From
there on the task runner commits and merges it as it would a local agent's work.

::

    engine                                node
    take_snapshot(worktree)  ─ bundle ─▶  checkout_snapshot(tmp, bundle, snapshot)
                                          … the agent works …
    apply_snapshot(worktree) ◀─ bundle ─  take_snapshot(tmp, files=True) + make_bundle

Every command is engine git (:func:`~claudecluster_mcp.workspace.git`): nothing the agent
planted in a repository runs.
"""

from __future__ import annotations

import contextlib
import secrets
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import anyio

from .errors import GitError
from .workspace import git

__all__ = [
    "Snapshot",
    "apply_snapshot",
    "checkout_snapshot",
    "git_identity",
    "ignored_matches",
    "make_bundle",
    "take_snapshot",
    "unbundle",
]

_FALLBACK_IDENTITY = ("claudecluster", "claudecluster@localhost")


@dataclass(frozen=True)
class Snapshot:
    """The state of a worktree, by commit ids (the objects travel in a bundle)."""

    head: str  #: the commit checked out
    branch: str | None  #: the branch checked out (None: detached)
    merge_head: str | None = None  #: the other parent of an unfinished merge
    #: a commit (parent ``head``) whose tree is the worktree's files; None: they equal ``head``
    files: str | None = None

    @property
    def tips(self) -> dict[str, str]:
        """The commits a bundle of this snapshot must hold, by a name for each."""
        named = {"head": self.head, "merge": self.merge_head, "files": self.files}
        return {name: sha for name, sha in named.items() if sha}


async def ignored_matches(worktree: Path, globs: Sequence[str]) -> list[str]:
    """Files of ``worktree`` that git ignores and ``globs`` (``copy_files``) match."""
    if not globs:
        return []
    listed = await git(
        worktree, "ls-files", "-z", "--others", "--ignored", "--exclude-standard", "--", *(f":(glob){g}" for g in globs)
    )
    return sorted(name for name in listed.stdout.split("\0") if name)


async def git_identity(repo: Path) -> tuple[str, str]:
    """The committer (name, e-mail) the repository's git would use, or claudecluster's."""
    name = (await git(repo, "config", "user.name", check=False)).stdout.strip()
    email = (await git(repo, "config", "user.email", check=False)).stdout.strip()
    return (name, email) if name and email else _FALLBACK_IDENTITY


def _identity_args(identity: tuple[str, str]) -> list[str]:
    return ["-c", f"user.name={identity[0]}", "-c", f"user.email={identity[1]}"]


async def _state(worktree: Path) -> tuple[str, str | None, str | None, Path]:
    """(HEAD, its branch or None, MERGE_HEAD or None, the worktree's git dir), in one git call."""
    found = await git(worktree, "rev-parse", "HEAD", "--symbolic-full-name", "HEAD", "--absolute-git-dir")
    head, ref, git_dir = found.stdout.split("\n")[:3]
    merge_file = Path(git_dir) / "MERGE_HEAD"
    merge_head = merge_file.read_text().split()[0] if merge_file.is_file() else None
    return head, ref.removeprefix("refs/heads/") if ref.startswith("refs/heads/") else None, merge_head, Path(git_dir)


async def take_snapshot(
    worktree: Path, identity: tuple[str, str], *, files: bool = False, ignored: Sequence[str] = ()
) -> Snapshot:
    """The worktree's state. Its files are recorded as a files commit when they differ
    from ``HEAD`` outside an unfinished merge (a node re-does that merge instead), or always
    with ``files`` (the node's result); ``ignored``: paths git ignores that go along (files
    copied in for the agent, e.g. ``.env``). Without ``files`` the index is left as it was."""
    head, branch, merge_head, git_dir = await _state(worktree)
    if not files and not ignored:
        dirty = (await git(worktree, "status", "--porcelain", "--untracked-files=all")).stdout.strip()
        if merge_head or not dirty:
            return Snapshot(head, branch, merge_head)
    index = git_dir / "index"
    saved = index.read_bytes() if not files and index.exists() else None
    try:  # the tree of every file in the worktree, through the index (put back if it matters)
        await git(worktree, "add", "--all")
        if ignored:
            await git(worktree, "add", "--force", "--", *(f":(literal){path}" for path in ignored))
        tree = (await git(worktree, "write-tree")).stdout.strip()
    finally:
        if saved is not None:
            index.write_bytes(saved)
    message = "claudecluster: the worktree's files"
    commit = await git(worktree, *_identity_args(identity), "commit-tree", tree, "-p", head, "-m", message)
    return Snapshot(head, branch, merge_head, commit.stdout.strip())


async def make_bundle(
    repo: Path, tips: Mapping[str, str], exclude: Iterable[str] = (), *, scratch: bool = False
) -> bytes:
    """A bundle of ``tips`` (name → commit) and their history, minus what ``exclude`` reaches
    (commits the receiver has). The tips get temporary refs, as bundles name refs only;
    in a ``scratch`` repository (a node's, removed afterwards) they are left there."""
    prefix = f"refs/claudecluster/bundle/{secrets.token_hex(6)}"
    refs = {f"{prefix}/{name}": sha for name, sha in tips.items()}
    try:
        for ref, sha in refs.items():
            await git(repo, "update-ref", "--no-deref", ref, sha)
        with tempfile.TemporaryDirectory(prefix="ccbundle-") as tmp:
            path = Path(tmp) / "out.bundle"
            excluded = [f"^{sha}" for sha in exclude]
            made = await git(repo, "bundle", "create", "--quiet", str(path), *refs, *excluded, check=False)
            if made.returncode != 0:
                if "empty bundle" in made.stderr:  # the receiver has it all already
                    return b""
                raise GitError(f"git bundle create failed in {repo}: {made.stderr.strip()}")
            return await anyio.Path(path).read_bytes()
    finally:
        for ref in [] if scratch else refs:
            with contextlib.suppress(Exception):
                await git(repo, "update-ref", "-d", ref)


async def unbundle(repo: Path, data: bytes) -> None:
    """Store a bundle's objects in ``repo`` (no ref changes; its prerequisites must be there)."""
    if not data:  # an empty bundle: nothing new
        return
    with tempfile.TemporaryDirectory(prefix="ccbundle-") as tmp:
        path = Path(tmp) / "in.bundle"
        await anyio.Path(path).write_bytes(data)
        await git(repo, "bundle", "unbundle", str(path))


async def checkout_snapshot(
    path: Path, data: bytes, snapshot: Snapshot, identity: tuple[str, str], *, cache: Path | None = None
) -> Path:
    """Node side: a new repository at ``path`` in the state ``snapshot`` describes (the same
    branch, an unfinished merge re-done, uncommitted files restored), committing as ``identity``.

    With ``cache`` (a bare repository kept by the node's slot), the bundle's objects go there
    and the new repository borrows them (``objects/info/alternates``): a slot receives only
    what it does not have yet (incremental bundles), and no run copies the history."""
    # The git directory lies beside the worktree, as a linked worktree's does on the engine:
    # the sandbox makes only the worktree (and TMPDIR) writable, so an agent cannot write
    # the repository's history, hooks or config there any more than it can locally.
    git_dir = path.with_name(path.name + ".git")
    path.parent.mkdir(parents=True, exist_ok=True)
    await git(path.parent, "init", "--quiet", f"--separate-git-dir={git_dir}", str(path))
    # The agent commits as the engine's repository would (one file write, not two git calls).
    name, email = (value.replace("\\", "\\\\").replace('"', '\\"') for value in identity)
    with (git_dir / "config").open("a") as config:
        config.write(f'[user]\n\tname = "{name}"\n\temail = "{email}"\n')
    if cache is not None:
        await unbundle(cache, data)
        (git_dir / "objects" / "info" / "alternates").write_text(f"{cache / 'objects'}\n")
    else:
        await unbundle(path, data)
    if snapshot.branch:
        await git(path, "checkout", "--quiet", "-B", snapshot.branch, snapshot.head)
    else:
        await git(path, "checkout", "--quiet", "--detach", snapshot.head)
    if snapshot.merge_head:
        # The same merge as the engine's (the agent then sees the conflicts as git shows them).
        await git(path, "merge", "--quiet", "--no-commit", "--no-ff", snapshot.merge_head, ok_codes=(0, 1))
    elif snapshot.files:
        await git(path, "read-tree", "-u", "--reset", snapshot.files)
        await git(path, "reset", "--quiet")
    return path


async def apply_snapshot(worktree: Path, data: bytes, snapshot: Snapshot, sent: Snapshot) -> None:
    """Engine side: put a node's result (``snapshot``, objects in ``data``) into the task's
    worktree, which is still as it was sent (``sent``): ``HEAD`` (and so the task branch) at
    the node's, its files uncommitted, an unfinished merge kept unfinished."""
    await unbundle(worktree, data)
    if snapshot.head != sent.head:
        await git(worktree, "update-ref", "-m", "claudecluster: result from a Ray node", "HEAD", snapshot.head)
    files = snapshot.files or snapshot.head
    if snapshot.head == sent.head and not (sent.merge_head or snapshot.merge_head or sent.files):
        # The usual case: the agent committed nothing, the worktree here is still a clean
        # checkout of HEAD, and the node's files become plain uncommitted changes (one command).
        await git(worktree, "restore", f"--source={files}", "--worktree", "--", ":/")
        return
    if snapshot.merge_head and sent.merge_head != snapshot.merge_head:
        await git(worktree, "update-ref", "--no-deref", "MERGE_HEAD", snapshot.merge_head)
    elif sent.merge_head and not snapshot.merge_head:
        await git(worktree, "merge", "--quit")
    await git(worktree, "clean", "-d", "--force", "--quiet")
    await git(worktree, "read-tree", "-u", "--reset", files)
    if not snapshot.merge_head:
        await git(worktree, "reset", "--quiet")  # uncommitted, as the agent left them
