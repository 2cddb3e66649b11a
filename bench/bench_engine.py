"""Engine benchmarks (results in BENCHMARKS.md).

    .venv/bin/python bench/bench_engine.py [scheduling] [speedup] [plan1000]

scheduling  seeded random 200-task DAG on 20 slots with scripted task durations, run by a
            stand-in agent executable (bench/standin_claude.sh): makespan divided by the
            lower bound max(critical path, total work / slots). Target <= 1.05.
speedup     10 independent 2-turn tasks, real `claude` against the scripted model with 5 s
            latency per turn: 10 slots vs 1 slot. Target >= 6x (brief: 3x). Also reports
            the CPU ceiling on this machine: claude start-up is CPU-bound.
plan1000    a 1,000-task plan validated and stored. Target <= 1 s.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _common import make_repo, write_scenario  # noqa: E402

from claudecluster_mcp.claude_cli import ClaudeBinary, find_claude  # noqa: E402
from claudecluster_mcp.engine import Cluster, EngineSettings  # noqa: E402
from claudecluster_mcp.graph import TaskGraph  # noqa: E402
from claudecluster_mcp.model_server import ScriptedModelServer, scripted_env  # noqa: E402
from claudecluster_mcp.models import TaskSpec, TaskState  # noqa: E402
from claudecluster_mcp.preflight import SKIP_VAR  # noqa: E402
from claudecluster_mcp.scenario import load_scenario  # noqa: E402


def random_dag(n: int, seed: int) -> tuple[list[dict[str, Any]], dict[str, float]]:
    rng = random.Random(seed)
    tasks, durations = [], {}
    for i in range(n):
        tid = f"t{i:03d}"
        window = list(range(max(0, i - 30), i))
        deps = sorted({f"t{j:03d}" for j in rng.sample(window, k=min(len(window), rng.choice([0, 0, 1, 1, 2, 3])))})
        durations[tid] = round(rng.uniform(1.0, 4.0), 2)
        tasks.append({"id": tid, "prompt": f"work sleep={durations[tid]}", "deps": deps})
    return tasks, durations


def times_from_events(events: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for event in events:
        if event["kind"] == "state" and event["task_id"]:
            stamp = datetime.fromisoformat(event["at"]).timestamp()
            out.setdefault(event["task_id"], {}).setdefault(event["data"]["state"], stamp)
    return out


async def scheduling(n: int = 200, slots: int = 20, seed: int = 7) -> dict[str, Any]:
    tasks, durations = random_dag(n, seed)
    specs = [TaskSpec.model_validate(t) for t in tasks]
    critical = sum(durations[t] for t in TaskGraph(specs).critical_path(durations))
    total = sum(durations.values())
    bound = max(critical, total / slots)
    standin = ClaudeBinary(path=ROOT / "bench" / "standin_claude.sh", version="2.1.332")
    with tempfile.TemporaryDirectory(prefix="cc-bench-") as tmp:
        repo = make_repo(Path(tmp) / "repo")
        # The stand-in agent needs no model: no pre-flight model check.
        settings = EngineSettings(
            workers=slots, state_dir=Path(tmp) / "state", inactivity_timeout=60, agent_env={SKIP_VAR: "1"}
        )
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        async with Cluster.open(repo, settings=settings, claude=standin) as cluster:
            plan = (await cluster.plan("scheduling benchmark", tasks)).plan
            started = time.monotonic()
            await cluster.dispatch(plan.id)
            status = await cluster.wait(plan.id, timeout=600)
            makespan = time.monotonic() - started
            events = await cluster.store.events(plan.id)
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    assert all(t.state is TaskState.MERGED for t in status.tasks), "not every task merged"
    stamps = times_from_events(events)
    to_merge = [s["merged"] - s["succeeded"] for s in stamps.values() if "merged" in s and "succeeded" in s]
    # Dispatch latency: from the last dependency merged to the task running.
    waits = []
    for t in status.tasks:
        if t.deps:
            ready_at = max(stamps[d]["merged"] for d in t.deps)
            waits.append(stamps[t.id]["running"] - ready_at)
    # Where the time went along the critical path.
    chain = TaskGraph(specs).critical_path(durations)
    by_id = {t.id: t for t in status.tasks}
    ready_wait = start_cost = merge_cost = 0.0
    for tid in chain:
        s = stamps[tid]
        deps_done = max((stamps[d]["merged"] for d in by_id[tid].deps), default=s.get("ready", s["running"]))
        ready_wait += s["running"] - deps_done
        start_cost += (s["succeeded"] - s["running"]) - durations[tid]
        merge_cost += s["merged"] - s["succeeded"]
    return {
        "tasks": n,
        "slots": slots,
        "critical_chain_tasks": len(chain),
        "chain_dispatch_s": round(ready_wait, 2),
        "chain_agent_overhead_s": round(start_cost, 2),
        "chain_merge_s": round(merge_cost, 2),
        "total_work_s": round(total, 1),
        "critical_path_s": round(critical, 1),
        "lower_bound_s": round(bound, 1),
        "makespan_s": round(makespan, 1),
        "efficiency_ratio": round(makespan / bound, 3),
        "agent_done_to_merged_ms_mean": round(1000 * sum(to_merge) / len(to_merge), 1),
        "deps_merged_to_running_ms_mean": round(1000 * sum(waits) / len(waits), 1),
        "engine_cpu_ms_per_task": round(
            1000 * ((cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)) / n, 1
        ),
    }


SPEEDUP_TASKS = 10


async def _speedup_run(workers: int, latency: float, claude: ClaudeBinary) -> tuple[float, float]:
    scenario = load_scenario(write_scenario(SPEEDUP_TASKS, latency, "speed"))
    tasks = [{"id": f"s{i}", "prompt": f"[speed{i}] write f{i}.txt"} for i in range(SPEEDUP_TASKS)]
    with tempfile.TemporaryDirectory(prefix="cc-bench-") as tmp:
        repo = make_repo(Path(tmp) / "repo")
        async with ScriptedModelServer(scenario) as server:
            settings = EngineSettings(
                workers=workers,
                state_dir=Path(tmp) / "state",
                claude_config_dir=Path(tmp) / "claude-config",
                agent_env=scripted_env(server.url),
                inactivity_timeout=120,
            )
            children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            async with Cluster.open(repo, settings=settings, claude=claude) as cluster:
                plan = (await cluster.plan("speed-up benchmark", tasks)).plan
                started = time.monotonic()
                await cluster.dispatch(plan.id)
                status = await cluster.wait(plan.id, timeout=900)
                wall = time.monotonic() - started
            children1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert all(t.state is TaskState.MERGED for t in status.tasks), [(t.id, t.state, t.reason) for t in status.tasks]
    cpu = (children1.ru_utime + children1.ru_stime) - (children0.ru_utime + children0.ru_stime)
    return wall, cpu


async def speedup(latency: float = 5.0) -> dict[str, Any]:
    claude = find_claude()
    parallel, cpu_parallel = await _speedup_run(SPEEDUP_TASKS, latency, claude)
    serial, cpu_serial = await _speedup_run(1, latency, claude)
    cores = os.cpu_count() or 1
    cpu_per_task = cpu_serial / SPEEDUP_TASKS
    one_task = serial / SPEEDUP_TASKS
    ideal_parallel = max(one_task, SPEEDUP_TASKS * cpu_per_task / cores)
    return {
        "tasks": SPEEDUP_TASKS,
        "latency_per_turn_s": latency,
        "wall_1_slot_s": round(serial, 1),
        "wall_10_slots_s": round(parallel, 1),
        "speedup": round(serial / parallel, 2),
        "cpu_s_per_task": round(cpu_per_task, 2),
        "cpu_s_total_10_slots": round(cpu_parallel, 1),
        "cores": cores,
        "ceiling_speedup": round(serial / ideal_parallel, 2),
        "share_of_ceiling": round((serial / parallel) / (serial / ideal_parallel), 2),
    }


async def plan1000(n: int = 1000) -> dict[str, Any]:
    tasks, _ = random_dag(n, seed=11)
    standin = ClaudeBinary(path=ROOT / "bench" / "standin_claude.sh", version="2.1.332")
    with tempfile.TemporaryDirectory(prefix="cc-bench-") as tmp:
        repo = make_repo(Path(tmp) / "repo")
        settings = EngineSettings(state_dir=Path(tmp) / "state")
        async with Cluster.open(repo, settings=settings, claude=standin) as cluster:
            timings = []
            for _ in range(3):
                started = time.perf_counter()
                status = await cluster.plan("big plan", tasks)
                timings.append(time.perf_counter() - started)
            status_timings = []
            for _ in range(5):
                started = time.perf_counter()
                await cluster.status(status.plan.id)
                status_timings.append(time.perf_counter() - started)
    return {
        "tasks": n,
        "plan_validate_store_s_best": round(min(timings), 3),
        "plan_validate_store_s_worst": round(max(timings), 3),
        "status_read_ms_best": round(1000 * min(status_timings), 1),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", nargs="*", default=["plan1000", "scheduling", "speedup"])
    parser.add_argument("--latency", type=float, default=5.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results: dict[str, Any] = {}
    for name in args.which:
        print(f"running {name} …", file=sys.stderr, flush=True)
        if name == "scheduling":
            results[name] = await scheduling()
        elif name == "speedup":
            results[name] = await speedup(args.latency)
        elif name == "plan1000":
            results[name] = await plan1000()
        else:
            parser.error(f"unknown benchmark {name}")
        print(json.dumps({name: results[name]}, indent=2), flush=True)
    targets = {
        ("scheduling", "efficiency_ratio"): "<= 1.05",
        ("speedup", "speedup"): ">= 6 (brief: 3)",
        ("plan1000", "plan_validate_store_s_best"): "<= 1 s",
    }
    print("\nbenchmark    metric                          measured   target")
    for name, values in results.items():
        for metric, value in values.items():
            print(f"{name:<12} {metric:<31} {value!s:<10} {targets.get((name, metric), '')}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    anyio.run(main)
