"""Git plumbing for plans: refs, worktrees, commits. Always the git CLI with an argument
list (never a shell), and every user-supplied ref or path checked first.

This is the one place git failures are translated: a failed command raises
:class:`~claudecluster_mcp.errors.GitError` carrying git's own message.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import anyio

from .errors import DirtyWorktreeError, GitError, RepositoryError

__all__ = [
    "GitResult",
    "add_worktree",
    "changed_files",
    "check_branch_name",
    "commit_all",
    "confine",
    "current_branch",
    "git",
    "git_common_dir",
    "identity_args",
    "is_ancestor",
    "is_dirty",
    "remove_worktree",
    "repo_root",
    "require_clean",
    "rev_parse",
    "update_ref",
    "worktree_of_branch",
]

ZERO_OID = "0" * 40
_FALLBACK_IDENTITY = ["-c", "user.name=claudecluster", "-c", "user.email=claudecluster@localhost"]
# No prompts, no pagers, no locale surprises in parsed output, no user hooks for our commits.
_GIT_ENV = {
    "GIT_TERMINAL_PROMPT": "0",
    "GIT_PAGER": "cat",
    "LC_ALL": "C",
    "GIT_OPTIONAL_LOCKS": "0",
}


@dataclass(frozen=True)
class GitResult:
    """What a git command printed and returned."""

    returncode: int
    stdout: str
    stderr: str


async def git(repo: Path, *args: str, check: bool = True, ok_codes: tuple[int, ...] = (0,)) -> GitResult:
    """Run ``git -C repo args…``; raise :class:`GitError` unless the exit code is in ``ok_codes``."""
    try:
        done = await anyio.run_process(
            ["git", "-C", str(repo), *args],
            check=False,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **_GIT_ENV},
        )
    except OSError as exc:
        raise GitError(f"cannot run git: {exc}") from exc
    result = GitResult(done.returncode, done.stdout.decode(errors="replace"), done.stderr.decode(errors="replace"))
    if check and result.returncode not in ok_codes:
        message = (result.stderr or result.stdout).strip() or f"exit code {result.returncode}"
        raise GitError(f"git {' '.join(args[:3])} failed in {repo}: {message}")
    return result


async def repo_root(path: Path) -> Path:
    """The top of the git repository containing ``path`` (:class:`RepositoryError` if none)."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise RepositoryError(f"{path} is not a directory")
    result = await git(path, "rev-parse", "--show-toplevel", check=False)
    if result.returncode != 0:
        raise RepositoryError(f"{path} is not a git repository (run `git init` there first)")
    root = Path(result.stdout.strip()).resolve()
    head = await git(root, "rev-parse", "--verify", "--quiet", "HEAD", check=False)
    if head.returncode != 0:
        raise RepositoryError(f"the repository {root} has no commits yet; commit something first")
    return root


async def git_common_dir(repo: Path) -> Path:
    """The repository's main git directory (shared by all its worktrees)."""
    result = await git(repo, "rev-parse", "--path-format=absolute", "--git-common-dir")
    return Path(result.stdout.strip())


def confine(repo: Path, path: Path | str) -> Path:
    """``path`` resolved (symlinks too) and required to lie inside ``repo``."""
    candidate = Path(path)
    if not candidate.is_absolute():
        candidate = repo / candidate
    resolved = candidate.resolve()
    try:
        resolved.relative_to(repo.resolve())
    except ValueError:
        raise RepositoryError(f"path {path} is outside the repository {repo}") from None
    return resolved


async def check_branch_name(repo: Path, name: str) -> str:
    """Validate a branch name (defense in depth: nothing that git could read as an option)."""
    if not name or name.startswith("-"):
        raise RepositoryError(f"invalid branch name {name!r}: it must not be empty or start with '-'")
    # Plain check-ref-format on the full ref: `--branch` would expand "@{-1}" and friends.
    result = await git(repo, "check-ref-format", f"refs/heads/{name}", check=False)
    if result.returncode != 0 or "@{" in name:
        raise RepositoryError(f"invalid branch name {name!r}")
    return name


async def rev_parse(repo: Path, ref: str) -> str:
    """The commit a ref names (:class:`RepositoryError` if it names none)."""
    if not ref or ref.startswith("-"):
        raise RepositoryError(f"invalid ref {ref!r}: it must not be empty or start with '-'")
    result = await git(
        repo,
        "rev-parse",
        "--verify",
        "--quiet",
        "--end-of-options",
        f"{ref}^{{commit}}",
        check=False,
    )
    if result.returncode != 0:
        raise RepositoryError(f"{ref!r} is not a commit, branch or tag in {repo}")
    return result.stdout.strip()


async def current_branch(repo: Path) -> str | None:
    """The branch checked out in ``repo`` (None when HEAD is detached)."""
    result = await git(repo, "symbolic-ref", "--quiet", "--short", "HEAD", check=False)
    return result.stdout.strip() or None


async def is_ancestor(repo: Path, ancestor: str, descendant: str) -> bool:
    """True if ``ancestor`` is reachable from ``descendant``."""
    result = await git(repo, "merge-base", "--is-ancestor", ancestor, descendant, ok_codes=(0, 1))
    return result.returncode == 0


async def update_ref(repo: Path, ref: str, new: str, old: str | None, message: str) -> bool:
    """Compare-and-swap a ref: set ``ref`` to ``new`` only if it is ``old`` (None = must not
    exist). False when the ref was not at ``old``."""
    result = await git(repo, "update-ref", "-m", message, ref, new, old or ZERO_OID, check=False)
    if result.returncode != 0:
        lost_race = ("but expected", "already exists", "unable to lock", "unable to resolve reference")
        if any(text in result.stderr for text in lost_race):
            return False
        raise GitError(f"git update-ref {ref} failed in {repo}: {result.stderr.strip()}")
    return True


async def worktree_of_branch(repo: Path, branch: str) -> Path | None:
    """The worktree that has ``branch`` checked out, if any."""
    result = await git(repo, "worktree", "list", "--porcelain")
    current: Path | None = None
    for line in result.stdout.splitlines():
        if line.startswith("worktree "):
            current = Path(line.removeprefix("worktree "))
        elif line == f"branch refs/heads/{branch}":
            return current
    return None


_worktree_locks: dict[str, anyio.Lock] = {}


def _worktree_lock(repo: Path) -> anyio.Lock:
    # Concurrent `git worktree add/remove/prune` in one repository race on .git/worktrees/
    # (a prune can delete the admin dir of an add in progress): one at a time per repo.
    key = str(repo.resolve())
    if key not in _worktree_locks:
        _worktree_locks[key] = anyio.Lock()
    return _worktree_locks[key]


async def add_worktree(repo: Path, path: Path, branch: str | None = None, *, commit: str | None = None) -> Path:
    """Check out ``branch`` (or ``commit``, detached) in a new worktree at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    async with _worktree_lock(repo):
        if branch is not None:
            await git(repo, "worktree", "add", "--quiet", "--end-of-options", str(path), branch)
        else:
            assert commit is not None
            await git(repo, "worktree", "add", "--quiet", "--detach", "--end-of-options", str(path), commit)
    return path


async def remove_worktree(repo: Path, path: Path) -> None:
    """Remove a worktree (and its files); a missing one is fine."""
    async with _worktree_lock(repo):
        if path.exists():
            await git(repo, "worktree", "remove", "--force", "--force", str(path), check=False)
        await git(repo, "worktree", "prune", check=False)


_identities: dict[str, list[str]] = {}


async def identity_args(repo: Path) -> list[str]:
    """``-c user.name=… -c user.email=…`` when the repository has no committer identity
    (looked up once per repository)."""
    key = str(repo)
    if key not in _identities:
        result = await git(repo, "config", "user.email", check=False)
        _identities[key] = [] if result.stdout.strip() else _FALLBACK_IDENTITY
    return _identities[key]


async def commit_all(worktree: Path, message: str) -> bool:
    """Commit everything changed in ``worktree`` (tracked and untracked, respecting
    .gitignore; an in-progress merge is concluded). False when there was nothing to commit."""
    await git(worktree, "add", "--all")
    staged = await git(worktree, "diff", "--cached", "--quiet", ok_codes=(0, 1))
    merging = (await git(worktree, "rev-parse", "--verify", "--quiet", "MERGE_HEAD", check=False)).returncode == 0
    if staged.returncode == 0 and not merging:
        return False
    await git(
        worktree,
        *(await identity_args(worktree)),
        "commit",
        "--quiet",
        "--no-verify",
        "-m",
        message,
    )
    return True


async def changed_files(repo: Path, base: str, head: str) -> list[str]:
    """Files that differ between two commits."""
    result = await git(repo, "diff", "--name-only", "-z", base, head, "--")
    return [name for name in result.stdout.split("\0") if name]


async def is_dirty(worktree: Path) -> bool:
    """True if tracked files in ``worktree`` have uncommitted changes (staged or not)."""
    result = await git(worktree, "status", "--porcelain", "--untracked-files=no")
    return bool(result.stdout.strip())


async def require_clean(worktree: Path, purpose: str) -> None:
    """Raise :class:`DirtyWorktreeError` if ``worktree`` has local changes."""
    if await is_dirty(worktree):
        raise DirtyWorktreeError(f"{worktree} has uncommitted changes; commit or stash them before {purpose}")
