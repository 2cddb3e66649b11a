"""Turning a goal into tasks with a read-only Claude Code planning run.

The planner is a real ``claude`` agent in the repository, in ``plan`` permission mode (it
can read, it cannot change anything), asked for a JSON task DAG through ``--json-schema``
(the CLI's ``StructuredOutput`` tool). Its answer is validated like any plan; if invalid, the
agent gets one more try with the validation errors.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .agent import AgentRun
from .agent_spec import AgentSpec
from .claude_cli import ClaudeBinary
from .errors import PlanValidationError
from .events import AgentEvent
from .graph import parse_tasks, validate_tasks
from .models import TASK_ID_PATTERN, TaskSpec
from .prompts import clip

__all__ = ["PLANNER_MARKER", "PLAN_SCHEMA", "plan_with_claude"]

PLANNER_MARKER = "[claudecluster:plan]"

PLAN_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "tasks": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "properties": {
                    "id": {"type": "string", "pattern": f"^{TASK_ID_PATTERN}$"},
                    "title": {"type": "string"},
                    "prompt": {"type": "string"},
                    "deps": {"type": "array", "items": {"type": "string"}},
                    "priority": {"enum": ["low", "medium", "high", "critical"]},
                    "category": {"enum": ["code", "test", "refactor", "analyze", "document"]},
                    "files": {"type": "array", "items": {"type": "string"}},
                },
                "required": ["id", "title", "prompt"],
            },
        }
    },
    "required": ["tasks"],
}

_INSTRUCTIONS = """{marker} You are planning work for several Claude Code agents that will run in
parallel, each in its own git worktree of this repository, and whose changes are merged
afterwards. Read what you need of the repository, then split the goal below into tasks.

Goal: {goal}

Rules for the plan:
- Each task is a self-contained unit of work for one agent, with a prompt that says exactly
  what to do and where (files, functions), as if to a capable engineer new to the code.
- Use "deps" when a task needs another task's result; a task only starts once its
  dependencies are merged. Keep the graph as parallel as the work allows, without cycles.
- Tasks that would edit the same files should depend on each other, or be merged into one.
- List the files (globs) each task will touch in "files".
- Ids: short, unique, letters/digits/-/_/. only (e.g. "api", "tests-api").
Answer with the plan through the structured output tool."""


def _extract(outcome_text: str | None, structured: Any) -> Any:
    if structured is not None:
        return structured
    if not outcome_text:
        return None
    fenced = re.search(r"```(?:json)?\s*(\{.*?\})\s*```", outcome_text, re.DOTALL)
    candidate = fenced.group(1) if fenced else outcome_text[outcome_text.find("{") :]
    try:
        return json.loads(candidate)
    except json.JSONDecodeError:
        return None


def _validate(data: Any) -> list[TaskSpec]:
    if not isinstance(data, dict) or not isinstance(data.get("tasks"), list):
        raise PlanValidationError('the planner must answer {"tasks": [...]}')
    specs = parse_tasks(data["tasks"])
    validate_tasks(specs)
    return specs


async def plan_with_claude(
    repo: Path,
    goal: str,
    *,
    claude: ClaudeBinary,
    env: dict[str, str],
    config_dir: Path | None,
    model: str | None,
    log_dir: Path,
    timeout: float = 900,
    on_event: Callable[[AgentEvent], None] | None = None,
) -> list[TaskSpec]:
    """Ask a read-only Claude Code run in ``repo`` to split ``goal`` into a validated task DAG
    (``on_event`` sees the planning agent's events as they come)."""
    prompt = _INSTRUCTIONS.format(marker=PLANNER_MARKER, goal=goal)
    last_error = "the planner gave no plan"
    for attempt in (1, 2):
        spec = AgentSpec(
            prompt=prompt,
            cwd=repo,
            model=model,
            permission_mode="plan",
            disallowed_tools=["Write", "Edit", "NotebookEdit"],
            json_schema=PLAN_SCHEMA,
            env=env,
            config_dir=config_dir,
            wall_timeout=timeout,
            inactivity_timeout=min(timeout, 600),
            log_path=log_dir / f"planner-{attempt}.log",
        )
        outcome = await AgentRun(spec, claude=claude, on_event=on_event).run()
        if not outcome.ok:
            raise PlanValidationError(f"the planning agent {outcome.status.value}: {outcome.reason}")
        try:
            return _validate(_extract(outcome.final_text, outcome.structured_output))
        except PlanValidationError as exc:
            last_error = str(exc)
        prompt = (
            _INSTRUCTIONS.format(marker=PLANNER_MARKER, goal=goal)
            + f"\n\nYour previous plan was rejected: {clip(last_error, 16384)}\nFix these problems and answer again."
        )
    raise PlanValidationError(f"the planning agent's plan was invalid twice; last problem: {last_error}")
