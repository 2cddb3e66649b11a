"""Scenarios for the scripted model server: which conversation gets which scripted turns.

A scenario is a list of rules. A rule matches a conversation by a substring (``match``) or a
regular expression (``regex``) searched in the conversation's first user message, and then
plays its ``turns`` in order: turn *k* answers the request that already holds *k* assistant
messages. A turn is text and/or tool calls, optional latency, and an optional fault.
Strings in a turn may use ``{cwd}`` (the agent's working directory as the CLI reports it)
and the named groups of the rule's ``regex``. See ``docs/scenarios.md``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import ScenarioError

__all__ = [
    "Fault",
    "Rule",
    "Scenario",
    "Storm",
    "ToolCall",
    "Turn",
    "bash_turn",
    "load_scenario",
    "marker_rule",
    "marker_task",
    "write_turn",
]

FaultType = Literal["rate_limit", "overloaded", "server_error", "unauthorized", "stall", "hang", "cut"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Fault(_Strict):
    """A failure injected instead of (or in the middle of) a turn.

    ``rate_limit`` = HTTP 429 with ``retry-after`` (none when ``retry_after`` is ``None``);
    ``overloaded`` = 529; ``server_error`` = 500; ``unauthorized`` = 401; ``hang`` = accept
    the request and send nothing for ``seconds``; ``stall`` = send ``message_start`` then
    nothing for ``seconds``, then finish the turn; ``cut`` = close the connection in the
    middle of the message (streamed or not).
    ``times`` = how many attempts at this turn get the fault (``None`` = all), counted per
    conversation (``per="conversation"``: a restarted agent is a new conversation and meets
    the fault again) or per rule (``per="rule"``: all conversations of the rule together, so
    a restarted agent gets past it).
    """

    type: FaultType
    retry_after: float | None = Field(default=1.0, ge=0)
    seconds: float = 3600.0
    times: int | None = Field(default=1, ge=1)
    per: Literal["conversation", "rule"] = "conversation"
    message: str | None = None


class ToolCall(_Strict):
    """A ``tool_use`` block: any tool the CLI offers (Write, Edit, Bash, Read, ``mcp__…``)."""

    name: str = Field(min_length=1)
    input: dict[str, Any] = Field(default_factory=dict)


class Turn(_Strict):
    """One scripted model response."""

    text: str | None = None
    tools: list[ToolCall] = Field(default_factory=list)
    latency: float | None = Field(default=None, ge=0, description="seconds; default: the scenario's")
    fault: Fault | None = None
    input_tokens: int | None = Field(default=None, ge=0)
    output_tokens: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _has_content(self) -> Turn:
        if self.text is None and not self.tools and self.fault is None:
            raise ValueError("a turn needs text, tools or a fault")
        return self


class Rule(_Strict):
    """Matches conversations and scripts their turns."""

    name: str = Field(min_length=1)
    match: str | None = None
    regex: str | None = None
    turns: list[Turn] = Field(min_length=1)
    captures: dict[str, str] = Field(
        default_factory=dict,
        description="variable → regex searched in the conversation's tool results so far (first group)",
    )

    @model_validator(mode="after")
    def _one_matcher(self) -> Rule:
        if (self.match is None) == (self.regex is None):
            raise ValueError(f"rule {self.name!r} needs exactly one of 'match' or 'regex'")
        for label, pattern in [("regex", self.regex), *((f"captures.{k}", v) for k, v in self.captures.items())]:
            if pattern is None:
                continue
            try:
                compiled = re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"rule {self.name!r}: bad {label}: {exc}") from exc
            if label.startswith("captures.") and compiled.groups < 1:
                raise ValueError(f"rule {self.name!r}: {label} needs a capturing group")
        return self

    def captured(self, tool_results: list[str]) -> dict[str, str]:
        """Values of ``captures`` found in earlier tool results (the latest match wins)."""
        found: dict[str, str] = {}
        for name, pattern in self.captures.items():
            for text in tool_results:
                for match in re.finditer(pattern, text):
                    found[name] = match.group(1)
        return found

    def variables(self, first_user_text: str) -> dict[str, str] | None:
        """Template variables if this rule matches the conversation, else ``None``."""
        if self.match is not None:
            return {} if self.match in first_user_text else None
        assert self.regex is not None
        found = re.search(self.regex, first_user_text)
        if found is None:
            return None
        return {k: v for k, v in found.groupdict().items() if v is not None}


class Storm(_Strict):
    """A fault for model requests of any rule: the first ``requests`` the server receives,
    or every one in a time window, ``seconds`` long, that opens ``after`` seconds after the
    server's first model request."""

    requests: int | None = Field(default=None, ge=1)
    after: float = Field(default=0.0, ge=0)
    seconds: float | None = Field(default=None, gt=0)
    fault: Fault

    @model_validator(mode="after")
    def _one_extent(self) -> Storm:
        if (self.requests is None) == (self.seconds is None):
            raise ValueError("a storm needs exactly one of 'requests' or 'seconds'")
        if self.after and self.seconds is None:
            raise ValueError("a storm's 'after' goes with 'seconds'")
        return self

    def hits(self, number: int, since_first: float) -> bool:
        """Does the storm fault the ``number``-th model request (from 1), which came
        ``since_first`` seconds after the first one?"""
        if self.requests is not None:
            return number <= self.requests
        assert self.seconds is not None
        return self.after <= since_first < self.after + self.seconds


class Scenario(_Strict):
    """A named set of rules, tried in order; the first match wins."""

    name: str = "scenario"
    rules: list[Rule] = Field(min_length=1)
    storm: Storm | None = None
    default_latency: float = Field(default=0.0, ge=0)

    @model_validator(mode="after")
    def _unique_names(self) -> Scenario:
        names = [rule.name for rule in self.rules]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"duplicate rule names: {', '.join(duplicates)}")
        return self

    def find_rule(self, first_user_text: str) -> tuple[Rule, dict[str, str]] | None:
        """The first rule matching the conversation, with its template variables."""
        for rule in self.rules:
            variables = rule.variables(first_user_text)
            if variables is not None:
                return rule, variables
        return None


def load_scenario(source: Path | str | dict[str, Any]) -> Scenario:
    """Load and validate a scenario from a YAML/JSON file path or an already parsed dict."""
    if isinstance(source, dict):
        data: Any = source
        origin = "scenario"
    else:
        path = Path(source)
        origin = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ScenarioError(f"cannot read scenario {origin}: {exc.strerror or exc}") from exc
        try:
            data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as exc:
            raise ScenarioError(f"scenario {origin} is not valid YAML/JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ScenarioError(f"scenario {origin} must be a mapping with a 'rules' list")
    try:
        return Scenario.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors()
        )
        raise ScenarioError(f"scenario {origin} is invalid: {problems}") from exc


# -- builders: the common turns and rules, as the plain dicts a scenario file holds ----------


def write_turn(name: str, content: str, **turn: Any) -> dict[str, Any]:
    """A turn calling Write for ``name`` (relative to the agent's working directory)."""
    return {"tools": [{"name": "Write", "input": {"file_path": "{cwd}/" + name, "content": content}}], **turn}


def bash_turn(command: str, **turn: Any) -> dict[str, Any]:
    """A turn calling Bash with ``command``."""
    return {"tools": [{"name": "Bash", "input": {"command": command}}], **turn}


def marker_rule(marker: str, *turns: dict[str, Any]) -> dict[str, Any]:
    """A rule for conversations whose prompt holds ``[marker]``: ``turns``, then a final
    text turn "<marker> done"."""
    return {"name": marker, "match": f"[{marker}]", "turns": [*turns, {"text": f"{marker} done"}]}


def marker_task(task_id: str, *deps: str, **fields: Any) -> dict[str, Any]:
    """A task in the ``plan`` tool's shape whose prompt holds ``[task_id]`` (for a
    :func:`marker_rule` of that marker), depending on ``deps``."""
    return {
        "id": task_id,
        "title": f"task {task_id}",
        "prompt": f"[{task_id}] do {task_id}",
        "deps": list(deps),
        **fields,
    }
