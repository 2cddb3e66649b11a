"""Load held: many MCP client processes poll `status` while agents run (BENCHMARKS.md,
"Load held: 50 client processes").

    .venv/bin/python bench/bench_load.py [--clients 50] [--agents 20] [--duration 120] [--json FILE]

One `claudecluster serve --transport http` process (as a user runs it, with its bearer
token) serves Streamable HTTP at /mcp and SSE at /sse. A plan of ``--agents`` long tasks
runs on as many slots: real `claude` against the scripted model server (a Write every
``--turn-latency`` s, so they stay busy until cancelled), or with ``--standin`` the sleeping
stand-in of bench_mcp.py. Once they all run, ``--clients`` processes (bench/load_client.py,
half over each transport) call `status` once a second each, spread evenly; after
``--warmup`` s the window of ``--duration`` s is measured:

- status latency as the clients see it (p50/p99/max, per transport), and in the server
  (its `claudecluster_request_seconds` histogram of `tools/call`, which leaves out the
  clients' own scheduling on a busy machine), plus CPU per call on both sides;
- the server's RSS (VmRSS) and open file descriptors every ``--sample-every`` s: first in the
  window vs last, slope, and before the clients came vs after they left;
- every error, in the window or not (a failed call, an isError result, a broken session).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import psutil
from _common import make_repo
from load_stats import (
    Sampler,
    cores_used,
    cpu_seconds,
    scrape,
    series_stats,
    server_latency,
    summary,
    window_samples,
)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from claudecluster_mcp.claude_cli import find_claude  # noqa: E402
from claudecluster_mcp.model_server import ScriptedModelServer, scripted_env  # noqa: E402
from claudecluster_mcp.scenario import load_scenario, write_turn  # noqa: E402

TOKEN = "bench-load-token"
TARGET_P99_MS = 50.0
CALL_TIMEOUT = 30.0  # a status call unanswered this long counts as an error


def scenario(agents: int, turns: int, latency: float) -> dict[str, Any]:
    """Agent i (prompt `[load<i>]`) writes a file per turn, ``turns`` times."""
    return {
        "default_latency": latency,
        "rules": [
            {
                "name": f"load{i}",
                "match": f"[load{i}]",
                "turns": [*(write_turn(f"w{i}-{k}.txt", f"{k}\n") for k in range(turns)), {"text": "done"}],
            }
            for i in range(agents)
        ],
    }


def plan_tasks(agents: int, standin: bool, seconds: float) -> list[dict[str, Any]]:
    """One task per agent; a stand-in agent sleeps ``seconds``."""
    prompt = "stand-in sleep={s} #{i}" if standin else "[load{i}] keep writing files"
    return [{"id": f"a{i:02d}", "prompt": prompt.format(i=i, s=round(seconds))} for i in range(agents)]


def start_server(opts: argparse.Namespace, tmp: Path, port: int, model_url: str | None) -> subprocess.Popen[bytes]:
    """`claudecluster serve --transport http` in its own process, with a hermetic HOME and state."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLAUDECLUSTER_")}
    env |= {
        "HOME": str(tmp / "home"),
        "XDG_STATE_HOME": str(tmp / "state"),
        "CLAUDECLUSTER_TOKEN": TOKEN,  # not --token: that would be visible in ps
        "CLAUDECLUSTER_ISOLATION": "none",  # the sandbox's own cost is bench_sandbox.py's subject
        "CLAUDECLUSTER_CLAUDE_CONFIG_DIR": str(tmp / "claude-config"),
    }
    if model_url is None:
        env |= {
            "CLAUDECLUSTER_CLAUDE_BIN": str(ROOT / "bench" / "standin_claude.sh"),
            "CLAUDECLUSTER_SKIP_MODEL_CHECK": "1",
        }
    else:
        env |= {"CLAUDECLUSTER_CLAUDE_BIN": str(find_claude().path), **scripted_env(model_url)}
    (tmp / "home").mkdir()
    argv = ["serve", "--transport", "http", "--port", str(port), "--root", str(tmp), "--workers", str(opts.agents)]
    with (tmp / "server.log").open("ab") as log:
        command = [sys.executable, "-m", "claudecluster_mcp.cli", *argv]
        return subprocess.Popen(command, env=env, cwd=ROOT, stdin=subprocess.DEVNULL, stderr=log)


def free_port() -> int:
    """A loopback TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def mcp_call(url: str, tool: str, args: dict[str, Any]) -> dict[str, Any]:
    """One tool call in a fresh Streamable HTTP session of this process."""
    import anyio
    from load_client import connect

    async def call() -> dict[str, Any]:
        async with connect(url, "http", TOKEN) as client:
            result = await client.call_tool(tool, args)
            if result.is_error:
                raise RuntimeError(f"{tool} failed: {result.content}")
            return result.structured_content or {}

    return anyio.run(call)


def wait_for(what: str, check: Any, timeout: float, every: float = 0.5) -> Any:
    """Poll ``check()`` until it returns something truthy; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            found = check()
        except (OSError, httpx.TransportError):
            found = None
        if found:
            return found
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(every)


def start_clients(opts: argparse.Namespace, url: str, plan_id: str, log: Path) -> list[subprocess.Popen[str]]:
    """The client processes, half over each transport, their calls spread over the second."""
    env = {**os.environ, "CLAUDECLUSTER_TOKEN": TOKEN}
    script = str(ROOT / "bench" / "load_client.py")
    clients = []
    with log.open("a") as errors:
        for i in range(opts.clients):
            transport = "http" if i % 2 == 0 else "sse"
            phase = f"{opts.interval * i / opts.clients:.4f}"
            argv = [script, url, transport, plan_id, "--phase", phase, "--interval", str(opts.interval)]
            argv += ["--timeout", str(CALL_TIMEOUT)]
            pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "stderr": errors}
            clients.append(subprocess.Popen([sys.executable, *argv], env=env, text=True, **pipes))
    return clients


def wait_ready(clients: list[subprocess.Popen[str]], timeout: float) -> None:
    """Until every client made its first call (it prints `ready`)."""
    with selectors.DefaultSelector() as selector:
        for client in clients:
            assert client.stdout is not None
            selector.register(client.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        while selector.get_map():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(selector.get_map())} client(s) not ready after {timeout:g} s")
            for key, _ in selector.select(timeout=1):
                key.fileobj.readline()  # type: ignore[union-attr]
                selector.unregister(key.fileobj)


def stop_clients(clients: list[subprocess.Popen[str]]) -> list[dict[str, Any]]:
    """Tell every client to stop; their results."""
    for client in clients:
        assert client.stdin is not None
        client.stdin.write("stop\n")
        client.stdin.flush()
    results = []
    deadline = time.monotonic() + CALL_TIMEOUT + 60  # a call in flight ends by then, answered or not
    for client in clients:
        try:
            out, _ = client.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            client.kill()  # its last line says closed: false
            out, _ = client.communicate()
        lines = [line for line in out.splitlines() if line.startswith("{")]
        lost = {"samples": [], "fatal": f"no result (exit {client.returncode})"}
        results.append(json.loads(lines[-1]) if lines else lost)
    return results


def health(url: str) -> dict[str, Any]:
    """The server's /health as the token holder sees it."""
    answer = httpx.get(url + "/health", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
    return dict(answer.json())


def stop_server(server: subprocess.Popen[bytes]) -> list[str]:
    """SIGTERM the server; the processes it left behind (none expected)."""
    try:
        below = psutil.Process(server.pid).children(recursive=True)
    except psutil.Error:
        below = []
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(timeout=60)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()
    time.sleep(1)
    return [f"{p.pid} {p.name()}" for p in below if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def measure(opts: argparse.Namespace, tmp: Path, url: str, server: subprocess.Popen[bytes]) -> dict[str, Any]:
    """Everything from the plan to the clients' results (the server is up)."""
    hold = opts.duration + opts.warmup + 600  # agents outlive the measurement; cancelled after
    tasks = plan_tasks(opts.agents, opts.standin, hold)
    plan_id = mcp_call(url, "plan", {"repo": str(tmp / "repo"), "goal": "load", "tasks": tasks})["plan_id"]
    mcp_call(url, "dispatch", {"plan_id": plan_id})
    sampler = Sampler(server.pid, lambda: health(url)["agents_running"], opts.sample_every).start()
    try:
        wait_for(f"{opts.agents} agents running", lambda: health(url)["agents_running"] >= opts.agents, 300)
        time.sleep(opts.settle)
        before = sampler.sample()  # no client yet
        clients = start_clients(opts, url, plan_id, tmp / "clients.log")
        try:
            wait_ready(clients, timeout=180)
            time.sleep(opts.warmup)
            pids = [client.pid for client in clients]
            metrics0, cpu0, start = scrape(url, TOKEN), cpu_seconds(server.pid, pids), time.monotonic()
            sampler.sample()
            time.sleep(opts.duration)
            metrics1, cpu1, end = scrape(url, TOKEN), cpu_seconds(server.pid, pids), time.monotonic()
            sampler.sample()
        finally:
            results = stop_clients(clients)
        time.sleep(opts.settle)
        after = sampler.sample()  # the clients gone
    finally:
        sampler.stop()
    cancelled = mcp_call(url, "cancel", {"plan_id": plan_id})
    return {
        "plan_id": plan_id,
        "window": (start, end),
        "metrics": (metrics0, metrics1),
        "cores": cores_used(cpu0, cpu1, end - start),
        "before": before,
        "after": after,
        "series": sampler.series,
        "clients": results,
        "cancelled_counts": cancelled.get("counts", {}),
    }


def report(opts: argparse.Namespace, raw: dict[str, Any], leftovers: list[str]) -> dict[str, Any]:
    """The figures: latency both sides, CPU, memory and descriptors, errors."""
    start, end = raw["window"]
    clients = raw["clients"]
    calls = {t: window_samples(clients, start, end, t) for t in ("http", "sse")}
    every = calls["http"] + calls["sse"]
    errors = [s[2] for c in clients for s in c["samples"] if s[2]] + [c["fatal"] for c in clients if c["fatal"]]
    errors += ["the session did not close" for c in clients if not c.get("closed", True)]
    total_calls = sum(len(c["samples"]) for c in clients)
    server_side = server_latency(*raw["metrics"])
    window_series = [s for s in raw["series"] if start <= s["t"] <= end]
    return {
        "setup": {
            "clients": opts.clients,
            "agents": opts.agents,
            "agent_kind": "stand-in (bench/standin_claude.sh)" if opts.standin else "real claude, scripted model",
            "duration_s": opts.duration,
            "warmup_s": opts.warmup,
            "cores": os.cpu_count(),
        },
        "client": {
            "all": summary([s[1] for s in every]),
            "http": summary([s[1] for s in calls["http"]]),
            "sse": summary([s[1] for s in calls["sse"]]),
            "calls_per_s": round(len(every) / (end - start), 1),
            "cpu_ms_per_call": round(1000 * sum(c.get("cpu_polling_s", 0) for c in clients) / max(1, total_calls), 2),
        },
        "server": {
            **server_side,
            "cpu_ms_per_call": round(1000 * raw["cores"]["server"] * (end - start) / max(1, len(every)), 2),
        },
        "cores_used": raw["cores"],  # average over the window: who used the 2 cores
        "rss_mb": series_stats(window_series, "rss_mb", raw["before"], raw["after"]),
        "fds": series_stats(window_series, "fds", raw["before"], raw["after"]),
        "fds_held": series_stats(window_series, "fds_held", raw["before"], raw["after"]),
        "agents_running": {  # as /health said (-1: it did not answer in time)
            "min": min((s["agents"] for s in window_series if s["agents"] >= 0), default=-1),
            "max": max((s["agents"] for s in window_series), default=-1),
        },
        "machine_load1": {
            "mean": round(statistics.fmean(s["load1"] for s in window_series), 1) if window_series else math.nan,
            "max": max((s["load1"] for s in window_series), default=math.nan),
        },
        "series": [{k: round(v - start, 1) if k == "t" else v for k, v in s.items()} for s in raw["series"]],
        "errors": {"count": len(errors), "calls": total_calls, "kinds": dict(Counter(e[:80] for e in errors))},
        "processes_left": leftovers,
    }


def run(opts: argparse.Namespace) -> dict[str, Any]:
    """The whole benchmark; its report."""
    tmp = Path(tempfile.mkdtemp(prefix="cc-bench-load-"))
    model = None
    try:
        make_repo(tmp / "repo")
        if not opts.standin:
            turns = math.ceil((opts.duration + opts.warmup + 600) / opts.turn_latency)
            model = ScriptedModelServer(load_scenario(scenario(opts.agents, turns, opts.turn_latency))).start()
        port = opts.port or free_port()
        url = f"http://127.0.0.1:{port}"
        server = start_server(opts, tmp, port, model.url if model else None)
        try:
            wait_for("the server", lambda: health(url).get("status") == "ok", 60)
            raw = measure(opts, tmp, url, server)
            wait_for("agents to stop", lambda: health(url)["agents_running"] == 0, 120)
        finally:
            leftovers = stop_server(server)
        return report(opts, raw, leftovers) | ({"kept": str(tmp)} if opts.keep else {})
    finally:
        if model is not None:
            model.stop()
        if not opts.keep:
            shutil.rmtree(tmp, ignore_errors=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The benchmark's options (defaults: the full measurement)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=50, help="client processes (half HTTP, half SSE)")
    parser.add_argument("--agents", type=int, default=20, help="agents running meanwhile")
    parser.add_argument("--duration", type=float, default=120, help="measured window (s)")
    parser.add_argument("--warmup", type=float, default=15, help="polling before the window (s)")
    parser.add_argument("--settle", type=float, default=5, help="pause before the clients come and after they go (s)")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between one client's calls")
    parser.add_argument("--sample-every", type=float, default=3.0, help="server RSS/fd sampling period (s)")
    parser.add_argument("--turn-latency", type=float, default=5.0, help="scripted model latency per turn (s)")
    parser.add_argument("--standin", action="store_true", help="stand-in agents instead of real claude")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    parser.add_argument("--json", type=Path)
    return parser.parse_args(argv)


def main() -> None:
    opts = parse_args()
    result = run(opts)
    print(json.dumps({k: v for k, v in result.items() if k != "series"}, indent=2))
    client, server = result["client"]["all"], result["server"]
    print(f"\nstatus p99: client {client['p99_ms']} ms, server {server['p99_ms']} ms (target <= {TARGET_P99_MS:g} ms)")
    print(f"RSS MB {result['rss_mb']}\nfds {result['fds_held']}\nerrors {result['errors']['count']}")
    if opts.json:
        opts.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
