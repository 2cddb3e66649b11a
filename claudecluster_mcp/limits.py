"""Limits on what callers give (each refused with an error naming it), and the rules a task id
must follow to be part of a git branch name."""

from __future__ import annotations

import re

__all__ = [
    "MAX_ARG_STRLEN",
    "MAX_FILES_PER_TASK",
    "MAX_FILE_GLOBS_PER_PLAN",
    "MAX_GLOB_LENGTH",
    "MAX_GOAL_BYTES",
    "MAX_PROMPT_BYTES",
    "MAX_STORED_TASK_ID_LENGTH",
    "MAX_TASKS_PER_PLAN",
    "MAX_TASK_ID_LENGTH",
    "MAX_TITLE_LENGTH",
    "TASK_ID_PATTERN",
    "ref_format_problem",
    "task_id_problem",
    "utf8_size",
]

#: Tasks in one plan.
MAX_TASKS_PER_PLAN = 5000
#: A task id a caller gives. Derived ids (``<id>.resolve``, ``<id>.resolve2`` …, up to 8
#: digits) stay within :data:`MAX_STORED_TASK_ID_LENGTH`.
MAX_TASK_ID_LENGTH = 48
MAX_STORED_TASK_ID_LENGTH = 64
#: Linux's MAX_ARG_STRLEN: the most one argv string may hold (its NUL included). The
#: prompt goes on the agent's command line as one argument.
MAX_ARG_STRLEN = 128 * 1024
#: A task's prompt and a plan's goal, in UTF-8 bytes. The engine puts the goal, a note and,
#: on a gate retry, up to ~6 KiB of gate output around the prompt: all of it stays below
#: MAX_ARG_STRLEN with room to spare (``prompt + goal + 16 KiB < MAX_ARG_STRLEN``).
MAX_PROMPT_BYTES = 96 * 1024
MAX_GOAL_BYTES = 8 * 1024
MAX_TITLE_LENGTH = 500
#: File globs per task, characters per glob, and globs in a whole plan.
MAX_FILES_PER_TASK = 100
MAX_GLOB_LENGTH = 1024
MAX_FILE_GLOBS_PER_PLAN = 50_000

TASK_ID_PATTERN = rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{MAX_TASK_ID_LENGTH - 1}}}"
_ID_CHARS = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# Branches a task id becomes part of: its own, its resolve task's, next to this one.
_RESERVED_IDS = frozenset({"integration"})
_REF_FORBIDDEN = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]")


def ref_format_problem(refname: str) -> str | None:
    """Why git would refuse ``refname`` as a ref name (``git check-ref-format`` rules, with
    at least two components), or None if it is valid."""
    if refname == "@":
        return "is '@'"
    if refname.endswith("/") or refname.startswith("/"):
        return "begins or ends with '/'"
    if refname.endswith("."):
        return "ends with '.'"
    if "@{" in refname:
        return "contains '@{'"
    if ".." in refname:
        return "contains '..'"
    if _REF_FORBIDDEN.search(refname):
        return "contains a space, a control character or one of ~^:?*[\\"
    components = refname.split("/")
    if len(components) < 2:
        return "has a single component"
    for component in components:
        if not component:
            return "contains '//'"
        if component.startswith("."):
            return f"has a component {component!r} starting with '.'"
        if component.endswith(".lock"):
            return f"has a component {component!r} ending with '.lock'"
    return None


def task_id_problem(value: str, *, max_length: int = MAX_TASK_ID_LENGTH) -> str | None:
    """Why ``value`` cannot be a task id, or None. A task id must be usable, unquoted, as a
    git branch name component: ``claudecluster/<plan>/<id>`` and its resolve task's
    ``claudecluster/<plan>/<id>.resolve`` must both pass ``git check-ref-format``."""
    if not _ID_CHARS.fullmatch(value) or len(value) > max_length:
        return (
            f"task id {value!r} must start with a letter or digit and use only letters, "
            f"digits, '.', '_' and '-' (max {max_length} characters)"
        )
    if value.lower() in _RESERVED_IDS:
        return f"task id {value!r} is reserved (the plan's integration branch)"
    for branch in (f"claudecluster/p0/{value}", f"claudecluster/p0/{value}.resolve"):
        problem = ref_format_problem(branch)
        if problem is not None:
            return f"task id {value!r} cannot be part of a git branch name ({branch} {problem})"
    return None


def utf8_size(text: str) -> int:
    """The size of ``text`` in UTF-8 bytes (lone surrogates included)."""
    return len(text.encode("utf-8", "surrogatepass"))
