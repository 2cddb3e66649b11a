"""The batching merge queue against a slow gate: N independent 2-turn tasks (real `claude`
against the scripted model, L s of latency per turn) on W workers, run to the end (every
task merged or final) three ways:

  nogate   no gate: the reference;
  gate     a gate that takes G s (`sleep G`, then a check script) on every merge candidate;
  bad      the same gate, and one task (the --bad-th) whose change fails the check.

Targets (issue 14): gate <= nogate + 3 G; bad <= nogate + 8 G, the N - 1 others merged and
the bad one named with the gate's output. One task at a time, the gate alone would add
about N G (``--unbatched`` measures that too, with merge_batch_size = 1). With ``--rounds``,
each run is repeated (the kinds alternating) and the median wall time of each is used.

    .venv/bin/python bench/bench_gate.py [--tasks 20] [--workers 10] [--gate-seconds 5]
        [--latency 2] [--bad 15] [--unbatched] [--rounds 1] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

ROOT = Path(__file__).resolve().parent.parent
ISOLATION = "none"
sys.path.insert(0, str(ROOT))

from _common import make_repo  # noqa: E402

from claudecluster_mcp.engine import Cluster, EngineSettings  # noqa: E402
from claudecluster_mcp.model_server import ScriptedModelServer, scripted_env  # noqa: E402
from claudecluster_mcp.models import TaskState  # noqa: E402
from claudecluster_mcp.scenario import load_scenario  # noqa: E402

CHECK = """
import pathlib, sys
bad = sorted(p.name for p in pathlib.Path(".").glob("f*.txt") if "bad" in p.read_text())
if bad:
    print("FAILED test_content: bad content in " + ", ".join(bad))
    sys.exit(1)
print("all checks passed")
"""


def scenario(n: int, latency: float, bad: int | None) -> dict[str, Any]:
    """Task i writes f<i>.txt ("bad" for the bad one), then says done."""

    def write(i: int) -> dict[str, Any]:
        content = "bad\n" if i == bad else "ok\n"
        return {"tools": [{"name": "Write", "input": {"file_path": "{cwd}/" + f"f{i}.txt", "content": content}}]}

    rules = [{"name": f"r{i}", "match": f"[gate{i}]", "turns": [write(i), {"text": "done"}]} for i in range(n)]
    return {"default_latency": latency, "rules": rules}


async def one_run(args: argparse.Namespace, tmp: Path, gate: list[str] | None, bad: bool, batch: int) -> dict[str, Any]:
    """Run the plan to its end; its wall time, gate runs and batches, and the tasks' ends."""
    bad_index = args.bad if bad else None
    repo = make_repo(tmp / "repo")
    home = tmp / "home"
    home.mkdir()
    async with ScriptedModelServer(load_scenario(scenario(args.tasks, args.latency, bad_index))) as server:
        settings = EngineSettings(
            workers=args.workers,
            state_dir=tmp / "state",
            claude_config_dir=tmp / "claude-config",
            agent_env={**scripted_env(server.url), "HOME": str(home)},
            isolation=ISOLATION,
            gate=gate,
            merge_batch_size=batch,
        )
        tasks = [{"id": f"t{i}", "prompt": f"[gate{i}] write f{i}.txt"} for i in range(args.tasks)]
        async with Cluster.open(repo, settings=settings) as cluster:
            plan = (await cluster.plan("gate bench", tasks)).plan
            started = time.monotonic()
            await cluster.dispatch(plan.id)
            status = await cluster.wait(plan.id, timeout=1800)
            wall = time.monotonic() - started
    bad_id = f"t{bad_index}" if bad_index is not None else None
    wrong = [(t.id, t.state, t.reason) for t in status.tasks if t.id != bad_id and t.state is not TaskState.MERGED]
    assert not wrong, wrong
    result: dict[str, Any] = {
        "wall_s": round(wall, 2),
        "merged": sum(t.state is TaskState.MERGED for t in status.tasks),
        "gate_runs": status.plan.gate_runs,
        "merge_batches": status.plan.merge_batches,
    }
    if bad_index is not None:
        culprit = status.task(f"t{bad_index}")
        assert culprit.state is TaskState.GATE_FAILED, (culprit.state, culprit.reason)
        assert f"bad content in f{bad_index}.txt" in culprit.reason, culprit.reason
        result["bad_task"] = {"id": culprit.id, "state": culprit.state.value, "attempts": culprit.attempts}
        result["bad_reason"] = culprit.reason
    return result


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=20)
    parser.add_argument("--workers", type=int, default=10)
    parser.add_argument("--gate-seconds", type=float, default=5.0)
    parser.add_argument("--latency", type=float, default=2.0, help="model latency per turn (s)")
    parser.add_argument("--bad", type=int, default=15, help="index of the task whose change fails the gate")
    parser.add_argument("--unbatched", action="store_true", help="also run the gate one candidate at a time")
    parser.add_argument("--rounds", type=int, default=1, help="rounds of every run; medians are reported")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cc-gate-") as tmp:
        check = Path(tmp) / "check.py"
        check.write_text(CHECK)
        gate = ["sh", "-c", f'sleep {args.gate_seconds} && exec "$0" "$1"', sys.executable, str(check)]
        runs = {"nogate": (None, False, 8), "gate": (gate, False, 8), "bad": (gate, True, 8)}
        if args.unbatched:
            runs["unbatched"] = (gate, False, 1)
        # Warm-up (discarded): the first agents of a process pay for cold caches.
        await one_run(argparse.Namespace(**{**vars(args), "tasks": 2}), Path(tmp) / "warm-up", None, False, 8)
        rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in runs}
        for number in range(args.rounds):
            for name, (command, bad, batch) in runs.items():
                print(f"round {number + 1}: {name} …", flush=True)
                rounds[name].append(await one_run(args, Path(tmp) / f"{name}-{number}", command, bad, batch))
                print(f"  {json.dumps(rounds[name][-1])[:300]}", flush=True)
    # The median run of each kind, by wall time.
    results = {name: sorted(done, key=lambda r: r["wall_s"])[len(done) // 2] for name, done in rounds.items()}
    base, g = results["nogate"]["wall_s"], args.gate_seconds
    summary = {
        "tasks": args.tasks,
        "workers": args.workers,
        "gate_s": g,
        "latency_per_turn_s": args.latency,
        "cores": os.cpu_count(),
        "runs": results,
        "walls": {name: [r["wall_s"] for r in done] for name, done in rounds.items()},
        # Time the gate added, in gate durations.
        "gate_overhead": round((results["gate"]["wall_s"] - base) / g, 2),
        "bad_overhead": round((results["bad"]["wall_s"] - base) / g, 2),
    }
    if "unbatched" in results:
        summary["unbatched_overhead"] = round((results["unbatched"]["wall_s"] - base) / g, 2)
    print(json.dumps(summary, indent=2))
    print(
        f"\ngate: nogate + {summary['gate_overhead']} gate durations (target <= 3); "
        f"one bad: nogate + {summary['bad_overhead']} (target <= 8)"
        + (f"; one at a time: nogate + {summary['unbatched_overhead']}" if "unbatched_overhead" in summary else "")
    )
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    anyio.run(main)
