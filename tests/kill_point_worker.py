"""Runs the engine in its own process and SIGKILLs it at one named point of its merge path,
where a kill -9 at a random moment can land but rarely does. Usage:
python kill_point_worker.py POINT SETTINGS_JSON TASKS_JSON REPO PLAN_ID_FILE"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import anyio

from claudecluster_mcp import merge
from claudecluster_mcp.engine import Cluster, EngineSettings
from claudecluster_mcp.models import TaskState
from claudecluster_mcp.store import Store

_move, _end_merge, _remove_worktree = Store.move, Store.end_merge, merge.remove_worktree
_AFTER = {"resolve-running"}  # points reached once the move is stored (the others: just before)


def _at(point: str, to: TaskState | None, fields: dict[str, Any], task_id: str = "") -> bool:
    reason = str(fields.get("reason", ""))
    return {
        # the resolve task is recorded running; its agent has not started (no session yet),
        # while its worktree already holds the unfinished merge (which looks like progress)
        "resolve-running": to is TaskState.RUNNING and task_id.endswith(".resolve"),
        # the conflict's resolve task is stored; the conflicted task is still "succeeded"
        "resolve-added": to is TaskState.CONFLICTED and "resolving in" in reason,
        # the resolve task is merged; the task it resolves is still "conflicted"
        "resolve-merged": to is TaskState.MERGED and reason.startswith("resolved by"),
        # the integration ref moved; its journal entry still says "started"
        "ref-moved": to is None,
        # the journal entry is closed; the task is still "succeeded"
        "journal-done": to is TaskState.MERGED and fields.get("last_activity") == "merged",
    }.get(point, False)


def arm(point: str) -> None:
    """Make this process kill itself with SIGKILL when it reaches ``point``."""

    async def move(self: Store, plan_id: str, task_id: str, to: TaskState, **fields: Any) -> Any:
        if _at(point, to, fields, task_id) and point not in _AFTER:
            os.kill(os.getpid(), signal.SIGKILL)
        moved = await _move(self, plan_id, task_id, to, **fields)
        if _at(point, to, fields, task_id) and point in _AFTER:
            os.kill(os.getpid(), signal.SIGKILL)
        return moved

    async def end_merge(self: Store, seq: int, state: str) -> None:
        if state == "done" and _at(point, None, {}):
            os.kill(os.getpid(), signal.SIGKILL)
        await _end_merge(self, seq, state)

    async def remove_worktree(repo: Path, path: Path) -> None:
        await _remove_worktree(repo, path)
        if point == "gate-tree-removed":  # the gate's worktree is gone, its directory not yet
            os.kill(os.getpid(), signal.SIGKILL)

    Store.move = move  # type: ignore[method-assign]
    Store.end_merge = end_merge  # type: ignore[method-assign]
    merge.remove_worktree = remove_worktree  # type: ignore[assignment]


async def main(point: str, settings_json: str, tasks_json: str, repo: str, plan_file: str) -> None:
    arm(point)
    settings = EngineSettings.model_validate_json(settings_json)
    async with Cluster.open(Path(repo), settings=settings) as cluster:
        status = await cluster.plan("kill at a point", json.loads(tasks_json))
        Path(plan_file).write_text(status.plan.id)
        await cluster.dispatch(status.plan.id)
        await cluster.wait(status.plan.id)


if __name__ == "__main__":
    anyio.run(main, *sys.argv[1:6])
