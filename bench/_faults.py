"""The fault-injection harness behind bench/bench_faults.py and tests/test_fault_suite.py.

A run: two plans on one engine (independent tasks, and a seeded random DAG), each task a
scripted 2-turn agent (write ``<id>.txt``, say done) of the real ``claude`` against the
scripted model server, and a seeded share of the tasks given one fault each:

- in the model's answers (:data:`MODEL_FAULTS`): 429 with and without ``retry-after``, 529,
  500, a stream cut mid-message (and Claude Code's non-streaming retry of it cut too), a
  stream that stalls past the engine's inactivity timeout. Each is met once per task
  (``per: rule``), so the agent the engine restarts gets past it;
- by :class:`Injector`: the agent's ``claude`` process SIGKILLed while it waits for the
  model, and a ``git`` failure while merging: the lock file of the integration ref exists
  (as while another git process holds it) when the merge queue updates that ref.

bench/_fault_checks.py then reads what :class:`Run` collected (the store, the git refs, the process table)
for the invariants.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import sqlite3
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import psutil
from anyio.abc import TaskGroup

from claudecluster_mcp.engine import Cluster
from claudecluster_mcp.model_server import ScriptedModelServer, scripted_env
from claudecluster_mcp.models import Task
from claudecluster_mcp.scenario import load_scenario, marker_rule, marker_task, write_turn
from claudecluster_mcp.settings import EngineSettings

#: Fault kind → the fault the scripted model answers with (``None``: injected by the harness).
MODEL_FAULTS: dict[str, dict[str, Any] | None] = {
    "429 retry-after": {"type": "rate_limit", "retry_after": 1},
    "429 no retry-after": {"type": "rate_limit", "retry_after": None},
    "529 overloaded": {"type": "overloaded"},
    "500 server error": {"type": "server_error"},
    "stream cut": {"type": "cut", "times": 2},  # the stream and Claude Code's plain retry of it
    "stall": {"type": "stall"},  # seconds: set from the inactivity timeout
    "agent killed": None,
    "git lock at merge": None,
}
KINDS = tuple(MODEL_FAULTS)
#: What the engine's reasons say when it met the fault (a retry's reason, or a final one).
SIGNS = {
    "429 retry-after": r"rate limited|\b429\b",
    "429 no retry-after": r"rate limited|\b429\b",
    "529 overloaded": r"\b529\b|[Oo]verloaded",
    "500 server error": r"\b500\b|[Ii]nternal server error",
    "stream cut": r"[Cc]onnection|ECONNRESET|socket|terminated|network",
    "stall": r"inactivity timeout",
    "agent killed": r"signal 9",
    "git lock at merge": r"\.lock|cannot lock|File exists",
}
KILL_LATENCY = 3.0  # s the model takes on a kill target's turn: the window for the kill


@dataclass(frozen=True)
class SuiteConfig:
    """One run's shape. ``fault_rate`` of the tasks get one fault each, every kind at least
    once; ``lock_hold`` is how long the injected ref lock stays (as another git would)."""

    tasks: int = 1000
    workers: int = 20
    fault_rate: float = 0.15
    seed: int = 11
    latency: float = 0.5
    inactivity_timeout: float = 30.0
    lock_hold: float = 1.5
    faults: bool = True


@dataclass
class Injected:
    """Which task gets which fault (kind, turn), and what the harness did."""

    faults: dict[str, tuple[str, int]]
    killed: dict[str, float] = field(default_factory=dict)  # task id → when
    locked: dict[str, float] = field(default_factory=dict)

    def of(self, kind: str) -> list[str]:
        return [t for t, (k, _) in self.faults.items() if k == kind]


def task_specs(config: SuiteConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(independent tasks, DAG tasks): half each; a DAG task depends on up to 2 of the 20
    DAG tasks before it."""
    rng = random.Random(config.seed)
    half = config.tasks // 2
    independent = [marker_task(f"i{n}") for n in range(half)]
    dag = []
    for n in range(config.tasks - half):
        window = list(range(max(0, n - 20), n))
        deps = sorted(rng.sample(window, k=min(len(window), rng.choice((0, 1, 1, 2)))))
        dag.append(marker_task(f"d{n}", *(f"d{d}" for d in deps)))
    return independent, dag


def choose_faults(config: SuiteConfig, task_ids: list[str]) -> Injected:
    """A seeded choice of faulted tasks, kinds dealt round-robin (each at least once), on turn 0 or 1."""
    if not config.faults:
        return Injected({})
    rng = random.Random(config.seed + 1)
    count = max(len(KINDS), round(config.fault_rate * len(task_ids)))
    chosen = rng.sample(task_ids, k=min(count, len(task_ids)))
    return Injected({t: (KINDS[n % len(KINDS)], rng.randint(0, 1)) for n, t in enumerate(chosen)})


def scenario(config: SuiteConfig, task_ids: list[str], injected: Injected) -> dict[str, Any]:
    """A rule per task: write ``<id>.txt``, then "done"; a faulted turn carries its fault."""
    rules = []
    for task in task_ids:
        turns: list[dict[str, Any]] = [write_turn(f"{task}.txt", f"{task}\n"), {"text": f"{task} done"}]
        kind, turn = injected.faults.get(task, (None, 0))
        fault = MODEL_FAULTS.get(kind) if kind else None
        if fault is not None:
            seconds = {"seconds": 3 * config.inactivity_timeout} if fault["type"] == "stall" else {}
            turns[turn] = {**turns[turn], "fault": {**fault, **seconds, "per": "rule"}}
        elif kind == "agent killed":
            turns[turn] = {**turns[turn], "latency": KILL_LATENCY}
        rule = marker_rule(task)
        rules.append({**rule, "turns": turns})
    return {"name": "faults", "default_latency": config.latency, "rules": rules}


class Injector:
    """Kills a target's ``claude`` while it waits for the model, and makes the integration
    ref's lock file exist when a target's merge is about to update that ref."""

    def __init__(self, cluster: Cluster, server: ScriptedModelServer, plans: dict[str, str], injected: Injected):
        self.cluster = cluster
        self.server = server
        self.plans = plans  # task id → plan id
        self.injected = injected
        self.lock_hold = 1.5
        self.git_dir = cluster.repo / ".git"

    async def run(self, tg: TaskGroup, lock_hold: float) -> None:
        """Arm the lock and kill the targets until cancelled."""
        self.lock_hold = lock_hold
        self._arm_lock(tg)
        kills = {t: turn for t in self.injected.of("agent killed") for _, turn in [self.injected.faults[t]]}
        due: set[str] = set()  # targets whose turn has been asked for, until their agent is killed
        seen = 0
        while True:
            records = self.server.requests
            due |= {r.rule for r in records[seen:] if r.rule in kills and r.turn == kills[r.rule]}
            seen = len(records)
            for target in sorted(due - set(self.injected.killed)):
                await self._kill(target)
            await anyio.sleep(0.1)

    async def _kill(self, task_id: str) -> None:
        task = await self.cluster.task(self.plans[task_id], task_id)
        if task.pid is None:
            return
        with contextlib.suppress(psutil.Error):
            # The stored pid is the run's reaper; the agent is its child.
            for child in psutil.Process(task.pid).children():
                os.kill(child.pid, signal.SIGKILL)
                self.injected.killed[task_id] = time.time()

    def _arm_lock(self, tg: TaskGroup) -> None:
        store = self.cluster.store
        begin = store.begin_merge
        targets = set(self.injected.of("git lock at merge"))

        async def begin_merge(plan_id: str, task_id: str | None, ref: str, old: str, new: str) -> int:
            entry = await begin(plan_id, task_id, ref, old, new)
            if task_id in targets and task_id not in self.injected.locked:
                lock = self.git_dir / f"{ref}.lock"
                lock.write_text(old + "\n")
                self.injected.locked[task_id] = time.time()
                tg.start_soon(_remove_later, lock, self.lock_hold)
            return entry

        store.begin_merge = begin_merge  # type: ignore[method-assign]


async def _remove_later(path: Path, seconds: float) -> None:
    await anyio.sleep(seconds)
    path.unlink(missing_ok=True)


@dataclass
class Run:
    """What one run left behind, for the checks in bench/_fault_checks.py."""

    config: SuiteConfig
    injected: Injected
    makespan: float
    tasks: dict[str, Task]
    events: dict[str, list[Any]]  # task id → its events
    journal: Counter[str]  # task id → 'done' merge journal entries
    integration_files: set[str]
    first_parent_commits: int
    requests: int
    leftover_pids: list[int]
    faulted: set[str]  # tasks whose fault did happen (a model fault answered, a kill, a lock)


def suite_settings(
    config: SuiteConfig, tmp: Path, cli_retries: str | None = "0", **overrides: Any
) -> Callable[[str], EngineSettings]:
    """``url`` → the engine's settings for a run under ``tmp``: the defaults, except the
    short inactivity timeout (for the stall fault), no confinement, the scripted model,
    ``CLAUDE_CODE_MAX_RETRIES`` = ``cli_retries`` (None: Claude Code's default), and ``overrides``."""
    home = tmp / "home"
    home.mkdir(exist_ok=True)

    def settings_for(url: str) -> EngineSettings:
        env = {**scripted_env(url), "HOME": str(home)}
        env.pop("CLAUDE_CODE_MAX_RETRIES")
        if cli_retries is not None:
            env["CLAUDE_CODE_MAX_RETRIES"] = cli_retries
        values: dict[str, Any] = {
            "workers": config.workers,
            "state_dir": tmp / "state",
            "claude_config_dir": tmp / "claude-config",
            "agent_env": env,
            "isolation": "none",
            "inactivity_timeout": config.inactivity_timeout,
        }
        return EngineSettings(**{**values, **overrides})

    return settings_for


async def run_suite(config: SuiteConfig, repo: Path, settings_for: Callable[[str], EngineSettings]) -> Run:
    """Serve the scripted model, plan, dispatch and wait for both plans while the injector
    works; collect the evidence. ``settings_for(url)``: the engine's settings for the model at ``url``."""
    independent, dag = task_specs(config)
    task_ids = [t["id"] for t in independent + dag]
    injected = choose_faults(config, task_ids)
    async with ScriptedModelServer(load_scenario(scenario(config, task_ids, injected))) as server:
        settings = settings_for(server.url)
        async with Cluster.open(repo, settings=settings) as cluster:
            ind = (await cluster.plan("independent tasks", independent)).plan
            graph = (await cluster.plan("a DAG of tasks", dag)).plan
            plans = {t["id"]: ind.id for t in independent} | {t["id"]: graph.id for t in dag}
            async with anyio.create_task_group() as tg:
                tg.start_soon(Injector(cluster, server, plans, injected).run, tg, config.lock_hold)
                started = time.monotonic()
                await cluster.dispatch(ind.id)
                await cluster.dispatch(graph.id)
                statuses = [await cluster.wait(ind.id), await cluster.wait(graph.id)]
                makespan = time.monotonic() - started
                tg.cancel_scope.cancel()
            events: dict[str, list[Any]] = {}
            for plan_id in (ind.id, graph.id):
                for event in await cluster.store.events(plan_id):
                    events.setdefault(event["task_id"], []).append(event)
            db = cluster.store.path
        requests = len(server.requests)
        faulted = {r.rule for r in server.requests if r.rule and r.outcome.startswith("fault:")}
    with sqlite3.connect(db) as conn:
        journal = Counter(r for (r,) in conn.execute("SELECT task_id FROM merges WHERE state = 'done'") if r)
    files, commits = set(), 0
    for plan in (ind, graph):
        files |= set(_git(repo, "ls-tree", "-r", "--name-only", plan.integration_branch).split())
        span = f"{plan.base_commit}..{plan.integration_branch}"
        commits += int(_git(repo, "rev-list", "--first-parent", "--count", span))
    return Run(
        config=config,
        injected=injected,
        makespan=makespan,
        tasks={t.id: t for status in statuses for t in status.tasks},
        events=events,
        journal=journal,
        integration_files=files,
        first_parent_commits=commits,
        requests=requests,
        leftover_pids=_leftovers(settings),
        faulted=faulted | set(injected.killed) | set(injected.locked),
    )


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout


def _leftovers(settings: EngineSettings) -> list[int]:
    """Living processes of this run's agents: below this process, or with the agents' HOME."""
    home = settings.agent_env.get("HOME")
    left = set()
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if proc.status() != psutil.STATUS_ZOMBIE and home and proc.environ().get("HOME") == home:
                left.add(proc.pid)
    for proc in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if proc.status() != psutil.STATUS_ZOMBIE:
                left.add(proc.pid)
    return sorted(left)
