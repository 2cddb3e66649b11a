"""Git plumbing for plans: refs, worktrees, commits, with every user-supplied ref or path
checked first. Each command runs through :func:`~claudecluster_mcp.gitrun.git` (re-exported
here): engine git, hardened, with a timeout (see :mod:`~claudecluster_mcp.gitrun`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import anyio

from .errors import DirtyWorktreeError, GitError, RepositoryError
from .gitrun import DEFAULT_GIT_TIMEOUT, GitResult, git, set_git_timeout

__all__ = [
    "DEFAULT_GIT_TIMEOUT",
    "GitResult",
    "add_worktree",
    "changed_files",
    "changes_fingerprint",
    "check_branch_name",
    "check_target_branch",
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
    "set_git_timeout",
    "update_ref",
    "worktree_of_branch",
]

ZERO_OID = "0" * 40
REF_LOCK_WAIT = 10.0
"""Seconds a ref update waits for a lock held by another git process (e.g. ``git gc``)."""
_FALLBACK_IDENTITY = ["-c", "user.name=claudecluster", "-c", "user.email=claudecluster@localhost"]


async def repo_root(path: Path) -> Path:
    """The top of the git repository containing ``path`` (:class:`RepositoryError` if none)."""
    path = Path(path).expanduser()
    try:
        is_dir = path.is_dir()
    except OSError as exc:  # e.g. a name too long
        raise RepositoryError(f"cannot open {str(path)[:200]!r}: {exc.strerror}") from exc
    if not is_dir:
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


async def check_target_branch(repo: Path, name: str) -> str:
    """Validate a branch a plan's work is merged into: a valid branch name, neither ``HEAD``
    (which ``git check-ref-format`` allows and git then cannot tell from HEAD) nor one of the
    engine's own branches under ``claudecluster/`` (another plan's integration branch)."""
    await check_branch_name(repo, name)
    if name == "HEAD" or name.startswith("claudecluster/"):
        raise RepositoryError(
            f"cannot merge into {name!r}: "
            + ("name a branch" if name == "HEAD" else "branches under claudecluster/ belong to the engine")
        )
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


async def update_ref(
    repo: Path, ref: str, new: str, old: str | None, message: str, *, lock_wait: float = REF_LOCK_WAIT
) -> bool:
    """Compare-and-swap a ref: set ``ref`` to ``new`` only if it is ``old`` (None = must not
    exist). False when the ref was not at ``old``. While another git process holds the ref's
    lock, git retries for up to ``lock_wait`` seconds (its own default is 0.1 s, after which a
    finished task's merge would fail for good); a lock still there after that is reported."""
    wait = f"core.filesRefLockTimeout={round(lock_wait * 1000)}"
    result = await git(repo, "-c", wait, "update-ref", "-m", message, ref, new, old or ZERO_OID, check=False)
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


async def commit_all(worktree: Path, message: str, *, exclude: Sequence[str] = ()) -> bool:
    """Commit everything changed in ``worktree`` (tracked and untracked, respecting
    .gitignore; an in-progress merge is concluded), except ``exclude``: files new to the
    index that stay out of the commit. False when there was nothing to commit."""
    await git(worktree, "add", "--all")
    if exclude:
        await git(worktree, "rm", "--cached", "-q", "--ignore-unmatch", "--", *(f":(literal){p}" for p in exclude))
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


async def changes_fingerprint(worktree: Path) -> dict[str, tuple[int, int]]:
    """Every changed or untracked file of ``worktree`` with its (mtime_ns, size): two
    fingerprints differ when a file was written in between (a clean file turning dirty, a
    dirty one rewritten, a new one)."""
    result = await git(worktree, "status", "--porcelain=v1", "-z", "--untracked-files=all", "--ignored=no")
    found: dict[str, tuple[int, int]] = {}
    for entry in result.stdout.split("\0"):
        name = entry[3:]
        if len(entry) > 3 and entry[2] == " ":
            try:
                stat = (worktree / name).lstat()
            except OSError:
                found[name] = (0, -1)  # deleted
                continue
            found[name] = (stat.st_mtime_ns, stat.st_size)
    return found


async def is_dirty(worktree: Path) -> bool:
    """True if tracked files in ``worktree`` have uncommitted changes (staged or not)."""
    result = await git(worktree, "status", "--porcelain", "--untracked-files=no")
    return bool(result.stdout.strip())


async def require_clean(worktree: Path, purpose: str) -> None:
    """Raise :class:`DirtyWorktreeError` if ``worktree`` has local changes."""
    if await is_dirty(worktree):
        raise DirtyWorktreeError(f"{worktree} has uncommitted changes; commit or stash them before {purpose}")
