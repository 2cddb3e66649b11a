"""What the engine's own git commands may run: nothing but git.

Agents work in worktrees of the user's repository and share its ``.git``: with a Bash tool
(or a file tool and a committed ``.gitattributes``) an agent can plant a hook, a
``core.fsmonitor`` command or a filter/merge/diff driver that any later git command in
that repository would execute, with the engine's rights and outside the agent's run. So
every engine git command (:func:`~claudecluster_mcp.gitrun.git`) runs with

* a **scrubbed environment** (:func:`git_environment`): every inherited ``GIT_*`` variable
  is dropped (``GIT_DIR``, ``GIT_WORK_TREE``, ``GIT_INDEX_FILE``, ``GIT_EXEC_PATH``,
  ``GIT_SSH_COMMAND``, ``GIT_EXTERNAL_DIFF``, ``GIT_CONFIG_*``, ``GIT_TRACE*``, …) except the
  committer/author name and e-mail; only what this module sets is added;
* **fixed settings** (:data:`HARDENED_SETTINGS`), passed as ``GIT_CONFIG_KEY_<n>``/
  ``GIT_CONFIG_VALUE_<n>`` (command scope, which wins over every config file and reaches
  the git processes git itself starts): hooks from ``/dev/null`` (a "directory" nothing can
  be planted in), ``core.fsmonitor`` off, no pager, editor or external diff, no signing or
  signature checks, no automatic gc/maintenance (which would detach a background git),
  submodules not recursed, and ``protocol.allow=never`` so that no transport (ssh, http,
  ``ext::``, credential helpers, ``core.sshCommand``/``core.gitProxy``) can be reached;
* **repository-defined drivers switched off** (:func:`driver_overrides`): which
  ``filter``/``merge``/``diff`` drivers exist is only known from the configuration, so
  before a command that reads file contents (checkout, add, status, diff, merge…) the
  repository's own configuration (scope local/worktree, includes resolved) is listed and
  every command-running driver key found there is overridden: ``filter.<x>.clean``,
  ``smudge`` and ``process`` emptied and ``required`` false (the file passes unfiltered),
  ``merge.<x>.driver`` set to ``false`` (the path is reported as a conflict, which a
  resolve task can fix), ``diff.<x>.command``/``textconv`` emptied (refused, never run).

Not covered: drivers the *user* defined in their global or system config stay active (that
is how git-lfs works; those files are the user's, not the repository's); a driver key
added to the repository's config between the listing and the command (a race of a few
milliseconds) would run; ``core.worktree`` and the like that redirect rather than execute
are not overridden; and settings that change git's output format (``status.*``,
``diff.relative``) are the callers' concern. Git older than 2.31 ignores
``GIT_CONFIG_COUNT``; the pinned environment has 2.39.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

__all__ = [
    "DRIVER_SCAN_ARGS",
    "HARDENED_SETTINGS",
    "KEPT_GIT_VARIABLES",
    "driver_overrides",
    "git_environment",
    "needs_driver_scan",
]

#: Settings every engine git command runs with (name, value), whatever the config files say.
HARDENED_SETTINGS: tuple[tuple[str, str], ...] = (
    ("core.hooksPath", "/dev/null"),
    ("core.fsmonitor", "false"),
    ("core.pager", "cat"),
    ("core.editor", ":"),
    ("sequence.editor", ":"),
    ("diff.external", ""),
    ("protocol.allow", "never"),
    ("core.sshCommand", "false"),
    ("commit.gpgSign", "false"),
    ("tag.gpgSign", "false"),
    ("merge.verifySignatures", "false"),
    ("log.showSignature", "false"),
    ("gc.auto", "0"),
    ("maintenance.auto", "false"),
    ("submodule.recurse", "false"),
)

#: Inherited ``GIT_*`` variables that survive the scrub: who the commits are by.
KEPT_GIT_VARIABLES = frozenset({"GIT_AUTHOR_NAME", "GIT_AUTHOR_EMAIL", "GIT_COMMITTER_NAME", "GIT_COMMITTER_EMAIL"})

# Ours in every mode: no prompts, no pagers or editors, no locale surprises in parsed
# output, no optional index refreshes (which a read-only status would otherwise write).
_BASE = {
    "GIT_TERMINAL_PROMPT": "0",
    "GIT_PAGER": "cat",
    "GIT_EDITOR": ":",
    "LC_ALL": "C",
    "GIT_OPTIONAL_LOCKS": "0",
}

#: ``git config`` arguments listing the repository's own driver keys (scope, NUL, key, NUL…).
DRIVER_SCAN_ARGS = (
    "config",
    "--show-scope",
    "--name-only",
    "-z",
    "--get-regexp",
    r"^(filter|merge|diff)\..*\.(clean|smudge|process|required|driver|command|textconv)$",
)

# Subcommands that never read file contents through attributes, so no driver can run.
_CONTENT_FREE = frozenset(
    {
        "rev-parse",
        "update-ref",
        "symbolic-ref",
        "merge-base",
        "check-ref-format",
        "commit-tree",
        "config",
        "show-ref",
        "for-each-ref",
        "cat-file",
    }
)
_USER_SCOPES = frozenset({"global", "system"})


def git_environment(
    *, hardened: bool = True, overrides: Sequence[tuple[str, str]] = (), base: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The environment of a git command: ``base`` (default: ours) without ``GIT_*`` variables
    (identity kept), plus our settings; with ``hardened``, :data:`HARDENED_SETTINGS` and
    ``overrides`` as command-scope configuration."""
    inherited = os.environ if base is None else base
    env = {k: v for k, v in inherited.items() if not k.startswith("GIT_") or k in KEPT_GIT_VARIABLES}
    env.update(_BASE)
    if hardened:
        settings = [*HARDENED_SETTINGS, *overrides]
        env["GIT_CONFIG_COUNT"] = str(len(settings))
        for index, (name, value) in enumerate(settings):
            env[f"GIT_CONFIG_KEY_{index}"] = name
            env[f"GIT_CONFIG_VALUE_{index}"] = value
    return env


def needs_driver_scan(args: Sequence[str]) -> bool:
    """True unless the git subcommand in ``args`` (after ``-c name=value`` pairs) is plumbing
    that never filters, merges or diffs file contents."""
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg == "-c":
            skip = True
        elif not arg.startswith("-"):
            return arg not in _CONTENT_FREE
    return True


def driver_overrides(listing: str) -> list[tuple[str, str]]:
    """Settings that switch off every driver key in ``listing`` (the output of
    ``git`` :data:`DRIVER_SCAN_ARGS`) that the repository, not the user, defined."""
    fields = listing.split("\0")
    overrides: dict[str, str] = {}
    for scope, key in zip(fields[0::2], fields[1::2], strict=False):
        if not key or scope in _USER_SCOPES:
            continue
        section, _, rest = key.partition(".")
        driver, _, variable = rest.rpartition(".")
        if section == "filter":
            # Each filter key is overridden as a set: an emptied command with a planted
            # `required = true` would make every checkout fail instead of passing the file.
            for name, value in (("clean", ""), ("smudge", ""), ("process", ""), ("required", "false")):
                overrides[f"filter.{driver}.{name}"] = value
        elif section == "merge" and variable == "driver":
            overrides[key] = "false"
        elif section == "diff" and variable in ("command", "textconv"):
            overrides[key] = ""
    return sorted(overrides.items())
