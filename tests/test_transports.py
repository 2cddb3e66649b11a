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
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import httpx2
import pytest
from mcp import Client, StdioServerParameters
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client

from claudecluster_mcp import __version__
from claudecluster_mcp.errors import ConfigError
from claudecluster_mcp.transports import default_token

ROOT = Path(__file__).parent.parent
INSPECTOR = ROOT / "node_modules" / ".bin" / "mcp-inspector"
SERVE = [sys.executable, "-m", "claudecluster_mcp.cli", "serve"]

MakeRepo = Callable[[Path], Path]
FreePort = Callable[[], int]


def server_env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state"), "CLAUDECLUSTER_TOKEN": ""}


@dataclass
class HttpServer:
    url: str
    process: subprocess.Popen[bytes]
    log: Path  # its stderr
    token: str = ""

    @property
    def stderr(self) -> str:
        return self.log.read_text()


@contextmanager
def serving(tmp_path: Path, port: int, *flags: str, env: dict[str, str] | None = None) -> Iterator[HttpServer]:
    """`claudecluster serve --transport http` over tmp_path, until the block ends."""
    log = tmp_path / f"serve-{port}-{time.monotonic_ns()}.log"
    with log.open("wb") as stderr:
        process = subprocess.Popen(
            [*SERVE, "--transport", "http", "--port", str(port), "--root", str(tmp_path), *flags],
            env=env or server_env(tmp_path),
            stdin=subprocess.DEVNULL,
            stderr=stderr,
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
            assert process.poll() is None, f"the server exited: {log.read_text()}"
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.1)
        yield HttpServer(url, process, log)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=20)


@pytest.fixture
def http_server(tmp_path: Path, repo: Path, free_port: FreePort) -> Iterator[HttpServer]:
    """A server started as a user would, with no token given: it makes its own."""
    with serving(tmp_path, free_port()) as server:
        server.token = server_token(tmp_path)
        yield server


def server_token(tmp_path: Path) -> str:
    return (tmp_path / "state" / "claudecluster" / "server-token").read_text().strip()


def with_token(token: str) -> httpx2.AsyncClient:
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
async def test_streamable_http_and_sse_clients_share_one_engine(http_server: HttpServer, repo: Path) -> None:
    mcp_url = http_server.url + "/mcp"
    async with with_token(http_server.token) as http, Client(streamable_http_client(mcp_url, http_client=http)) as a:
        planned = await a.call_tool("plan", plan_args(repo))
        plan_id = planned.structured_content["plan_id"]
        sse = sse_client(http_server.url + "/sse", headers={"Authorization": f"Bearer {http_server.token}"})
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
    auth = {"Authorization": f"Bearer {http_server.token}"}
    good = httpx.post(http_server.url + "/mcp", json=init, headers={**headers, **auth}, timeout=10)

    assert no_token.status_code == wrong.status_code == sse.status_code == 401
    assert good.status_code == 200


def test_http_rejects_foreign_origin_and_host(http_server: HttpServer) -> None:
    headers = {
        "Accept": "application/json, text/event-stream",
        "Content-Type": "application/json",
        "Authorization": f"Bearer {http_server.token}",
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


def test_health_and_metrics_tell_details_only_with_the_token(http_server: HttpServer) -> None:
    auth = {"Authorization": f"Bearer {http_server.token}"}
    with httpx.Client(base_url=http_server.url, timeout=10) as http:
        anonymous_health = http.get("/health").json()
        wrong_health = http.get("/health", headers={"Authorization": "Bearer nope"}).json()
        anonymous_metrics = http.get("/metrics")
        metrics = http.get("/metrics", headers=auth)

    assert anonymous_health == wrong_health == {"status": "ok", "version": __version__}
    assert anonymous_metrics.status_code == 401
    assert metrics.status_code == 200
    for name in (
        "claudecluster_tasks",
        "claudecluster_agents_running",
        "claudecluster_queue_depth",
        "claudecluster_merge_outcomes",
        "claudecluster_tool_seconds",
    ):
        assert name in metrics.text


@pytest.mark.anyio
async def test_health_with_the_token_lists_the_open_repositories(http_server: HttpServer, repo: Path) -> None:
    async with with_token(http_server.token) as http:
        async with Client(streamable_http_client(http_server.url + "/mcp", http_client=http)) as client:
            assert not (await client.call_tool("plan", plan_args(repo))).is_error
        anonymous = (await http.get(http_server.url + "/health", headers={"Authorization": ""})).json()
        detailed = (await http.get(http_server.url + "/health")).json()

    assert str(repo) not in json.dumps(anonymous) and set(anonymous) == {"status", "version"}
    assert detailed["repositories"] == [str(repo)] and detailed["agents_running"] == 0


def test_a_generated_token_is_private_shown_once_and_reused(
    http_server: HttpServer, tmp_path: Path, free_port: FreePort
) -> None:
    token_file = tmp_path / "state" / "claudecluster" / "server-token"
    first_banner = http_server.stderr
    http_server.process.send_signal(signal.SIGTERM)
    http_server.process.wait(timeout=20)

    with serving(tmp_path, free_port()) as again:
        second_banner = again.stderr
        with_it = httpx.get(again.url + "/metrics", headers={"Authorization": f"Bearer {http_server.token}"})

    assert len(http_server.token) >= 40 and oct(token_file.stat().st_mode & 0o777) == "0o600"
    assert http_server.token in first_banner and str(token_file) in first_banner
    assert f"Authorization: Bearer $(cat {token_file})" in first_banner
    assert http_server.token not in second_banner and str(token_file) in second_banner
    assert with_it.status_code == 200 and server_token(tmp_path) == http_server.token


def test_a_token_on_the_command_line_works_but_warns(tmp_path: Path, free_port: FreePort) -> None:
    with serving(tmp_path, free_port(), "--token", "cli-token-0123456789") as server:
        accepted = httpx.get(server.url + "/metrics", headers={"Authorization": "Bearer cli-token-0123456789"})
        warning = server.stderr

    assert accepted.status_code == 200
    assert "visible to every user of this machine (ps)" in warning and "--token-file" in warning
    assert not (tmp_path / "state" / "claudecluster" / "server-token").exists()


def test_no_auth_is_refused_off_loopback(tmp_path: Path, free_port: FreePort) -> None:
    done = subprocess.run(
        [*SERVE, "--transport", "http", "--host", "0.0.0.0", "--no-auth", "--port", str(free_port())],
        env=server_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )

    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "--no-auth is allowed only on a loopback address (127.0.0.1, localhost, ::1), not 0.0.0.0" in done.stderr


@pytest.mark.anyio
async def test_no_auth_on_loopback_needs_no_token(tmp_path: Path, repo: Path, free_port: FreePort) -> None:
    with serving(tmp_path, free_port(), "--no-auth") as server:
        async with Client(server.url + "/mcp") as client:  # no token at all
            planned = await client.call_tool("plan", plan_args(repo))
        async with httpx2.AsyncClient() as http:
            health = (await http.get(server.url + "/health")).json()

    assert not planned.is_error and health["repositories"] == [str(repo)]
    assert "WITHOUT authentication" in server.stderr
    assert not (tmp_path / "state" / "claudecluster" / "server-token").exists()


def test_oversized_requests_get_413_before_auth(http_server: HttpServer) -> None:
    headers = {
        "Accept": "application/json, text/event-stream",
        "Content-Type": "application/json",
        "Authorization": f"Bearer {http_server.token}",
    }
    big = b'{"jsonrpc": "2.0", "id": 1, "method": "ping", "params": {"pad": "' + b"x" * (5 << 20) + b'"}}'

    def chunks() -> Iterator[bytes]:  # no Content-Length: chunked transfer encoding
        for start in range(0, len(big), 1 << 16):
            yield big[start : start + (1 << 16)]

    with httpx.Client(base_url=http_server.url, timeout=30) as http:
        declared = http.post("/mcp", content=big, headers=headers)
        chunked = http.post("/mcp", content=chunks(), headers=headers)
        anonymous = http.post("/messages/?session_id=x", content=big, headers={"Content-Type": "application/json"})
        small = http.post("/mcp", content=b"{not json", headers=headers)

    assert declared.status_code == chunked.status_code == anonymous.status_code == 413
    assert "larger than 4194304 bytes" in declared.json()["error_description"]
    assert small.status_code == 400  # a small body still reaches the MCP transport


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


def test_inspector_cli_over_http_and_sse_with_a_token(http_server: HttpServer, tmp_path: Path, repo: Path) -> None:
    env = {**os.environ, "HOME": str(tmp_path)}
    auth = ["--header", f"Authorization: Bearer {http_server.token}"]
    args = json.dumps(plan_args(repo))

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


def test_a_server_token_readable_by_others_is_refused(tmp_path: Path) -> None:
    token_file = tmp_path / "server-token"
    token_file.write_text("leaked-token\n")
    token_file.chmod(0o644)

    with pytest.raises(ConfigError, match=f"readable by other users \\(mode 0644\\): run `chmod 600 {token_file}`"):
        default_token(tmp_path)
