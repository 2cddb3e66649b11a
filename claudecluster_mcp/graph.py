"""The task DAG: validation, topological order, ready set, critical path, file overlaps.

Everything here is linear or near-linear in the plan's size (the engine runs it in a worker
thread all the same): a plan of :data:`~claudecluster_mcp.models.MAX_TASKS_PER_PLAN` tasks
with files is checked in well under a second.
"""

from __future__ import annotations

import fnmatch
import heapq
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from pydantic import ValidationError

from .errors import PlanValidationError
from .models import MAX_FILE_GLOBS_PER_PLAN, MAX_TASKS_PER_PLAN, Priority, TaskSpec

__all__ = [
    "MAX_GLOB_COMPARISONS",
    "MAX_OVERLAP_WARNINGS",
    "MAX_SERIALIZED_OVERLAPS",
    "FileOverlaps",
    "TaskGraph",
    "checked_plan",
    "file_overlap_warnings",
    "find_file_overlaps",
    "overlap_message",
    "parse_tasks",
    "serialize_overlaps",
    "validate_tasks",
]

#: Overlapping pairs named in warnings (the rest are counted).
MAX_OVERLAP_WARNINGS = 50
#: Overlapping pairs ``serialize_overlaps`` orders; more is refused (add dependencies instead).
MAX_SERIALIZED_OVERLAPS = 10_000
#: Pairs of distinct globs compared before the overlap check gives up (and says so).
MAX_GLOB_COMPARISONS = 2_000_000
# Problems named in one validation error (the rest are counted): the message is shown to
# users and, from the planner, sent back to the planning agent on its command line.
_MAX_PROBLEMS = 30


class _Node(Protocol):
    id: str
    deps: list[str]
    priority: Priority
    files: list[str]


def validate_tasks(tasks: Sequence[TaskSpec]) -> None:
    """Raise :class:`PlanValidationError` listing every problem: no tasks, too many tasks or
    file globs, duplicate ids (also ids differing only in case: their branches and worktrees
    collide on case-insensitive file systems), empty prompts, self-dependencies, unknown
    dependencies, and cycles (named)."""
    if not tasks:
        raise PlanValidationError("a plan needs at least one task")
    _check_plan_size(len(tasks))
    problems: list[str] = []
    globs = sum(len(task.files) for task in tasks)
    if globs > MAX_FILE_GLOBS_PER_PLAN:
        problems.append(f"{globs} file globs in all; the limit is {MAX_FILE_GLOBS_PER_PLAN} (MAX_FILE_GLOBS_PER_PLAN)")
    seen: dict[str, str] = {}
    for task in tasks:
        other = seen.get(task.id.lower())
        if other == task.id:
            problems.append(f"duplicate task id {task.id!r}")
        elif other is not None:
            problems.append(f"task ids {other!r} and {task.id!r} differ only in case")
        seen.setdefault(task.id.lower(), task.id)
        if not task.prompt.strip():
            problems.append(f"task {task.id!r} has an empty prompt")
        if task.id in task.deps:
            problems.append(f"task {task.id!r} depends on itself")
        if len(set(task.deps)) != len(task.deps):
            problems.append(f"task {task.id!r} lists a dependency twice")
    ids = {task.id for task in tasks}
    known = _listing(sorted(ids))
    for task in tasks:
        for dep in task.deps:
            if dep not in ids:
                problems.append(f"task {task.id!r} depends on unknown task {dep!r} (tasks: {known})")
    if not problems:
        cycle = _find_cycle({t.id: t.deps for t in tasks})
        if cycle:
            problems.append("dependency cycle: " + " → ".join(cycle))
    if problems:
        raise _invalid(problems)


def _check_plan_size(count: int) -> None:
    if count > MAX_TASKS_PER_PLAN:
        raise PlanValidationError(
            f"invalid plan: {count} tasks; the limit is {MAX_TASKS_PER_PLAN} per plan (MAX_TASKS_PER_PLAN)"
        )


def _listing(ids: Sequence[str], shown: int = 20) -> str:
    more = f", … {len(ids) - shown} more" if len(ids) > shown else ""
    return ", ".join(ids[:shown]) + more


def _invalid(problems: Sequence[str]) -> PlanValidationError:
    more = f"; … and {len(problems) - _MAX_PROBLEMS} more problems" if len(problems) > _MAX_PROBLEMS else ""
    return PlanValidationError("invalid plan: " + "; ".join(problems[:_MAX_PROBLEMS]) + more)


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


@dataclass(frozen=True)
class FileOverlaps:
    """Pairs of tasks whose file globs overlap and that no dependency orders."""

    pairs: list[tuple[str, str]]  #: the first pairs found, in task order (at most the limit asked for)
    total: int  #: how many such pairs there are
    complete: bool  #: False if the check gave up after MAX_GLOB_COMPARISONS glob comparisons


_GLOB_SPECIAL = re.compile(r"[*?\[]")


def _literal_prefix(glob: str) -> str:
    """What every path a glob matches starts with. Two globs can only overlap if one's
    literal prefix is a prefix of the other's (both are prefixes of a common path)."""
    special = _GLOB_SPECIAL.search(glob)
    return glob if special is None else glob[: special.start()]


def _bits(mask: int) -> Iterator[int]:
    while mask:
        low = mask & -mask
        yield low.bit_length() - 1
        mask ^= low


def find_file_overlaps(tasks: Sequence[TaskSpec], limit: int = MAX_OVERLAP_WARNINGS) -> FileOverlaps:
    """Unordered task pairs with overlapping files, near-linear in the plan's size.

    Globs are compared only when one's literal prefix is a prefix of the other's (a sorted
    scan finds exactly those pairs); which tasks are ordered is a bitset of ancestors and
    descendants per task, so a pair costs a few machine words, not a graph walk."""
    index = {t.id: i for i, t in enumerate(tasks)}
    graph = TaskGraph(tasks)
    order = [index[tid] for tid in graph.topological_order()]
    ordered = [1 << i for i in range(len(tasks))]  # itself, its ancestors and descendants
    ancestors = [0] * len(tasks)
    for i in order:
        for dep in tasks[i].deps:
            if (j := index.get(dep)) is not None:
                ancestors[i] |= ancestors[j] | (1 << j)
    descendants = [0] * len(tasks)
    for i in reversed(order):
        for child in graph.children[tasks[i].id]:
            j = index[child]
            descendants[i] |= descendants[j] | (1 << j)
    for i in range(len(tasks)):
        ordered[i] |= ancestors[i] | descendants[i]

    holders: dict[str, int] = {}  # glob → the tasks listing it (bitset)
    for i, task in enumerate(tasks):
        for glob in task.files:
            holders[glob] = holders.get(glob, 0) | (1 << i)
    globs = sorted(holders, key=lambda g: (_literal_prefix(g), g))
    prefixes = [_literal_prefix(g) for g in globs]
    near = dict(holders)  # glob → the tasks listing a glob overlapping it
    comparisons, complete = 0, True
    for x, glob in enumerate(globs):
        for y in range(x + 1, len(globs)):
            if not prefixes[y].startswith(prefixes[x]):
                break
            comparisons += 1
            if _globs_overlap(glob, globs[y]):
                near[glob] |= holders[globs[y]]
                near[globs[y]] |= holders[glob]
        if comparisons > MAX_GLOB_COMPARISONS:
            complete = False
            break

    pairs: list[tuple[str, str]] = []
    total = 0
    for i, task in enumerate(tasks):
        reach = 0
        for glob in task.files:
            reach |= near[glob]
        later = (reach & ~ordered[i]) >> (i + 1)
        total += later.bit_count()
        for offset in _bits(later):
            if len(pairs) >= limit:
                break
            pairs.append((task.id, tasks[i + 1 + offset].id))
    return FileOverlaps(pairs, total, complete)


def overlap_message(a: TaskSpec, b: TaskSpec) -> str:
    """The warning for two unordered tasks whose files overlap, naming the globs."""
    shared = sorted({f"{x} ~ {y}" for x in a.files for y in b.files if _globs_overlap(x, y)})
    return (
        f"tasks {a.id!r} and {b.id!r} may edit the same files ({', '.join(shared)}) "
        "and no dependency orders them: expect a merge conflict"
    )


def file_overlap_warnings(tasks: Sequence[TaskSpec], limit: int = MAX_OVERLAP_WARNINGS) -> list[tuple[str, str, str]]:
    """Pairs of tasks whose file globs overlap and that no dependency orders: (a, b, message),
    at most ``limit`` of them (:func:`find_file_overlaps` counts them all)."""
    by_id = {t.id: t for t in tasks}
    found = find_file_overlaps(tasks, limit)
    return [(a, b, overlap_message(by_id[a], by_id[b])) for a, b in found.pairs]


def parse_tasks(tasks: Sequence[object]) -> list[TaskSpec]:
    """Task specs from what a caller or the planner gave (specs or mappings), with every
    invalid field of every task named in one :class:`PlanValidationError`."""
    _check_plan_size(len(tasks))
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
        raise _invalid(problems)
    return specs


def serialize_overlaps(specs: list[TaskSpec], overlaps: Sequence[tuple[str, str, str]]) -> list[TaskSpec]:
    """Order each overlapping pair (the later in topological order depends on the earlier)."""
    order = {tid: i for i, tid in enumerate(TaskGraph(specs).topological_order())}
    extra: dict[str, set[str]] = {}
    for a, b, _ in overlaps:
        first, second = sorted((a, b), key=order.__getitem__)
        extra.setdefault(second, set()).add(first)
    return [s.model_copy(update={"deps": [*s.deps, *sorted(extra.get(s.id, set()) - set(s.deps))]}) for s in specs]


def checked_plan(specs: list[TaskSpec], *, serialize: bool) -> tuple[list[TaskSpec], list[str]]:
    """Validate ``specs`` and check their files: (specs, warnings). With ``serialize``, each
    unordered overlapping pair gets a dependency instead (refused beyond
    :data:`MAX_SERIALIZED_OVERLAPS` pairs). CPU-bound: the engine runs it in a thread."""
    validate_tasks(specs)
    found = find_file_overlaps(specs, MAX_SERIALIZED_OVERLAPS if serialize else MAX_OVERLAP_WARNINGS)
    if serialize and (found.total > MAX_SERIALIZED_OVERLAPS or not found.complete):
        raise PlanValidationError(
            f"invalid plan: {found.total if found.complete else 'too many'} pairs of tasks have overlapping files; "
            f"serialize_overlaps orders at most {MAX_SERIALIZED_OVERLAPS} (MAX_SERIALIZED_OVERLAPS): "
            "add dependencies or narrow the tasks' files"
        )
    by_id = {t.id: t for t in specs}
    shown = found.pairs[:MAX_OVERLAP_WARNINGS]
    warnings = [overlap_message(by_id[a], by_id[b]) for a, b in shown]
    if found.total > len(shown):
        warnings.append(f"… and {found.total - len(shown)} more pairs of tasks with overlapping files")
    if not found.complete:
        warnings.append(
            f"the file overlap check stopped after {MAX_GLOB_COMPARISONS} glob comparisons (MAX_GLOB_COMPARISONS): "
            "more overlaps may go unreported"
        )
    if serialize and found.pairs:
        specs = serialize_overlaps(specs, [(a, b, "") for a, b in found.pairs])
        warnings = [w + " (serialized by an added dependency)" for w in warnings]
    return specs, warnings
