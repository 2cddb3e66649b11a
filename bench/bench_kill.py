"""kill -9 at random points (results in BENCHMARKS.md, "kill -9 at random points").

    .venv/bin/python bench/bench_kill.py [--tasks 50] [--kills 20] [--seed 1] [--workers 4] [--json FILE]

A seeded loop SIGKILLs `claudecluster serve --transport http` (a real subprocess; real
`claude` agents against the scripted model) at --kills moments of a --tasks DAG run with
merges, a gate and a resolve task — while agents run, while the gate runs, right after a gate
passed (the ref update and its journal), while a restarted server recovers — and restarts it
each time; a client re-dispatches and finally waits over MCP (the SDK's Streamable HTTP
client). Then it checks: every task ended exactly once, the integration ref never moved
backwards, every merged task's work is on it exactly once, no merge half done, no process
left (bench/killcheck.py). The verdict is in the output (and --json); the exit code is 0
whenever the loop ran to its end, as for every benchmark `claudecluster bench` runs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from killloop import KillLoop, LoopConfig

from claudecluster_mcp.claude_cli import find_claude


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=50)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, repo, store)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    config = LoopConfig(tasks=args.tasks, kills=args.kills, seed=args.seed, workers=args.workers)
    workdir = Path(tempfile.mkdtemp(prefix="cc-bench-kill-"))
    report = KillLoop(config, workdir, find_claude().path).run()
    result = report.as_dict()
    print(
        json.dumps(
            {k: v for k, v in result.items() if k != "figures"}
            | {"figures": {k: v for k, v in report.figures.items() if k != "kill_log"}},
            indent=2,
        )
    )
    print(f"\n{'invariant':<48} held")
    for name, held in report.checks.items():
        print(f"{name:<48} {'yes' if held else 'NO'}")
    run = f"a {report.tasks}-task run (+{report.figures['resolve_tasks']} resolve)"
    print(f"\n{report.kills} kills ({report.kinds}) of {run} in {report.wall_s} s")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if args.keep or not report.ok:
        print(f"kept the work directory (repository, store, server logs): {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
