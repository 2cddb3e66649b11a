"""Hypothesis strategies for fuzzing the MCP surface: odd strings, junk JSON values, and
arguments for each tool that mix valid values (real repositories, plan and task ids of a
running server) with everything a careless or hostile client might send."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any

from hypothesis import strategies as st
from pydantic import Field, TypeAdapter, ValidationError

from claudecluster_mcp.models import MAX_GOAL_BYTES, TASK_ID_PATTERN

#: Strings that have broken path, ref, id and text handling elsewhere.
ODD_TEXT = [
    "",
    " ",
    "\t\n",
    "\r\n",
    "-",
    "--",
    "-rf",
    "--help",
    "--upload-pack=touch /tmp/pwned",
    "..",
    "../",
    "../../..",
    "/",
    "/etc",
    "/etc/passwd",
    "~",
    "~root",
    "$HOME",
    "a\x00b",
    "\x00",
    "HEAD",
    "HEAD~1",
    "HEAD^{tree}",
    "@",
    "@{-1}",
    "main..other",
    "refs/heads/main",
    "x.lock",
    "a b",
    "*",
    "?",
    "[",
    "\\",
    "C:\\x",
    ":",
    "::",
    "a:b:c",
    "/:/",
    "%2e%2e%2f",
    "file:///etc/passwd",
    "p00000000",
    "💥",
    "\u202egnp.exe",
    "\uff4d\uff41\uff49\uff4e",
    "\ud800",
    "a\udfffb",
]

#: Long strings: over the prompt limit (96 KiB), over PATH_MAX, many path components.
HUGE = st.sampled_from([("x", 200_000), ("é", 3000), ("a/", 3000)]).map(lambda piece: piece[0] * piece[1])

#: Any text, surrogates and control characters included, or one of :data:`ODD_TEXT`.
TEXT = st.one_of(
    st.sampled_from(ODD_TEXT),
    HUGE,
    st.text(max_size=30),
    st.text(st.characters(exclude_categories=()), max_size=12),
)

#: Any JSON-like value (and non-JSON floats: NaN, infinities).
JUNK: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)

VALID_TASK_IDS = st.one_of(st.sampled_from(["a", "b", "c"]), st.from_regex(TASK_ID_PATTERN, fullmatch=True))
TASK_IDS = st.one_of(
    VALID_TASK_IDS,
    VALID_TASK_IDS,
    st.sampled_from(["a.b", "x_y", "-x", ".x", "a/b", "a:b", "HEAD", "integration", "..", "é", "x" * 48, "x" * 49]),
    TEXT,
)
REFS = st.one_of(
    st.sampled_from(["main", "HEAD", "HEAD~0", "main~99", "nope", "-x", "--orphan", "/main", "main/", "a..b"]),
    TEXT,
)


_WAIT = TypeAdapter(Annotated[float, Field(ge=0, le=600)])


def short_wait(arguments: dict[str, Any]) -> dict[str, Any]:
    """``status`` arguments whose ``wait_seconds``, if the server would accept it, is at most
    10 ms: a longer wait long-polls a plan that never changes."""
    try:
        wait = _WAIT.validate_python(arguments.get("wait_seconds", 0))
    except ValidationError:
        return arguments
    return {**arguments, "wait_seconds": min(wait, 0.01)}


def maybe(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """A valid value, or now and then junk."""
    return st.one_of(valid, valid, valid, JUNK)


@st.composite
def arguments(draw: st.DrawFn, required: tuple[str, ...] = (), **fields: st.SearchStrategy[Any]) -> dict[str, Any]:
    """Tool arguments: the ``required`` fields and some others, each with a valid value
    (whose text may still be odd); one time in four, a field (or an unknown one) is then
    replaced by junk or left out."""
    present = {name: fields[name] for name in required}
    drawn: dict[str, Any] = draw(
        st.fixed_dictionaries(present, optional={k: v for k, v in fields.items() if k not in present})
    )
    if draw(st.integers(0, 3)) == 0:
        name = draw(st.sampled_from([*fields, "unexpected"]))
        if draw(st.booleans()):
            drawn.pop(name, None)
        else:
            drawn[name] = draw(JUNK)
    return drawn


#: Ordinary text: no control characters, no surrogates, not empty.
PLAIN = st.text(st.characters(exclude_categories=("Cs", "Cc")), min_size=1, max_size=40).filter(str.strip)


@st.composite
def valid_tasks(draw: st.DrawFn) -> list[dict[str, Any]]:
    """A task list the server accepts: unique ids, ordinary prompts, deps on earlier tasks."""
    ids = draw(st.lists(VALID_TASK_IDS, min_size=1, max_size=4, unique_by=str.lower))
    tasks = []
    for index, task_id in enumerate(ids):
        task: dict[str, Any] = {"id": task_id, "prompt": draw(PLAIN)}
        if index and draw(st.booleans()):
            task["deps"] = draw(st.lists(st.sampled_from(ids[:index]), max_size=2, unique=True))
        if draw(st.booleans()):
            task["files"] = draw(st.lists(st.sampled_from(["src/**", "*.py", "README.md", "a/b.txt"]), max_size=2))
        tasks.append(task)
    return tasks


def task_specs(ids: st.SearchStrategy[str] = TASK_IDS) -> st.SearchStrategy[dict[str, Any]]:
    """A task of the `plan` tool: valid-looking, with odd text, or with a junk field."""

    @st.composite
    def task(draw: st.DrawFn) -> dict[str, Any]:
        drawn = {"id": draw(ids), "prompt": draw(TEXT)}
        drawn |= draw(
            arguments(
                title=TEXT,
                deps=st.lists(ids, max_size=3),
                priority=st.sampled_from(["low", "medium", "high", "critical"]),
                category=st.sampled_from(["code", "test", "refactor", "analyze", "document"]),
                files=st.lists(TEXT, max_size=3),
            )
        )
        return drawn

    return task()


@dataclass
class Known:
    """What a running server knows: its repositories and other paths, plans and tasks."""

    paths: list[str]
    valid_repos: list[str]
    plans: list[str]
    tasks: list[str] = field(default_factory=list)  # '<plan_id>:<task id>'

    @property
    def plan_ids(self) -> st.SearchStrategy[str]:
        """Plan ids of this server, of nothing, or odd."""
        return st.one_of(
            st.sampled_from(self.plans), st.sampled_from(["pdeadbeef", "p", "P" + self.plans[0][1:]]), TEXT
        )

    @property
    def task_refs(self) -> st.SearchStrategy[str]:
        """Task refs: known, crossed between plans, with the other separator, or odd."""
        locals_ = st.sampled_from([t.partition(":")[2] for t in self.tasks])
        return st.one_of(
            st.sampled_from(self.tasks),
            st.builds(lambda p, sep, t: f"{p}{sep}{t}", self.plan_ids, st.sampled_from([":", "/", "::"]), locals_),
            st.builds(lambda p, t: f"{p}:{t}", self.plan_ids, TASK_IDS),
            TEXT,
        )

    def repo(self) -> st.SearchStrategy[str]:
        """Repository paths: good, outside the roots, symlinked out, not a repo, odd."""
        return st.one_of(st.sampled_from(self.valid_repos), st.sampled_from(self.paths), TEXT)

    def tool_arguments(self, tool: str) -> st.SearchStrategy[dict[str, Any]]:
        """Fuzzed arguments for ``tool``."""
        waits = st.sampled_from([0, 0.01, 1, -1, 600.5, 1e308, float("nan"), float("inf"), "1", True])
        strategies: dict[str, st.SearchStrategy[dict[str, Any]]] = {
            "plan": self.plan_arguments(),
            "dispatch": arguments(
                ("plan_id",),
                plan_id=self.plan_ids,
                workers=st.integers(-3, 70),
                task_ids=st.lists(st.one_of(TASK_IDS, self.task_refs), max_size=3),
            ),
            "status": arguments(
                plan_id=self.plan_ids,
                task_id=self.task_refs,
                wait_seconds=waits,
                until_finished=st.booleans(),
                all_tasks=st.booleans(),
            ).map(short_wait),
            "merge": arguments(("plan_id",), plan_id=self.plan_ids, target=REFS, dry_run=st.booleans()),
            "cancel": arguments(plan_id=self.plan_ids, task_id=self.task_refs),
            "approve": arguments(("task_id",), task_id=self.task_refs, reject=st.booleans()),
            "logs": arguments(("task_id",), task_id=self.task_refs, tail=st.integers(-5, 6000)),
            "workers": arguments(count=st.integers(-3, 70)),
        }
        return strategies[tool]

    def plan_arguments(self) -> st.SearchStrategy[dict[str, Any]]:
        """`plan` arguments that never start a planning agent: a call without tasks has a goal
        the server refuses before planning (see the test module)."""

        def safe(arguments: dict[str, Any]) -> bool:
            return arguments.get("tasks") is not None or goal_refused(arguments.get("goal"))

        odd_tasks = st.lists(task_specs(st.one_of(VALID_TASK_IDS, VALID_TASK_IDS, TASK_IDS)), max_size=4)
        return arguments(
            ("goal", "repo", "tasks"),
            goal=st.one_of(PLAIN, TEXT),
            repo=st.one_of(st.sampled_from(self.valid_repos), self.repo()),
            tasks=st.one_of(valid_tasks(), valid_tasks(), valid_tasks(), odd_tasks),
            base_ref=st.one_of(st.sampled_from(["main", "HEAD"]), REFS),
            target=st.one_of(st.sampled_from(["main", "feature/x"]), REFS),
            merge_policy=st.sampled_from(["resolve", "report"]),
        ).filter(safe)


def goal_refused(goal: object) -> bool:
    """Whether `plan` refuses ``goal`` before it would start a planning agent."""
    if not isinstance(goal, str) or not goal.strip() or "\x00" in goal:
        return True
    try:
        return len(goal.encode("utf-8")) > MAX_GOAL_BYTES
    except UnicodeEncodeError:
        return True


def resource_uris(known: Known) -> st.SearchStrategy[str]:
    """URIs of the two resource templates with fuzzed ids, and odd URIs."""
    return st.one_of(
        st.builds("claudecluster://plans/{}".format, st.one_of(known.plan_ids, TEXT)),
        st.builds("claudecluster://tasks/{}/log".format, st.one_of(known.task_refs, TEXT)),
        st.sampled_from(
            [
                "claudecluster://plans/",
                "claudecluster://tasks//log",
                "claudecluster://plans/../tasks/x/log",
                "claudecluster://tasks/a:b/log/extra",
                "claudecluster://PLANS/x",
                "claudecluster:plans/x",
                "file:///etc/passwd",
                "http://127.0.0.1/",
                "",
                "x",
            ]
        ),
        TEXT,
    )
