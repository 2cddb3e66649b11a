"""`claudecluster run` in a real terminal (a pty): live progress, the final summary, exit codes,
and Ctrl-C stopping every agent cleanly. Agents are the real `claude` against the scripted model."""

from __future__ import annotations

import contextlib
import re
import select
import sqlite3
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml
from ptyprocess import PtyProcess

from claudecluster_mcp.model_server import ScriptedModelServer, scripted_env
from claudecluster_mcp.proctree import RUN_TAG_VAR
from claudecluster_mcp.scenario import bash_turn, marker_rule, write_turn

pytestmark = pytest.mark.claude

ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]")


def spawn_cli(args: list[str], cwd: Path, env: dict[str, str]) -> PtyProcess:
    return PtyProcess.spawn(
        [sys.executable, "-m", "claudecluster_mcp.cli", *args], cwd=str(cwd), env=env, dimensions=(40, 160)
    )


def read_until(proc: PtyProcess, done: Callable[[str], bool], timeout: float) -> str:
    """Read the terminal until ``done(text so far)`` or EOF; fail after ``timeout`` s."""
    text = ""
    deadline = time.monotonic() + timeout
    while not done(text):
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"timed out; the terminal showed:\n{ANSI.sub('', text)[-3000:]}"
        ready, _, _ = select.select([proc.fd], [], [], min(remaining, 0.5))
        if ready:
            try:
                text += proc.read(65536).decode(errors="replace")
            except EOFError:
                break
    return text


def terminal_env(user_env: dict[str, str], model: ScriptedModelServer) -> dict[str, str]:
    """A user's environment (agents and the engine state stay inside tmp_path) in a terminal,
    with agents on the scripted model."""
    return {**user_env, **scripted_env(model.url), "TERM": "xterm-256color", "COLUMNS": "160"}


def tasks_file(tmp_path: Path, tasks: list[dict[str, Any]]) -> Path:
    path = tmp_path / "tasks.yaml"
    path.write_text(yaml.safe_dump({"tasks": tasks}))
    return path


def test_run_shows_live_progress_merges_and_exits_0(
    tmp_path: Path,
    repo: Path,
    user_env: dict[str, str],
    model_server: Callable[[dict[str, Any]], ScriptedModelServer],
) -> None:
    model = model_server(
        {
            "default_latency": 0.5,  # every turn: the live table shows the tasks running
            "rules": [marker_rule(n, write_turn(f"{n}.txt", f"{n}.txt\n")) for n in ("a", "b", "c")],
        }
    )
    tasks = tasks_file(
        tmp_path,
        [
            {"id": "a", "prompt": "[a] go"},
            {"id": "b", "prompt": "[b] go"},
            {"id": "c", "prompt": "[c] go", "deps": ["a", "b"]},
        ],
    )

    proc = spawn_cli(["run", "three files", "--tasks", str(tasks), "--merge"], repo, terminal_env(user_env, model))
    screen = read_until(proc, lambda text: False, timeout=120)
    proc.wait()

    plain = ANSI.sub("", screen)
    assert proc.exitstatus == 0, plain[-3000:]
    # The live table showed tasks running, then the summary: everything merged into main.
    assert "running" in plain and "final" in plain
    assert "3 tasks: 3 merged" in plain
    assert "merged into main" in plain
    assert all((repo / f"{n}.txt").read_text() == f"{n}.txt\n" for n in ("a", "b", "c"))


def test_ctrl_c_stops_every_agent_and_says_how_to_resume(
    tmp_path: Path,
    repo: Path,
    user_env: dict[str, str],
    model_server: Callable[[dict[str, Any]], ScriptedModelServer],
) -> None:
    sleeper = "python3 -c 'import time; time.sleep(120)'"
    model = model_server({"rules": [marker_rule(n, bash_turn(sleeper)) for n in ("x", "y")]})
    tasks = tasks_file(tmp_path, [{"id": "x", "prompt": "[x] go"}, {"id": "y", "prompt": "[y] go"}])
    env = terminal_env(user_env, model)

    proc = spawn_cli(["run", "sleepers", "--tasks", str(tasks), "--allowed-tool", "Bash"], repo, env)
    read_until(proc, lambda text: sum(r.turn == 0 for r in model.requests) >= 2, timeout=60)
    time.sleep(2)  # the Bash tools are running now
    db = repo / ".git" / "claudecluster" / "state.db"
    with contextlib.closing(sqlite3.connect(db)) as con:
        run_ids = [row[0] for row in con.execute("SELECT run_id FROM tasks WHERE state = 'running'")]
    assert len(run_ids) == 2
    proc.write(b"\x03")  # Ctrl-C, as a user types it
    screen = ANSI.sub("", read_until(proc, lambda text: False, timeout=60))
    proc.wait()

    assert proc.exitstatus == 130, screen[-2000:]
    match = re.search(r"resume with: claudecluster run --plan (p[0-9a-f]{8})", screen)
    assert match, screen[-2000:]
    survivors = []
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if p.environ().get(RUN_TAG_VAR) in run_ids and p.status() != psutil.STATUS_ZOMBIE:
                survivors.append(p.pid)
    assert survivors == []
    with contextlib.closing(sqlite3.connect(db)) as con:
        states = {row[0] for row in con.execute("SELECT state FROM tasks")}
        plan_state = con.execute("SELECT state FROM plans").fetchone()[0]
    # Nothing was lost: the tasks wait to be resumed, and the plan is still running.
    assert states == {"pending"} and plan_state == "running"
