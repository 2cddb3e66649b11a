"""Faults at scale: 1,000 scripted tasks (half independent, half a seeded random DAG; two
plans on one engine, 20 workers, real `claude` against the scripted model server) with a
seeded share of them given one fault each — 429 with and without retry-after, 529, 500, a
stream cut mid-message, a stream that stalls past the inactivity timeout, the agent's
process SIGKILLed, a git ref lock in the way of a merge (see bench/_faults.py). Prints the
outcome table. Targets: >= 99.5 % of tasks merged, every other task final with a reason that
names its fault, 0 lost, 0 merged twice, 0 processes left; and the time lost to faults
(against the same run without faults, with --baseline).

    .venv/bin/python bench/bench_faults.py [--tasks 1000] [--workers 20] [--fault-rate 0.15]
        [--seed 11] [--inactivity 30] [--baseline] [--json FILE]

Agents run with CLAUDE_CODE_MAX_RETRIES=0 (every API fault reaches the engine, as after
Claude Code has used up its own retries) unless --cli-retries says otherwise, and with
isolation "none" (the sandbox's own cost is measured in bench_sandbox.py; confinement does
not change how faults are handled).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import anyio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _common import make_repo  # noqa: E402
from _fault_checks import Outcome, check  # noqa: E402
from _faults import KINDS, SuiteConfig, run_suite, suite_settings  # noqa: E402

TARGET_MERGED = 0.995


async def measure(config: SuiteConfig, cli_retries: str | None) -> Outcome:
    """One run in a fresh repository."""
    with tempfile.TemporaryDirectory(prefix="cc-faults-") as tmp:
        repo = make_repo(Path(tmp) / "repo")
        run = await run_suite(config, repo, suite_settings(config, Path(tmp), cli_retries))
        return check(run)


def table(outcome: Outcome, baseline: float | None) -> str:
    """The outcome table (the invariants, then one row per fault kind)."""
    lines = [
        f"tasks {outcome.total}: merged {outcome.merged} ({100 * outcome.merged_share:.2f} %, target >= 99.5 %)",
        f"not merged, final, reason names the fault: {len(outcome.not_merged) - len(outcome.unexplained)}"
        f" of {len(outcome.not_merged)}",
        f"lost: {len(outcome.lost)}   merged twice: {len(outcome.merged_twice)}   "
        f"processes left: {len(outcome.leftover_pids)}   (targets 0)",
        f"makespan {outcome.makespan:.1f} s"
        + (f"; without faults {baseline:.1f} s: {outcome.makespan - baseline:+.1f} s lost" if baseline else ""),
        "",
        f"{'fault':<20} {'injected':>8} {'seen':>5} {'merged':>7} {'task-s lost':>12}",
    ]
    for kind in KINDS:
        row = outcome.per_kind[kind]
        lines.append(f"{kind:<20} {row['injected']:>8} {row['seen']:>5} {row['merged']:>7} {row['lost_s']:>12}")
    none = outcome.per_kind["(none)"]
    lines.append(f"{'(no fault)':<20} {'':>8} {none['seen']:>5} {none['merged']:>7}   (seen: retried or paused anyway)")
    lines.append(f"(typical start-to-merge of an unfaulted task: {none['typical_s']} s)")
    for task_id, reason in sorted(outcome.not_merged.items()):
        lines.append(f"  not merged: {task_id}: {reason[:160]!r}")
    return "\n".join(lines)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=20)
    parser.add_argument("--fault-rate", type=float, default=0.15)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--inactivity", type=float, default=30.0, help="the engine's inactivity timeout (s)")
    parser.add_argument("--baseline", action="store_true", help="also run without faults, for the time lost")
    parser.add_argument("--cli-retries", default="0", help="CLAUDE_CODE_MAX_RETRIES; 'default' leaves it unset")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    config = SuiteConfig(
        tasks=args.tasks,
        workers=args.workers,
        fault_rate=args.fault_rate,
        seed=args.seed,
        inactivity_timeout=args.inactivity,
    )
    retries = None if args.cli_retries == "default" else args.cli_retries
    baseline = None
    if args.baseline:
        clean = await measure(SuiteConfig(**{**asdict(config), "faults": False}), retries)
        baseline = clean.makespan
    outcome = await measure(config, retries)
    print(table(outcome, baseline))
    result = {
        "config": asdict(config),
        "cli_retries": args.cli_retries,
        "cores": os.cpu_count(),
        "merged_share": round(outcome.merged_share, 4),
        "met": outcome.merged_share >= TARGET_MERGED
        and not (outcome.lost or outcome.merged_twice or outcome.unexplained or outcome.leftover_pids),
        "baseline_makespan_s": round(baseline, 1) if baseline else None,
        **{k: v for k, v in asdict(outcome).items()},
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    anyio.run(main)
