"""One MCP client process of the load benchmark (bench/bench_load.py).

    python bench/load_client.py URL {http|sse} PLAN_ID --phase 0.3 [--interval 1]

Connects with the MCP SDK's own client (Streamable HTTP at URL/mcp, or SSE at URL/sse; the
bearer token from $CLAUDECLUSTER_TOKEN, if set), then calls `status` on the plan once per
interval, on ticks offset by ``--phase`` so that many clients spread their calls evenly.
It prints ``ready`` after its first call, stops when a line (or EOF) arrives on stdin, and
then prints a JSON object, once before closing its session and again after: every call as
[monotonic start, seconds, error text ("" when none)], its CPU seconds, whether the session
closed, and a fatal error if the session itself broke.

Start times are ``time.monotonic()``, one clock for every process of the machine (Linux), so
the benchmark can keep only the calls of its measurement window.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx2
from mcp import Client
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client


@asynccontextmanager
async def connect(url: str, transport: str, token: str) -> AsyncIterator[Client]:
    """A connected client session over ``transport``."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if transport == "sse":
        async with Client(sse_client(url + "/sse", headers=headers, sse_read_timeout=600)) as client:
            yield client
        return
    async with (
        httpx2.AsyncClient(headers=headers, timeout=60) as http,
        Client(streamable_http_client(url + "/mcp", http_client=http)) as client,
    ):
        yield client


def error_of(result: Any, plan_id: str) -> str:
    """Why a `status` result is wrong ("" when it is a live status of the plan)."""
    if result.is_error:
        return "isError: " + " ".join(getattr(c, "text", "") for c in result.content)[:300]
    content = result.structured_content or {}
    if content.get("plan_id") != plan_id:
        return f"status of {content.get('plan_id')!r}, not {plan_id!r}"
    return ""


async def timed_status(client: Client, plan_id: str, timeout: float) -> list[Any]:
    """One `status` call: [monotonic start, seconds, error text or ""]; no answer within
    ``timeout`` s is an error too."""
    started = time.monotonic()
    try:
        with anyio.fail_after(timeout):
            error = error_of(await client.call_tool("status", {"plan_id": plan_id}), plan_id)
    except TimeoutError:
        error = f"no answer within {timeout:g} s"
    except Exception as exc:  # every failure is a measured error
        error = f"{type(exc).__name__}: {exc}"[:300]
    return [started, time.monotonic() - started, error]


def next_tick(tick: float, interval: float) -> float:
    """The tick after ``tick``; when behind, the next one still ahead (no burst to catch up)."""
    tick += interval
    late = time.monotonic() - tick
    return tick + interval * math.ceil(late / interval) if late > 0 else tick


class Report:
    """What the client prints for the benchmark: its calls, its CPU time, and how it ended."""

    def __init__(self, transport: str) -> None:
        self.transport = transport
        self.samples: list[list[Any]] = []
        self._first_call_cpu: float | None = None
        self._polling_cpu = 0.0

    def call_starts(self) -> None:
        """Mark the CPU clock at the first call."""
        if self._first_call_cpu is None:
            self._first_call_cpu = time.process_time()

    def polling_ends(self) -> None:
        """Mark the CPU clock when polling stops."""
        if self._first_call_cpu is not None:
            self._polling_cpu = time.process_time() - self._first_call_cpu

    def print(self, *, closed: bool, fatal: str = "") -> None:
        """One JSON line; the benchmark reads the last one (``closed``: the session ended)."""
        result = {
            "transport": self.transport,
            "samples": self.samples,
            "cpu_s": time.process_time(),
            "cpu_polling_s": self._polling_cpu,
            "closed": closed,
            "fatal": fatal,
        }
        print(json.dumps(result), flush=True)


async def poll(args: argparse.Namespace, report: Report) -> None:
    """Call `status` once per interval until stdin says stop; report before closing the
    session, so that a session that cannot close still leaves its calls."""
    stop = anyio.Event()

    async def wait_for_stop() -> None:
        await anyio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)
        stop.set()

    token = os.environ.get("CLAUDECLUSTER_TOKEN", "")
    async with connect(args.url, args.transport, token) as client, anyio.create_task_group() as tasks:
        tasks.start_soon(wait_for_stop)
        tick = args.interval * (math.floor(time.monotonic() / args.interval) + 1) + args.phase
        while not stop.is_set():
            with anyio.move_on_after(max(0.0, tick - time.monotonic())):
                await stop.wait()
            if stop.is_set():
                break
            report.call_starts()
            report.samples.append(await timed_status(client, args.plan_id, args.timeout))
            if len(report.samples) == 1:
                print("ready", flush=True)
            tick = next_tick(tick, args.interval)
        report.polling_ends()
        report.print(closed=False)
        tasks.cancel_scope.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url")
    parser.add_argument("transport", choices=["http", "sse"])
    parser.add_argument("plan_id")
    parser.add_argument("--phase", type=float, default=0.0, help="offset of this client's ticks (s)")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between calls")
    parser.add_argument("--timeout", type=float, default=30.0, help="a call unanswered this long is an error")
    args = parser.parse_args()
    report = Report(args.transport)
    fatal = ""
    try:
        anyio.run(poll, args, report)
    except BaseException as exc:  # reported, not raised: the benchmark counts it
        fatal = f"{type(exc).__name__}: {exc}"[:500]
    if not report.samples:
        print("ready", flush=True)  # never got going: unblock the benchmark, which reads `fatal`
    report.print(closed=True, fatal=fatal)


if __name__ == "__main__":
    main()
