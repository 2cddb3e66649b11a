"""The task DAG: validation messages, task ids, ordering, critical paths, file overlaps."""

from __future__ import annotations

import itertools
import re
from typing import Any

import pytest
from pydantic import ValidationError

from claudecluster_mcp.errors import ConfigError, PlanValidationError
from claudecluster_mcp.graph import TaskGraph, file_overlap_warnings, serialize_overlaps, validate_tasks
from claudecluster_mcp.models import Priority, TaskSpec


def spec(tid: str, *deps: str, prompt: str | None = None, **fields: Any) -> TaskSpec:
    return TaskSpec(id=tid, prompt=f"do {tid}" if prompt is None else prompt, deps=list(deps), **fields)


def problems_of(tasks: list[TaskSpec]) -> str:
    with pytest.raises(PlanValidationError) as caught:
        validate_tasks(tasks)
    return str(caught.value)


# -- validate_tasks -------------------------------------------------------------------------


def test_a_valid_dag_passes() -> None:
    validate_tasks([spec("a"), spec("b", "a"), spec("c", "a"), spec("d", "b", "c")])


def test_plan_validation_error_is_a_config_error() -> None:
    assert issubclass(PlanValidationError, ConfigError)


def test_empty_task_list() -> None:
    assert problems_of([]) == "a plan needs at least one task"


def test_duplicate_id() -> None:
    assert "duplicate task id 'a'" in problems_of([spec("a"), spec("b"), spec("a")])


@pytest.mark.parametrize("prompt", ["", "   ", "\n\t "])
def test_empty_or_whitespace_prompt(prompt: str) -> None:
    assert "task 'b' has an empty prompt" in problems_of([spec("a"), spec("b", prompt=prompt)])


def test_self_dependency() -> None:
    assert "task 'a' depends on itself" in problems_of([spec("a", "a")])


def test_duplicate_dependency() -> None:
    assert "task 'b' lists a dependency twice" in problems_of([spec("a"), spec("b", "a", "a")])


def test_unknown_dependency_lists_the_known_tasks() -> None:
    message = problems_of([spec("build"), spec("test", "build", "lint"), spec("docs")])
    assert "task 'test' depends on unknown task 'lint' (tasks: build, docs, test)" in message


def test_three_cycle_is_named_as_a_closed_arrow_path() -> None:
    message = problems_of([spec("A", "C"), spec("B", "A"), spec("C", "B"), spec("D", "A")])
    match = re.search(r"dependency cycle: (.+?)(?:;|$)", message)
    assert match, message
    path = match.group(1).split(" → ")
    assert len(path) == 4
    assert path[0] == path[-1], "the cycle is reported as a closed path"
    assert sorted(path[:-1]) == ["A", "B", "C"]
    assert "D" not in path
    # Each arrow follows a real dependency edge: X → Y means X depends on Y.
    deps = {"A": "C", "B": "A", "C": "B"}
    for here, there in itertools.pairwise(path):
        assert deps[here] == there


def test_two_cycle_and_acyclic_rest() -> None:
    message = problems_of([spec("root"), spec("x", "root", "y"), spec("y", "x")])
    assert re.search(r"dependency cycle: (x → y → x|y → x → y)$", message), message


def test_several_problems_are_reported_together() -> None:
    message = problems_of(
        [
            spec("a", prompt=" "),
            spec("a"),
            spec("b", "b"),
            spec("c", "ghost", "a", "a"),
        ]
    )
    assert message.startswith("invalid plan: ")
    for problem in (
        "task 'a' has an empty prompt",
        "duplicate task id 'a'",
        "task 'b' depends on itself",
        "task 'c' lists a dependency twice",
        "task 'c' depends on unknown task 'ghost'",
    ):
        assert problem in message
    assert message.count("; ") == 4


# -- TaskSpec ids ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad_id",
    ["-rf", "--help", "a/b", "a b", " a", "a..b", "a.lock", "x" * 65, "", ".hidden", "_x", "ä", "a\nb"],
)
def test_unsafe_task_ids_are_rejected(bad_id: str) -> None:
    with pytest.raises(ValidationError, match="task id"):
        TaskSpec(id=bad_id, prompt="p")


def test_a_task_id_with_a_trailing_newline_is_rejected() -> None:
    with pytest.raises(ValidationError, match="task id"):
        TaskSpec(id="abc\n", prompt="p")


@pytest.mark.parametrize("good_id", ["a.b_c-1", "A", "9", "x" * 48, "v1.2.3"])
def test_safe_task_ids_are_accepted(good_id: str) -> None:
    assert TaskSpec(id=good_id, prompt="p").id == good_id


def test_task_spec_rejects_unknown_fields() -> None:
    with pytest.raises(ValidationError):
        TaskSpec(id="a", prompt="p", depends_on=["b"])  # type: ignore[call-arg]


# -- TaskGraph ------------------------------------------------------------------------------


def diamond() -> TaskGraph:
    #   a → b → d      (b, c depend on a; d on both)
    #     ↘ c ↗
    return TaskGraph([spec("a"), spec("b", "a"), spec("c", "a"), spec("d", "b", "c")])


def chain(n: int) -> list[TaskSpec]:
    return [spec("t0")] + [spec(f"t{i}", f"t{i - 1}") for i in range(1, n)]


def assert_respects_deps(order: list[str], tasks: list[TaskSpec]) -> None:
    position = {tid: i for i, tid in enumerate(order)}
    assert sorted(order) == sorted(t.id for t in tasks)
    for task in tasks:
        for dep in task.deps:
            assert position[dep] < position[task.id], f"{dep} must come before {task.id}"


def test_topological_order_respects_dependencies() -> None:
    tasks = [spec("e", "d"), spec("d", "b", "c"), spec("c", "a"), spec("b", "a"), spec("a"), spec("z")]
    order = TaskGraph(tasks).topological_order()
    assert_respects_deps(order, tasks)


def test_topological_order_puts_higher_priority_first_among_ready_tasks() -> None:
    tasks = [
        spec("low", priority=Priority.LOW),
        spec("medium"),
        spec("critical", priority=Priority.CRITICAL),
        spec("high", priority=Priority.HIGH),
    ]
    assert TaskGraph(tasks).topological_order() == ["critical", "high", "medium", "low"]


def test_topological_order_breaks_priority_ties_by_longer_critical_path() -> None:
    tasks = [
        spec("short"),
        spec("long"),
        spec("long2", "long"),
        spec("long3", "long2"),
        spec("mid"),
        spec("mid2", "mid"),
    ]
    order = TaskGraph(tasks).topological_order()
    assert order[0] == "long"
    assert order.index("mid") < order.index("short")
    assert order[-1] == "short"
    assert_respects_deps(order, tasks)


def test_priority_beats_critical_path_length() -> None:
    tasks = [spec("long"), spec("long2", "long"), spec("long3", "long2"), spec("urgent", priority=Priority.CRITICAL)]
    assert TaskGraph(tasks).topological_order()[0] == "urgent"


def test_a_dependency_never_waits_for_priority() -> None:
    # A critical task depending on a low one still comes after it.
    tasks = [spec("base", priority=Priority.LOW), spec("top", "base", priority=Priority.CRITICAL), spec("other")]
    order = TaskGraph(tasks).topological_order()
    assert order.index("base") < order.index("top")


def test_critical_path_lengths_on_a_diamond() -> None:
    assert diamond().critical_path_lengths() == {"a": 3.0, "b": 2.0, "c": 2.0, "d": 1.0}


def test_critical_path_lengths_with_weights() -> None:
    lengths = diamond().critical_path_lengths({"a": 1, "b": 10, "c": 2, "d": 0.5})
    assert lengths == {"a": 11.5, "b": 10.5, "c": 2.5, "d": 0.5}


def test_missing_weights_default_to_one() -> None:
    assert diamond().critical_path_lengths({"c": 5}) == {"a": 7.0, "b": 2.0, "c": 6.0, "d": 1.0}


def test_critical_path_on_a_diamond_follows_the_heavier_branch() -> None:
    graph = diamond()
    assert graph.critical_path({"b": 10}) == ["a", "b", "d"]
    assert graph.critical_path({"c": 10}) == ["a", "c", "d"]
    unweighted = graph.critical_path()
    assert len(unweighted) == 3
    assert unweighted[0] == "a"
    assert unweighted[-1] == "d"


def test_critical_path_on_a_chain() -> None:
    graph = TaskGraph([*chain(5), spec("side")])
    assert graph.critical_path() == ["t0", "t1", "t2", "t3", "t4"]
    assert graph.critical_path_lengths()["t0"] == 5.0
    assert graph.critical_path({"side": 100}) == ["side"]
    assert graph.critical_path({"t2": 2.5})[0] == "t0"
    assert graph.critical_path_lengths({"t2": 2.5})["t0"] == 6.5


def test_critical_path_of_no_tasks_is_empty() -> None:
    assert TaskGraph([]).critical_path() == []
    assert TaskGraph([]).topological_order() == []


def test_ancestors_and_descendants() -> None:
    graph = TaskGraph([spec("a"), spec("b", "a"), spec("c", "a"), spec("d", "b", "c"), spec("e", "d"), spec("f")])
    assert graph.ancestors("e") == {"a", "b", "c", "d"}
    assert graph.ancestors("b") == {"a"}
    assert graph.ancestors("a") == set()
    assert graph.descendants("a") == {"b", "c", "d", "e"}
    assert graph.descendants("c") == {"d", "e"}
    assert graph.descendants("e") == set()
    assert graph.ancestors("f") == graph.descendants("f") == set()


def test_a_2000_task_chain_does_not_hit_the_recursion_limit() -> None:
    tasks = chain(2000)
    validate_tasks(tasks)
    graph = TaskGraph(tasks)
    assert graph.topological_order() == [f"t{i}" for i in range(2000)]
    assert graph.critical_path_lengths()["t0"] == 2000.0
    assert len(graph.critical_path()) == 2000
    assert len(graph.ancestors("t1999")) == 1999
    assert len(graph.descendants("t0")) == 1999


def test_a_long_cycle_is_found_without_recursion() -> None:
    tasks = [spec("t0", "t1999")] + [spec(f"t{i}", f"t{i - 1}") for i in range(1, 2000)]
    message = problems_of(tasks)
    path = message.removeprefix("invalid plan: dependency cycle: ").split(" → ")
    assert len(path) == 2001
    assert path[0] == path[-1]


# -- file_overlap_warnings ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("files_a", "files_b"),
    [
        (["src/app.py"], ["src/app.py"]),
        (["src/*.py"], ["src/a.py"]),
        (["src/a.py"], ["src/*.py"]),
        (["src/**"], ["src/x/y.py"]),
        (["docs/*.md", "src/**"], ["tests/t.py", "src/x/y.py"]),
    ],
)
def test_overlapping_globs_of_unordered_tasks_warn(files_a: list[str], files_b: list[str]) -> None:
    warnings = file_overlap_warnings([spec("a", files=files_a), spec("b", files=files_b)])
    assert len(warnings) == 1
    a, b, message = warnings[0]
    assert (a, b) == ("a", "b")
    assert "'a' and 'b'" in message
    assert "merge conflict" in message


def test_overlap_message_names_the_globs() -> None:
    [(_, _, message)] = file_overlap_warnings([spec("a", files=["src/*.py"]), spec("b", files=["src/a.py"])])
    assert "src/*.py ~ src/a.py" in message


def test_tasks_ordered_by_a_dependency_do_not_warn() -> None:
    tasks = [
        spec("a", files=["src/app.py"]),
        spec("b", "a", files=["src/other.py"]),
        spec("c", "b", files=["src/app.py"]),  # ordered after a transitively
    ]
    assert file_overlap_warnings(tasks) == []


def test_only_the_unordered_pair_warns() -> None:
    tasks = [spec("a", files=["x.py"]), spec("b", "a", files=["x.py"]), spec("c", files=["x.py"])]
    assert [(a, b) for a, b, _ in file_overlap_warnings(tasks)] == [("a", "c"), ("b", "c")]


@pytest.mark.parametrize(
    ("files_a", "files_b"),
    [
        (["src/a.py"], ["src/b.py"]),
        (["src/**"], ["tests/test_a.py"]),
        (["docs/*.md"], ["src/*.py"]),
        ([], ["src/a.py"]),
        (["src/x/*"], ["src/y/z.py"]),
    ],
)
def test_disjoint_globs_do_not_warn(files_a: list[str], files_b: list[str]) -> None:
    assert file_overlap_warnings([spec("a", files=files_a), spec("b", files=files_b)]) == []


@pytest.mark.parametrize(("files_a", "files_b"), [(["src/*.py"], ["src/README.md"]), (["src/*.py"], ["src/*.txt"])])
def test_same_directory_globs_with_different_extensions_do_not_warn(files_a: list[str], files_b: list[str]) -> None:
    assert file_overlap_warnings([spec("a", files=files_a), spec("b", files=files_b)]) == []


# -- graph.serialize_overlaps ----------------------------------------------------------------------


def test_serialize_orders_overlapping_tasks_and_stays_acyclic() -> None:
    tasks = [
        spec("api", files=["src/api.py"], priority=Priority.HIGH),
        spec("cli", files=["src/cli.py", "src/api.py"]),
        spec("docs", files=["docs/**"]),
        spec("readme", "docs", files=["docs/index.md"]),
        spec("tests", "cli", files=["src/**"]),
    ]
    overlaps = file_overlap_warnings(tasks)
    assert {(a, b) for a, b, _ in overlaps} == {("api", "cli"), ("api", "tests")}
    serialized = serialize_overlaps(tasks, overlaps)

    validate_tasks(serialized)
    by_id = {t.id: t for t in serialized}
    order = TaskGraph(tasks).topological_order()
    # The later of each pair in topological order now depends on the earlier one.
    for a, b, _ in overlaps:
        first, second = sorted((a, b), key=order.index)
        assert first in by_id[second].deps
    assert by_id["cli"].deps == ["api"]
    assert by_id["tests"].deps == ["cli", "api"]
    assert by_id["readme"].deps == ["docs"], "existing deps are kept and not duplicated"
    assert file_overlap_warnings(serialized) == []
    # The input is not modified.
    assert tasks[1].deps == []


def test_serialize_does_not_duplicate_an_existing_dependency() -> None:
    tasks = [spec("a", files=["f"]), spec("b", "a", files=["f"])]
    assert serialize_overlaps(tasks, [("a", "b", "overlap")])[1].deps == ["a"]
