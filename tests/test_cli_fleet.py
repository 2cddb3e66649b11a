"""What a person reads after a run, at 80 columns, and `claudecluster watch` following a plan
that another process runs (real processes, real `claude` against the scripted model)."""

from __future__ import annotations

import contextlib
import re
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from claudecluster_mcp.model_server import ScriptedModelServer, scripted_env
from claudecluster_mcp.scenario import marker_rule, write_turn

pytestmark = pytest.mark.claude

Cli = Callable[..., subprocess.CompletedProcess[str]]


def tasks_file(tmp_path: Path, ids: list[str]) -> Path:
    path = tmp_path / "tasks.yaml"
    path.write_text(yaml.safe_dump({"tasks": [{"id": i, "prompt": f"[{i}] go"} for i in ids]}))
    return path


def test_run_merge_with_a_gate_failure_says_in_one_line_how_to_land_the_rest(
    tmp_path: Path,
    repo: Path,
    user_env: dict[str, str],
    cli: Cli,
    git: Callable[..., str],
    model_server: Callable[[dict[str, Any]], ScriptedModelServer],
) -> None:
    ids = ["export-csv-with-delimiter", "break-the-help-output", "add-zsh-completion"]
    model = model_server(
        {"rules": [marker_rule(i, write_turn(f"{i}.txt", "bad\n" if "break" in i else "ok\n")) for i in ids]}
    )
    # The gate fails when any file says "bad", printing a long test-runner-like report.
    gate = tmp_path / "gate.py"
    gate.write_text(
        "import glob, sys\n"
        "print('=== test session starts ===\\n' * 30)\n"
        "sys.exit(any(open(f).read() == 'bad\\n' for f in glob.glob('*.txt')))\n"
    )
    env = {**user_env, **scripted_env(model.url), "COLUMNS": "80"}

    ran = cli(
        "run",
        "three changes",
        "--tasks",
        str(tasks_file(tmp_path, ids)),
        "--gate",
        f"{sys.executable} {gate}",
        "--merge",
        cwd=repo,
        env=env,
    )

    lines = ran.stdout.splitlines()
    assert ran.returncode == 1, ran.stdout + ran.stderr
    # Every line fits in 80 columns but the one saying what landed (the terminal wraps it).
    assert all(len(line) <= 80 for line in lines if not line.startswith("not landed:")), ran.stdout
    for task_id in ids:  # one line per task, its id whole
        assert len([line for line in lines if re.match(rf"{task_id} +(merged|gate_failed) ", line)]) == 1, ran.stdout
    plan_id = re.search(r"plan (p[0-9a-f]{8})", ran.stdout)
    assert plan_id, ran.stdout
    land = f"claudecluster merge {plan_id[1]}"
    said = [line for line in lines if line.startswith("not landed:")]
    assert said == [
        f"not landed: 1 of 3 tasks did not merge (break-the-help-output gate_failed); the 2 that passed are on "
        f"claudecluster/{plan_id[1]}/integration; land them with: {land}"
    ], ran.stdout
    assert "break-the-help-output (gate_failed): gate failed (exit 1):" in ran.stdout  # below the table
    assert git(repo, "ls-files").split() == ["README.md"]  # nothing landed

    landed = cli("merge", plan_id[1], cwd=repo, env=env)  # the exact command it gave

    assert landed.returncode == 0, landed.stderr
    assert git(repo, "ls-files").split() == ["README.md", "add-zsh-completion.txt", "export-csv-with-delimiter.txt"]


def _running_plan(db: Path) -> str | None:
    if not db.exists():
        return None
    with contextlib.suppress(sqlite3.Error), contextlib.closing(sqlite3.connect(db, timeout=5)) as con:
        row = con.execute("SELECT id FROM plans WHERE state = 'running'").fetchone()
        return str(row[0]) if row else None
    return None


def test_watch_follows_a_plan_another_process_runs_until_it_is_final(
    tmp_path: Path,
    repo: Path,
    user_env: dict[str, str],
    cli: Cli,
    model_server: Callable[[dict[str, Any]], ScriptedModelServer],
) -> None:
    ids = ["alpha", "beta"]
    model = model_server(
        {"default_latency": 1.5, "rules": [marker_rule(i, write_turn(f"{i}.txt", f"{i}\n")) for i in ids]}
    )
    env = {**user_env, **scripted_env(model.url), "COLUMNS": "100"}
    command = [
        sys.executable,
        "-m",
        "claudecluster_mcp.cli",
        "run",
        "two files",
        "--tasks",
        str(tasks_file(tmp_path, ids)),
    ]
    with (
        (tmp_path / "run.err").open("w") as err,
        subprocess.Popen(
            command, cwd=repo, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err
        ) as runner,
    ):
        try:
            deadline = time.monotonic() + 60
            while (plan_id := _running_plan(repo / ".git" / "claudecluster" / "state.db")) is None:
                assert runner.poll() is None and time.monotonic() < deadline, "the run never started its plan"
                time.sleep(0.2)
            assert runner.poll() is None  # the plan is still running when watch starts

            watched = cli("watch", cwd=repo, env=env, timeout=120)  # a second process, beside the engine

            assert runner.wait(timeout=60) == 0, (tmp_path / "run.err").read_text()
        finally:
            if runner.poll() is None:
                runner.kill()
    again = cli("watch", plan_id, cwd=repo, env=env)  # a final plan: shown, and done
    unknown = cli("watch", "pdeadbeef", cwd=repo, env=env)

    assert watched.returncode == 0, watched.stdout + watched.stderr
    assert f"plan {plan_id}: two files" in watched.stdout
    assert "2 tasks: 2 merged" in watched.stdout
    assert [line.split()[:2] for line in watched.stdout.splitlines() if line.split()[:1] in (["alpha"], ["beta"])] == [
        ["alpha", "merged"],
        ["beta", "merged"],
    ]
    assert again.returncode == 0 and "2 tasks: 2 merged" in again.stdout, again.stderr
    assert unknown.returncode == 2 and "pdeadbeef" in unknown.stderr
