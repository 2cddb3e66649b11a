"""The protocol features on a real HTTP server (Streamable HTTP and SSE in one app, served
by uvicorn in this process) with real `claude` agents behind it: two clients on two
transports watching one running plan, a dropped connection resumed mid-call, and progress
from the planning agent and from a merge's gate."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
import uvicorn
from anyio.abc import SocketStream
from mcp import Client
from mcp.client.sse import sse_client
from mcp.types import LoggingMessageNotification, ResourceListChangedNotification, ResourceUpdatedNotification

from claudecluster_mcp.agent import ClaudeBinary
from claudecluster_mcp.engine import EngineSettings
from claudecluster_mcp.event_store import RETRY_MS
from claudecluster_mcp.model_server import ScriptedModelServer
from claudecluster_mcp.scenario import marker_rule, marker_task, write_turn
from claudecluster_mcp.server import ServerSettings, build_http_app, build_server

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.filterwarnings("ignore::mcp.shared.exceptions.MCPDeprecationWarning"),
]

StartModel = Callable[[dict[str, Any]], ScriptedModelServer]
Settings = Callable[..., EngineSettings]
Serve = Callable[..., AbstractAsyncContextManager[str]]


@pytest.fixture
def serve(tmp_path: Path, claude: ClaudeBinary, engine_settings: Settings, free_port: Callable[[], int]) -> Serve:
    """``serve(model=None, **engine)``: the HTTP app over tmp_path on a free port, for the
    block; yields its base URL."""

    @asynccontextmanager
    async def run(model: ScriptedModelServer | None = None, **engine: Any) -> AsyncIterator[str]:
        port = free_port()
        settings = ServerSettings(roots=[tmp_path], engine=engine_settings(model, **engine), no_auth=True, port=port)
        server = uvicorn.Server(
            uvicorn.Config(build_http_app(settings, claude=claude), host="127.0.0.1", port=port, log_level="warning")
        )
        async with anyio.create_task_group() as tg:
            tg.start_soon(server.serve)
            with anyio.fail_after(30):
                while not server.started:  # noqa: ASYNC110 (uvicorn has a flag, not an event)
                    await anyio.sleep(0.05)
            try:
                yield f"http://127.0.0.1:{port}"
            finally:
                server.should_exit = True

    return run


class Watcher:
    """What one client was told without asking."""

    def __init__(self) -> None:
        self.messages: list[Any] = []

    async def __call__(self, message: Any) -> None:
        self.messages.append(message)

    def updated(self, uri: str) -> int:
        return sum(isinstance(m, ResourceUpdatedNotification) and m.params.uri == uri for m in self.messages)

    def logs(self) -> list[dict[str, Any]]:
        return [
            {"level": m.params.level, **m.params.data}
            for m in self.messages
            if isinstance(m, LoggingMessageNotification)
        ]


async def call(client: Client, tool: str, **arguments: Any) -> dict[str, Any]:
    result = await client.call_tool(tool, arguments)
    assert not result.is_error, result.content
    assert result.structured_content is not None
    return result.structured_content


@pytest.mark.claude
async def test_two_clients_on_two_transports_watch_one_running_plan(
    serve: Serve, repo: Path, model_server: StartModel
) -> None:
    # Each agent makes a few tool calls: many events, which must not mean many notifications.
    steps = [write_turn(f"{name}{n}.txt", f"{n}\n") for name in "ab" for n in range(3)]
    model = model_server({"rules": [marker_rule("a", *steps[:3]), marker_rule("b", *steps[3:])]})
    http, sse = Watcher(), Watcher()

    async with (
        serve(model) as url,
        Client(f"{url}/mcp", mode="legacy", message_handler=http) as one,
        Client(sse_client(f"{url}/sse"), mode="legacy", message_handler=sse) as two,
    ):
        plan = await call(one, "plan", repo=str(repo), goal="files", tasks=[marker_task("a"), marker_task("b", "a")])
        plan_id = plan["plan_id"]
        plan_uri, log_b = f"claudecluster://plans/{plan_id}", f"claudecluster://tasks/{plan_id}:b/log"
        for client in (one, two):
            await client.set_logging_level("info")
            await client.subscribe_resource(plan_uri)
        await two.subscribe_resource(log_b)
        await call(one, "dispatch", plan_id=plan_id)
        status = await call(two, "status", plan_id=plan_id, wait_seconds=120, until_finished=True)
        assert {t["id"]: t["state"] for t in status["tasks"]} == {"a": "merged", "b": "merged"}
        await anyio.sleep(1.5)  # the last coalesced updates
        events = len((await call(one, "logs", task_id=f"{plan_id}:a", tail=5000))["lines"])
        events += len((await call(one, "logs", task_id=f"{plan_id}:b", tail=5000))["lines"])

    for watcher in (http, sse):
        assert any(isinstance(m, ResourceListChangedNotification) for m in watcher.messages)
        assert 1 <= watcher.updated(plan_uri) < events, (watcher.updated(plan_uri), events)
        merged = [e["task_id"] for e in watcher.logs() if e.get("state") == "merged"]
        assert merged == [f"{plan_id}:a", f"{plan_id}:b"], watcher.logs()
        assert all(e["level"] != "debug" for e in watcher.logs())
    assert sse.updated(log_b) >= 1 and http.updated(log_b) == 0


# -- a dropped connection, resumed -------------------------------------------------------


class CuttableProxy:
    """A TCP proxy to ``port`` whose open connections :meth:`cut` drops at once, as a network
    failure would (new connections go through)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.connections = 0
        self._open: set[SocketStream] = set()

    async def serve(self, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        async with await anyio.create_tcp_listener(local_host="127.0.0.1") as listener:
            task_status.started(listener.extra(anyio.abc.SocketAttribute.local_port))
            await listener.serve(self._relay)

    async def _relay(self, client: SocketStream) -> None:
        self.connections += 1
        async with client, await anyio.connect_tcp("127.0.0.1", self.port) as upstream:
            self._open |= {client, upstream}
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._pipe, client, upstream, tg.cancel_scope)
                    tg.start_soon(self._pipe, upstream, client, tg.cancel_scope)
            finally:
                self._open -= {client, upstream}

    @staticmethod
    async def _pipe(source: SocketStream, sink: SocketStream, scope: anyio.CancelScope) -> None:
        with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
            async for chunk in source:
                await sink.send(chunk)
        scope.cancel()

    async def cut(self) -> None:
        for stream in list(self._open):
            await stream.aclose()


async def test_a_status_long_poll_survives_a_dropped_connection(serve: Serve, repo: Path) -> None:
    progressed = anyio.Event()

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        progressed.set()

    async with serve() as url, anyio.create_task_group() as tg:
        proxy = CuttableProxy(int(url.rsplit(":", 1)[1]))
        port = await tg.start(proxy.serve)
        async with (
            Client(f"{url}/mcp", mode="legacy") as direct,
            Client(f"http://127.0.0.1:{port}/mcp", mode="legacy") as remote,
        ):
            plan = await call(direct, "plan", repo=str(repo), goal="g", tasks=[{"id": "a", "prompt": "x"}])
            plan_id = plan["plan_id"]
            answer: dict[str, Any] = {}

            async def long_poll() -> None:
                result = await remote.call_tool(
                    "status", {"plan_id": plan_id, "wait_seconds": 60}, progress_callback=on_progress
                )
                answer.update(result.structured_content or {"error": result.content})

            started = time.monotonic()
            async with anyio.create_task_group() as calls:
                calls.start_soon(long_poll)
                with anyio.fail_after(30):
                    await progressed.wait()
                connections = proxy.connections
                await proxy.cut()  # the status call's stream is gone, its answer not yet made
                await call(direct, "cancel", plan_id=plan_id)  # the change that ends the long-poll
            elapsed = time.monotonic() - started
        tg.cancel_scope.cancel()

    assert answer.get("state") == "cancelled", answer  # the answer made while disconnected arrived
    assert proxy.connections > connections  # by a new connection (GET with Last-Event-ID)
    assert elapsed < 30


async def test_post_streams_start_with_a_priming_event_and_a_retry_field(serve: Serve) -> None:
    headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
    init = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}},
    }
    async with serve() as url, httpx2.AsyncClient(base_url=url, timeout=30) as http:
        opened = await http.post("/mcp", json=init, headers=headers)
        session = {"mcp-session-id": opened.headers["mcp-session-id"], "mcp-protocol-version": "2025-11-25"}
        await http.post(
            "/mcp", json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers={**headers, **session}
        )
        async with http.stream(
            "POST", "/mcp", json={"jsonrpc": "2.0", "id": 2, "method": "ping"}, headers={**headers, **session}
        ) as stream:
            body = (await stream.aread()).decode().replace("\r\n", "\n")

    assert "\n\n" in body, body
    first, rest = body.split("\n\n", 1)
    fields = dict(line.split(": ", 1) if ": " in line else (line.rstrip(":"), "") for line in first.splitlines())
    assert fields.get("id") and fields.get("retry") == str(RETRY_MS) and fields.get("data", "") == ""
    assert json.loads(rest.split("data: ", 1)[1].splitlines()[0])["id"] == 2


# -- progress ---------------------------------------------------------------------------


@pytest.mark.claude
async def test_the_planning_agent_and_a_gated_merge_report_progress(
    tmp_path: Path,
    repo: Path,
    claude: ClaudeBinary,
    engine_settings: Settings,
    model_server: StartModel,
    git: Callable[..., str],
) -> None:
    planned = {"tasks": [{"id": "a", "title": "A", "prompt": "[a] write a"}]}
    model = model_server(
        {
            "rules": [
                {
                    "name": "planner",
                    "match": "[claudecluster:plan]",
                    "turns": [{"tools": [{"name": "StructuredOutput", "input": planned}]}, {"text": "planned"}],
                },
                marker_rule("a", write_turn("a.txt", "a\n")),
            ]
        }
    )
    # The gate passes only with an "ok" late.txt, which only the final merge commit holds.
    gate = ["python3", "-c", "import os, sys, time; time.sleep(2.5 if os.path.exists('late.txt') else 0); "
            "sys.exit(0 if not os.path.exists('late.txt') or open('late.txt').read() == 'ok\\n' else 1)"]  # fmt: skip
    mcp, ref, _ = build_server()
    settings = ServerSettings(roots=[tmp_path], engine=engine_settings(model, gate=gate))
    seen: dict[str, list[tuple[float, str]]] = {}

    def recorder(name: str) -> Any:
        async def record(progress: float, total: float | None, message: str | None) -> None:
            seen.setdefault(name, []).append((progress, message or ""))

        return record

    async with ref.running(settings.hub(claude)), Client(mcp) as client:
        result = await client.call_tool(
            "plan", {"repo": str(repo), "goal": "write a"}, progress_callback=recorder("plan")
        )
        plan_id = result.structured_content["plan_id"]  # type: ignore[index]
        await call(client, "dispatch", plan_id=plan_id)
        await call(client, "status", plan_id=plan_id, wait_seconds=120, until_finished=True)
        for content, name in (("bad\n", "failed"), ("ok\n", "merge")):  # the target moves on meanwhile
            (repo / "late.txt").write_text(content)
            git(repo, "add", "late.txt")
            git(repo, "commit", "-qm", f"late {content.strip()}")
            result = await client.call_tool("merge", {"plan_id": plan_id}, progress_callback=recorder(name))
            assert result.structured_content is not None
            seen[name + ".kind"] = [(0, result.structured_content["kind"])]

    assert seen["plan"][0][1].startswith("the planning agent")
    assert seen["failed.kind"] == [(0, "gate_failed")] and seen["merge.kind"] == [(0, "merge")]
    assert (repo / "a.txt").read_text() == "a\n"
    stages = [message for _, message in seen["merge"]]
    assert any(m.startswith("checking") for m in stages) and any(m.startswith("running the gate") for m in stages)
    assert any(m.startswith("running the gate") and m.endswith("s)") for m in stages)  # the heartbeat
    assert stages[-1].startswith("moving refs/heads/")
    for name in ("plan", "failed", "merge"):
        values = [progress for progress, _ in seen[name]]
        assert values == sorted(set(values)), values  # progress only grows
