"""The kill loop's verdict: what must hold after a run however often its server was killed.

* every task ended exactly once: in the store's append-only state events each task reaches a
  final state once (a conflicted task may then go to ``merged`` once, with its resolve task);
* every task merged (nothing in this run may fail), and at most one resolve task per conflict;
* the integration ref never moved backwards: each tip recorded at a kill is an ancestor of the
  next (``git merge-base --is-ancestor``), the last one of the final tip;
* every merged task's work is on the integration branch exactly once: its file with its text
  in the final tree, its line in ``shared.txt`` once, its commit in ``git log`` once and its
  recorded commit an ancestor of the tip, no conflict marker left, and no file no task was
  asked to write (debris of a write a kill interrupted);
* no merge left half done (no journal entry still ``started``);
* no process left: every process any killed server had was gone once the next server answered
  (its recovery reaped it), and at the end no process the servers ever had, no pid the store
  ever recorded for an agent, and no orphan carrying a run's tag (this process is their
  subreaper) is alive;
* no gate worktree or temporary directory left behind by a gate a kill interrupted.
"""

from __future__ import annotations

import contextlib
import itertools
import subprocess
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
from killdag import PAIR, SHARED, KillDag, expected_files, work_file
from killserver import FINAL, alive

from claudecluster_mcp.proctree import RUN_TAG_VAR

if TYPE_CHECKING:
    from killloop import KillLoop


@dataclass
class Report:
    """The run's figures and one verdict per invariant (``problems`` empty when all hold)."""

    tasks: int  # planned (the resolve task comes on top: figures["resolve_tasks"])
    kills: int
    kinds: dict[str, int]
    wall_s: float
    checks: dict[str, bool]
    problems: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Every invariant held."""
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {**asdict(self), "ok": self.ok}


def _git(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=False)


def judge(loop: KillLoop, final: dict[str, Any], wall: float) -> Report:
    """Check every invariant of the module docstring on the finished run."""
    state, plan_id, repo = loop.state, loop.state.plan_id, loop.repo
    tasks = loop.store.tasks(plan_id)
    tip = _git(repo, "rev-parse", f"refs/heads/claudecluster/{plan_id}/integration").stdout.strip()
    checks: dict[str, list[str]] = {
        "every task ended exactly once": _ended_once(tasks, loop.store.states(plan_id)),
        "every task merged": [
            f"{t['id']} is {t['state']}: {t['reason'][:200]}" for t in tasks if t["state"] != "merged"
        ],
        "integration ref never moved backwards": _forward(repo, [state.base, *(k.tip for k in state.kills), tip]),
        "every merged task's work on it exactly once": _work_once(repo, tip, plan_id, tasks, loop.dag),
        "no merge left half done": [f"journal entry {e['seq']} left started" for e in _open(loop.store.journal())],
        "no process left": _processes(loop),
        "no gate worktree or directory left": _gates_left(loop),
        "the server answered MCP after every restart": state.mcp_errors,
    }
    if not final.get("finished"):
        checks["every task ended exactly once"].append(f"not finished after {loop.config.finish_timeout:g} s")
    resolves = [t for t in tasks if t["kind"] == "resolve"]
    kills = state.kills
    restarts = [k.restart_s for k in kills if k.restart_s]
    figures = {
        "seed": loop.config.seed,
        "workers": loop.config.workers,
        "resolve_tasks": len(resolves),
        "conflicted": sorted(t["resolves"] for t in resolves),
        "aimed": dict(Counter(k.aimed.split(" (")[0] for k in kills)),
        "kills_with_open_journal": sum(k.open_journal for k in kills),
        "processes_at_kills": sum(k.processes for k in kills),
        "alive_at_restart": sum(k.alive_at_restart for k in kills),
        "tasks_requeued_by_recovery": sum(k.recovered for k in kills),
        "restart_s_max": max((k.restart_s for k in kills), default=0),
        "restart_s_mean": round(sum(restarts) / max(1, len(restarts)), 2),
        "agent_runs": sum(1 for t in tasks for _ in range(t["attempts"])),
        "mcp_calls": state.mcp_calls,
        "gate_runs": len(list(loop.gate_runs.glob("*.start"))) if loop.gate_runs else 0,
        "kill_log": [asdict(k) | {"at": round(k.at - kills[0].at, 1)} for k in kills],
    }
    problems = [f"{name}: {p}" for name, found in checks.items() for p in found]
    return Report(
        tasks=len(loop.dag.ids),
        kills=len(kills),
        kinds=dict(Counter(k.kind for k in kills)),
        wall_s=round(wall, 1),
        checks={name: not found for name, found in checks.items()},
        problems=problems,
        figures=figures,
    )


def _open(journal: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [entry for entry in journal if entry["state"] == "started"]


def _ended_once(tasks: list[dict[str, Any]], states: dict[str, list[str]]) -> list[str]:
    problems = []
    resolved = {t["resolves"] for t in tasks if t["kind"] == "resolve"}
    for task in tasks:
        finals = [s for s in states.get(task["id"], []) if s in FINAL]
        allowed = [["merged"], ["conflicted", "merged"]] if task["id"] in resolved else [["merged"]]
        if finals != [task["state"]] and finals not in allowed:
            problems.append(f"{task['id']} reached final states {finals}")
        elif task["state"] not in FINAL:
            problems.append(f"{task['id']} never ended ({task['state']})")
    counted = Counter(t["resolves"] for t in tasks if t["kind"] == "resolve")
    problems += [f"{task} got {n} resolve tasks" for task, n in counted.items() if n > 1]
    return problems


def _forward(repo: Path, tips: list[str]) -> list[str]:
    problems = []
    for old, new in itertools.pairwise(tips):
        if old != new and _git(repo, "merge-base", "--is-ancestor", old, new).returncode != 0:
            problems.append(f"{new[:10]} does not descend from {old[:10]}")
    return problems


def _work_once(repo: Path, tip: str, plan_id: str, tasks: list[dict[str, Any]], dag: KillDag) -> list[str]:
    ids = dag.ids
    tree = set(_git(repo, "ls-tree", "-r", "--name-only", tip).stdout.split())
    problems = [f"{name} is on the tip, but no task was asked to write it" for name in tree - expected_files(dag)]
    for task_id in ids:
        if task_id in PAIR:
            continue
        if work_file(task_id) not in tree:
            problems.append(f"{work_file(task_id)} missing")
        elif _git(repo, "show", f"{tip}:{work_file(task_id)}").stdout != f"{task_id}\n":
            problems.append(f"{work_file(task_id)} has the wrong text")
    shared = Counter(_git(repo, "show", f"{tip}:{SHARED}").stdout.splitlines())
    problems += [f"{SHARED} holds {task} {shared[task]} times" for task in PAIR if shared[task] != 1]
    if any(line[:7] in ("<<<<<<<", "=======", ">>>>>>>") for line in shared):
        problems.append(f"{SHARED} holds a conflict marker")
    log = _git(repo, "log", "--format=%H %P%x00%B%x01", tip).stdout
    work: Counter[str] = Counter()
    merges: Counter[str] = Counter()
    for entry in filter(str.strip, log.split("\x01")):
        body = entry.strip().partition("\x00")[2]
        lines = body.strip().splitlines()
        if lines and lines[0].startswith("Merge task "):
            merges[lines[0].removeprefix("Merge task ").split(":")[0]] += 1
        elif lines and lines[-1].startswith(f"claudecluster plan {plan_id}, task "):
            work[lines[-1].rsplit(" ", 1)[1]] += 1
    problems += [f"the work of {t} is in {n} commits" for t, n in work.items() if n > 1]
    problems += [f"{t} was merged by {n} merge commits" for t, n in merges.items() if n > 1]
    for task in tasks:
        if task["state"] == "merged" and task["commit"] and work[task["id"]] != 1 and task["kind"] != "resolve":
            problems.append(f"{task['id']}: {work[task['id']]} commits of its work on the tip")
        on_tip = task["commit"] and _git(repo, "merge-base", "--is-ancestor", task["commit"], tip).returncode == 0
        if task["state"] == "merged" and not on_tip:
            problems.append(f"{task['id']}: its commit {str(task['commit'])[:10]} is not on the tip")
    return problems


def _processes(loop: KillLoop) -> list[str]:
    problems = list(loop.state.leaked_after_recovery)
    assert loop.server is not None
    seen = loop.server.seen.items()
    problems += [f"{name} (pid {pid}) still alive at the end" for (pid, t), name in seen if alive(pid, t)]
    problems += [f"agent pid {pid} (from the store) still alive" for pid, t in loop.tracked if alive(pid, t)]
    # As the subreaper, this process inherits every orphan: none may be an agent's or a gate's.
    for proc in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if RUN_TAG_VAR in proc.environ() and alive(proc.pid):
                problems.append(f"{proc.name()} (pid {proc.pid}) of run {proc.environ()[RUN_TAG_VAR]} left")
    return problems


def _gates_left(loop: KillLoop) -> list[str]:
    listed = _git(loop.repo, "worktree", "list", "--porcelain").stdout
    problems = [f"gate worktree {line[9:]} left" for line in listed.splitlines() if "claudecluster-gate-" in line]
    problems += [f"gate directory {path.name} left" for path in (loop.workdir / "tmp").glob("claudecluster-gate-*")]
    return problems
