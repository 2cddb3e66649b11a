"""Limits on input, each refused with an error naming it: tasks per plan, prompt and goal
size (an accepted prompt really reaches a real agent on its command line), file globs, task
ids that git refuses as branch names; and a big plan's validation never stalls the loop."""

from __future__ import annotations

import itertools
import random
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from pydantic import ValidationError

from claudecluster_mcp.claude_cli import ClaudeBinary
from claudecluster_mcp.engine import Cluster
from claudecluster_mcp.errors import ConfigError, PlanValidationError
from claudecluster_mcp.graph import _globs_overlap, find_file_overlaps, parse_tasks, validate_tasks
from claudecluster_mcp.model_server import ScriptedModelServer
from claudecluster_mcp.models import (
    MAX_ARG_STRLEN,
    MAX_FILES_PER_TASK,
    MAX_GOAL_BYTES,
    MAX_PROMPT_BYTES,
    MAX_STORED_TASK_ID_LENGTH,
    MAX_TASK_ID_LENGTH,
    MAX_TASKS_PER_PLAN,
    Task,
    TaskSpec,
    TaskState,
    ref_format_problem,
)
from claudecluster_mcp.prompts import resolve_prompt
from claudecluster_mcp.scenario import marker_rule, write_turn
from claudecluster_mcp.settings import EngineSettings
from claudecluster_mcp.store import now

StartServer = Callable[[dict[str, Any]], ScriptedModelServer]
Settings = Callable[..., EngineSettings]


def git_accepts(refname: str) -> bool:
    return subprocess.run(["git", "check-ref-format", refname], check=False).returncode == 0


# -- task ids -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad_id",
    ["a.", "x.", "a..b", "a.lock", "x" * (MAX_TASK_ID_LENGTH + 1), "x" * 64, "a@{b", "integration", "Integration"],
)
def test_ids_git_would_refuse_in_a_branch_are_rejected_at_once(bad_id: str) -> None:
    with pytest.raises(ValidationError, match="task id"):
        TaskSpec(id=bad_id, prompt="p")
    with pytest.raises(PlanValidationError, match="task id"):
        parse_tasks([{"id": bad_id, "prompt": "p"}])


@pytest.mark.parametrize("good_id", ["x" * MAX_TASK_ID_LENGTH, "a.lock.b", "v1.2.3", "a-b_c", "9"])
def test_an_accepted_id_works_in_every_branch_derived_from_it(good_id: str) -> None:
    TaskSpec(id=good_id, prompt="p")
    # Its branch, its resolve task's (the longest suffix _free_id can add: 8 digits).
    for derived in (good_id, f"{good_id}.resolve", f"{good_id}.resolve99999999"):
        assert git_accepts(f"refs/heads/claudecluster/p1a2b3c4d/{derived}"), derived
        assert len(derived) <= MAX_STORED_TASK_ID_LENGTH
        stamp = now()
        Task(id=derived, prompt="p", plan_id="p1", created_at=stamp, updated_at=stamp)


def test_ref_format_rule_agrees_with_git() -> None:
    parts = ["a", ".", "..", "a.", ".a", "a.lock", "@", "@{", "a b", "a~", "a^", "a:", "a?", "a*", "a[", "a\\", "é"]
    names = {f"refs/heads/{x}{y}" for x, y in itertools.product(parts, repeat=2)}
    names |= {"@", "a", "refs//a", "refs/a/", "/refs/a", "refs/heads/a/.b", "refs/heads/a.lock/b", "a/b\x7f"}
    disagree = [n for n in sorted(names) if (ref_format_problem(n) is None) != git_accepts(n)]
    assert disagree == []


# -- sizes and counts -----------------------------------------------------------------------


def test_too_many_tasks_is_refused_before_parsing_them() -> None:
    tasks = [{"id": f"t{i}", "prompt": "p"} for i in range(MAX_TASKS_PER_PLAN + 1)]
    started = time.perf_counter()
    with pytest.raises(PlanValidationError, match="MAX_TASKS_PER_PLAN"):
        parse_tasks(tasks)
    assert time.perf_counter() - started < 0.05
    with pytest.raises(PlanValidationError, match="MAX_TASKS_PER_PLAN"):
        validate_tasks([TaskSpec(id=f"t{i}", prompt="p") for i in range(MAX_TASKS_PER_PLAN + 1)])


def test_a_prompt_over_the_limit_names_it() -> None:
    with pytest.raises(PlanValidationError, match="MAX_PROMPT_BYTES"):
        parse_tasks([{"id": "a", "prompt": "é" * (MAX_PROMPT_BYTES // 2 + 1)}])  # counted in bytes


def test_too_many_file_globs_names_the_limit() -> None:
    with pytest.raises(PlanValidationError, match="MAX_FILES_PER_TASK"):
        parse_tasks([{"id": "a", "prompt": "p", "files": [f"f{i}" for i in range(MAX_FILES_PER_TASK + 1)]}])


def test_ids_differing_only_in_case_are_refused() -> None:
    with pytest.raises(PlanValidationError, match="differ only in case"):
        validate_tasks([TaskSpec(id="api", prompt="p"), TaskSpec(id="API", prompt="p")])


def test_a_plan_with_thousands_of_problems_gives_a_bounded_message() -> None:
    tasks = [TaskSpec(id=f"t{i}", prompt="p", deps=[f"missing{i}"]) for i in range(3000)]
    with pytest.raises(PlanValidationError, match="more problems") as caught:
        validate_tasks(tasks)
    assert len(str(caught.value)) < 16 * 1024


def test_budget_leaves_room_below_the_single_argument_limit() -> None:
    # Prompt + goal + the engine's note + a failed gate's output (≤ 1500 characters).
    assert MAX_PROMPT_BYTES + MAX_GOAL_BYTES + 1024 + 4 * 1500 < MAX_ARG_STRLEN - 8 * 1024


def test_a_resolve_prompt_stays_below_the_argument_limit() -> None:
    stamp = now()
    big = "é" * (MAX_PROMPT_BYTES // 2)

    def task(tid: str) -> Task:
        return Task(id=tid, prompt=big, title="t" * 500, plan_id="p1", created_at=stamp, updated_at=stamp)

    prompt = resolve_prompt(
        task("a"), [f"src/{'d' * 200}/{i}.py" for i in range(500)], [task(f"m{i}") for i in range(9)]
    )
    assert len(prompt.encode()) < MAX_ARG_STRLEN - 16 * 1024


@pytest.mark.anyio
async def test_a_goal_over_the_limit_names_it(claude: ClaudeBinary, repo: Path, engine_settings: Settings) -> None:
    async with Cluster.open(repo, settings=engine_settings(), claude=claude) as cluster:
        with pytest.raises(ConfigError, match="MAX_GOAL_BYTES"):
            await cluster.plan("g" * (MAX_GOAL_BYTES + 1), [TaskSpec(id="a", prompt="p")])


@pytest.mark.anyio
@pytest.mark.claude
async def test_the_largest_prompt_and_goal_reach_a_real_agent(
    claude: ClaudeBinary, repo: Path, model_server: StartServer, engine_settings: Settings
) -> None:
    # Before the limits, a prompt this size passed validation and the agent failed to start
    # with E2BIG, reported as "install the pinned CLI".
    server = model_server({"rules": [marker_rule("big", write_turn("big.txt", "ok\n"))]})
    head = "[big] write big.txt. "
    prompt = head + "é" * ((MAX_PROMPT_BYTES - len(head)) // 2)
    goal = "ü" * (MAX_GOAL_BYTES // 2)
    async with Cluster.open(repo, workers=1, settings=engine_settings(server), claude=claude) as cluster:
        plan = (await cluster.plan(goal, [TaskSpec(id="big", prompt=prompt)])).plan
        await cluster.dispatch(plan.id)
        with anyio.fail_after(90):
            status = await cluster.wait(plan.id)
    assert status.task("big").state is TaskState.MERGED, status.task("big").reason
    assert len(prompt.encode()) > MAX_PROMPT_BYTES - 4


# -- file overlaps on big plans -------------------------------------------------------------


def brute_force_pairs(tasks: list[TaskSpec]) -> set[tuple[str, str]]:
    from claudecluster_mcp.graph import TaskGraph

    graph = TaskGraph(tasks)
    ancestors = {t.id: graph.ancestors(t.id) for t in tasks}
    return {
        (a.id, b.id)
        for i, a in enumerate(tasks)
        for b in tasks[i + 1 :]
        if a.id not in ancestors[b.id]
        and b.id not in ancestors[a.id]
        and any(_globs_overlap(x, y) for x in a.files for y in b.files)
    }


def test_the_fast_overlap_check_finds_exactly_the_pairs_of_the_quadratic_one() -> None:
    rng = random.Random(3)
    pool = [
        "src/**",
        "src/*",
        "src/a.py",
        "src/b.py",
        "src/x/*.py",
        "src/x/y.py",
        "docs/*.md",
        "docs/i.md",
        "*",
        "t?.py",
    ]
    pool += ["tx.py", "src/[ab].py", "src/a.pyc", "README.md"]
    tasks = []
    for i in range(150):
        deps = rng.sample([t.id for t in tasks], k=min(len(tasks), rng.randint(0, 2)))
        tasks.append(TaskSpec(id=f"t{i}", prompt="p", deps=deps, files=rng.sample(pool, k=rng.randint(0, 3))))
    found = find_file_overlaps(tasks, limit=100_000)
    assert set(found.pairs) == brute_force_pairs(tasks)
    assert found.total == len(found.pairs) and found.complete


def big_plan(n: int) -> list[dict[str, Any]]:
    """Every task touches src/** (all pairs overlap), chains of 10, a few files each."""
    return [
        {
            "id": f"t{i}",
            "prompt": f"do {i}",
            "deps": [f"t{i - 1}"] if i % 10 else [],
            "files": ["src/**", f"src/m{i}/a.py", f"docs/{i}.md", f"src/m{i % 50}/*.py"],
        }
        for i in range(n)
    ]


@pytest.mark.anyio
async def test_planning_the_largest_plan_with_files_does_not_stall_the_event_loop(
    claude: ClaudeBinary, repo: Path, engine_settings: Settings
) -> None:
    gaps: list[float] = []
    planned = anyio.Event()

    async def ticker() -> None:
        last = time.perf_counter()
        while not planned.is_set():
            await anyio.sleep(0.005)
            gaps.append(time.perf_counter() - last)
            last = time.perf_counter()

    async with (
        Cluster.open(repo, settings=engine_settings(), claude=claude) as cluster,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(ticker)
        try:
            status = await cluster.plan("big", big_plan(MAX_TASKS_PER_PLAN))
        finally:
            planned.set()
    assert len(status.tasks) == MAX_TASKS_PER_PLAN
    pairs = MAX_TASKS_PER_PLAN * (MAX_TASKS_PER_PLAN - 1) // 2 - MAX_TASKS_PER_PLAN // 10 * 45
    assert status.plan.warnings[-1] == f"… and {pairs - 50} more pairs of tasks with overlapping files"
    # A stall would last as long as the whole validation (seconds); 0.25 s leaves room for a
    # busy machine's scheduling without letting one through.
    assert max(gaps) < 0.25, f"the event loop stalled for {max(gaps) * 1000:.0f} ms"


def test_serializing_more_overlaps_than_the_limit_is_refused() -> None:
    from claudecluster_mcp.graph import checked_plan

    with pytest.raises(PlanValidationError, match="MAX_SERIALIZED_OVERLAPS"):
        checked_plan(parse_tasks(big_plan(500)), serialize=True)
