"""The server's Prometheus metrics (served at ``/metrics`` over HTTP): tasks by state,
agents running, queue depth, merge outcomes, MCP tool latency and errors, and every MCP
request's time in the server."""

from __future__ import annotations

import time
from typing import Any

from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.types.methods import SPEC_CLIENT_METHODS
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .hub import Hub
from .models import TaskState

__all__ = ["LATENCY_BUCKETS", "Metrics"]

#: Latency buckets (s), fine below 100 ms where the MCP latency targets are.
LATENCY_BUCKETS = (
    *(0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1),
    *(0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)


class Metrics:
    """Prometheus metrics of one server (a private registry, so tests can build several)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.tasks = Gauge("claudecluster_tasks", "Tasks by state", ["state"], registry=self.registry)
        self.agents = Gauge("claudecluster_agents_running", "Agent processes running", registry=self.registry)
        self.queue = Gauge("claudecluster_queue_depth", "Tasks ready and waiting for a slot", registry=self.registry)
        self.merges = Gauge(
            "claudecluster_merge_outcomes", "Tasks by merge outcome", ["outcome"], registry=self.registry
        )
        self.latency = Histogram(
            "claudecluster_tool_seconds",
            "MCP tool latency",
            ["tool"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.requests = Histogram(
            "claudecluster_request_seconds",
            "MCP requests in the server, from the decoded message to its result",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.errors = Counter("claudecluster_tool_errors", "MCP tool errors", ["tool"], registry=self.registry)

    def observe(self, tool: str, seconds: float, failed: bool) -> None:
        """Record one tool call."""
        self.latency.labels(tool).observe(seconds)
        if failed:
            self.errors.labels(tool).inc()

    async def timed(self, ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> HandlerResult:
        """MCP server middleware timing every request into :attr:`requests`, whatever the
        transport (clients' own timings include their machine's scheduling; this does not)."""
        started = time.perf_counter()
        try:
            return await call_next(ctx)
        finally:
            if ctx.request_id is not None:  # not a notification
                # Only the spec's method names: a label per made-up name would grow forever.
                method = ctx.method if ctx.method in SPEC_CLIENT_METHODS else "other"
                self.requests.labels(method).observe(time.perf_counter() - started)

    async def refresh(self, hub: Hub) -> None:
        """Recompute the gauges from the open clusters."""
        counts: dict[str, int] = dict.fromkeys((s.value for s in TaskState), 0)
        running = 0
        for cluster in hub.clusters:
            running += cluster.running
            for plan in await cluster.overview():
                for state, count in plan.counts.items():
                    counts[state] = counts.get(state, 0) + count
        for state, count in counts.items():
            self.tasks.labels(state).set(count)
        self.agents.set(running)
        self.queue.set(counts[TaskState.READY.value])
        for outcome in (TaskState.MERGED, TaskState.CONFLICTED, TaskState.GATE_FAILED):
            self.merges.labels(outcome.value).set(counts[outcome.value])
