"""The work of the kill -9 loop: a seeded DAG of scripted tasks, the scripted model's answers
for them, and the gate every merge runs.

Every task leaves a mark that can be counted afterwards: task ``tNN`` writes
``work/tNN.txt`` holding ``tNN``; the conflict pair ``ca`` and ``cb`` (roots, started first)
each insert their own line before ``end`` in ``shared.txt``, so the second of them to merge
conflicts and the engine adds a resolve task, whose agent removes the conflict markers and
keeps both lines.

Every agent action is idempotent and made twice, in two turns. An agent killed in the middle
of a tool call is resumed with that call's outcome unknown; a real model checks and redoes it,
a scripted one just plays its next turn, and the repeat is that redo. So a line or a file
found missing or twice is the engine's doing, not the script's.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PAIR = ("ca", "cb")
SHARED = "shared.txt"
SHARED_TEXT = "begin\nend\n"
# Resumed sessions ask for one more turn per resume: spare answers keep them from running out.
_SPARE_TURNS = 6
_MARKERS = "<<<<<<<|=======|>>>>>>>|[|]{7}"

GATE_SCRIPT = '''"""The kill loop's gate: marks its start and end (the loop aims kills at them), sleeps a while."""
import os, random, sys, time
markers, low, high = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
name = os.path.join(markers, f"{time.time_ns()}-{os.getpid()}")
open(name + ".start", "w").close()
time.sleep(random.uniform(low, high))
open(name + ".end", "w").close()
'''


@dataclass(frozen=True)
class KillDag:
    """The plan's tasks (``plan`` tool shape) and the scripted model's scenario for them."""

    tasks: list[dict[str, Any]]
    scenario: dict[str, Any]

    @property
    def ids(self) -> list[str]:
        """Ids of the planned tasks (the resolve task comes on top)."""
        return [t["id"] for t in self.tasks]


def build_dag(n_tasks: int, seed: int, latency: tuple[float, float] = (0.2, 1.2)) -> KillDag:
    """``n_tasks`` tasks (the conflict pair and ``n_tasks - 2`` file writers, each depending on
    up to two earlier writers), seeded."""
    if n_tasks < 4:
        raise ValueError("the kill loop needs at least 4 tasks")
    rng = random.Random(seed)
    spare = [{"text": "Nothing left to do."}] * _SPARE_TURNS
    rules: list[dict[str, Any]] = [_resolve_rule(spare)]
    tasks: list[dict[str, Any]] = []
    for task_id, talk in zip(PAIR, (0.5, 4.0), strict=True):
        # The pair writes at once and then talks: each has its line in its worktree before
        # the other merges, so whichever merges second conflicts.
        insert = f"grep -qx {task_id} {SHARED} || sed -i 's/^end$/{task_id}\\nend/' {SHARED}"
        bash = {"tools": [{"name": "Bash", "input": {"command": insert}}]}
        turns = [bash, bash, {"text": f"{task_id} done", "latency": talk}]
        rules.append({"name": task_id, "match": f"[{task_id}]", "turns": [*turns, *spare]})
        tasks.append(_task(task_id, f"add the line {task_id} to {SHARED}", [], priority="critical"))
    writers = [f"t{i:02d}" for i in range(n_tasks - len(PAIR))]
    for index, task_id in enumerate(writers):
        earlier = writers[:index]
        deps = rng.sample(earlier, rng.randint(0, min(2, len(earlier)))) if index >= 3 else []
        write = {"name": "Write", "input": {"file_path": "{cwd}/" + work_file(task_id), "content": f"{task_id}\n"}}
        turns = [
            {"tools": [write], "latency": round(rng.uniform(*latency), 2)},
            {"tools": [write]},
            {"text": f"{task_id} done", "latency": round(rng.uniform(*latency), 2)},
        ]
        rules.append({"name": task_id, "match": f"[{task_id}]", "turns": [*turns, *spare]})
        tasks.append(_task(task_id, f"write {work_file(task_id)}", sorted(deps)))
    return KillDag(tasks, {"name": "kill-loop", "rules": rules})


def expected_files(dag: KillDag) -> set[str]:
    """Every file the run's final tree should hold, and nothing else."""
    return {SHARED} | {work_file(t) for t in dag.ids if t not in PAIR}


def work_file(task_id: str) -> str:
    """The file a writer task creates."""
    return f"work/{task_id}.txt"


def _task(task_id: str, what: str, deps: list[str], **fields: Any) -> dict[str, Any]:
    return {"id": task_id, "title": what, "prompt": f"[{task_id}] {what}", "deps": deps, **fields}


def _resolve_rule(spare: list[dict[str, Any]]) -> dict[str, Any]:
    # First rule: a resolve prompt quotes the conflicted task's prompt (and its marker).
    strip = f"sed -i -E '/^({_MARKERS})( |$)/d' {SHARED}"
    bash = {"tools": [{"name": "Bash", "input": {"command": strip}}]}
    turns = [bash, bash, {"text": "resolved"}]
    return {"name": "resolve", "match": "[claudecluster:resolve]", "turns": [*turns, *spare]}


def write_gate(directory: Path, python: str, seconds: tuple[float, float]) -> tuple[list[str], Path]:
    """Write the gate script; returns its argv and the directory it marks its runs in."""
    markers = directory / "gate-runs"
    markers.mkdir(parents=True, exist_ok=True)
    script = directory / "gate.py"
    script.write_text(GATE_SCRIPT)
    return [python, str(script), str(markers), str(seconds[0]), str(seconds[1])], markers
