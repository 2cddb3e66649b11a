"""Plans' and tasks' fields on their way into the store: tasks as encoded rows, the columns
that hold agents' output redacted, and the brief of a change that observers are told."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .models import Task
from .redact import redact
from .schema import encode

__all__ = ["brief_plan", "brief_task", "encoded_tasks", "redacted_fields"]


def brief_task(fields: Mapping[str, Any]) -> dict[str, Any]:
    """What observers learn of a task move: its attempts, reason, commits, turns and cost, if set."""
    keep = ("attempts", "reason", "commit", "merge_commit", "turns", "cost_usd")
    return {k: encode(k, v) for k, v in fields.items() if k in keep and v not in (None, "")}


def brief_plan(fields: Mapping[str, Any]) -> dict[str, Any]:
    """What observers learn of a plan update: its state and reason, if set."""
    return {k: encode(k, v) for k, v in fields.items() if k in ("state", "reason") and v not in (None, "")}


def encoded_tasks(tasks: Sequence[Task]) -> tuple[list[str], list[list[Any]]]:
    """(columns, encoded values) of ``tasks`` in order, ``seq`` numbering them."""
    rows = [{**task.model_dump(), "seq": seq} for seq, task in enumerate(tasks)]
    columns = list(rows[0]) if rows else []
    return columns, [[encode(k, row[k]) for k in columns] for row in rows]


# Task columns holding what agents and tools said (as opposed to what the user asked).
_REDACTED_COLUMNS = ("reason", "last_activity")


def redacted_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    """``fields`` with secrets redacted from the columns that hold agents' output."""
    return {k: redact(v) if k in _REDACTED_COLUMNS and isinstance(v, str) else v for k, v in fields.items()}
