"""The per-run reaper: orphans that dropped the run's tag and left its session are still the
run's, killed and reaped when the run is cancelled or ends. Real processes throughout; the
agent tests run the real `claude` against the scripted model."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import psutil
import pytest

from claudecluster_mcp import reaper
from claudecluster_mcp.agent import AgentRun
from claudecluster_mcp.agent_spec import AgentSpec
from claudecluster_mcp.claude_cli import ClaudeBinary
from claudecluster_mcp.model_server import ScriptedModelServer
from claudecluster_mcp.outcome import OutcomeStatus
from claudecluster_mcp.placement import LocalPlacement, RunRecord, _kill_leftovers
from claudecluster_mcp.proctree import RUN_TAG_VAR
from claudecluster_mcp.scenario import bash_turn, marker_rule

pytestmark = pytest.mark.anyio

StartServer = Callable[[dict[str, Any]], ScriptedModelServer]
SpecFor = Callable[..., AgentSpec]
REAPER = [sys.executable, "-I", "-S", reaper.__file__, "--"]


def escaping_sleepers(seconds: str, double: str) -> str:
    """A shell command leaving two sleepers that drop the run's tag (``env -i``) and leave
    its session (``setsid``): one orphaned once, one double-forked. Their durations are
    unique so that they can be found by command line."""
    return (
        f"(env -i setsid sleep {seconds} >/dev/null 2>&1 &) ; "
        f"(env -i setsid sh -c '(sleep {double} &) ; exit 0' >/dev/null 2>&1 &)"
    )


def unique_durations() -> tuple[str, str]:
    nonce = random.randrange(10**6, 10**7)
    return f"1000.{nonce}1", f"1000.{nonce}2"


def sleepers(*durations: str) -> list[psutil.Process]:
    """Processes (zombies included) running ``sleep <duration>`` for one of ``durations``."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if len(cmdline) == 2 and cmdline[0] == "sleep" and cmdline[1] in durations:
            found.append(proc)
    return found


def assert_gone(durations: tuple[str, str], pids: list[int]) -> None:
    """No sleeper and no recorded pid exists any more, not even as a zombie."""
    deadline = time.monotonic() + 3
    while sleepers(*durations) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sleepers(*durations) == []
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() != psutil.STATUS_ZOMBIE, pid


# -- the reaper on its own ------------------------------------------------------------------


def test_the_exit_code_and_the_signal_pass_through() -> None:
    exited = subprocess.run([*REAPER, "sh", "-c", "exit 3"], check=False)
    killed = subprocess.run([*REAPER, "sh", "-c", "kill -TERM $$"], check=False)
    missing = subprocess.run([*REAPER, "/nonexistent/claude"], capture_output=True, text=True, check=False)

    assert exited.returncode == 3
    assert killed.returncode == -signal.SIGTERM
    assert missing.returncode == 127 and "cannot start /nonexistent/claude" in missing.stderr


def test_a_forwarded_sigterm_reaches_the_command_and_its_signal_comes_back(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    command = f"trap 'exit 7' TERM; touch {ready}; while :; do sleep 0.05; done"
    proc = subprocess.Popen([*REAPER, "sh", "-c", command])
    while not ready.exists():
        time.sleep(0.02)

    proc.send_signal(signal.SIGTERM)

    assert proc.wait(10) == 7


def test_orphans_of_the_command_are_killed_and_reaped_when_it_ends() -> None:
    durations = unique_durations()
    started = time.monotonic()

    done = subprocess.run([*REAPER, "sh", "-c", escaping_sleepers(*durations)], timeout=30, check=False)

    assert done.returncode == 0
    assert time.monotonic() - started < 5
    assert_gone(durations, [])


def test_crash_recovery_kills_an_untagged_orphan_below_a_runs_reaper() -> None:
    # The engine died; the run's reaper lives on with an orphan that has no tag.
    durations = unique_durations()
    command = f"{escaping_sleepers(*durations)}; exec sleep 600"
    run_id = f"reaper-test-{durations[0]}"
    proc = subprocess.Popen([*REAPER, "sh", "-c", command], env={"PATH": "/usr/bin:/bin", RUN_TAG_VAR: run_id})
    deadline = time.monotonic() + 10
    while len(sleepers(*durations)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(RUN_TAG_VAR not in p.environ() for p in sleepers(*durations))
    record = RunRecord(run_id, proc.pid, psutil.Process(proc.pid).create_time())
    orphans = {p.pid for p in sleepers(*durations)}

    killed = _kill_leftovers(record)

    # The reaper reaped its killed orphans itself and exited as its command did.
    assert proc.wait(5) == -signal.SIGKILL
    assert orphans <= set(killed)
    assert_gone(durations, killed)


# -- with a real agent ----------------------------------------------------------------------


@pytest.mark.claude
@pytest.mark.parametrize("ending", ["cancelled", "ends-normally"])
async def test_orphans_that_dropped_the_tag_and_left_the_session_never_survive_a_run(
    claude: ClaudeBinary, repo: Path, model_server: StartServer, spec_for: SpecFor, ending: str
) -> None:
    durations = unique_durations()
    # The command outlives the sleepers' start long enough to look at them; when cancelled,
    # the CLI is still in it.
    command = escaping_sleepers(*durations) + ("; sleep 120" if ending == "cancelled" else "; sleep 3")
    server = model_server({"rules": [marker_rule("ESCAPE", bash_turn(command))]})
    run = AgentRun(spec_for(server, "[ESCAPE] go", repo, allowed_tools=["Bash"], cancel_grace=2), claude=claude)
    escaped: list[psutil.Process] = []

    async def watch() -> None:
        with anyio.fail_after(60):
            while len(escaped) < 2:
                escaped[:] = sleepers(*durations)
                await anyio.sleep(0.1)
        # The plant is real: no tag, and not below claude any more.
        assert all(RUN_TAG_VAR not in p.environ() for p in escaped)
        if ending == "cancelled":
            run.cancel()

    async with anyio.create_task_group() as tg:
        tg.start_soon(watch)
        with anyio.fail_after(90):
            outcome = await run.run()

    if ending == "cancelled":
        assert outcome.status is OutcomeStatus.CANCELLED, outcome.reason
    else:
        assert outcome.status is OutcomeStatus.SUCCEEDED, outcome.reason
        assert outcome.exit_code == 0 and outcome.signal is None
    assert_gone(durations, [p.pid for p in escaped])


@pytest.mark.anyio
async def test_recovery_of_a_run_killed_before_its_pid_was_recorded(claude: ClaudeBinary) -> None:
    # The engine can die between marking a task running and recording its agent's pid.
    assert await LocalPlacement(claude).reap(RunRecord(run_id="no-such-run", pid=None)) == []
