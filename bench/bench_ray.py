"""Ray placement benchmark (results in BENCHMARKS.md, "Ray placement").

    .venv/bin/python bench/bench_ray.py [--tasks 20] [--slots 10] [--latency 2] [--json FILE]

Starts a two-node Ray cluster on this machine (``ray start`` on 127.0.0.2 and 127.0.0.3,
``--slots`` claude slots each, token authentication on), then runs, in the same process:

local     ``--tasks`` independent 2-turn tasks (real ``claude`` against the scripted model,
          ``--latency`` s per turn) on 2 x ``--slots`` local slots;
ray cold  the same on the cluster, slots starting with the first task;
ray warm  the same again on the now warm slots (the steady state of a long plan).

Per-task overhead of Ray placement = (engine asks for a slot → result in the local
worktree) minus the agent's own run time: slot, bundle out, checkout on the node, result
bundle back, applied here. Target: <= 0.5 s at the median. Wall, CPU (engine + cluster
processes, agents included) and peak memory are reported for each.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _common import make_repo, write_scenario  # noqa: E402

from claudecluster_mcp.agent import AgentRun  # noqa: E402
from claudecluster_mcp.agent_spec import AgentSpec  # noqa: E402
from claudecluster_mcp.bundles import checkout_snapshot, make_bundle, take_snapshot  # noqa: E402
from claudecluster_mcp.claude_cli import ClaudeBinary, find_claude  # noqa: E402
from claudecluster_mcp.engine import Cluster, EngineSettings  # noqa: E402
from claudecluster_mcp.events import AgentEvent  # noqa: E402
from claudecluster_mcp.model_server import ScriptedModelServer, scripted_env  # noqa: E402
from claudecluster_mcp.models import TaskState  # noqa: E402
from claudecluster_mcp.outcome import AgentOutcome  # noqa: E402
from claudecluster_mcp.placement import LocalPlacement  # noqa: E402
from claudecluster_mcp.ray_cluster import connect, disconnect  # noqa: E402
from claudecluster_mcp.ray_placement import RayPlacement  # noqa: E402
from claudecluster_mcp.scenario import load_scenario  # noqa: E402

HEAD, WORKER = "127.0.0.2", "127.0.0.3"
OnEvent = Callable[[AgentEvent], None]
OnStart = Callable[[int, float], Awaitable[None]]


# -- the cluster -----------------------------------------------------------------------------


def start_node(ip: str, args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    ray = str(Path(sys.executable).parent / "ray")
    with log.open("wb") as out:
        process = subprocess.Popen(
            [ray, "start", "--block", f"--node-ip-address={ip}", "--disable-usage-stats", *args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    while b"Ray runtime started" not in log.read_bytes():
        if process.poll() is not None:
            raise SystemExit(f"ray start on {ip} failed:\n{log.read_text()}")
        time.sleep(0.1)
    return process


def stop_node(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(psutil.Error):
        family = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
        process.terminate()
        _, alive = psutil.wait_procs(family, timeout=20)
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.kill()
    process.wait()


def tree(pids: list[int]) -> list[psutil.Process]:
    found = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(pid)
            found += [root, *root.children(recursive=True)]
    return found


def cpu_of(pids: list[int]) -> float:
    """CPU seconds of the living processes below ``pids``, with their waited-for children."""
    total = 0.0
    for proc in tree(pids):
        with contextlib.suppress(psutil.Error):
            t = proc.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
    return total


def pss_of(pids: list[int], but: list[int] | None = None) -> int:
    """Proportional set size (shared pages split between their users: Ray's workers share
    its object store and libraries) of the processes below ``pids`` and not below ``but``,
    in bytes."""
    total = 0
    excluded = {proc.pid for proc in tree(but or [])}
    for proc in tree(pids):
        if proc.pid in excluded:
            continue
        with contextlib.suppress(OSError), open(f"/proc/{proc.pid}/smaps_rollup") as rollup:
            total += next(int(line.split()[1]) * 1024 for line in rollup if line.startswith("Pss:"))
    return total


class PeakMemory:
    """Samples the memory (PSS) of the engine's and the cluster's process trees every 0.5 s
    while a round runs: each one's peak, and the peak of their sum."""

    def __init__(self, engine: list[int], cluster: list[int], nodes: list[int]) -> None:
        self.engine, self.cluster, self.nodes = engine, cluster, nodes
        self.peaks = {"engine": 0, "cluster": 0, "both": 0}

    async def run(self) -> None:
        while True:
            # The cluster's nodes are this process's children too: counted on their side only.
            engine = await anyio.to_thread.run_sync(pss_of, self.engine, self.nodes)
            cluster = await anyio.to_thread.run_sync(pss_of, self.cluster)
            for key, value in (("engine", engine), ("cluster", cluster), ("both", engine + cluster)):
                self.peaks[key] = max(self.peaks[key], value)
            await anyio.sleep(0.5)


# -- local placement, timed -------------------------------------------------------------------


class TimedLocal(LocalPlacement):
    """Local placement recording each run's (wall, agent duration)."""

    def __init__(self, claude: ClaudeBinary) -> None:
        super().__init__(claude)
        self.runs: list[tuple[float, float]] = []
        self.durations: dict[str, float] = {}  # run id -> the agent's own run time

    def agent(self, spec: AgentSpec, *, on_event: OnEvent, on_start: OnStart) -> AgentRun:
        run = AgentRun(spec, claude=self.claude, on_event=on_event, on_start=on_start)
        original = run.run

        async def timed() -> AgentOutcome:
            started = time.time()
            outcome = await original()
            self.runs.append((time.time() - started, outcome.duration_s))
            self.durations[run.run_id] = outcome.duration_s
            return outcome

        run.run = timed  # type: ignore[method-assign]
        return run


# -- the rounds -------------------------------------------------------------------------------


def settings_for(tmp: Path, name: str, server: ScriptedModelServer, workers: int, **extra: Any) -> EngineSettings:
    return EngineSettings(
        workers=workers,
        state_dir=tmp / name / "state",
        claude_config_dir=tmp / "claude-config",
        agent_env={**scripted_env(server.url), "HOME": str(tmp / "home")},
        isolation="none",  # the placement's cost, not the sandbox's (measured on its own)
        inactivity_timeout=300,
        **extra,
    )


def bench_repo(path: Path) -> Path:
    """A repository of 50 small files (so that bundles carry something)."""
    make_repo(path)
    for i in range(50):
        (path / f"src{i:02d}.py").write_text(f"# module {i}\n" + "x = 1\n" * 40)
    for args in (["add", "-A"], ["commit", "-qm", "fifty files"]):
        subprocess.run(["git", "-C", str(path), "-c", "user.name=b", "-c", "user.email=b@b", *args], check=True)
    return path


async def one_round(
    cluster: Cluster,
    tasks: list[dict[str, Any]],
    pids: list[int],
    durations: Callable[[], dict[str, float]],
    nodes: list[int],
) -> dict[str, Any]:
    """Plan, run and wait for ``tasks``: wall, CPU (this process's children and the ``pids``
    trees), peak memory (this process and the ``pids`` trees), and each task's time from
    running to succeeded (committed here) beyond its agent's own run time (``durations``:
    run id -> agent run time), the placement's cost as the task sees it."""
    peak = PeakMemory([os.getpid()], pids, nodes)
    load = os.getloadavg()[0]
    me0, kids0 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cluster0 = await anyio.to_thread.run_sync(cpu_of, pids)
    async with anyio.create_task_group() as tg:
        tg.start_soon(peak.run)
        plan = (await cluster.plan("ray benchmark", tasks)).plan
        started = time.monotonic()
        await cluster.dispatch(plan.id)
        status = await cluster.wait(plan.id, timeout=900)
        wall = time.monotonic() - started
        tg.cancel_scope.cancel()
    events = await cluster.store.events(plan.id)
    me1, kids1 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cluster1 = await anyio.to_thread.run_sync(cpu_of, pids)
    assert all(t.state is TaskState.MERGED for t in status.tasks), [(t.id, t.state, t.reason) for t in status.tasks]

    def cpu(r: Any) -> float:
        return float(r.ru_utime + r.ru_stime)

    engine, children, nodes = cpu(me1) - cpu(me0), cpu(kids1) - cpu(kids0), cluster1 - cluster0
    moves: dict[str, dict[str, float]] = {}
    for event in events:
        if event["kind"] == "state" and event["task_id"]:
            at = datetime.fromisoformat(event["at"]).timestamp()
            moves.setdefault(event["task_id"], {}).setdefault(event["data"]["state"], at)
    agent = durations()
    beyond = [moves[t.id]["succeeded"] - moves[t.id]["running"] - agent[t.run_id] for t in status.tasks if t.run_id]
    return {
        "wall_s": round(wall, 2),
        "running_to_succeeded_beyond_agent_s_median": median(beyond),
        "cpu_total_s": round(engine + children + nodes, 1),
        "cpu_engine_s": round(engine, 1),
        "cpu_engine_children_s": round(children, 1),  # git, and local agents
        "cpu_cluster_s": round(nodes, 1),  # Ray's processes, slots and the agents on them
        # PSS: shared pages split between their users (the agents share claude's binary, the
        # slots Ray's libraries); the engine's process tree (local agents included), the cluster's
        **{f"peak_pss_{key}_mb": round(value / 2**20) for key, value in peak.peaks.items()},
        "load_average_1min": [round(load, 1), round(os.getloadavg()[0], 1)],  # other work on the box
    }


def median(values: list[float]) -> float:
    return round(statistics.median(values), 3) if values else 0.0


def ray_figures(placement: RayPlacement, first: int) -> dict[str, Any]:
    runs = [r for r in placement.placed[first:] if r.applied]
    return {
        "runs": len(runs),
        "nodes": {node: sum(r.node.address == node for r in runs) for node in (HEAD, WORKER)},
        "overhead_s_median": median([r.overhead_s for r in runs]),
        "overhead_s_p90": round(sorted(r.overhead_s for r in runs)[int(0.9 * (len(runs) - 1))], 3),
        "slot_and_bundle_out_s_median": median([r.accepted - r.requested for r in runs]),
        "checkout_to_agent_started_s_median": median([r.started - r.accepted for r in runs]),
        "result_back_and_applied_s_median": median([r.applied - r.started - r.agent_s for r in runs]),
        "agent_s_median": median([r.agent_s for r in runs]),
        "node_received_s_median": median([r.node_times["received"] - r.requested for r in runs]),
        "node_checkout_s_median": median([r.node_times["checked_out"] - r.node_times["received"] for r in runs]),
        "node_agent_wall_s_median": median([r.node_times["agent_done"] - r.node_times["checked_out"] for r in runs]),
        "node_result_s_median": median([r.node_times["result_ready"] - r.node_times["agent_done"] for r in runs]),
        "result_transit_s_median": median([r.finished - r.node_times["result_ready"] for r in runs]),
        "apply_s_median": median([r.applied - r.finished for r in runs]),
        "bundle_out_bytes": max(r.bundle_out for r in runs),
        "bundle_back_bytes_median": median([float(r.bundle_back) for r in runs]),
    }


def _commit(repo: Path, name: str, data: bytes) -> None:
    (repo / name).write_bytes(data)
    for args in (["add", "-A"], ["commit", "-qm", name]):
        subprocess.run(["git", "-C", str(repo), "-c", "user.name=b", "-c", "user.email=b@b", *args], check=True)


def _big_repo(tmp: Path, megabytes: int) -> tuple[Path, Path]:
    """A repository with ``megabytes`` MB of incompressible history, and an empty bare cache."""
    repo = make_repo(tmp / "big")
    for i in range(megabytes):
        _commit(repo, f"blob{i}.bin", os.urandom(1_000_000))
    subprocess.run(["git", "init", "-q", "--bare", str(tmp / "cache.git")], check=True)
    return repo, tmp / "cache.git"


async def bundles(tmp: Path, megabytes: int = 30) -> dict[str, Any]:
    """What a base costs a node: the whole history in a bundle and unbundled per run, against
    a slot's object cache that receives only what is new (the tip moved by one commit)."""
    repo, cache = await anyio.to_thread.run_sync(_big_repo, tmp, megabytes)
    identity = ("b", "b@b")
    first = await take_snapshot(repo, identity)  # a slot's first run: its cache gets it all
    await checkout_snapshot(tmp / "first" / "wt", await make_bundle(repo, first.tips), first, identity, cache=cache)
    await anyio.to_thread.run_sync(_commit, repo, "small.txt", b"small\n")
    snapshot = await take_snapshot(repo, identity)
    started = time.perf_counter()
    full = await make_bundle(repo, snapshot.tips)
    full_made = time.perf_counter()
    await checkout_snapshot(tmp / "full" / "wt", full, snapshot, identity)
    full_out = time.perf_counter()
    increment = await make_bundle(repo, snapshot.tips, exclude=[first.head])
    increment_made = time.perf_counter()
    await checkout_snapshot(tmp / "inc" / "wt", increment, snapshot, identity, cache=cache)
    increment_out = time.perf_counter()
    return {
        "history_mb": megabytes,
        "full_bundle_mb": round(len(full) / 1e6, 1),
        "full_bundle_s": round(full_made - started, 2),
        "full_checkout_s": round(full_out - full_made, 2),
        "incremental_bundle_kb": round(len(increment) / 1e3, 1),
        "incremental_bundle_s": round(increment_made - full_out, 3),
        "incremental_checkout_s": round(increment_out - increment_made, 3),
    }


@asynccontextmanager
async def model(tasks: int, latency: float) -> AsyncIterator[ScriptedModelServer]:
    async with ScriptedModelServer(load_scenario(write_scenario(tasks, latency, "ray"))) as server:
        yield server


async def bench(args: argparse.Namespace, address: str, node_pids: list[int], tmp: Path) -> dict[str, Any]:
    claude = find_claude()
    workers = 2 * args.slots
    tasks = [{"id": f"t{i}", "prompt": f"[ray{i}] write f{i}.txt"} for i in range(args.tasks)]
    (tmp / "home").mkdir()
    results: dict[str, Any] = {"tasks": args.tasks, "slots": f"2 nodes x {args.slots}", "latency_s": args.latency}
    idle = pss_of(node_pids)
    async with model(args.tasks, args.latency) as server:
        local = TimedLocal(claude)
        settings = settings_for(tmp, "local", server, workers)
        async with Cluster.open(bench_repo(tmp / "local" / "repo"), settings=settings, placement=local) as cluster:
            results["local"] = await one_round(cluster, tasks, [], lambda: local.durations, node_pids)
        results["local"]["overhead_s_median"] = median([wall - agent for wall, agent in local.runs])
        results["local"]["agent_s_median"] = median([agent for _, agent in local.runs])

        settings = settings_for(tmp, "ray", server, workers, placement="ray", ray_address=address)
        async with (
            RayPlacement.open(settings, claude) as placement,
            Cluster.open(bench_repo(tmp / "ray" / "repo"), settings=settings, placement=placement) as cluster,
        ):
            placement.pool.idle_keep = 3600  # the steady state of a long plan: slots stay busy
            for name in ("ray_cold", "ray_warm"):
                first = len(placement.placed)
                results[name] = await one_round(
                    cluster, tasks, node_pids, lambda: {r.run_id: r.agent_s for r in placement.placed}, node_pids
                )
                results[name].update(ray_figures(placement, first))
    results["bundles"] = await bundles(tmp)
    results["cluster_idle_pss_mb"] = round(idle / 2**20)
    results["overhead_s_median"] = results["ray_warm"]["overhead_s_median"]
    results["overhead_over_local_s_median"] = round(
        results["ray_warm"]["overhead_s_median"] - results["local"]["overhead_s_median"], 3
    )
    key = "running_to_succeeded_beyond_agent_s_median"
    results["task_cost_over_local_s_median"] = round(results["ray_warm"][key] - results["local"][key], 3)
    results["wall_ratio_warm_vs_local"] = round(results["ray_warm"]["wall_s"] / results["local"]["wall_s"], 2)
    return results


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=20)
    parser.add_argument("--slots", type=int, default=10, help="claude slots per node")
    parser.add_argument("--latency", type=float, default=2.0, help="model latency per turn (s)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ccrb"))  # short: Ray puts unix sockets below it
    token = tmp / "token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    os.environ.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)})
    env = {**os.environ, "CLAUDECLUSTER_CLAUDE_BIN": str(find_claude().path)}
    common = [f"--temp-dir={tmp}", f"--resources={json.dumps({'claude_slot': args.slots})}", "--num-cpus=2"]
    nodes = []
    try:
        started = time.monotonic()
        address = f"{HEAD}:{free_port()}"
        head = ["--head", f"--port={address.split(':')[1]}", "--include-dashboard=false"]
        nodes.append(start_node(HEAD, [*head, *common], env, tmp / "head.log"))
        nodes.append(start_node(WORKER, [f"--address={address}", *common], env, tmp / "worker.log"))
        cluster_start = time.monotonic() - started
        connect(address)  # before the event loop (Ray's advice)
        results = anyio.run(bench, args, address, [n.pid for n in nodes], tmp)
        results["cluster_start_s"] = round(cluster_start, 1)
    finally:
        disconnect()
        for node in reversed(nodes):
            stop_node(node)
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(results, indent=2))
    print(
        f"\nper-task overhead of Ray placement, median: {results['overhead_s_median']} s warm "
        f"({results['ray_cold']['overhead_s_median']} s with slots starting); target <= 0.5 s"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
