"""What bench_load.py measures with, and how it sums up: the server process sampler
(/proc), Prometheus histograms scraped from /metrics, percentiles and slopes."""

from __future__ import annotations

import math
import os
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families

Buckets = dict[str, dict[float, float]]  # "<histogram>/<label value>" -> {upper bound: cumulative count}


class Sampler:
    """Samples a process's RSS (VmRSS), open file descriptors and CPU time, a count of running
    agents and the machine's load average, every ``every`` s in a thread; :attr:`series`
    holds the samples."""

    def __init__(self, pid: int, agents: Callable[[], int], every: float) -> None:
        self.pid = pid
        self.series: list[dict[str, Any]] = []
        self._agents = agents
        self._every = every
        self._process = psutil.Process(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def sample(self) -> dict[str, Any]:
        """One sample now (also added to :attr:`series`)."""
        with open(f"/proc/{self.pid}/status") as status:
            rss_kb = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
        cpu = self._process.cpu_times()
        try:
            agents = self._agents()
        except Exception:  # a slow /health is not the sampler's failure
            agents = -1
        kinds = fd_kinds(self.pid)
        found = {
            "t": time.monotonic(),
            "rss_mb": round(rss_kb / 1024, 1),
            "fds": sum(kinds.values()),
            # Less the /proc files the agents' memory scans hold open for a moment.
            "fds_held": sum(n for kind, n in kinds.items() if not kind.startswith("/proc")),
            "fd_kinds": kinds,
            "cpu_s": cpu.user + cpu.system,
            "agents": agents,
            "load1": os.getloadavg()[0],
        }
        self.series.append(found)
        return found

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            try:
                self.sample()
            except (OSError, StopIteration, psutil.Error):
                return  # the process ended

    def start(self) -> Sampler:
        """Start sampling in the background."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop sampling."""
        self._stop.set()
        self._thread.join()


def fd_kinds(pid: int) -> dict[str, int]:
    """The open file descriptors of ``pid`` by kind (socket, pipe, anon_inode:[eventfd], a
    path's directory …)."""
    kinds: dict[str, int] = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue  # closed meanwhile
        kind = target.split(":")[0] if ":" in target and not target.startswith("/") else os.path.dirname(target)
        kinds[kind] = kinds.get(kind, 0) + 1
    return dict(sorted(kinds.items()))


def cpu_seconds(server_pid: int, client_pids: list[int]) -> dict[str, float]:
    """CPU seconds used so far by the server, its agents (every process below it), the
    clients, this process (the scripted model server, the sampler) and the whole machine
    (busy time of all cores): the difference of two readings says who used the machine."""

    def used(process: psutil.Process) -> float:
        try:
            times = process.cpu_times()
        except psutil.Error:
            return 0.0
        return times.user + times.system

    server = psutil.Process(server_pid)
    machine = psutil.cpu_times()
    return {
        "server": used(server),
        "agents": sum(used(p) for p in server.children(recursive=True)),
        "clients": sum(used(psutil.Process(pid)) for pid in client_pids if psutil.pid_exists(pid)),
        "bench": used(psutil.Process()),
        "machine": sum(getattr(machine, f, 0.0) for f in ("user", "nice", "system", "irq", "softirq", "steal")),
    }


def cores_used(before: dict[str, float], after: dict[str, float], seconds: float) -> dict[str, float]:
    """Cores used on average between two :func:`cpu_seconds` readings, and by other processes."""
    used = {key: round((after[key] - before[key]) / seconds, 2) for key in before}
    ours = sum(value for key, value in used.items() if key != "machine")
    return {**used, "others": round(used["machine"] - ours, 2)}


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (nearest rank) of ``values``."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary(seconds: list[float]) -> dict[str, float]:
    """n, p50, p99 and max (ms) of latencies in seconds."""
    if not seconds:
        return {"n": 0, "p50_ms": math.nan, "p99_ms": math.nan, "max_ms": math.nan}
    ms = [1000 * s for s in seconds]
    return {
        "n": len(ms),
        "p50_ms": round(statistics.median(ms), 1),
        "p99_ms": round(percentile(ms, 0.99), 1),
        "max_ms": round(max(ms), 1),
    }


def window_samples(clients: list[dict[str, Any]], start: float, end: float, transport: str) -> list[list[Any]]:
    """The calls of ``transport`` clients that started inside [start, end]."""
    return [s for c in clients if c.get("transport") == transport for s in c["samples"] if start <= s[0] <= end]


def scrape(url: str, token: str) -> Buckets:
    """The latency histograms of the server's /metrics, by label value."""
    text = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {token}"}, timeout=30).text
    found: Buckets = {}
    for family in text_string_to_metric_families(text):
        if family.name not in ("claudecluster_request_seconds", "claudecluster_tool_seconds"):
            continue
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                label = sample.labels.get("method") or sample.labels.get("tool", "")
                found.setdefault(f"{family.name}/{label}", {})[float(sample.labels["le"])] = sample.value
    return found


def histogram(before: dict[float, float], after: dict[float, float]) -> dict[str, float]:
    """n, p50, p99 (interpolated inside its bucket, as Prometheus does) and the share of
    observations within 50 ms, of what a cumulative histogram gained between two scrapes."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    n = counts[-1] if counts else 0.0
    if n == 0:
        return {"n": 0, "p50_ms": math.nan, "p99_ms": math.nan, "within_50ms": math.nan}

    def quantile(q: float) -> float:
        rank, lower, below = q * n, 0.0, 0.0
        for bound, count in zip(bounds, counts, strict=True):
            if count >= rank:
                if math.isinf(bound):
                    return lower
                return lower + (bound - lower) * (rank - below) / max(count - below, 1e-9)
            lower, below = bound, count
        return lower

    within = counts[bounds.index(0.05)] / n if 0.05 in bounds else math.nan
    return {
        "n": int(n),
        "p50_ms": round(1000 * quantile(0.5), 1),
        "p99_ms": round(1000 * quantile(0.99), 1),
        "within_50ms": round(within, 4),
    }


def server_latency(before: Buckets, after: Buckets) -> dict[str, Any]:
    """The window's server-side latency: whole MCP `tools/call` requests, and the `status`
    tool function alone."""
    request = "claudecluster_request_seconds/tools/call"
    tool = "claudecluster_tool_seconds/status"
    whole = histogram(before.get(request, {}), after.get(request, {}))
    return {**whole, "status_tool_only": histogram(before.get(tool, {}), after.get(tool, {}))}


def slope_per_min(series: list[dict[str, Any]], key: str) -> float:
    """Least-squares slope of ``key`` over time, per minute."""
    if len(series) < 2:
        return 0.0
    ts = [s["t"] / 60 for s in series]
    ys = [float(s[key]) for s in series]
    mean_t, mean_y = statistics.fmean(ts), statistics.fmean(ys)
    var = sum((t - mean_t) ** 2 for t in ts)
    return sum((t - mean_t) * (y - mean_y) for t, y in zip(ts, ys, strict=True)) / var if var else 0.0


def series_stats(
    series: list[dict[str, Any]], key: str, before: dict[str, Any], after: dict[str, Any]
) -> dict[str, float]:
    """First and last sample of the window, min, max, slope per minute, and the value before
    the clients came and after they left."""
    values = [s[key] for s in series]
    return {
        "first": values[0] if values else math.nan,
        "last": values[-1] if values else math.nan,
        "min": min(values, default=math.nan),
        "max": max(values, default=math.nan),
        "slope_per_min": round(slope_per_min(series, key), 3),
        "samples": len(values),
        "before_clients": before[key],
        "after_clients": after[key],
    }
