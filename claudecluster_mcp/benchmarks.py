"""``claudecluster bench``: run the benchmark scripts of a source checkout (``bench/*.py``)
and print one table of measured ratios against their targets (details: BENCHMARKS.md)."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from .errors import ConfigError

__all__ = ["BENCHES", "TIMED", "results_table", "run_benchmarks"]

# name -> (script in bench/, its arguments)
BENCHES = {
    "runner": ("bench_runner.py", []),
    "engine": ("bench_engine.py", ["plan1000", "scheduling", "speedup"]),
    "mcp": ("bench_mcp.py", []),
    "race": ("bench_race.py", []),
    "sandbox": ("bench_sandbox.py", []),
    "kill": ("bench_kill.py", []),
    "load": ("bench_load.py", []),
    "gate": ("bench_gate.py", []),
    "faults": ("bench_faults.py", ["--baseline"]),
    "storm": ("bench_storm.py", []),
    "ray": ("bench_ray.py", []),
}
# "Flat" RSS over the held load: what the allocator's noise allows, far below a leak's growth.
RSS_SLACK_MB = 2.0
# ... and descriptors: a client's connection being replaced at the moment of a sample.
FD_SLACK = 2
# Benchmarks that hold a load for a while: `claudecluster bench --duration S` sets how long.
TIMED = frozenset({"load"})


def run_benchmarks(console: Console, names: list[str], *, verbose: bool = False, duration: float | None = None) -> int:
    """Run the named benchmarks (keys of :data:`BENCHES`), print the table; exit code 0 when
    every one ran (whether its targets were met is in the table), else 1. ``duration``: the
    measured seconds of the :data:`TIMED` ones (default: each one's own)."""
    bench_dir = Path(__file__).resolve().parent.parent / "bench"
    if not bench_dir.is_dir():
        raise ConfigError(f"benchmarks not found at {bench_dir}; run `claudecluster bench` from a source checkout")
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="cc-bench-") as tmp:
        for name in names:
            script, extra = BENCHES[name]
            if duration is not None and name in TIMED:
                extra = [*extra, "--duration", f"{duration:g}"]
            out = Path(tmp) / f"{name}.json"
            console.print(f"[bold]running {script}[/] …")
            done = subprocess.run(
                [sys.executable, str(bench_dir / script), *extra, "--json", str(out)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL if not verbose else None,
                check=False,
            )
            if done.returncode != 0 or not out.exists():
                console.print(f"[red]{script} failed (exit {done.returncode})[/]")
                continue
            results[name] = json.loads(out.read_text())
    console.print(results_table(results))
    return 0 if len(results) == len(names) else 1


def _load_rows(load: dict[str, Any], row: Any) -> None:
    """The held-load benchmark's rows: latency on both sides, flat memory and descriptors, errors."""
    clients = load["setup"]["clients"]
    for label, p99 in (("client side", load["client"]["all"]["p99_ms"]), ("in the server", load["server"]["p99_ms"])):
        row(f"status p99 under load ({clients} client processes), {label}", p99, "<= 50 ms", p99 <= 50, " ms")
    rss, fds = load["rss_mb"], load["fds_held"]
    growth = round(rss["last"] - rss["first"], 1)
    row("server RSS growth over the held load", growth, f"flat (<= {RSS_SLACK_MB:g} MB)", growth <= RSS_SLACK_MB, " MB")
    fd_growth = fds["last"] - fds["first"]
    row("server open fds growth over the held load", fd_growth, f"flat (<= {FD_SLACK})", fd_growth <= FD_SLACK)
    row("errors under load", load["errors"]["count"], "0", load["errors"]["count"] == 0)


def results_table(results: dict[str, Any]) -> Table:
    """One row per measurement in the benchmarks' JSON results, with its target and whether
    it was met."""
    rows: list[tuple[str, str, str, bool]] = []

    def row(label: str, value: float, target: str, met: bool, unit: str = "") -> None:
        rows.append((label, f"{value:g}{unit}", target, met))

    if "runner" in results:
        overhead = results["runner"]["summary"]["overhead"]
        row("runner / direct claude -p (one run)", round(overhead["ratio"], 3), "<= 1.10", overhead["ratio"] <= 1.10)
    if "engine" in results:
        engine = results["engine"]
        if "scheduling" in engine:
            ratio = engine["scheduling"]["efficiency_ratio"]
            row("makespan / lower bound (200-task DAG)", ratio, "<= 1.05", ratio <= 1.05)
        if "speedup" in engine:
            speed = engine["speedup"]["speedup"]
            row("10 slots vs 1 slot (real claude)", speed, ">= 6 (brief 3)", speed >= 6, "x")
        if "plan1000" in engine:
            seconds = engine["plan1000"]["plan_validate_store_s_best"]
            row("1,000-task plan validated + stored", seconds, "<= 1 s", seconds <= 1, " s")
    if "mcp" in results:
        mcp = results["mcp"]
        for key, label, limit in [
            ("http_dispatch", "MCP dispatch p99, HTTP", 50),
            ("sse_dispatch", "MCP dispatch p99, SSE", 50),
            ("http_status", "MCP status p99, HTTP", 20),
            ("sse_status", "MCP status p99, SSE", 20),
        ]:
            row(label, mcp[key]["p99_ms"], f"<= {limit} ms", mcp[key]["p99_ms"] <= limit, " ms")
    if "race" in results:
        race = results["race"]
        row("race wall: claudecluster / bare claude -p", race["wall_ratio"], "<= 1.1", race["wall_ratio"] <= 1.1)
        row("race memory: claudecluster / bare", race["memory_ratio"], "<= 1.1", race["memory_ratio"] <= 1.1)
    if "sandbox" in results:
        sandbox = results["sandbox"]
        # A cost to know, not a bar to pass: the sandbox is on by default either way.
        row("agent run, sandbox / none: wall", sandbox["wall_ratio"], "measured", True, "x")
        row("agent run, sandbox / none: CPU", sandbox["cpu_ratio"], "measured", True, "x")
    if "kill" in results:
        kill = results["kill"]
        held, total = sum(kill["checks"].values()), len(kill["checks"])
        label = f"kill -9 x{kill['kills']} of a {kill['tasks']}-task run: invariants held"
        row(label, held, f"{total} of {total}", held == total, f" of {total}")
    if "load" in results:
        _load_rows(results["load"], row)
    if "gate" in results:
        gate = results["gate"]
        # Time a 5 s gate added to 20 tasks on 10 workers, in gate durations.
        row("batched gate: added / gate duration", gate["gate_overhead"], "<= 3", gate["gate_overhead"] <= 3)
        row("… with one bad task", gate["bad_overhead"], "<= 8", gate["bad_overhead"] <= 8)
    if "faults" in results:
        rows.extend(_fault_rows(results["faults"]))
    if "storm" in results:
        rows.extend(_storm_rows(results["storm"]))
    if "ray" in results:
        ray = results["ray"]
        warm, cold = ray["ray_warm"]["overhead_s_median"], ray["ray_cold"]["overhead_s_median"]
        row("Ray placement: per-task overhead, median", warm, "<= 0.5 s", warm <= 0.5, " s")
        row("Ray placement: the same while slots start", cold, "measured", True, " s")
        row("Ray (2 nodes x 10) / local (20 slots): wall", ray["wall_ratio_warm_vs_local"], "measured", True, "x")
    table = Table(title="claudecluster benchmarks (details: BENCHMARKS.md)", title_justify="left")
    for column in ("measurement", "measured", "target", ""):
        table.add_column(column)
    for label, value, target, met in rows:
        table.add_row(label, value, target, "[green]met[/]" if met else "[red]not met[/]")
    return table


def _fault_rows(faults: dict[str, Any]) -> list[tuple[str, str, str, bool]]:
    """The fault suite's invariants (bench_faults.py)."""
    tasks = faults["total"]
    share = 100 * faults["merged_share"]
    unexplained = len(faults["unexplained"])
    rows = [
        (f"faults: {tasks} tasks merged", f"{share:.2f} %", ">= 99.5 %", share >= 99.5),
        ("faults: not merged without a reason naming the fault", str(unexplained), "0", unexplained == 0),
    ]
    for key, label in [
        ("lost", "tasks lost"),
        ("merged_twice", "tasks merged twice"),
        ("leftover_pids", "processes left"),
    ]:
        rows.append((f"faults: {label}", str(len(faults[key])), "0", not faults[key]))
    for kind, row in faults["per_kind"].items():
        if kind != "(none)":
            done = f"{row['merged']}/{row['injected']} merged, {row['lost_s']:g} task-s lost"
            rows.append((f"faults: {kind}", done, "measured", True))
    lost = sum(row["lost_s"] for kind, row in faults["per_kind"].items() if kind != "(none)")
    rows.append(("faults: task-seconds lost to faults", f"{lost:g} s", "measured", True))
    if faults.get("baseline_makespan_s"):
        spans = f"{faults['makespan']:.0f} s / {faults['baseline_makespan_s']:.0f} s"
        rows.append(("faults: makespan with / without faults", spans, "measured", True))
    return rows


def _storm_rows(storm: dict[str, Any]) -> list[tuple[str, str, str, bool]]:
    """The rate-limit storm runs against the run without a storm (bench_storm.py)."""
    rows = []
    for mode, run in storm["runs"].items():
        if "makespan_ratio" not in run:
            continue
        rows.append(
            (
                f"{mode}: makespan / (storm + 1.2 x no storm)",
                f"{run['makespan_ratio']:g}",
                "<= 1",
                run["makespan_ratio"] <= 1,
            )
        )
        rows.append(
            (
                f"{mode}: requests in storm / (3 x workers)",
                f"{run['requests_ratio']:g}",
                "<= 1",
                run["requests_ratio"] <= 1,
            )
        )
        failed = len(run["not_merged"])
        rows.append((f"{mode}: tasks failed", str(failed), "0", failed == 0))
        if run.get("storm_missed_the_run"):
            rows.append((f"{mode}: the storm came during the run", "no", "yes", False))
    return rows
