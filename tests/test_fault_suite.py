"""The fault suite, small (the big one is `claudecluster bench --only faults`): scripted
tasks, independent and in a DAG, real `claude` agents, and every kind of fault at least once
— 429 with and without retry-after, 529, 500, a cut stream, a stall past the inactivity
timeout, the agent SIGKILLed, a ref lock in the way of a merge. Nothing is lost, nothing is
merged twice, no process is left, and every task merges."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from _faults import KINDS, SuiteConfig, check, run_suite, suite_settings

pytestmark = [pytest.mark.anyio, pytest.mark.claude]


async def test_every_kind_of_fault_once_and_every_task_still_merges_exactly_once(repo: Path, tmp_path: Path) -> None:
    config = SuiteConfig(tasks=24, workers=4, fault_rate=len(KINDS) / 24, latency=0.2, inactivity_timeout=8)
    settings = suite_settings(config, tmp_path, retry_backoff=0.5, restart_stagger=0.2)

    outcome = check(await run_suite(config, repo, settings))

    print(f"makespan {outcome.makespan:.1f} s; per fault kind: {outcome.per_kind}")
    assert {kind: row["injected"] for kind, row in outcome.per_kind.items() if kind in KINDS} == dict.fromkeys(KINDS, 1)
    assert outcome.not_merged == {}
    assert outcome.merged == outcome.total == 24
    assert outcome.lost == [] and outcome.merged_twice == [] and outcome.leftover_pids == []
    # The engine met each fault that reaches it (a ref lock is waited out inside git).
    seen = {kind for kind, row in outcome.per_kind.items() if row["seen"]}
    assert seen >= set(KINDS) - {"git lock at merge"}, outcome.per_kind
