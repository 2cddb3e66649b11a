"""Held load, the short version of `claudecluster bench --only load`: MCP clients, each its own
process, poll `status` over Streamable HTTP and SSE of one `claudecluster serve` while real
agents run. No call may fail, and the server may keep no descriptor or session per client.
Latency is the benchmark's subject, not this test's (a shared 2-core box is too noisy)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import bench_load

pytestmark = pytest.mark.claude


def test_client_processes_polling_status_over_http_and_sse_get_answers_and_leave_nothing_behind() -> None:
    short = ["--clients", "6", "--agents", "2", "--duration", "6", "--warmup", "1", "--settle", "1.5"]
    opts = bench_load.parse_args([*short, "--sample-every", "1", "--turn-latency", "2"])
    result = bench_load.run(opts)

    assert result["errors"]["count"] == 0, result["errors"]
    client = result["client"]
    assert client["http"]["n"] >= 3 * 4 and client["sse"]["n"] >= 3 * 4  # 3 clients x 6 s each, at least 4 s of it
    assert result["agents_running"] == {"min": 2, "max": 2}
    # The server timed the same calls (its window is the benchmark's, give or take a second).
    assert abs(result["server"]["n"] - client["all"]["n"]) <= opts.clients * 2
    # Flat descriptors: none per call while polling, none per session once the clients left.
    fds = result["fds_held"]
    assert fds["max"] - fds["min"] <= 3, result["series"]
    assert fds["after_clients"] <= fds["before_clients"] + 1, fds
    assert result["processes_left"] == []
