"""The task DAG: validation, topological order, ready set, critical path, file overlaps."""

from __future__ import annotations

import fnmatch
import heapq
from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol

from pydantic import ValidationError

from .errors import PlanValidationError
from .models import Priority, TaskSpec

__all__ = [
    "TaskGraph",
    "file_overlap_warnings",
    "parse_tasks",
    "serialize_overlaps",
    "validate_tasks",
]


class _Node(Protocol):
    id: str
    deps: list[str]
    priority: Priority
    files: list[str]


def validate_tasks(tasks: Sequence[TaskSpec]) -> None:
    """Raise :class:`PlanValidationError` listing every problem: no tasks, duplicate ids,
    empty prompts, self-dependencies, unknown dependencies, and cycles (named)."""
    problems: list[str] = []
    if not tasks:
        raise PlanValidationError("a plan needs at least one task")
    seen: set[str] = set()
    for task in tasks:
        if task.id in seen:
            problems.append(f"duplicate task id {task.id!r}")
        seen.add(task.id)
        if not task.prompt.strip():
            problems.append(f"task {task.id!r} has an empty prompt")
        if task.id in task.deps:
            problems.append(f"task {task.id!r} depends on itself")
        if len(set(task.deps)) != len(task.deps):
            problems.append(f"task {task.id!r} lists a dependency twice")
    for task in tasks:
        for dep in task.deps:
            if dep not in seen:
                known = ", ".join(sorted(seen))
                problems.append(f"task {task.id!r} depends on unknown task {dep!r} (tasks: {known})")
    if not problems:
        cycle = _find_cycle({t.id: t.deps for t in tasks})
        if cycle:
            problems.append("dependency cycle: " + " → ".join(cycle))
    if problems:
        raise PlanValidationError("invalid plan: " + "; ".join(problems))


def _find_cycle(deps: Mapping[str, Sequence[str]]) -> list[str] | None:
    """A cycle as a closed path (first == last), or None. Iterative DFS."""
    white, grey, black = 0, 1, 2
    colour = dict.fromkeys(deps, white)
    for start in deps:
        if colour[start] != white:
            continue
        stack: list[tuple[str, int]] = [(start, 0)]
        path: list[str] = []
        while stack:
            node, index = stack.pop()
            if index == 0:
                colour[node] = grey
                path.append(node)
            children = deps.get(node, ())
            if index < len(children):
                stack.append((node, index + 1))
                child = children[index]
                if colour.get(child) == grey:
                    return [*path[path.index(child) :], child]
                if colour.get(child) == white:
                    stack.append((child, 0))
            else:
                colour[node] = black
                path.pop()
    return None


def _globs_overlap(a: str, b: str) -> bool:
    if a == b or fnmatch.fnmatchcase(a, b) or fnmatch.fnmatchcase(b, a):
        return True
    # A directory glob ("src/**", "src/*") covers anything below its literal prefix.
    for wide, narrow in ((a, b), (b, a)):
        prefix, star, rest = wide.partition("*")
        if star and prefix.endswith("/") and (star + rest) in ("*", "**", "**/*") and narrow.startswith(prefix):
            return True
    return False


class TaskGraph:
    """A validated DAG over tasks (anything with ``id``, ``deps``, ``priority``, ``files``)."""

    def __init__(self, tasks: Iterable[_Node]) -> None:
        self.tasks = {t.id: t for t in tasks}
        self.children: dict[str, list[str]] = {tid: [] for tid in self.tasks}
        for task in self.tasks.values():
            for dep in task.deps:
                if dep in self.children:
                    self.children[dep].append(task.id)

    def topological_order(self) -> list[str]:
        """Kahn's algorithm; among ready tasks, higher priority then longer critical path first."""
        remaining = {tid: sum(d in self.tasks for d in t.deps) for tid, t in self.tasks.items()}
        path = self.critical_path_lengths()
        heap = [self._key(tid, path) for tid, n in remaining.items() if n == 0]
        heapq.heapify(heap)
        order: list[str] = []
        while heap:
            *_, tid = heapq.heappop(heap)
            order.append(tid)
            for child in self.children[tid]:
                remaining[child] -= 1
                if remaining[child] == 0:
                    heapq.heappush(heap, self._key(child, path))
        return order

    def _key(self, tid: str, path: Mapping[str, float]) -> tuple[int, float, str]:
        return (-self.tasks[tid].priority.rank, -path[tid], tid)

    def critical_path_lengths(self, weights: Mapping[str, float] | None = None) -> dict[str, float]:
        """For each task, the longest weighted path from it to a sink (itself included)."""
        memo: dict[str, float] = {}
        # Iterative post-order so deep chains do not hit the recursion limit.
        for root in self.tasks:
            stack = [(root, False)]
            while stack:
                node, expanded = stack.pop()
                if node in memo:
                    continue
                if expanded:
                    weight = 1.0 if weights is None else weights.get(node, 1.0)
                    memo[node] = weight + max((memo[c] for c in self.children[node]), default=0.0)
                else:
                    stack.append((node, True))
                    stack.extend((c, False) for c in self.children[node] if c not in memo)
        return memo

    def critical_path(self, weights: Mapping[str, float] | None = None) -> list[str]:
        """The longest weighted chain of dependent tasks."""
        lengths = self.critical_path_lengths(weights)
        if not lengths:
            return []
        roots = [tid for tid, t in self.tasks.items() if not any(d in self.tasks for d in t.deps)]
        node = max(roots, key=lambda tid: (lengths[tid], tid))
        chain = [node]
        while self.children[node]:
            node = max(self.children[node], key=lambda tid: (lengths[tid], tid))
            chain.append(node)
        return chain

    def ancestors(self, tid: str) -> set[str]:
        """Every task ``tid`` depends on, directly or not."""
        seen: set[str] = set()
        stack = list(self.tasks[tid].deps)
        while stack:
            dep = stack.pop()
            if dep in seen or dep not in self.tasks:
                continue
            seen.add(dep)
            stack.extend(self.tasks[dep].deps)
        return seen

    def descendants(self, tid: str) -> set[str]:
        """Every task that depends on ``tid``, directly or not."""
        seen: set[str] = set()
        stack = list(self.children[tid])
        while stack:
            child = stack.pop()
            if child not in seen:
                seen.add(child)
                stack.extend(self.children[child])
        return seen


def file_overlap_warnings(tasks: Sequence[TaskSpec]) -> list[tuple[str, str, str]]:
    """Pairs of tasks whose file globs overlap and that no dependency orders: (a, b, message)."""
    with_files = [t for t in tasks if t.files]
    if len(with_files) < 2:
        return []
    graph = TaskGraph(tasks)
    ancestors = {t.id: graph.ancestors(t.id) for t in with_files}
    found: list[tuple[str, str, str]] = []
    for i, a in enumerate(with_files):
        for b in with_files[i + 1 :]:
            if a.id in ancestors[b.id] or b.id in ancestors[a.id]:
                continue
            shared = sorted({f"{x} ~ {y}" for x in a.files for y in b.files if _globs_overlap(x, y)})
            if shared:
                found.append(
                    (
                        a.id,
                        b.id,
                        f"tasks {a.id!r} and {b.id!r} may edit the same files ({', '.join(shared)}) "
                        "and no dependency orders them: expect a merge conflict",
                    )
                )
    return found


def parse_tasks(tasks: Sequence[object]) -> list[TaskSpec]:
    """Task specs from what a caller or the planner gave (specs or mappings), with every
    invalid field of every task named in one :class:`PlanValidationError`."""
    specs: list[TaskSpec] = []
    problems: list[str] = []
    for index, item in enumerate(tasks):
        try:
            specs.append(item if isinstance(item, TaskSpec) else TaskSpec.model_validate(item))
        except ValidationError as exc:
            label = item.get("id", f"#{index + 1}") if isinstance(item, Mapping) else f"#{index + 1}"
            for err in exc.errors():
                where = ".".join(str(p) for p in err["loc"]) or "task"
                problems.append(f"task {label}: {where}: {err['msg']}")
    if problems:
        raise PlanValidationError("invalid plan: " + "; ".join(problems))
    return specs


def serialize_overlaps(specs: list[TaskSpec], overlaps: Sequence[tuple[str, str, str]]) -> list[TaskSpec]:
    """Order each overlapping pair (the later in topological order depends on the earlier)."""
    order = {tid: i for i, tid in enumerate(TaskGraph(specs).topological_order())}
    extra: dict[str, set[str]] = {}
    for a, b, _ in overlaps:
        first, second = sorted((a, b), key=order.__getitem__)
        extra.setdefault(second, set()).add(first)
    return [s.model_copy(update={"deps": [*s.deps, *sorted(extra.get(s.id, set()) - set(s.deps))]}) for s in specs]
