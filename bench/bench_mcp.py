"""MCP latency benchmark (results in BENCHMARKS.md).

    .venv/bin/python bench/bench_mcp.py [--tasks 1000] [--calls 200] [--clients 50]

Starts `claudecluster serve --transport http` (one process, as a user would) with a
1,000-task plan, then measures with the SDK's own clients: p50/p99 latency of `dispatch` and
`status` over Streamable HTTP and over SSE, and of `status` with 50 clients polling at once.
Targets: dispatch p99 <= 50 ms (brief: 500 ms), status p99 <= 20 ms (brief: 2 s).
Agents are the stand-in executable here (bench/standin_claude.sh, sleeping), so that the
figures measure the server, not model latency. The 50 polling clients share this one process,
so that figure is bound by the clients' own CPU; bench_load.py runs each client in its own
process, against a server with 20 real agents running, and times each call in the server too.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import httpx
import httpx2
import psutil
from _common import make_repo
from load_stats import summary
from mcp import Client
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "bench-token"


def tasks(n: int) -> list[dict[str, Any]]:
    # A wide DAG: every task after the first 50 depends on one of them, so the plan is big
    # but only a few stand-in agents run while we measure.
    return [
        {"id": f"t{i:04d}", "prompt": f"work sleep=600 #{i}", "deps": [] if i < 50 else [f"t{i % 50:04d}"]}
        for i in range(n)
    ]


def http_client(url: str) -> tuple[httpx2.AsyncClient, Client]:
    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)
    return http, Client(streamable_http_client(url + "/mcp", http_client=http))


def sse(url: str) -> Client:
    return Client(sse_client(url + "/sse", headers={"Authorization": f"Bearer {TOKEN}"}, sse_read_timeout=60))


async def timed_calls(client: Client, tool: str, args: dict[str, Any], calls: int) -> list[float]:
    samples = []
    for _ in range(calls):
        started = time.perf_counter()
        result = await client.call_tool(tool, args)
        samples.append(time.perf_counter() - started)
        assert not result.is_error, result.content
    return samples


async def run(n_tasks: int, calls: int, clients: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="cc-bench-mcp-") as tmp:
        repo = make_repo(Path(tmp) / "repo")
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        env = {
            **os.environ,
            "XDG_STATE_HOME": str(Path(tmp) / "state"),
            "CLAUDECLUSTER_TOKEN": TOKEN,  # not --token: that would be visible in ps (and warned about)
            "CLAUDECLUSTER_CLAUDE_BIN": str(ROOT / "bench" / "standin_claude.sh"),
            # The stand-in agent needs no model: no pre-flight model check.
            "CLAUDECLUSTER_SKIP_MODEL_CHECK": "1",
        }
        server = subprocess.Popen(  # noqa: ASYNC220 - a long-lived server process, stopped below
            [
                sys.executable,
                "-m",
                "claudecluster_mcp.cli",
                "serve",
                "--transport",
                "http",
                "--port",
                str(port),
                "--root",
                tmp,
                "--workers",
                "4",
            ],
            env=env,
            stdin=subprocess.DEVNULL,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            async with httpx.AsyncClient() as probe:
                for _ in range(300):
                    try:
                        if (await probe.get(url + "/health", timeout=1)).status_code == 200:
                            break
                    except httpx.TransportError:
                        await anyio.sleep(0.1)
            results: dict[str, Any] = {"tasks": n_tasks}
            http, client = http_client(url)
            async with http, client:
                started = time.perf_counter()
                planned = await client.call_tool("plan", {"repo": str(repo), "goal": "bench", "tasks": tasks(n_tasks)})
                results["plan_call_ms"] = round(1000 * (time.perf_counter() - started), 1)
                plan_id = planned.structured_content["plan_id"]
                await client.call_tool("dispatch", {"plan_id": plan_id})
                await timed_calls(client, "status", {"plan_id": plan_id}, 10)  # warm-up
                results["http_dispatch"] = summary(await timed_calls(client, "dispatch", {"plan_id": plan_id}, calls))
                results["http_status"] = summary(await timed_calls(client, "status", {"plan_id": plan_id}, calls))
                results["http_status_one_task"] = summary(
                    await timed_calls(client, "status", {"task_id": f"{plan_id}:t0001"}, calls)
                )
            async with sse(url) as client:
                await timed_calls(client, "status", {"plan_id": plan_id}, 10)
                results["sse_dispatch"] = summary(await timed_calls(client, "dispatch", {"plan_id": plan_id}, calls))
                results["sse_status"] = summary(await timed_calls(client, "status", {"plan_id": plan_id}, calls))

            samples: list[float] = []

            async def poller() -> None:
                http, client = http_client(url)
                async with http, client:
                    samples.extend(await timed_calls(client, "status", {"plan_id": plan_id}, max(5, calls // 20)))

            server_proc = psutil.Process(server.pid)
            server_cpu0 = sum(server_proc.cpu_times()[:2])
            client_cpu0 = time.process_time()
            started = time.perf_counter()
            async with anyio.create_task_group() as tg:
                for _ in range(clients):
                    tg.start_soon(poller)
            wall = time.perf_counter() - started
            server_cpu = sum(server_proc.cpu_times()[:2]) - server_cpu0
            client_cpu = time.process_time() - client_cpu0
            results[f"http_status_{clients}_clients"] = {
                **summary(samples),
                "calls_per_s": round(len(samples) / wall, 1),
                "server_cpu_ms_per_call": round(1000 * server_cpu / len(samples), 1),
                "client_cpu_ms_per_call": round(1000 * client_cpu / len(samples), 1),
            }
            return results
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = anyio.run(run, args.tasks, args.calls, args.clients)
    print(json.dumps(results, indent=2))
    targets = {"dispatch": "p99 <= 50 ms (brief 500 ms)", "status": "p99 <= 20 ms (brief 2 s)"}
    print(f"\n{'measurement':<28} {'p50 ms':>8} {'p99 ms':>8}  target")
    for name, value in results.items():
        if isinstance(value, dict):
            target = targets["dispatch"] if "dispatch" in name else targets["status"]
            print(f"{name:<28} {value['p50_ms']:>8} {value['p99_ms']:>8}  {target}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
