"""Isolation levels: what confines the commands of agents and of the merge gate.

``sandbox`` (the default): every agent runs under Claude Code's own sandbox (bubblewrap on
Linux, Seatbelt on macOS), with Bash allowed inside it. A Bash command may write only the
task's worktree, the run's private TMPDIR and ``sandbox_write_paths``, and reach only
``sandbox_allowed_domains``; it cannot ask to leave the sandbox. The merge gate runs under
the same confinement, applied directly (``bwrap`` / ``sandbox-exec``).

``none``: no confinement; agents and the gate can write wherever the server's user can. It
must be chosen explicitly: where the sandbox is not available, ``sandbox`` (explicit or by
default) fails with one line naming what to install — never a silent downgrade.

This module says what is available (:func:`sandbox_support`), refuses what is not
(:func:`require_isolation`), and turns a :class:`SandboxPolicy` into Claude Code settings
(:func:`claude_sandbox_settings`) or a confined argv (:func:`confine_argv`).
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .errors import ConfigError

__all__ = [
    "Isolation",
    "SandboxPolicy",
    "SandboxSupport",
    "claude_sandbox_settings",
    "confine_argv",
    "require_isolation",
    "sandbox_support",
]

Isolation = Literal["sandbox", "none"]

# What each platform's sandbox needs on PATH, and how to get it.
_LINUX_TOOLS: tuple[str, ...] = ("bwrap", "socat")
_LINUX_HINT = "install bubblewrap and socat (e.g. apt-get install bubblewrap socat, dnf install bubblewrap socat)"
_MACOS_TOOLS: tuple[str, ...] = ("sandbox-exec",)
_MACOS_HINT = "sandbox-exec (Seatbelt) ships with macOS; it must be on PATH (/usr/bin)"


class SandboxPolicy(BaseModel):
    """What a sandboxed command may touch beyond its own working tree and TMPDIR."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    write_paths: list[Path] = Field(default_factory=list, description="more writable paths")
    allowed_domains: list[str] = Field(default_factory=list, description="reachable domains; empty: no network")


@dataclass(frozen=True)
class SandboxSupport:
    """Whether ``sandbox`` can be used on this machine, and what is missing if not."""

    platform: str
    mechanism: str  #: "bubblewrap", "Seatbelt", or "" where there is none
    missing: tuple[str, ...]
    hint: str

    @property
    def available(self) -> bool:
        """True when every tool the sandbox needs is on PATH."""
        return bool(self.mechanism) and not self.missing

    def describe(self) -> str:
        """One line for ``claudecluster check`` / ``init``."""
        if self.available:
            return f"isolation: sandbox available ({self.mechanism})"
        if not self.mechanism:
            return f'isolation: sandbox not supported on {self.platform}; only isolation = "none" runs here'
        return f"isolation: sandbox NOT available (missing {', '.join(self.missing)}): {self.hint}"


def sandbox_support(
    *, platform: str | None = None, which: Callable[[str], str | None] = shutil.which
) -> SandboxSupport:
    """What the ``sandbox`` level needs here: ``bwrap`` and ``socat`` on Linux (Claude Code
    uses both), ``sandbox-exec`` on macOS; other platforms have none."""
    platform = platform or sys.platform
    if platform.startswith("linux"):
        tools, mechanism, hint = _LINUX_TOOLS, "bubblewrap", _LINUX_HINT
    elif platform == "darwin":
        tools, mechanism, hint = _MACOS_TOOLS, "Seatbelt", _MACOS_HINT
    else:
        return SandboxSupport(platform, "", (), 'set isolation = "none"')
    return SandboxSupport(platform, mechanism, tuple(t for t in tools if which(t) is None), hint)


def require_isolation(isolation: Isolation, support: SandboxSupport | None = None) -> None:
    """Refuse ``sandbox`` where it cannot run, with one line saying what to install."""
    if isolation != "sandbox":
        return
    support = support or sandbox_support()
    if support.available:
        return
    if not support.mechanism:
        raise ConfigError(
            f'isolation "sandbox" is not supported on {support.platform}; set isolation = "none" '
            "(CLAUDECLUSTER_ISOLATION=none) to run agents unconfined"
        )
    raise ConfigError(
        f'isolation "sandbox" needs {", ".join(support.missing)} on PATH: {support.hint}; '
        'or set isolation = "none" (CLAUDECLUSTER_ISOLATION=none) to run agents unconfined'
    )


def claude_sandbox_settings(policy: SandboxPolicy, writable: Sequence[Path]) -> dict[str, Any]:
    """Claude Code settings (for ``--settings``) that sandbox every Bash command.

    Bash runs without a permission prompt but only inside the sandbox: no command may ask to
    run unsandboxed, and a missing sandbox backend stops the CLI instead of running the
    shell unconfined."""
    paths = [str(p) for p in (*writable, *policy.write_paths)]
    return {
        "sandbox": {
            "enabled": True,
            "failIfUnavailable": True,
            "autoAllowBashIfSandboxed": True,
            "allowUnsandboxedCommands": False,
            "filesystem": {"allowWrite": list(dict.fromkeys(paths))},
            "network": {"allowedDomains": list(policy.allowed_domains)},
        }
    }


def confine_argv(
    argv: Sequence[str], policy: SandboxPolicy, writable: Sequence[Path], *, platform: str | None = None
) -> list[str]:
    """``argv`` wrapped so that it sees the file system read-only except ``writable`` and
    ``policy.write_paths`` (plus a private /dev and /proc on Linux), and has no network
    unless ``policy.allowed_domains`` lists any (then all of it: neither bwrap nor Seatbelt
    filters by domain). On Linux it sees only its own processes (a pid namespace), and it
    stays in the caller's process group, so killing the group kills all of it."""
    platform = platform or sys.platform
    # The policy's extra paths (caches) may not exist yet; bwrap cannot bind what is not there.
    paths = [p.resolve() for p in writable] + [p.resolve() for p in policy.write_paths if p.exists()]
    network = bool(policy.allowed_domains)
    if platform == "darwin":
        return ["sandbox-exec", "-p", _seatbelt_profile(paths, network), "--", *argv]
    binds = [arg for path in dict.fromkeys(paths) for arg in ("--bind", str(path), str(path))]
    return [
        "bwrap",
        "--ro-bind", "/", "/",
        "--dev", "/dev",
        "--proc", "/proc",
        *binds,
        *([] if network else ["--unshare-net"]),
        "--unshare-pid",
        "--unshare-ipc",
        "--die-with-parent",
        "--",
        *argv,
    ]  # fmt: skip


def _seatbelt_profile(paths: Sequence[Path], network: bool) -> str:
    """A Seatbelt profile: everything allowed but writes outside ``paths`` (and the network,
    unless ``network``). Not tried on a Mac yet."""
    quoted = " ".join(f'(subpath "{_seatbelt_quote(p)}")' for p in paths)
    rules = [
        "(version 1)",
        "(allow default)",
        "(deny file-write*)",
        f'(allow file-write* {quoted} (literal "/dev/null") (literal "/dev/tty") (regex #"^/dev/fd/"))',
    ]
    if not network:
        rules.append('(deny network* (remote ip "*:*") (remote unix-socket))')
    return "\n".join(rules)


def _seatbelt_quote(path: Path) -> str:
    return str(path).replace("\\", "\\\\").replace('"', '\\"')
