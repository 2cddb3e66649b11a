"""Locate the ``claude`` executable and check that it is a recent enough Claude Code.

:func:`find_claude` looks at an explicit path, ``$CLAUDECLUSTER_CLAUDE_BIN``, the project's
pinned ``node_modules/.bin/claude`` and ``PATH``, in that order, and says where it looked
and how to install the CLI when nothing fits.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from .errors import ClaudeNotFoundError, ClaudeVersionError

__all__ = [
    "CLAUDE_BIN_ENV",
    "INSTALL_HINT",
    "MIN_CLAUDE_VERSION",
    "PINNED_CLAUDE_VERSION",
    "ClaudeBinary",
    "find_claude",
]

CLAUDE_BIN_ENV = "CLAUDECLUSTER_CLAUDE_BIN"
MIN_CLAUDE_VERSION = (2, 1, 300)
PINNED_CLAUDE_VERSION = "2.1.332"
INSTALL_HINT = (
    "Install the pinned Claude Code CLI with `npm ci` in the claudecluster checkout "
    f"(or `npm install -g @anthropic-ai/claude-code@{PINNED_CLAUDE_VERSION}`), "
    f"or point {CLAUDE_BIN_ENV} at a `claude` executable."
)
"""What to do when ``claude`` is missing, too old or cannot be started."""


class ClaudeBinary(BaseModel):
    """A located, version-checked ``claude`` executable."""

    model_config = ConfigDict(frozen=True)

    path: Path
    version: str


# Keyed by path and mtime: `claude --version` takes ~0.5 s, and a reinstall changes the mtime.
_version_cache: dict[tuple[str, float], str] = {}


def _candidates(explicit: str | os.PathLike[str] | None) -> list[tuple[str, Path]]:
    found: list[tuple[str, Path]] = []
    if explicit:
        return [("the configured path", Path(explicit))]
    if env := os.environ.get(CLAUDE_BIN_ENV):
        return [(f"${CLAUDE_BIN_ENV}", Path(env))]
    project_root = Path(__file__).resolve().parent.parent
    for root in dict.fromkeys([project_root, Path.cwd()]):
        found.append((f"{root}/node_modules", root / "node_modules" / ".bin" / "claude"))
    if on_path := shutil.which("claude"):
        found.append(("PATH", Path(on_path)))
    return found


def _version_of(path: Path) -> str:
    key = (str(path), path.stat().st_mtime)
    if key not in _version_cache:
        try:
            done = subprocess.run(
                [str(path), "--version"],
                capture_output=True,
                text=True,
                timeout=30,
                stdin=subprocess.DEVNULL,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ClaudeVersionError(f"`{path} --version` failed: {exc}. {INSTALL_HINT}") from exc
        match = re.search(r"(\d+)\.(\d+)\.(\d+)", done.stdout)
        if done.returncode != 0 or match is None:
            detail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise ClaudeVersionError(
                f"`{path} --version` did not report a Claude Code version ({detail[0]}). " + INSTALL_HINT
            )
        _version_cache[key] = match.group(0)
    return _version_cache[key]


def find_claude(explicit: str | os.PathLike[str] | None = None) -> ClaudeBinary:
    """Locate ``claude``: ``explicit``, else ``$CLAUDECLUSTER_CLAUDE_BIN``, else the project's
    ``node_modules/.bin/claude``, else ``PATH``. Raises a :class:`ClaudeNotFoundError` that
    says how to install it, or :class:`ClaudeVersionError` if it is older than
    :data:`MIN_CLAUDE_VERSION`."""
    looked: list[str] = []
    for origin, path in _candidates(explicit):
        if path.is_file() and os.access(path, os.X_OK):
            version = _version_of(path)
            if tuple(int(p) for p in version.split(".")) < MIN_CLAUDE_VERSION:
                minimum = ".".join(map(str, MIN_CLAUDE_VERSION))
                raise ClaudeVersionError(
                    f"Claude Code at {path} is version {version}; "
                    f"claudecluster needs {minimum} or newer. " + INSTALL_HINT
                )
            return ClaudeBinary(path=path, version=version)
        looked.append(f"{path} ({origin})")
    raise ClaudeNotFoundError(
        "The Claude Code CLI (`claude`) was not found; looked at: "
        + "; ".join(looked or ["PATH"])
        + ". "
        + INSTALL_HINT
    )
