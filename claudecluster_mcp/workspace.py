"""Git plumbing for plans: refs, worktrees, commits. Always the git CLI with an argument
list (never a shell), and every user-supplied ref or path checked first.

This is the one place git failures are translated: a failed command raises
:class:`~claudecluster_mcp.errors.GitError` carrying git's own message, and a command that
outlives its timeout (a hanging lock, a remote, a slow filesystem) is killed with everything
it started and reported as a :class:`GitError` that says what to check.

Two kinds of git command, chosen by :func:`git`'s ``user_hooks`` flag:

* **engine git** (the default; every function of this module, the merge queue, the task
  runner, recovery, reports): runs *only git*. Repository hooks, ``core.fsmonitor``,
  repository-defined filter/merge/diff drivers, pagers, editors, transports and inherited
  ``GIT_*`` variables are all switched off (:mod:`~claudecluster_mcp.githarden` lists what
  is and is not covered). Agents can write to the shared ``.git``; nothing they plant there
  runs when the engine creates worktrees, commits, merges or moves refs.
* **user git** (``user_hooks=True``): the user's own action in the user's own checkout,
  i.e. the final fast-forward of their checked-out branch (``merge.py`` ``_advance``). It
  runs the repository's hooks and honours its configuration like a ``git merge`` typed by
  the user would; only the inherited ``GIT_*`` variables are still dropped (a stray
  ``GIT_DIR`` must not redirect it).
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import anyio
from anyio.abc import ByteReceiveStream, Process

from .errors import DirtyWorktreeError, GitError, RepositoryError
from .githarden import DRIVER_SCAN_ARGS, driver_overrides, git_environment, needs_driver_scan

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
DEFAULT_GIT_TIMEOUT = 120.0
"""Seconds a git command may run before it is killed, unless :func:`set_git_timeout` says otherwise."""
_git_timeout = DEFAULT_GIT_TIMEOUT
_FALLBACK_IDENTITY = ["-c", "user.name=claudecluster", "-c", "user.email=claudecluster@localhost"]


@dataclass(frozen=True)
class GitResult:
    """What a git command printed and returned."""

    returncode: int
    stdout: str
    stderr: str


def set_git_timeout(seconds: float) -> float:
    """Set the timeout of git commands that do not pass their own (``math.inf``: none);
    returns the previous one."""
    global _git_timeout
    if not seconds > 0:
        raise ValueError(f"git timeout must be positive, not {seconds!r}")
    previous, _git_timeout = _git_timeout, seconds
    return previous


async def git(
    repo: Path,
    *args: str,
    check: bool = True,
    ok_codes: tuple[int, ...] = (0,),
    timeout: float | None = None,
    user_hooks: bool = False,
) -> GitResult:
    """Run ``git -C repo args…``; raise :class:`GitError` unless the exit code is in ``ok_codes``.

    Engine git by default: no hook, fsmonitor, repository-defined driver or inherited
    ``GIT_*`` variable takes part (see the module docstring). ``user_hooks=True`` is for
    the user's own action in their own checkout: the repository's hooks and configuration
    apply as they would to the user's git.

    ``timeout`` (seconds; None: the module's, see :func:`set_git_timeout`) bounds the whole
    command including its hooks; on expiry, or when the caller is cancelled, git and every
    process it started are killed.
    """
    limit = _git_timeout if timeout is None else timeout
    argv = ["git", "-C", str(repo), *args]
    try:
        with anyio.fail_after(None if math.isinf(limit) else limit):
            env = await _environment(repo, args, hardened=not user_hooks)
            returncode, stdout, stderr = await _run(argv, env)
    except TimeoutError:
        raise GitError(
            f"git {_describe(args)} timed out after {limit:g}s in {repo} and was killed. Check for a lock "
            "held by another git process (e.g. .git/index.lock), a remote that does not answer, "
            "a slow or stuck filesystem, or (for the user's own merge) a hook that hangs."
        ) from None
    except OSError as exc:
        raise GitError(f"cannot run git: {exc}") from exc
    result = GitResult(returncode, stdout.decode(errors="replace"), stderr.decode(errors="replace"))
    if check and result.returncode not in ok_codes:
        message = (result.stderr or result.stdout).strip() or f"exit code {result.returncode}"
        raise GitError(f"git {_describe(args)} failed in {repo}: {message}")
    return result


def _describe(args: tuple[str, ...]) -> str:
    """The command for messages: ``-c name=value`` settings dropped, three words kept."""
    words: list[str] = []
    skip = False
    for arg in args:
        if skip or arg == "-c":
            skip = not skip
            continue
        words.append(arg)
    return " ".join(words[:3])


async def _environment(repo: Path, args: tuple[str, ...], *, hardened: bool) -> dict[str, str]:
    """The command's environment; for engine git that reads file contents, with every
    command-running driver the repository's own config defines switched off."""
    if not (hardened and needs_driver_scan(args)):
        return git_environment(hardened=hardened)
    returncode, listing, _ = await _run(["git", "-C", str(repo), *DRIVER_SCAN_ARGS], git_environment())
    overrides = driver_overrides(listing.decode(errors="surrogateescape")) if returncode == 0 else []
    return git_environment(overrides=overrides)


async def _run(argv: list[str], env: dict[str, str]) -> tuple[int, bytes, bytes]:
    # Its own session (process group) so that hooks and other children of git can be
    # killed with it, and so that nothing can read from our terminal.
    process = await anyio.open_process(
        argv,
        stdin=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
    )
    output = [BytesIO(), BytesIO()]

    async def drain(stream: ByteReceiveStream | None, into: BytesIO) -> None:
        if stream is not None:
            async for chunk in stream:
                into.write(chunk)

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(drain, process.stdout, output[0])
            tg.start_soon(drain, process.stderr, output[1])
            await process.wait()
    except BaseException:
        with anyio.CancelScope(shield=True):
            await _kill_group(process)
        raise
    finally:
        with anyio.CancelScope(shield=True):
            await process.aclose()
    assert process.returncode is not None
    return process.returncode, output[0].getvalue(), output[1].getvalue()


async def _kill_group(process: Process) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    await process.wait()


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
