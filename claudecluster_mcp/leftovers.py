"""What agent runs leave on disk, where, and how much of it: a plan's files (worktrees, our
transcripts, Claude Code's session files), leftover run TMPDIRs and gate checkouts.
:mod:`~claudecluster_mcp.retention` decides what of it goes."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import psutil

from .proctree import RUN_TAG_VAR
from .settings import EngineSettings

__all__ = [
    "LEFTOVER_MIN_AGE",
    "PlanFiles",
    "claude_projects_dir",
    "disk_usage",
    "plan_files",
    "remove_paths",
    "stale_temp_dirs",
]

#: Leftover temp dirs and git temp files younger than this may still be in use.
LEFTOVER_MIN_AGE = 600.0


def disk_usage(path: Path) -> int:
    """Bytes ``path`` takes on disk (a whole tree; links not followed; 0 if missing)."""
    total = 0
    stack = [path]
    while stack:
        current = stack.pop()
        with contextlib.suppress(OSError):
            stat = current.lstat()
            total += stat.st_blocks * 512
            if current.is_dir() and not current.is_symlink():
                stack.extend(Path(entry.path) for entry in os.scandir(current))
    return total


def claude_projects_dir(settings: EngineSettings) -> Path:
    """Where the agents' Claude Code keeps its session transcripts: ``projects/`` of the
    config dir agents get (their ``CLAUDE_CONFIG_DIR``, else ``$HOME/.claude``)."""
    env = settings.agent_env
    config = env.get("CLAUDE_CONFIG_DIR") or settings.claude_config_dir or os.environ.get("CLAUDE_CONFIG_DIR")
    if not config:
        config = Path(env.get("HOME") or os.environ.get("HOME") or Path.home()) / ".claude"
    return Path(config).expanduser() / "projects"


def _project_prefixes(directory: Path) -> set[str]:
    # Claude Code names a session's project after its cwd, every non-alphanumeric as "-".
    return {re.sub(r"[^A-Za-z0-9]", "-", str(path)) + "-" for path in (directory, directory.resolve())}


def remove_paths(paths: Iterable[Path]) -> None:
    """Remove files and directory trees (links themselves, never what they point to)."""
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                path.unlink()


class PlanFiles:
    """A plan's files: worktrees (each a directory) and transcripts (files or directories)."""

    def __init__(self, worktrees_dir: Path, worktrees: list[Path], logs_dir: Path, logs: list[Path]) -> None:
        self.worktrees_dir, self.worktrees, self.logs_dir, self.logs = worktrees_dir, worktrees, logs_dir, logs

    def size(self) -> int:
        """Bytes they take on disk."""
        others = [p for p in self.logs if p.parent != self.logs_dir]
        return sum(disk_usage(p) for p in [self.worktrees_dir, self.logs_dir, *others])


def plan_files(settings: EngineSettings, plan_id: str) -> PlanFiles:
    """The files a plan left: its worktrees, our transcripts and Claude Code's."""
    state = settings.state_dir
    worktrees_dir = state / "worktrees" / plan_id
    worktrees = sorted(p for p in worktrees_dir.iterdir() if p.is_dir()) if worktrees_dir.is_dir() else []
    logs_dir = state / "logs" / plan_id
    logs = sorted(logs_dir.iterdir()) if logs_dir.is_dir() else []
    projects = claude_projects_dir(settings)
    prefixes = tuple(_project_prefixes(worktrees_dir))
    with contextlib.suppress(OSError):
        logs += sorted(p for p in projects.iterdir() if p.name.startswith(prefixes))
    return PlanFiles(worktrees_dir, worktrees, logs_dir, logs)


def stale_temp_dirs() -> list[Path]:
    """This user's run TMPDIRs (``ccrun-*``) and gate checkouts (``claudecluster-gate-*``)
    untouched for :data:`LEFTOVER_MIN_AGE` that no live process uses (by its run tag or
    working directory)."""
    root = Path(tempfile.gettempdir())
    now = time.time()
    found = []
    for pattern in ("ccrun-*", "claudecluster-gate-*"):
        for path in root.glob(pattern):
            with contextlib.suppress(OSError):
                stat = path.lstat()
                if path.is_dir() and stat.st_uid == os.getuid() and now - stat.st_mtime > LEFTOVER_MIN_AGE:
                    found.append(path)
    if not found:
        return []
    tags: set[str] = set()
    cwds: list[str] = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            tag = proc.environ().get(RUN_TAG_VAR)
            if tag:
                tags.add(tag)
            cwds.append(proc.cwd())
    return [
        path
        for path in found
        if path.name.removeprefix("ccrun-") not in tags
        and not any(c == str(path) or c.startswith(f"{path}/") for c in cwds)
    ]
