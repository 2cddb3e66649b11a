"""`claudecluster serve` as a real process, reached by real MCP clients: the SDK's stdio,
Streamable HTTP and SSE clients, and the MCP Inspector CLI (pinned in package.json)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import httpx2
import pytest
from mcp import Client, StdioServerParameters
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client

ROOT = Path(__file__).parent.parent
INSPECTOR = ROOT / "node_modules" / ".bin" / "mcp-inspector"
TOKEN = "test-token-0123456789"
SERVE = [sys.executable, "-m", "claudecluster_mcp.cli", "serve"]

MakeRepo = Callable[[Path], Path]
FreePort = Callable[[], int]


def server_env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state"), "CLAUDECLUSTER_TOKEN": ""}


@dataclass
class HttpServer:
    url: str
    repo: Path
    process: subprocess.Popen[bytes]


@pytest.fixture
def http_server(tmp_path: Path, repo: Path, free_port: FreePort) -> Iterator[HttpServer]:
    port = free_port()
    process = subprocess.Popen(
        [*SERVE, "--transport", "http", "--port", str(port), "--token", TOKEN, "--root", str(tmp_path)],
        env=server_env(tmp_path),
        stdin=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).json()["status"] == "ok":
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None, "the server exited"
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.1)
        yield HttpServer(url, repo, process)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=20)


def with_token(token: str = TOKEN) -> httpx2.AsyncClient:
    return httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=30)


def plan_args(repo: Path) -> dict[str, object]:
    return {"repo": str(repo), "goal": "g", "tasks": [{"id": "a", "prompt": "do a"}]}


@pytest.mark.anyio
async def test_stdio_server_speaks_only_protocol_on_stdout(tmp_path: Path, repo: Path) -> None:
    params = StdioServerParameters(
        command=SERVE[0], args=[*SERVE[1:], "--root", str(tmp_path)], env=server_env(tmp_path)
    )

    async with Client(params) as client:
        tools = await client.list_tools()
        planned = await client.call_tool("plan", plan_args(repo))
        status = await client.call_tool("status", {"plan_id": planned.structured_content["plan_id"]})

    assert {t.name for t in tools.tools} >= {"plan", "dispatch", "status", "merge"}
    assert not planned.is_error and not status.is_error
    assert status.structured_content["counts"] == {"pending": 1}


@pytest.mark.anyio
async def test_serve_loads_settings_like_run_flags_over_env_over_each_repos_toml(
    tmp_path: Path, make_repo: MakeRepo
) -> None:
    a, b = make_repo(tmp_path / "a"), make_repo(tmp_path / "b")
    (a / "claudecluster.toml").write_text("workers = 3\n")
    (b / "claudecluster.toml").write_text(f'claude_bin = "{tmp_path / "no-such-claude"}"\n')

    async def serve(*flags: str, **env: str) -> tuple[dict[str, int], str]:
        params = StdioServerParameters(
            command=SERVE[0], args=[*SERVE[1:], "--root", str(tmp_path), *flags], env={**server_env(tmp_path), **env}
        )
        async with Client(params) as client:
            assert not (await client.call_tool("plan", plan_args(a))).is_error
            refused = await client.call_tool("plan", plan_args(b))
            pools = (await client.call_tool("workers", {})).structured_content["pools"]
        assert refused.is_error
        return pools, refused.content[0].text

    pools, refused = await serve()
    assert pools == {str(a): 3}
    assert f"{tmp_path / 'no-such-claude'} (the configured path)" in refused  # b's claude_bin
    assert (await serve(CLAUDECLUSTER_WORKERS="6"))[0] == {str(a): 6}
    assert (await serve("--workers", "5", CLAUDECLUSTER_WORKERS="6"))[0] == {str(a): 5}


def test_serve_rejects_bad_settings_before_serving(tmp_path: Path) -> None:
    done = subprocess.run(
        [*SERVE, "--root", str(tmp_path)],
        env={**server_env(tmp_path), "CLAUDECLUSTER_WORKERS": "0"},
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )

    assert done.returncode == 2
    assert "workers" in done.stderr and "CLAUDECLUSTER_WORKERS" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.anyio
async def test_streamable_http_and_sse_clients_share_one_engine(http_server: HttpServer) -> None:
    async with with_token() as http, Client(streamable_http_client(http_server.url + "/mcp", http_client=http)) as a:
        planned = await a.call_tool("plan", plan_args(http_server.repo))
        plan_id = planned.structured_content["plan_id"]
        sse = sse_client(http_server.url + "/sse", headers={"Authorization": f"Bearer {TOKEN}"})
        async with Client(sse) as b:
            seen_by_b = await b.call_tool("status", {"plan_id": plan_id})
            listed_by_b = await b.call_tool("status", {})
        seen_by_a = await a.call_tool("status", {"plan_id": plan_id})

    assert not planned.is_error, planned.content
    assert seen_by_b.structured_content["plan_id"] == plan_id == seen_by_a.structured_content["plan_id"]
    assert [p["plan_id"] for p in listed_by_b.structured_content["plans"]] == [plan_id]


def test_http_requires_the_bearer_token(http_server: HttpServer) -> None:
    init = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}},
    }
    headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}

    no_token = httpx.post(http_server.url + "/mcp", json=init, headers=headers, timeout=10)
    wrong = httpx.post(
        http_server.url + "/mcp", json=init, headers={**headers, "Authorization": "Bearer nope"}, timeout=10
    )
    sse = httpx.get(http_server.url + "/sse", timeout=10)
    good = httpx.post(
        http_server.url + "/mcp", json=init, headers={**headers, "Authorization": f"Bearer {TOKEN}"}, timeout=10
    )

    assert no_token.status_code == wrong.status_code == sse.status_code == 401
    assert good.status_code == 200


def test_http_rejects_foreign_origin_and_host(http_server: HttpServer) -> None:
    headers = {
        "Accept": "application/json, text/event-stream",
        "Content-Type": "application/json",
        "Authorization": f"Bearer {TOKEN}",
    }
    init = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}},
    }

    evil_origin = httpx.post(
        http_server.url + "/mcp", json=init, headers={**headers, "Origin": "http://evil.example"}, timeout=10
    )
    evil_host = httpx.post(http_server.url + "/mcp", json=init, headers={**headers, "Host": "evil.example"}, timeout=10)

    assert evil_origin.status_code == 403
    assert evil_host.status_code == 421


def test_health_and_metrics(http_server: HttpServer) -> None:
    health = httpx.get(http_server.url + "/health", timeout=10)
    anonymous = httpx.get(http_server.url + "/metrics", timeout=10)
    metrics = httpx.get(http_server.url + "/metrics", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)

    assert health.json()["status"] == "ok"
    assert anonymous.status_code == 401
    assert metrics.status_code == 200
    for name in (
        "claudecluster_tasks",
        "claudecluster_agents_running",
        "claudecluster_queue_depth",
        "claudecluster_merge_outcomes",
        "claudecluster_tool_seconds",
    ):
        assert name in metrics.text


def test_refuses_a_public_address_without_a_token(tmp_path: Path, free_port: FreePort) -> None:
    done = subprocess.run(
        [*SERVE, "--transport", "http", "--host", "0.0.0.0", "--port", str(free_port())],
        env=server_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )

    assert done.returncode == 2
    assert "without a bearer token" in done.stderr and "Traceback" not in done.stderr


def inspector(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(INSPECTOR), "--cli", *args, "--format", "json"],
        capture_output=True,
        text=True,
        timeout=90,
        env=env,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.usefixtures("repo")  # a repository under the root
def test_inspector_cli_over_stdio(tmp_path: Path) -> None:
    env = {**server_env(tmp_path), "HOME": str(tmp_path)}
    target = [*SERVE, "--root", str(tmp_path)]

    listed = inspector(*target, "--method", "tools/list", env=env)
    called = inspector(*target, "--method", "tools/call", "--tool-name", "status", env=env)

    assert listed.returncode == 0, listed.stderr
    assert {t["name"] for t in json.loads(listed.stdout)["result"]["tools"]} >= {"plan", "dispatch", "status", "merge"}
    assert called.returncode == 0, called.stderr
    assert json.loads(called.stdout)["result"]["isError"] is False


def test_inspector_cli_over_http_and_sse_with_a_token(http_server: HttpServer, tmp_path: Path) -> None:
    env = {**os.environ, "HOME": str(tmp_path)}
    auth = ["--header", f"Authorization: Bearer {TOKEN}"]
    args = json.dumps(plan_args(http_server.repo))

    planned = inspector(
        http_server.url + "/mcp",
        *auth,
        "--method",
        "tools/call",
        "--tool-name",
        "plan",
        "--tool-args-json",
        args,
        env=env,
    )
    plan_id = json.loads(planned.stdout)["result"]["structuredContent"]["plan_id"]
    status = inspector(
        http_server.url + "/sse",
        *auth,
        "--method",
        "tools/call",
        "--tool-name",
        "status",
        "--tool-arg",
        f"plan_id={plan_id}",
        env=env,
    )
    denied = inspector(http_server.url + "/mcp", "--method", "tools/list", env=env)

    assert planned.returncode == 0, planned.stderr
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["result"]["structuredContent"]["counts"] == {"pending": 1}
    assert denied.returncode != 0
