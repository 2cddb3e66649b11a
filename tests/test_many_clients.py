"""Many MCP clients on one server at once: in-memory sessions plus sessions over real
Streamable HTTP and legacy SSE (uvicorn in this process, with a bearer token), all on the one
hub. Each client plans its own work, then calls every tool concurrently on its own plan and
on another client's plan (in the other repository), and every call is answered. No agent
runs: plans are cancelled, never dispatched."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
import uvicorn
from mcp import Client
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client

from claudecluster_mcp.claude_cli import ClaudeBinary
from claudecluster_mcp.hub import HubRef
from claudecluster_mcp.server import ServerSettings, build_server
from claudecluster_mcp.settings import EngineSettings
from claudecluster_mcp.transports import http_app, transport_security

pytestmark = [pytest.mark.anyio]

IN_MEMORY, HTTP, SSE = 12, 2, 2
TOKEN = "many-clients-token"

Settings = Callable[..., EngineSettings]
MakeRepo = Callable[[Path], Path]


@asynccontextmanager
async def http_serving(
    mcp: Any, ref: HubRef, settings: ServerSettings, claude: ClaudeBinary, port: int
) -> AsyncIterator[str]:
    """The server's HTTP app under uvicorn on ``port``; its lifespan runs the hub in ``ref``."""
    app = http_app(
        mcp,
        ref,
        lambda: settings.hub(claude),
        host="127.0.0.1",
        security=transport_security("127.0.0.1", [], []),
        token=TOKEN,
        metrics=build_server()[2],
        max_request_bytes=4 * 1024 * 1024,
    )
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve)
        with anyio.fail_after(30):
            while not server.started:  # noqa: ASYNC110 (uvicorn only sets a flag)
                await anyio.sleep(0.05)
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            server.should_exit = True


def clients(mcp: Any, url: str) -> list[AbstractAsyncContextManager[Client]]:
    """In-memory clients of ``mcp``, and clients of the server at ``url`` over each transport."""
    bearer = {"Authorization": f"Bearer {TOKEN}"}

    @asynccontextmanager
    async def over_http() -> AsyncIterator[Client]:
        async with (
            httpx2.AsyncClient(headers=bearer, timeout=60) as http,
            Client(streamable_http_client(url + "/mcp", http_client=http)) as client,
        ):
            yield client

    return [
        *(Client(mcp) for _ in range(IN_MEMORY)),
        *(over_http() for _ in range(HTTP)),
        *(Client(sse_client(url + "/sse", headers=bearer, timeout=60)) for _ in range(SSE)),
    ]


@dataclass
class Crowd:
    """The clients' plans, and a barrier: every client plans before any looks at another's."""

    size: int
    plans: dict[int, str] = field(default_factory=dict)
    everyone_planned: anyio.Event = field(default_factory=anyio.Event)
    answers: dict[int, dict[str, Any]] = field(default_factory=dict)

    def planned(self, index: int, plan_id: str) -> None:
        self.plans[index] = plan_id
        if len(self.plans) == self.size:
            self.everyone_planned.set()


async def ok(client: Client, tool: str, **arguments: Any) -> dict[str, Any]:
    result = await client.call_tool(tool, arguments)
    assert not result.is_error and result.structured_content is not None, (tool, arguments, result.content)
    return result.structured_content


async def error(client: Client, tool: str, **arguments: Any) -> str:
    result = await client.call_tool(tool, arguments)
    assert result.is_error, (tool, arguments, result.structured_content)
    text = result.content[0].text  # type: ignore[union-attr]
    assert "Traceback" not in text and text.strip() != f"Error executing tool {tool}", text
    return text


async def act(index: int, opened: AbstractAsyncContextManager[Client], repos: list[Path], crowd: Crowd) -> None:
    """One client's session: plan, wait for the others, then everything at once."""
    async with opened as client:
        mine = (await ok(client, "plan", goal=f"client {index}", repo=str(repos[index % 2]), tasks=TASKS))["plan_id"]
        crowd.planned(index, mine)
        await crowd.everyone_planned.wait()
        other = crowd.plans[(index + 1) % crowd.size]  # in the other repository
        answers: dict[str, Any] = {}

        async def record(name: str, call: Any) -> None:
            answers[name] = await call

        async def cancel_mine() -> None:
            answers["cancel task"] = await ok(client, "cancel", task_id=f"{mine}:b")
            answers["cancel plan"] = await ok(client, "cancel", plan_id=mine)

        async with anyio.create_task_group() as tg:
            tg.start_soon(cancel_mine)
            # Ends once the other client has cancelled its plan (it never waits for this one).
            tg.start_soon(
                record, "wait other", ok(client, "status", plan_id=other, wait_seconds=60, until_finished=True)
            )
            tg.start_soon(record, "status other", ok(client, "status", plan_id=other))
            tg.start_soon(record, "task other", ok(client, "status", task_id=f"{other}:a"))
            tg.start_soon(record, "logs other", ok(client, "logs", task_id=f"{other}:b"))
            tg.start_soon(record, "listing", ok(client, "status"))
            tg.start_soon(record, "workers", ok(client, "workers"))
            tg.start_soon(record, "resource", client.read_resource(f"claudecluster://plans/{other}"))
            tg.start_soon(record, "approve other", error(client, "approve", task_id=f"{other}:a"))
            tg.start_soon(record, "dispatch other", error(client, "dispatch", plan_id=other, task_ids=["nope"]))
            tg.start_soon(record, "crossed ids", error(client, "status", plan_id=mine, task_id=f"{other}:a"))
            # JSON carries a NUL ("\u0000") to the server over every transport.
            tg.start_soon(record, "nul", error(client, "plan", goal="g", repo=f"{repos[0]}\x00", tasks=TASKS))
        crowd.answers[index] = answers


TASKS = [{"id": "a", "prompt": "x"}, {"id": "b", "prompt": "y", "deps": ["a"]}]


async def test_many_clients_over_every_transport_call_tools_at_once_across_plans(
    tmp_path: Path,
    make_repo: MakeRepo,
    claude: ClaudeBinary,
    engine_settings: Settings,
    free_port: Callable[[], int],
    caplog: pytest.LogCaptureFixture,
) -> None:
    repos = [make_repo(tmp_path / "a"), make_repo(tmp_path / "b")]
    mcp, ref, _ = build_server(token=TOKEN)
    settings = ServerSettings(roots=[tmp_path], engine=engine_settings())
    crowd = Crowd(IN_MEMORY + HTTP + SSE)

    with anyio.fail_after(90):
        async with http_serving(mcp, ref, settings, claude, free_port()) as url:
            async with anyio.create_task_group() as tg:
                for index, opened in enumerate(clients(mcp, url)):
                    tg.start_soon(act, index, opened, repos, crowd)
            async with Client(mcp) as client:
                listing = await ok(client, "status")

    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert sorted(crowd.answers) == list(range(crowd.size))
    for index, answers in crowd.answers.items():
        other = crowd.plans[(index + 1) % crowd.size]
        assert answers["cancel plan"]["state"] == "cancelled"
        assert answers["wait other"]["plan_id"] == other and answers["wait other"]["finished"]
        assert answers["status other"]["plan_id"] == other and answers["task other"]["tasks"][0]["id"] == "a"
        assert answers["logs other"]["task_id"] == f"{other}:b"
        assert other in answers["resource"].contents[0].text
        assert "not held for approval" in answers["approve other"]
        assert "has no task nope" in answers["dispatch other"]
        assert "is not in plan" in answers["crossed ids"]
        assert "repo holds a NUL character" in answers["nul"]
    assert sorted(p["plan_id"] for p in listing["plans"]) == sorted(crowd.plans.values())
    assert {p["state"] for p in listing["plans"]} == {"cancelled"}
