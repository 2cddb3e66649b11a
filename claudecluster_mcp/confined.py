"""Running a command on code the agents wrote, confined as the merge gate is: no shell, the
agents' environment allow-list without model credentials, a private TMPDIR removed
afterwards, and under a :class:`~claudecluster_mcp.isolation.SandboxPolicy` a file system
read-only except the given paths, with no network unless the policy allows some. Its own
process group is killed on timeout or cancellation.

Worktree setup and the merge gate (:func:`~claudecluster_mcp.merge.run_gate`) both run
through :func:`run_confined`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import anyio

from .agent_spec import scrubbed_env
from .isolation import SandboxPolicy, confine_argv, require_isolation

__all__ = ["ConfinedResult", "run_confined"]

_OUTPUT_TAIL = 8000


@dataclass(frozen=True)
class ConfinedResult:
    """How a confined command ended: ``returncode`` None when it timed out or could not
    start; ``output`` is the tail of its stdout and stderr together."""

    ok: bool
    returncode: int | None
    output: str
    seconds: float


async def run_confined(
    argv: Sequence[str],
    cwd: Path,
    *,
    timeout: float,
    sandbox: SandboxPolicy | None,
    env: Mapping[str, str] | None = None,
    writable: Sequence[Path] = (),
    tmpdir: Path | None = None,
) -> ConfinedResult:
    """Run ``argv`` in ``cwd`` (writable, with ``writable`` and a private TMPDIR, when
    sandboxed); ``env`` is added to the scrubbed environment. The TMPDIR is made and removed
    here unless the caller gives its own ``tmpdir`` (which it then removes)."""
    if sandbox is not None:
        require_isolation("sandbox")
    own_tmpdir = tmpdir is None
    tmpdir = Path(tempfile.mkdtemp(prefix="claudecluster-run-")) if tmpdir is None else tmpdir
    full_env = {**scrubbed_env(credentials=False), **(env or {}), "TMPDIR": str(tmpdir)}
    command = list(argv) if sandbox is None else confine_argv(argv, sandbox, [cwd, *writable, tmpdir])
    started = time.monotonic()
    try:
        with anyio.fail_after(timeout):
            returncode, output = await _run_group(command, cwd, full_env)
    except TimeoutError:
        return ConfinedResult(False, None, f"timed out after {timeout:g}s", time.monotonic() - started)
    except OSError as exc:
        return ConfinedResult(False, None, f"could not run {argv[0]}: {exc}", time.monotonic() - started)
    finally:
        if own_tmpdir:
            shutil.rmtree(tmpdir, ignore_errors=True)
    return ConfinedResult(returncode == 0, returncode, output[-_OUTPUT_TAIL:], time.monotonic() - started)


async def _run_group(argv: Sequence[str], cwd: Path, env: dict[str, str]) -> tuple[int, str]:
    """Run ``argv`` in its own session; kill the whole group when it ends or is cancelled."""
    chunks: list[bytes] = []
    process = await anyio.open_process(
        list(argv), cwd=cwd, env=env, stdin=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        assert process.stdout is not None
        async for chunk in process.stdout:
            chunks.append(chunk)
        returncode = await process.wait()
        # Nothing it started outlives it (a dev server left running would hold its ports).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    except BaseException:
        with anyio.CancelScope(shield=True):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
        raise
    finally:
        with anyio.CancelScope(shield=True):
            await process.aclose()
    return returncode, b"".join(chunks).decode(errors="replace")
