"""The protocol around the tools, through the SDK's client over JSON-RPC in memory (the
2025-11-25 handshake, which has logging/setLevel and resources/subscribe): log messages
filtered per session, coalesced resource updates, list_changed, completions and the
capabilities that announce them. State changes come from the real engine and store."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client
from mcp.types import (
    LoggingMessageNotification,
    PromptReference,
    ResourceListChangedNotification,
    ResourceTemplateReference,
    ResourceUpdatedNotification,
)

from claudecluster_mcp.engine import EngineSettings
from claudecluster_mcp.hub import Hub
from claudecluster_mcp.models import TaskState
from claudecluster_mcp.notifications import COALESCE_SECONDS, log_entry
from claudecluster_mcp.server import ServerSettings, build_server
from claudecluster_mcp.signals import Change

pytestmark = [
    pytest.mark.anyio,
    # Logging and resources/subscribe are deprecated by the 2026-07-28 revision (the SDK says
    # so on each call); 2025 hosts, Claude Code among them, use them.
    pytest.mark.filterwarnings("ignore::mcp.shared.exceptions.MCPDeprecationWarning"),
]


@dataclass
class Session:
    """A legacy-protocol client and what the server told it."""

    client: Client
    hub: Hub
    messages: list[Any] = field(default_factory=list)

    def logs(self) -> list[dict[str, Any]]:
        return [
            {"level": m.params.level, "logger": m.params.logger, **m.params.data}
            for m in self.messages
            if isinstance(m, LoggingMessageNotification)
        ]

    def updated(self) -> list[str]:
        return [m.params.uri for m in self.messages if isinstance(m, ResourceUpdatedNotification)]

    def list_changed(self) -> int:
        return sum(isinstance(m, ResourceListChangedNotification) for m in self.messages)

    async def settle(self) -> None:
        """Let the server's outbox send what it coalesced."""
        await anyio.sleep(COALESCE_SECONDS * 3)

    async def plan(self, repo: Path, *task_ids: str) -> str:
        tasks = [{"id": t, "prompt": f"do {t}"} for t in task_ids]
        result = await self.client.call_tool("plan", {"repo": str(repo), "goal": "g", "tasks": tasks})
        assert not result.is_error, result.content
        assert result.structured_content is not None
        return str(result.structured_content["plan_id"])


Connect = Callable[[], AbstractAsyncContextManager[Session]]


@pytest.fixture
def legacy(tmp_path: Path, engine_settings: Callable[..., EngineSettings]) -> Connect:
    """``legacy()``: a 2025-11-25 session of a server over tmp_path (no agents)."""

    @asynccontextmanager
    async def connect() -> AsyncIterator[Session]:
        mcp, ref, _ = build_server()
        settings = ServerSettings(roots=[tmp_path], engine=engine_settings())
        messages: list[Any] = []

        async def on_message(message: Any) -> None:
            messages.append(message)

        async with ref.running(settings.hub()) as hub, Client(mcp, mode="legacy", message_handler=on_message) as c:
            yield Session(c, hub, messages)

    return connect


async def test_capabilities_announce_logging_completions_and_resource_subscriptions(legacy: Connect) -> None:
    async with legacy() as session:
        capabilities = session.client.session.server_capabilities
        assert capabilities is not None
        assert capabilities.logging is not None and capabilities.completions is not None
        assert capabilities.resources is not None
        assert capabilities.resources.subscribe and capabilities.resources.list_changed


async def test_logs_follow_the_level_each_session_sets(legacy: Connect, repo: Path) -> None:
    async with legacy() as session:
        plan_id = await session.plan(repo, "a", "b")
        store = session.hub.clusters[0].store
        await store.move(plan_id, "a", TaskState.CANCELLED, reason="cancelled by request")  # a notice
        await store.move(plan_id, "b", TaskState.BLOCKED, reason="a cancelled")  # a warning
        await session.settle()
        default = session.logs()
        await session.client.set_logging_level("info")
        await session.client.call_tool("cancel", {"plan_id": plan_id})
        await session.settle()
        info = session.logs()[len(default) :]

    # By default only what needs attention: b blocked; not the plan's creation or a's cancel.
    assert [(e["level"], e.get("task_id"), e.get("state")) for e in default] == [("warning", f"{plan_id}:b", "blocked")]
    assert default[0]["logger"] == f"claudecluster.{plan_id}"
    assert default[0]["message"] == f"task {plan_id}:b is blocked: a cancelled"
    assert ("notice", None, "cancelled") in [(e["level"], e.get("task_id"), e.get("state")) for e in info]


async def test_agent_tool_calls_are_logged_at_debug_only(legacy: Connect, repo: Path) -> None:
    async with legacy() as session:
        plan_id = await session.plan(repo, "a")
        cluster = session.hub.clusters[0]
        tool_call = {"id": "t1", "name": "Bash", "input": {"command": "pytest -q"}}
        await session.client.set_logging_level("info")
        await cluster.store.append_event(plan_id, "a", "tool_use", tool_call)
        await session.settle()
        at_info = session.logs()
        await session.client.set_logging_level("debug")
        await cluster.store.append_event(plan_id, "a", "tool_use", tool_call)
        await session.settle()

    assert not [e for e in at_info if e["level"] == "debug"]
    debug = [e for e in session.logs() if e["level"] == "debug"]
    assert len(debug) == 1 and debug[0]["tool"] == "Bash" and "pytest -q" in debug[0]["message"]


async def test_subscribed_resources_get_one_update_per_burst_and_unknown_ones_stay_silent(
    legacy: Connect, repo: Path
) -> None:
    async with legacy() as session:
        plan_id = await session.plan(repo, "a", "b")
        plan_uri, log_a = f"claudecluster://plans/{plan_id}", f"claudecluster://tasks/{plan_id}:a/log"
        for uri in (plan_uri, log_a, "claudecluster://plans/pnotyet00", "test://watched-resource"):
            await session.client.subscribe_resource(uri)
        store = session.hub.clusters[0].store
        for n in range(40):  # a burst of agent events on task a
            await store.append_event(plan_id, "a", "text", {"text": f"step {n}"})
        await session.settle()
        burst = session.updated()
        await session.client.unsubscribe_resource(log_a)
        await store.append_event(plan_id, "a", "text", {"text": "after"})
        await session.settle()
        after = session.updated()[len(burst) :]

    assert set(burst) == {plan_uri, log_a}
    assert burst.count(plan_uri) <= 3 and burst.count(log_a) <= 3  # coalesced, not 40 each
    assert after == [plan_uri]


async def test_a_new_plan_changes_the_resource_list(legacy: Connect, repo: Path) -> None:
    async with legacy() as session:
        assert (await session.client.list_resources()).resources == []
        plan_id = await session.plan(repo, "a")
        await session.settle()
        resources = (await session.client.list_resources()).resources

    assert session.list_changed() == 1
    assert [(str(r.uri), r.mime_type) for r in resources] == [(f"claudecluster://plans/{plan_id}", "application/json")]


async def test_completions_of_plan_and_task_ids_and_prompt_arguments(legacy: Connect, repo: Path) -> None:
    async with legacy() as session:
        first = await session.plan(repo, "api", "api-tests", "docs")
        second = await session.plan(repo, "x")
        client = session.client
        plans = ResourceTemplateReference(type="ref/resource", uri="claudecluster://plans/{plan_id}")
        logs = ResourceTemplateReference(type="ref/resource", uri="claudecluster://tasks/{task_id}/log")
        prompt = PromptReference(type="ref/prompt", name="split_goal")

        every_plan = (await client.complete(plans, {"name": "plan_id", "value": "p"})).completion
        one_plan = (await client.complete(plans, {"name": "plan_id", "value": first[:5]})).completion
        tasks = (await client.complete(logs, {"name": "task_id", "value": f"{first}:api"})).completion
        no_plan = (await client.complete(plans, {"name": "plan_id", "value": "zz"})).completion
        repos = (await client.complete(prompt, {"name": "repo", "value": str(repo)[:-2]})).completion
        goal = (await client.complete(prompt, {"name": "goal", "value": "add"})).completion
        other = (await client.complete(plans, {"name": "nope", "value": ""})).completion

    assert set(every_plan.values) == {first, second} and every_plan.has_more is False
    assert first in one_plan.values
    assert tasks.values == [f"{first}:api", f"{first}:api-tests"]
    assert no_plan.values == [] and goal.values == [] and other.values == []
    assert str(repo) in repos.values


@pytest.mark.parametrize(
    ("change", "level", "says"),
    [
        (Change("p1", None, "plan", {"goal": "g", "tasks": 2}), "info", "plan p1 created with 2 tasks: g"),
        (Change("p1", "a", "state", {"state": "running", "attempts": 2}), "info", "task p1:a is running (attempt 2)"),
        (Change("p1", "a", "state", {"state": "merged"}), "notice", "task p1:a is merged"),
        (Change("p1", "a", "state", {"state": "held", "reason": "x"}), "warning", "task p1:a is held: x"),
        (Change("p1", "a", "state", {"state": "failed", "reason": "boom"}), "error", "task p1:a is failed: boom"),
        (Change("p1", "a", "state", {"state": "gate_failed"}), "error", "task p1:a is gate_failed"),
        (Change("p1", None, "plan_state", {"state": "merged"}), "notice", "plan p1 is merged"),
        (Change("p1", None, "plan_state", {"state": "failed", "reason": "bug"}), "error", "plan p1 is failed: bug"),
        (Change("p1", "a", "tool_use", {"name": "Read", "input": {"file_path": "x"}}), "debug", "task p1:a calls Read"),
        (Change("p1", "a", "text", {"text": "hi"}), None, None),
        (Change("p1", "a", "tool_result", {"content": "ok"}), None, None),
    ],
)
def test_what_each_change_says_in_the_log(change: Change, level: str | None, says: str | None) -> None:
    entry = log_entry(change)

    if level is None:
        assert entry is None
    else:
        assert entry is not None and entry.level == level and entry.logger == "claudecluster.p1"
        assert says is not None and entry.data["message"].startswith(says)


async def test_2026_sessions_hear_of_changes_on_their_listen_stream(
    tmp_path: Path, repo: Path, engine_settings: Callable[..., EngineSettings]
) -> None:
    mcp, ref, _ = build_server()
    settings = ServerSettings(roots=[tmp_path], engine=engine_settings())
    heard: list[Any] = []

    async with ref.running(settings.hub()) as hub, Client(mcp) as client:  # 2026-07-28
        tasks = [{"id": "a", "prompt": "x"}]
        planned = await client.call_tool("plan", {"repo": str(repo), "goal": "g", "tasks": tasks})
        plan_id = planned.structured_content["plan_id"]  # type: ignore[index]
        uri = f"claudecluster://plans/{plan_id}"
        async with client.listen(resources_list_changed=True, resource_subscriptions=[uri]) as stream:
            await hub.clusters[0].store.append_event(plan_id, "a", "text", {"text": "hi"})
            await client.call_tool("plan", {"repo": str(repo), "goal": "another", "tasks": tasks})
            with anyio.fail_after(10):
                async for event in stream:
                    heard.append(event)
                    if {type(e).__name__ for e in heard} >= {"ResourceUpdated", "ResourcesListChanged"}:
                        break

    assert [e.uri for e in heard if type(e).__name__ == "ResourceUpdated"] == [uri]
