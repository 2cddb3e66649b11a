"""What agents were denied, said as a warning with the setting that would allow it.

Claude Code reports a refused tool call in the ``result`` event's ``permission_denials``
(and live, as ``system/permission_denied``): "wanted Bash(npm test): add it to
allowed_tools". The sandbox refuses differently: a network request is listed in a
``<sandbox_violations>`` block of the tool's result, and a write outside the writable paths
fails with "Read-only file system"; those name ``sandbox_allowed_domains`` and
``sandbox_write_paths``. :class:`DenialWatch` turns an agent's events into these warnings;
:func:`warning_lines` says each once (and :func:`common_denial` once that every task of a
plan hit the same one).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from .events import AgentEvent, PermissionDenied, ToolResult, ToolUse
from .models import Task, TaskState

__all__ = ["DenialWatch", "allow_rule", "common_denial", "denial_warning", "warning_lines"]

_EDIT_TOOLS = frozenset({"Write", "Edit", "MultiEdit", "NotebookEdit"})
_RULE_ARGUMENT_LIMIT = 160
_VIOLATIONS = re.compile(r"<sandbox_violations>(.*?)</sandbox_violations>", re.DOTALL)
_NETWORK = re.compile(r"deny network-outbound (\S+?)(?::\d+)?(?:\s|$)")
_READ_ONLY = re.compile(r"(?:['\"]?([^'\"\s:]+)['\"]?: )?Read-only file system(?:: ['\"]([^'\"]+)['\"])?")
_FAILED = frozenset({TaskState.FAILED, TaskState.TIMED_OUT, TaskState.GATE_FAILED, TaskState.BLOCKED})


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _RULE_ARGUMENT_LIMIT else text[: _RULE_ARGUMENT_LIMIT - 1] + "…"


def allow_rule(tool_name: str, tool_input: Mapping[str, Any]) -> str:
    """The ``allowed_tools`` rule that would have allowed this call: ``Bash(<command>)``,
    ``Edit(<path>)`` for the file-editing tools (``//`` starts an absolute path),
    ``WebFetch(domain:<host>)``, else the tool's name."""
    if tool_name == "Bash" and isinstance(tool_input.get("command"), str):
        return f"Bash({_short(tool_input['command'])})"
    path = tool_input.get("file_path") or tool_input.get("notebook_path")
    if tool_name in _EDIT_TOOLS | {"Read"} and isinstance(path, str):
        rule_path = "/" + path if path.startswith("/") else path
        return f"{'Read' if tool_name == 'Read' else 'Edit'}({_short(rule_path)})"
    if tool_name == "WebFetch" and isinstance(tool_input.get("url"), str):
        host = urlsplit(tool_input["url"]).hostname
        return f"WebFetch(domain:{host})" if host else tool_name
    return tool_name


def denial_warning(tool_name: str, tool_input: Mapping[str, Any]) -> str:
    """The warning for a tool call Claude Code's permissions refused."""
    return f"wanted {allow_rule(tool_name, tool_input)}: add it to allowed_tools"


def _sandbox_warnings(result: ToolResult, command: str, sandboxed: bool) -> list[str]:
    content = result.content
    found = []
    for block in _VIOLATIONS.findall(content):
        for line in block.splitlines():
            network = _NETWORK.search(line)
            if network:
                found.append(f"the sandbox blocked network access to {network[1]}: add it to sandbox_allowed_domains")
            elif line.strip():
                found.append(f"the sandbox refused {_short(line.strip())} ({_short(command)})")
    # Only a failed command under the sandbox: output that merely mentions the error is no refusal.
    read_only = _READ_ONLY.search(content) if sandboxed and result.is_error else None
    if read_only:
        path = read_only[1] or read_only[2]
        where = f"a write to {path}" if path else "a write"
        found.append(f"the sandbox refused {where} ({_short(command)}): add the path to sandbox_write_paths")
    return found


class DenialWatch:
    """Reads one agent's events and yields each new warning once."""

    def __init__(self, *, sandboxed: bool) -> None:
        self.sandboxed = sandboxed
        self.warnings: list[str] = []
        self._calls: dict[str, ToolUse] = {}

    def _new(self, candidates: Sequence[str]) -> list[str]:
        fresh = [w for w in dict.fromkeys(candidates) if w not in self.warnings]
        self.warnings += fresh
        return fresh

    def feed(self, event: AgentEvent) -> list[str]:
        """The warnings this event adds (usually none)."""
        if isinstance(event, ToolUse):
            self._calls[event.id] = event
        elif isinstance(event, PermissionDenied):
            call = self._calls.get(event.tool_use_id or "")
            return self._new([denial_warning(event.tool_name, call.input if call else {})])
        elif isinstance(event, ToolResult):
            call = self._calls.get(event.tool_use_id)
            if call is not None and call.name == "Bash":
                return self._new(_sandbox_warnings(event, str(call.input.get("command", "")), self.sandboxed))
        return []

    def result(self, denials: Sequence[Mapping[str, Any]]) -> list[str]:
        """The warnings of a run's final ``permission_denials`` not seen live."""
        return self._new([denial_warning(str(d.get("tool_name") or "?"), d.get("tool_input") or {}) for d in denials])


def _shared(tasks: Sequence[Task]) -> tuple[str, int, bool] | None:
    """(warning, tasks that ran, all failed) when every task that ran (two or more) got it."""
    ran = [t for t in tasks if t.attempts > 0]
    if len(ran) < 2:
        return None
    shared = [w for w in ran[0].warnings if all(w in t.warnings for t in ran[1:])]
    return (shared[0], len(ran), all(t.state in _FAILED for t in ran)) if shared else None


def common_denial(tasks: Sequence[Task]) -> str | None:
    """One line when every task that ran (two or more) got the same warning, e.g. "all 3
    tasks failed after the same denial: wanted Bash(npm test): add it to allowed_tools";
    None otherwise."""
    shared = _shared(tasks)
    if shared is None:
        return None
    warning, count, failed = shared
    return f"all {count} tasks {'failed after' if failed else 'hit'} the same denial: {warning}"


def warning_lines(tasks: Sequence[Task]) -> list[str]:
    """Every distinct warning of the tasks, once: the :func:`common_denial` line for the one
    they all got, each other one with the ids of the tasks it hit."""
    shared = _shared(tasks)
    groups: dict[str, list[str]] = {}
    for task in tasks:
        for warning in task.warnings:
            groups.setdefault(warning, []).append(task.id)
    lines = [common_denial(tasks) or ""] if shared else []
    return lines + [f"{w} ({', '.join(ids)})" for w, ids in groups.items() if not (shared and w == shared[0])]
