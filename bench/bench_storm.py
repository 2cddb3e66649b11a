"""Rate-limit storm: the scripted model answers 429 to every request for 20 s in the middle
of a 40-task run (10 workers, real `claude`, 3-turn tasks). Run without a storm, then with
the storm twice: Claude Code's own retries at their default, and off
(CLAUDE_CODE_MAX_RETRIES=0, as after a long storm has used them up). Targets, per storm run:
makespan <= storm + 1.2 x the run without it; model requests during the storm <= 3 x workers;
no task fails. Each round runs the three; the makespan ratio reported is the median of the
rounds' (each storm run against its own round's run without a storm), the request count the
worst.

    .venv/bin/python bench/bench_storm.py [--tasks 40] [--workers 10] [--storm 20]
        [--latency 1.5] [--retry-after SECONDS] [--rounds 2] [--json FILE] [--trace FILE]

The storm's 429s carry no retry-after unless --retry-after is given: how long it lasts is
unknown, as in a provider's outage. Isolation "none" (confinement does not change how rate
limits are handled; bench_sandbox.py measures its cost).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _common import make_repo  # noqa: E402

from claudecluster_mcp.engine import Cluster, EngineSettings  # noqa: E402
from claudecluster_mcp.model_server import ScriptedModelServer, scripted_env  # noqa: E402
from claudecluster_mcp.models import TaskState  # noqa: E402
from claudecluster_mcp.scenario import load_scenario, marker_rule, marker_task, write_turn  # noqa: E402

MODES = {"no storm": "default", "storm, CLI retries default": "default", "storm, CLI retries 0": "0"}


def scenario(tasks: int, latency: float, storm: dict[str, Any] | None) -> dict[str, Any]:
    """Task ``s<i>`` writes two files, one turn each, then says done; every turn takes ``latency``."""
    rules = [
        marker_rule(f"s{i}", write_turn(f"s{i}.txt", "one\n"), write_turn(f"s{i}.b.txt", "two\n")) for i in range(tasks)
    ]
    return {"name": "storm", "default_latency": latency, "rules": rules, **({"storm": storm} if storm else {})}


async def one_run(args: argparse.Namespace, storm: dict[str, Any] | None, cli_retries: str) -> dict[str, Any]:
    """One run in a fresh repository: makespan, requests in the storm, and what did not merge."""
    with tempfile.TemporaryDirectory(prefix="cc-storm-") as tmp:
        repo = make_repo(Path(tmp) / "repo")
        (Path(tmp) / "home").mkdir()
        async with ScriptedModelServer(load_scenario(scenario(args.tasks, args.latency, storm))) as server:
            env = {**scripted_env(server.url), "HOME": f"{tmp}/home"}
            if cli_retries == "default":
                env.pop("CLAUDE_CODE_MAX_RETRIES")
            settings = EngineSettings(
                workers=args.workers,
                state_dir=Path(tmp) / "state",
                claude_config_dir=Path(tmp) / "claude-config",
                agent_env=env,
                isolation="none",
            )
            async with Cluster.open(repo, settings=settings) as cluster:
                plan = (await cluster.plan("storm", [marker_task(f"s{i}") for i in range(args.tasks)])).plan
                started = time.time()
                await cluster.dispatch(plan.id)
                status = await cluster.wait(plan.id, timeout=1800)
                makespan = time.time() - started
                events = await cluster.store.events(plan.id)
                pauses = [e["data"] for e in events if e["kind"] == "pool_paused"]
            window = server.storm_window
            requests = [r for r in server.requests if r.path == "/v1/messages"]
    if args.trace:
        _trace(args.trace, cli_retries, window, requests, events)
    in_storm = [r for r in requests if window and window[0] <= r.at < window[1]]
    after = [r.at - window[1] for r in requests if window and r.at >= window[1] and r.outcome == "ok"]
    return {
        "makespan_s": round(makespan, 1),
        "first_request_s": round(requests[0].at - started, 1) if requests else None,
        "requests": len(requests),
        "requests_in_storm": len(in_storm),
        "first_answer_after_storm_s": round(min(after), 1) if after else None,
        "pool_pauses": len(pauses),
        "pool_pause_s": [p["seconds"] for p in pauses],
        "not_merged": {t.id: f"{t.state.value}: {t.reason}" for t in status.tasks if t.state is not TaskState.MERGED},
        "attempts": sum(t.attempts for t in status.tasks),
    }


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """A mode's rounds: the median makespan and ratio (each round's storm run against its own
    run without a storm), the most requests in a storm, every task that did not merge."""
    summary: dict[str, Any] = {
        "makespan_s": round(statistics.median(r["makespan_s"] for r in runs), 1),
        "requests_in_storm": max(r["requests_in_storm"] for r in runs),
        "not_merged": {k: v for r in runs for k, v in r["not_merged"].items()},
        "rounds": runs,
    }
    if "makespan_ratio" in runs[0]:
        summary["makespan_ratio"] = round(statistics.median(r["makespan_ratio"] for r in runs), 3)
        summary["requests_ratio"] = max(r["requests_ratio"] for r in runs)
        # A storm that came after the run had ended proves nothing.
        hit = all(r["requests_in_storm"] > 0 for r in runs)
        met = summary["makespan_ratio"] <= 1 and summary["requests_ratio"] <= 1 and not summary["not_merged"]
        summary["met"] = hit and met
        summary["storm_missed_the_run"] = not hit
    return summary


def _trace(path: Path, mode: str, window: tuple[float, float] | None, requests: list[Any], events: list[Any]) -> None:
    """Append the run's timeline (seconds from the storm's start): requests and state changes."""
    t0 = window[0] if window else requests[0].at
    lines = [(r.at - t0, f"request {r.rule} turn {r.turn}: {r.outcome}") for r in requests]
    for e in events:
        if e["kind"] in ("state", "pool_paused"):
            at = datetime.fromisoformat(e["at"]).timestamp() - t0
            lines.append((at, f"{e['task_id']} {e['kind']} {json.dumps(e['data'])[:150]}"))
    with path.open("a") as out:
        out.write(f"== CLI retries {mode}, storm {window and round(window[1] - window[0])} s\n")
        out.writelines(f"{at:8.2f} {text}\n" for at, text in sorted(lines))


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=40)
    parser.add_argument("--workers", type=int, default=10)
    parser.add_argument("--storm", type=float, default=20.0, help="seconds of 429s")
    parser.add_argument("--latency", type=float, default=1.5, help="model latency per turn (s)")
    parser.add_argument("--retry-after", type=float, default=None, help="retry-after of the storm's 429s")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the three runs (medians reported)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--trace", type=Path, help="append each run's timeline to this file")
    args = parser.parse_args()
    runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
    storm: dict[str, Any] = {}
    for _ in range(args.rounds):  # each round: the run without a storm, then the two with it
        quiet = await one_run(args, None, MODES["no storm"])
        runs["no storm"].append(quiet)
        if not storm:  # in the middle of the first quiet run (its clock starts at the first request)
            run_time = quiet["makespan_s"] - (quiet["first_request_s"] or 0)
            fault = {"type": "rate_limit", "retry_after": args.retry_after, "times": None}
            after = round(max(0.0, run_time / 2 - args.storm / 2), 1)
            storm = {"after": after, "seconds": args.storm, "fault": fault}
        for mode in ("storm, CLI retries default", "storm, CLI retries 0"):
            run = await one_run(args, storm, MODES[mode])
            run["makespan_ratio"] = round(run["makespan_s"] / (args.storm + 1.2 * quiet["makespan_s"]), 3)
            run["requests_ratio"] = round(run["requests_in_storm"] / (3 * args.workers), 3)
            runs[mode].append(run)
    results = {mode: _summary(mode_runs) for mode, mode_runs in runs.items()}
    summary = {
        "tasks": args.tasks,
        "workers": args.workers,
        "storm_s": args.storm,
        "storm_after_s": storm["after"],
        "latency_s": args.latency,
        "retry_after": args.retry_after,
        "rounds": args.rounds,
        "cores": os.cpu_count(),
        "runs": results,
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}))
    print(f"\n{'run':<28} {'makespan':>9} {'ratio':>6} {'requests':>9} {'ratio':>6} {'late':>6}  (per round)")
    for mode, mode_runs in runs.items():
        for run in mode_runs:
            late = run["first_answer_after_storm_s"]
            print(
                f"{mode:<28} {run['makespan_s']:>8.1f}s {run.get('makespan_ratio', ''):>6} "
                f"{run['requests_in_storm']:>9} {run.get('requests_ratio', ''):>6} {'' if late is None else late:>5}s"
            )
    print("ratio: makespan / (storm + 1.2 x that round's run without a storm), target <= 1; requests in the")
    print("storm / (3 x workers), target <= 1; late: first answer after the storm's end")
    for mode, result in results.items():
        if "makespan_ratio" in result:
            print(
                f"{mode}: median ratio {result['makespan_ratio']:.3f}, worst requests ratio "
                f"{result['requests_ratio']:.3f}, tasks failed {len(result['not_merged'])}"
            )
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    anyio.run(main)
