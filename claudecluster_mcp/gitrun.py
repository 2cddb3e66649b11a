"""Running one git command: always the git CLI with an argument list (never a shell), in
its own process group, with a timeout.

This is the one place git failures are translated: a failed command raises
:class:`~claudecluster_mcp.errors.GitError` carrying git's own message, and a command that
outlives its timeout (a hanging lock, a remote, a slow filesystem) is killed with everything
it started and reported as a :class:`GitError` that says what to check.

Two kinds of git command, chosen by :func:`git`'s ``user_hooks`` flag:

* **engine git** (the default; every function of :mod:`~claudecluster_mcp.workspace`, the
  merge queue, the task runner, recovery, reports): runs *only git*. Repository hooks,
  ``core.fsmonitor``, repository-defined filter/merge/diff drivers, pagers, editors,
  transports and inherited ``GIT_*`` variables are all switched off
  (:mod:`~claudecluster_mcp.githarden` lists what is and is not covered). Agents can write
  to the shared ``.git``; nothing they plant there runs when the engine creates worktrees,
  commits, merges or moves refs.
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
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import anyio
from anyio.abc import ByteReceiveStream, Process

from .errors import GitError
from .githarden import DRIVER_SCAN_ARGS, driver_overrides, git_environment, needs_driver_scan

__all__ = ["DEFAULT_GIT_TIMEOUT", "GitResult", "git", "set_git_timeout"]

DEFAULT_GIT_TIMEOUT = 120.0
"""Seconds a git command may run before it is killed, unless :func:`set_git_timeout` says otherwise."""
_git_timeout = DEFAULT_GIT_TIMEOUT


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
