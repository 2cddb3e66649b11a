"""An agent's events into its task's record, as they come: each event stored (secrets
redacted before any cut, long texts cut), what the agent was denied as warnings, its live
state (waiting while Claude Code waits to retry the model API, running again once it
answers), its last activity and turns, and the rate-limit side of each event."""

from __future__ import annotations

import contextlib
from typing import Any

from .denials import DenialWatch
from .errors import StateError
from .events import AgentEvent, ApiRetry, AssistantText, StderrLine, ToolResult, activity
from .models import Plan, Task, TaskState
from .placement import AgentHandle
from .rate_limits import RateLimits
from .redact import Redactor
from .store import Store

__all__ = ["EventLog", "state_after"]

_CUT = 2000  #: characters of an event's text or content that are stored


class EventLog:
    """Writes agents' events into the store (see the module docstring)."""

    def __init__(self, store: Store, secrets: Redactor, limits: RateLimits) -> None:
        self.store = store
        self.secrets = secrets
        self.limits = limits

    async def record(self, plan: Plan, task: Task, handle: AgentHandle, receive: Any, denials: DenialWatch) -> None:
        """Store the events of ``handle``'s run read from ``receive`` until it closes."""
        async with receive:
            async for event in receive:
                if isinstance(event, StderrLine):
                    continue
                data = self.secrets.data(event.model_dump(mode="json", exclude={"raw"}))
                for key in ("text", "content"):
                    if isinstance(data.get(key), str) and len(data[key]) > _CUT:
                        data[key] = data[key][:_CUT] + "…"
                await self.store.append_event(plan.id, task.id, event.kind, data)
                await self.warn(plan, task, denials.feed(event))
                self.limits.watch(task.ref, event)
                target = state_after(event, task.state)
                if target is not None:
                    with contextlib.suppress(StateError):
                        await self.store.move(plan.id, task.id, target)
                        task.state = target
                await self.store.update_task(plan.id, task.id, last_activity=activity(event), turns=handle.turns)

    async def warn(self, plan: Plan, task: Task, warnings: list[str]) -> None:
        """Record what the agent was denied: on the task (once each) and in its log."""
        fresh = [w for w in dict.fromkeys(self.secrets.text(w) for w in warnings) if w not in task.warnings]
        if not fresh:
            return
        task.warnings = [*task.warnings, *fresh]
        await self.store.update_task(plan.id, task.id, warnings=task.warnings)
        for warning in fresh:
            await self.store.append_event(plan.id, task.id, "warning", {"text": warning})


def state_after(event: AgentEvent, state: TaskState) -> TaskState | None:
    """Waiting while the CLI waits to retry the model API; running again once it answers."""
    if isinstance(event, ApiRetry) and state is TaskState.RUNNING:
        return TaskState.WAITING
    if isinstance(event, (AssistantText, ToolResult)) and state is TaskState.WAITING:
        return TaskState.RUNNING
    return None
