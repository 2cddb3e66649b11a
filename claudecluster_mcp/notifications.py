"""What MCP sessions are told when the cluster changes, without asking.

Every committed change of an open repository (:class:`~claudecluster_mcp.signals.Change`,
from the hub's feed) is offered to every session's :class:`Outbox`:

- a **log message** (``notifications/message``, logger ``claudecluster.<plan id>``) for plan
  and task state changes, failures and merges, and at ``debug`` the agents' tool calls, sent
  when at or above the level the session chose with ``logging/setLevel`` (default
  ``warning``: failures and tasks waiting for approval only);
- ``notifications/resources/updated`` for a subscribed plan or task log, **coalesced**: a
  burst of agent events makes one notification per resource at most every
  :data:`COALESCE_SECONDS`, not one per event;
- ``notifications/resources/list_changed`` when a plan is added.

Sessions of the 2026-07-28 protocol have no ``resources/subscribe``: their
``subscriptions/listen`` streams get the same coalesced updates through the SDK's
subscription bus (:meth:`Broadcaster.serving` with ``bus``), which filters them per stream.

Each outbox sends from its own task, so a slow or gone client delays only itself; what it
cannot take in time is dropped (logs beyond :data:`MAX_QUEUED_LOGS` are counted and said).
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Final, Literal, get_args

import anyio
from anyio.abc import TaskGroup
from mcp.server.subscriptions import ResourcesListChanged, ResourceUpdated, SubscriptionBus

from .hub import HubRef
from .signals import Change

__all__ = [
    "COALESCE_SECONDS",
    "DEFAULT_LEVEL",
    "LEVELS",
    "Broadcaster",
    "LogEntry",
    "LogLevel",
    "Outbox",
    "log_entry",
    "plan_uri",
    "task_log_uri",
    "touched_uris",
]

logger = logging.getLogger(__name__)

LogLevel = Literal["debug", "info", "notice", "warning", "error", "critical", "alert", "emergency"]
#: Severity-ascending (RFC 5424), as in the MCP schema.
LEVELS: Final[tuple[LogLevel, ...]] = get_args(LogLevel)
DEFAULT_LEVEL: Final[LogLevel] = "warning"
COALESCE_SECONDS: Final = 0.5
MAX_QUEUED_LOGS: Final = 500
SEND_TIMEOUT: Final = 10.0

#: Sends one notification (method, params) to a client; must not raise for a gone client.
Send = Callable[[str, dict[str, Any]], Awaitable[None]]


def plan_uri(plan_id: str) -> str:
    """The resource of a plan's status."""
    return f"claudecluster://plans/{plan_id}"


def task_log_uri(plan_id: str, task_id: str) -> str:
    """The resource of a task's agent log."""
    return f"claudecluster://tasks/{plan_id}:{task_id}/log"


def touched_uris(change: Change) -> tuple[str, ...]:
    """The resources whose content ``change`` changes."""
    if change.task_id is None:
        return (plan_uri(change.plan_id),)
    return plan_uri(change.plan_id), task_log_uri(change.plan_id, change.task_id)


# -- what a change says in the log ------------------------------------------------------------


@dataclass(frozen=True)
class LogEntry:
    """One ``notifications/message``: its level, logger and data (a readable ``message`` plus
    the ids and state, for programs)."""

    level: LogLevel
    logger: str
    data: dict[str, Any]

    def params(self) -> dict[str, Any]:
        """The notification's params."""
        return {"level": self.level, "logger": self.logger, "data": self.data}


_TASK_LEVELS: Mapping[str, LogLevel] = {
    "merged": "notice",
    "held": "warning",
    "conflicted": "warning",
    "blocked": "warning",
    "cancelled": "notice",
    "failed": "error",
    "timed_out": "error",
    "gate_failed": "error",
}
_PLAN_LEVELS: Mapping[str, LogLevel] = {"done": "notice", "merged": "notice", "cancelled": "notice", "failed": "error"}


def log_entry(change: Change) -> LogEntry | None:
    """What ``change`` says in the log, and at which level (None: nothing to say). Agent
    events other than tool calls (text, results) are left to the task log resource."""
    ref = change.plan_id if change.task_id is None else f"{change.plan_id}:{change.task_id}"
    data: dict[str, Any] = {"plan_id": change.plan_id}
    if change.task_id is not None:
        data["task_id"] = ref
    state = str(change.data.get("state", ""))
    reason = str(change.data.get("reason", ""))
    because = f": {reason}" if reason else ""
    if change.kind == "plan":
        level: LogLevel = "info"
        message = f"plan {ref} created with {change.data.get('tasks', 0)} tasks: {change.data.get('goal', '')}"
    elif change.kind == "plan_state" and state:
        level = _PLAN_LEVELS.get(state, "info")
        message = f"plan {ref} is {state}{because}"
    elif change.kind == "task_added":
        level, message = "info", f"task {ref} added (it resolves a merge conflict)"
    elif change.kind == "state" and state:
        level = _TASK_LEVELS.get(state, "info")
        attempt = f" (attempt {change.data['attempts']})" if state == "running" and "attempts" in change.data else ""
        message = f"task {ref} is {state}{attempt}{because}"
    elif change.kind == "gate":  # a merge batch (or one candidate, or a final merge) gated
        passed = bool(change.data.get("ok"))
        on = ", ".join(change.data.get("tasks") or []) or "the final merge"
        level = "info" if passed else "warning"
        message = f"plan {ref}: the gate {'passed' if passed else 'failed'} on {on} ({change.data.get('seconds')}s)"
    elif change.kind == "tool_use":
        level = "debug"
        message = f"task {ref} calls {change.data.get('name')}: {_short(change.data.get('input'))}"
        data["tool"] = change.data.get("name")
    else:
        return None
    if state:
        data["state"] = state
    data["message"] = message[:2000]
    return LogEntry(level, f"claudecluster.{change.plan_id}", data)


def _short(value: Any) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= 300 else text[:300] + "…"


# -- one session ----------------------------------------------------------------------------------


class Outbox:
    """What one session still has to be told, and the task telling it.

    ``everything`` (for the subscription bus) takes updates of every resource, no logs."""

    def __init__(self, send: Send, *, everything: bool = False) -> None:
        self._send = send
        self._everything = everything
        self.level: LogLevel | None = None if everything else DEFAULT_LEVEL
        self.subscriptions: set[str] = set()
        self._logs: deque[LogEntry] = deque()
        self._dropped = 0
        self._updated: set[str] = set()
        self._list_changed = False
        self._wake = anyio.Event()

    def set_level(self, level: LogLevel) -> None:
        """Send log messages at ``level`` and above from now on."""
        self.level = level

    def offer(self, change: Change, entry: LogEntry | None, uris: tuple[str, ...]) -> None:
        """Queue what ``change`` means for this session (never blocks)."""
        if entry is not None and self.level is not None and LEVELS.index(entry.level) >= LEVELS.index(self.level):
            if len(self._logs) >= MAX_QUEUED_LOGS:
                self._dropped += 1
            else:
                self._logs.append(entry)
        wanted = uris if self._everything else [u for u in uris if u in self.subscriptions]
        self._updated.update(wanted)
        if change.kind == "plan":
            self._list_changed = True
        if self._logs or self._updated or self._list_changed or self._dropped:
            self._wake.set()

    async def run(self) -> None:
        """Send what is queued, as it comes, until cancelled; then wait
        :data:`COALESCE_SECONDS` so that a burst of changes makes one update per resource."""
        while True:
            await self._wake.wait()
            self._wake = anyio.Event()
            await self._flush()
            await anyio.sleep(COALESCE_SECONDS)

    async def _flush(self) -> None:
        logs, self._logs = self._logs, deque()
        dropped, self._dropped = self._dropped, 0
        updated, self._updated = sorted(self._updated), set()
        list_changed, self._list_changed = self._list_changed, False
        with anyio.move_on_after(SEND_TIMEOUT) as scope:
            for entry in logs:
                await self._send("notifications/message", entry.params())
            if dropped:
                note = {"message": f"{dropped} log messages were dropped: this client did not keep up"}
                await self._send("notifications/message", {"level": "warning", "logger": "claudecluster", "data": note})
            if list_changed:
                await self._send("notifications/resources/list_changed", {})
            for uri in updated:
                await self._send("notifications/resources/updated", {"uri": uri})
        if scope.cancelled_caught:
            logger.warning("a client did not take its notifications within %gs; some were dropped", SEND_TIMEOUT)


# -- every session ---------------------------------------------------------------------------------


class Broadcaster:
    """The outboxes of the sessions of one server lifespan, fed by the hub's changes."""

    def __init__(self) -> None:
        self._outboxes: dict[object, tuple[Outbox, anyio.CancelScope]] = {}
        self._tg: TaskGroup | None = None

    @classmethod
    @asynccontextmanager
    async def serving(cls, ref: HubRef, bus: SubscriptionBus | None = None) -> AsyncIterator[Broadcaster]:
        """Run a broadcaster of the changes of ``ref``'s hub (none while it is not running)
        for the duration of the block; with ``bus``, also publish resource updates there."""
        broadcaster = cls()
        async with anyio.create_task_group() as tg:
            broadcaster._tg = tg
            unwatch = ref.hub.changes.watch(broadcaster.publish) if ref.hub is not None else None
            if bus is not None:
                broadcaster.attach(bus, _bus_sender(bus), everything=True)
            try:
                yield broadcaster
            finally:
                if unwatch is not None:
                    unwatch()
                broadcaster._tg = None
                tg.cancel_scope.cancel()

    def attach(self, key: object, send: Send, *, everything: bool = False) -> Outbox | None:
        """The outbox of the session ``key`` (created, with its sending task, on first use);
        None once the broadcaster has stopped."""
        if key in self._outboxes:
            return self._outboxes[key][0]
        if self._tg is None:
            return None
        outbox = Outbox(send, everything=everything)
        scope = anyio.CancelScope()
        self._outboxes[key] = (outbox, scope)
        self._tg.start_soon(self._run, outbox, scope)
        return outbox

    def outbox(self, key: object) -> Outbox | None:
        """The outbox of session ``key``, if attached."""
        found = self._outboxes.get(key)
        return found[0] if found else None

    def detach(self, key: object) -> None:
        """Forget session ``key`` (its connection closed) and stop its task."""
        found = self._outboxes.pop(key, None)
        if found is not None:
            found[1].cancel()

    @property
    def sessions(self) -> int:
        """Sessions attached (the bus included)."""
        return len(self._outboxes)

    def publish(self, change: Change) -> None:
        """Offer ``change`` to every session (the hub's watcher: never blocks)."""
        entry = log_entry(change)
        uris = touched_uris(change)
        for outbox, _ in list(self._outboxes.values()):
            outbox.offer(change, entry, uris)

    @staticmethod
    async def _run(outbox: Outbox, scope: anyio.CancelScope) -> None:
        # A gone client: detach() follows when its connection closes.
        with scope, contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
            await outbox.run()


def _bus_sender(bus: SubscriptionBus) -> Send:
    async def send(method: str, params: dict[str, Any]) -> None:
        if method == "notifications/resources/updated":
            await bus.publish(ResourceUpdated(uri=params["uri"]))
        elif method == "notifications/resources/list_changed":
            await bus.publish(ResourcesListChanged())

    return send
