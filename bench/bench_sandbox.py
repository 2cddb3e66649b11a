"""The cost of `isolation = "sandbox"`: one agent run (a Bash command, a Write, then "done")
under Claude Code's sandbox vs the same run unconfined, alternating, same process, same
scripted model (no latency). Wall time and CPU per run; median of the pairs.

    .venv/bin/python bench/bench_sandbox.py [--pairs 8] [--commands 1] [--json FILE]

``--commands N`` makes the run N Bash commands (one per turn) instead of one, which splits
the sandbox's cost into a per-run and a per-command part.

CPU is `getrusage(RUSAGE_CHILDREN)` per run: claude and every process it (or we, as the
subreaper, after each run) reaped — bubblewrap and socat included.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _common import make_repo  # noqa: E402

from claudecluster_mcp.agent import AgentRun  # noqa: E402
from claudecluster_mcp.agent_spec import AgentSpec  # noqa: E402
from claudecluster_mcp.claude_cli import ClaudeBinary, find_claude  # noqa: E402
from claudecluster_mcp.isolation import SandboxPolicy, require_isolation  # noqa: E402
from claudecluster_mcp.model_server import ScriptedModelServer, scripted_env  # noqa: E402
from claudecluster_mcp.outcome import OutcomeStatus  # noqa: E402
from claudecluster_mcp.scenario import bash_turn, load_scenario, marker_rule, write_turn  # noqa: E402

LEVELS = ("sandbox", "none")


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def reap_orphans() -> int:
    """Reap the zombies re-parented to us (we are the subreaper), so their CPU is counted;
    returns how many there were. Safe here: nothing else in this process waits for children."""
    reaped = 0
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            reaped += 1
    return reaped


async def one_run(claude: ClaudeBinary, url: str, base: Path, level: str, index: int) -> dict[str, Any]:
    work = base / f"{index:03d}-{level}"
    repo = make_repo(work / "repo")
    home = work / "home"
    home.mkdir()
    spec = AgentSpec(
        prompt="[bench] build it",
        cwd=repo,
        config_dir=work / "claude-config",
        env={**scripted_env(url), "HOME": str(home)},
        log_path=work / "run.log",
        sandbox=SandboxPolicy() if level == "sandbox" else None,
        allowed_tools=[] if level == "sandbox" else ["Bash"],  # the sandbox allows Bash itself
        wall_timeout=120,
    )
    cpu0, t0 = children_cpu(), time.perf_counter()
    outcome = await AgentRun(spec, claude=claude).run()
    wall = time.perf_counter() - t0
    orphans = reap_orphans()
    cpu = children_cpu() - cpu0
    if outcome.status is not OutcomeStatus.SUCCEEDED or not (repo / "built.txt").is_file():
        raise SystemExit(f"{level} run {index} failed: {outcome.status} {outcome.reason}")
    return {"level": level, "wall_s": wall, "cpu_s": cpu, "orphans_reaped": orphans}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--commands", type=int, default=1, help="Bash commands per run")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    require_isolation("sandbox")
    claude = find_claude()
    scenario = {
        "default_latency": 0,
        "rules": [
            marker_rule(
                "bench",
                *[bash_turn(f"python3 -c 'print(6 * {i})' > built.txt") for i in range(args.commands)],
                write_turn("b.txt", "b\n"),
            )
        ],
    }
    runs: list[dict[str, Any]] = []
    async with ScriptedModelServer(load_scenario(scenario)) as server:
        with tempfile.TemporaryDirectory(prefix="cc-bench-sandbox-") as tmp:
            await one_run(claude, server.url, Path(tmp), "none", 0)  # warm-up, not counted
            for i in range(args.pairs):
                for level in LEVELS if i % 2 == 0 else LEVELS[::-1]:
                    runs.append(await one_run(claude, server.url, Path(tmp), level, len(runs) + 1))
    summary: dict[str, Any] = {"pairs": args.pairs, "bash_commands_per_run": args.commands, "cores": os.cpu_count()}
    for level in LEVELS:
        mine = [r for r in runs if r["level"] == level]
        summary[level] = {
            "wall_s_median": round(statistics.median(r["wall_s"] for r in mine), 3),
            "cpu_s_median": round(statistics.median(r["cpu_s"] for r in mine), 3),
            "orphans_per_run": round(statistics.mean(r["orphans_reaped"] for r in mine), 1),
        }
    summary["wall_ratio"] = round(summary["sandbox"]["wall_s_median"] / summary["none"]["wall_s_median"], 3)
    summary["cpu_ratio"] = round(summary["sandbox"]["cpu_s_median"] / summary["none"]["cpu_s_median"], 3)
    summary["runs"] = runs
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    anyio.run(main)
