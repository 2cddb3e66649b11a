"""The MCP surface: seven tools (plan, dispatch, status, merge, cancel, logs, workers), two
resource templates and a prompt, as plain module-level functions over the engine facade.

Each tool is an ``async def`` taking the :class:`~claudecluster_mcp.hub.Hub` first and its
arguments after, so it can be called (and tested) directly::

    view = await tools.plan(hub, goal="…", repo="~/src/app", tasks=[…])

Inside a server the hub parameter is filled by the SDK's resolver (:data:`HubDep`), so it
is not part of the input schema. :data:`TOOLS` lists the tools as data (title and
annotations each); :func:`register` puts them, the resources and the prompt on a server.
:func:`reported` is the one place a :class:`~claudecluster_mcp.errors.ClusterError`
becomes an MCP error, for tools (an ``isError`` result carrying the message) and resources.
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ResourceError, ResourceNotFoundError, ToolError
from mcp.server.mcpserver.resolve import Resolve
from mcp.types import CallToolResult, TextContent, ToolAnnotations
from pydantic import BaseModel, Field

from .engine import STATUS_FOCUS
from .errors import ClusterError, ConfigError, NotFoundError
from .hub import Hub, HubRef
from .merge_queue import FinalMerge
from .models import MergePolicy, PlanStatus, TaskSpec, split_task_ref
from .report import event_line
from .views import LogsView, PlanView, StatusView, WorkersView, summary_of

__all__ = [
    "TOOLS",
    "HubDep",
    "ToolSpec",
    "approve",
    "cancel",
    "current_hub",
    "dispatch",
    "lifespan",
    "logs",
    "merge",
    "plan",
    "plan_resource",
    "register",
    "reported",
    "split_goal",
    "status",
    "task_log_resource",
    "workers",
]

HUB_KEY = "hub"

#: Observes every tool call: (tool name, seconds, failed).
Observer = Callable[[str, float, bool], None]


# -- errors: the one mapping ---------------------------------------------------------------


@contextmanager
def reported(kind: Literal["tool", "resource"]) -> Iterator[None]:
    """Turn a :class:`ClusterError` into the MCP error for ``kind``, keeping its message:
    a ``ToolError`` (the client gets an ``isError`` result), or for resources a
    ``ResourceNotFoundError`` (unknown or malformed ids) or ``ResourceError``. Anything else
    is a bug: the SDK logs its traceback and shows the client no details."""
    try:
        yield
    except ClusterError as exc:
        if kind == "tool":
            raise ToolError(str(exc)) from exc
        if isinstance(exc, NotFoundError | ConfigError):
            raise ResourceNotFoundError(str(exc)) from exc
        raise ResourceError(str(exc)) from exc


# -- finding the hub -----------------------------------------------------------------------


def lifespan(ref: HubRef) -> Callable[[MCPServer[Any]], AbstractAsyncContextManager[dict[str, Any]]]:
    """The server lifespan handing sessions ``ref``; the hub itself outlives sessions (the
    SSE transport enters the lifespan once per connection)."""

    @asynccontextmanager
    async def enter(_: MCPServer[Any]) -> AsyncIterator[dict[str, Any]]:
        yield {HUB_KEY: ref}

    return enter


def _hub_of(ctx: Context) -> Hub:
    ref = ctx.request_context.lifespan_context[HUB_KEY]
    assert isinstance(ref, HubRef)
    return ref.get()


def current_hub(ctx: Context) -> Hub:
    """The running hub of the server handling this request (the resolver of :data:`HubDep`)."""
    with reported("tool"):
        return _hub_of(ctx)


#: A tool parameter the SDK fills with the hub (not part of the input schema).
HubDep = Annotated[Hub, Resolve(current_hub)]


# -- the tools -------------------------------------------------------------------------------


async def plan(
    hub: HubDep,
    goal: Annotated[str, Field(description="What the work should achieve, in one or two sentences.")],
    repo: Annotated[
        str | None, Field(description="Path of the git repository (default: the server's first root).")
    ] = None,
    tasks: Annotated[
        list[TaskSpec] | None,
        Field(
            description="The tasks, if you split the goal yourself: each has a unique `id`, a `title`, a "
            "self-contained `prompt` for one agent, `deps` (ids of tasks it needs merged first), optional "
            "`priority` (low|medium|high|critical), `category` (code|test|refactor|analyze|document) and "
            "`files` (globs it will touch). Omit to let a read-only Claude Code planning run split the goal."
        ),
    ] = None,
    base_ref: Annotated[str | None, Field(description="Commit/branch to start from (default: HEAD).")] = None,
    target: Annotated[
        str | None, Field(description="Branch the final merge goes into (default: the current branch).")
    ] = None,
    merge_policy: Annotated[
        MergePolicy | None,
        Field(description="On a merge conflict: 'resolve' (an agent resolves it) or 'report' (stop and say how)."),
    ] = None,
) -> PlanView:
    """Validate and store a plan for a goal in a git repository, without running anything.

    Returns the plan id (use it with `dispatch`, `status`, `merge`), the tasks in dependency
    order, and warnings (e.g. tasks that may edit the same files). Errors name every problem
    (unknown dependency, duplicate id, cycle, bad ref)."""
    async with hub.cluster(repo) as cluster:
        stored = await cluster.plan(goal, tasks, base_ref=base_ref, target=target, merge_policy=merge_policy)
    return PlanView.of(stored)


async def dispatch(
    hub: HubDep,
    plan_id: Annotated[str, Field(description="The id `plan` returned.")],
    workers: Annotated[
        int | None, Field(ge=1, le=64, description="Agents to run at once (default: the pool size).")
    ] = None,
    task_ids: Annotated[list[str] | None, Field(description="Run only these tasks of the plan (default: all).")] = None,
) -> StatusView:
    """Start the plan's agents and return at once. Each task runs as a Claude Code agent in its own
    git worktree as soon as its dependencies are merged. Follow it with `status`."""
    async with hub.cluster_of_plan(plan_id) as cluster:
        if workers is not None:
            hub.set_workers(workers)
        started = await cluster.dispatch(plan_id, task_ids)
        return StatusView.of(
            started, workers=cluster.workers, agents_running=cluster.running, isolation=cluster.settings.isolation
        )


async def status(
    hub: HubDep,
    plan_id: Annotated[str | None, Field(description="A plan id; omit both ids to list every plan.")] = None,
    task_id: Annotated[str | None, Field(description="A task id '<plan_id>:<task>' to see one task.")] = None,
    wait_seconds: Annotated[
        float,
        Field(
            ge=0,
            le=600,
            description="Long-poll: wait up to this long for a task state to change before answering "
            "(progress notifications are sent meanwhile).",
        ),
    ] = 0,
    until_finished: Annotated[
        bool, Field(description="With wait_seconds: keep waiting until every task is final, not just until a change.")
    ] = False,
    all_tasks: Annotated[
        bool,
        Field(
            description=f"List every task. By default a plan of more than {STATUS_FOCUS} tasks lists only "
            "those needing attention (running, waiting, awaiting merge, failed, …); the rest are counted."
        ),
    ] = False,
    ctx: Context | None = None,
) -> StatusView:
    """Live state of a plan: per-task state, attempts, elapsed time, turns, cost, tokens, last
    activity and merge state, plus counts by state and totals."""
    if plan_id is None and task_id is None:
        overview: list[PlanStatus] = []
        for open_cluster in hub.clusters:
            overview += await open_cluster.overview()
        return StatusView.listing(overview)
    local = None
    if task_id is not None:
        plan_id, local = split_task_ref(task_id)
    assert plan_id is not None
    async with hub.cluster_of_plan(plan_id) as cluster:
        found = await cluster.status(
            plan_id,
            task_id=local,
            focus=None if all_tasks else STATUS_FOCUS,
            wait=wait_seconds,
            until_finished=until_finished,
            on_progress=ctx.report_progress if ctx is not None else None,
        )
        return StatusView.of(
            found, workers=cluster.workers, agents_running=cluster.running, isolation=cluster.settings.isolation
        )


async def merge(
    hub: HubDep,
    plan_id: Annotated[str, Field(description="The plan to merge.")],
    target: Annotated[str | None, Field(description="Branch to merge into (default: the plan's target).")] = None,
    dry_run: Annotated[bool, Field(description="Only report what would happen.")] = False,
) -> FinalMerge:
    """Merge the plan's integration branch (all merged tasks) into the target branch: a
    fast-forward if the target has not moved, else a merge commit after a conflict check.
    Conflicts are listed and nothing changes; a checked-out target with local changes is
    refused. The answer includes the command that undoes the merge."""
    async with hub.cluster_of_plan(plan_id) as cluster:
        return await cluster.merge(plan_id, target, dry_run=dry_run)


async def cancel(
    hub: HubDep,
    plan_id: Annotated[str | None, Field(description="Cancel this whole plan.")] = None,
    task_id: Annotated[str | None, Field(description="Or only this task, '<plan_id>:<task>'.")] = None,
) -> StatusView:
    """Stop running agents (no process survives) and cancel waiting tasks; dependents of a
    cancelled task are blocked. Merged work stays on the integration branch."""
    if (plan_id is None) == (task_id is None):
        raise ConfigError("give exactly one of plan_id or task_id")
    local = None
    if task_id is not None:
        plan_id, local = split_task_ref(task_id)
    assert plan_id is not None
    async with hub.cluster_of_plan(plan_id) as cluster:
        cancelled = await cluster.cancel(plan_id, local)
        return StatusView.of(
            cancelled, workers=cluster.workers, agents_running=cluster.running, isolation=cluster.settings.isolation
        )


async def approve(
    hub: HubDep,
    task_id: Annotated[str, Field(description="The held task, '<plan_id>:<task>'.")],
    reject: Annotated[
        bool, Field(description="Reject it instead: it is cancelled and its dependents blocked.")
    ] = False,
) -> StatusView:
    """Approve a task held because its changes touch protected paths (claudecluster.toml,
    .mcp.json, .claude/**, …): it is merged like any other. Or reject it."""
    plan_id, local = split_task_ref(task_id)
    async with hub.cluster_of_plan(plan_id) as cluster:
        decided = await cluster.approve(plan_id, local, reject=reject)
        return StatusView.of(
            decided, workers=cluster.workers, agents_running=cluster.running, isolation=cluster.settings.isolation
        )


async def logs(
    hub: HubDep,
    task_id: Annotated[str, Field(description="The task, '<plan_id>:<task>'.")],
    tail: Annotated[int, Field(ge=1, le=5000, description="How many of the last events to return.")] = 100,
) -> LogsView:
    """A task's agent events (text, tool calls and results, state changes), oldest first."""
    plan_id, local = split_task_ref(task_id)
    async with hub.cluster_of_plan(plan_id) as cluster:
        task = await cluster.task(plan_id, local)
        events = await cluster.events(plan_id, local, limit=tail)
        return LogsView.of(task, events, cluster.transcript(task))


async def workers(
    hub: HubDep,
    count: Annotated[int | None, Field(ge=1, le=64, description="New pool size; omit to only read it.")] = None,
) -> WorkersView:
    """Read or resize the pool of agent slots (1 to 64); a resize applies at once."""
    if count is not None:
        hub.set_workers(count)
    clusters = hub.clusters
    return WorkersView(
        workers=hub.workers,
        agents_running=sum(c.running for c in clusters),
        repositories=[str(c.repo) for c in clusters],
        pools={str(c.repo): c.workers for c in clusters},
    )


@dataclass(frozen=True)
class ToolSpec:
    """A tool as data: its function (whose name and docstring are the tool's name and
    description), a title and its annotations."""

    fn: Callable[..., Awaitable[BaseModel]]
    title: str
    annotations: ToolAnnotations


_READ_ONLY = ToolAnnotations(read_only_hint=True, destructive_hint=False, idempotent_hint=True, open_world_hint=False)

TOOLS: tuple[ToolSpec, ...] = (
    ToolSpec(
        plan,
        "Plan a goal as a task DAG",
        ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=False),
    ),
    ToolSpec(
        dispatch,
        "Start running a plan",
        ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=True),
    ),
    ToolSpec(status, "Progress of a plan or task", _READ_ONLY),
    ToolSpec(
        merge,
        "Merge a finished plan into its target branch",
        ToolAnnotations(read_only_hint=False, destructive_hint=True, idempotent_hint=False),
    ),
    ToolSpec(
        cancel,
        "Cancel a plan or a task",
        ToolAnnotations(read_only_hint=False, destructive_hint=True, idempotent_hint=True),
    ),
    ToolSpec(logs, "What an agent did", _READ_ONLY),
    ToolSpec(
        approve,
        "Approve or reject a task held for changing protected paths",
        ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=False),
    ),
    ToolSpec(
        workers,
        "Agent pool size",
        ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=True),
    ),
)


# -- resources and the prompt ------------------------------------------------------------------


async def plan_resource(plan_id: str, ctx: Context) -> str:
    """A plan's status as JSON."""
    with reported("resource"):
        async with _hub_of(ctx).cluster_of_plan(plan_id) as cluster:
            found = await cluster.status(plan_id)
            view = StatusView.of(
                found, workers=cluster.workers, agents_running=cluster.running, isolation=cluster.settings.isolation
            )
    return view.model_dump_json(indent=2)


async def task_log_resource(task_id: str, ctx: Context) -> str:
    """A task's agent events as text, one line each."""
    with reported("resource"):
        plan_id, local = split_task_ref(task_id)
        async with _hub_of(ctx).cluster_of_plan(plan_id) as cluster:
            events = await cluster.events(plan_id, local)
    return "\n".join(event_line(e) for e in events) + "\n"


def split_goal(goal: str, repo: str = ".") -> str:
    """Guide for turning a coding goal into tasks for the `plan` tool."""
    return (
        f"Split this coding goal into tasks for claudecluster, then call the `plan` tool with repo={repo!r}.\n\n"
        f"Goal: {goal}\n\n"
        "Read the relevant code first. Each task runs as a separate Claude Code agent in its own git "
        "worktree, in parallel with the others, and only sees the work of tasks listed in its `deps` "
        "(they are merged before it starts). So:\n"
        "- give every task a unique short `id`, a `title` and a self-contained `prompt` naming the files "
        "and functions to change and how to check the result;\n"
        "- add `deps` only where a task needs another's result, keeping the graph wide;\n"
        "- avoid two independent tasks editing the same file (make one depend on the other, or merge them);\n"
        "- list the files each task touches in `files` (globs);\n"
        "- put tests in their own task depending on the code they test, with `category: test`.\n"
        "Then call `dispatch` and follow progress with `status` (wait_seconds=60), and `merge` when done."
    )


# -- registration ------------------------------------------------------------------------------


def _as_tool(fn: Callable[..., Awaitable[BaseModel]], observe: Observer | None) -> Callable[..., Awaitable[Any]]:
    """``fn`` with domain errors reported, every call observed, and its result as structured
    content (for programs) plus one readable line (for the model, instead of a JSON dump)."""

    @functools.wraps(fn)
    async def call(*args: Any, **kwargs: Any) -> CallToolResult:
        started, failed = time.perf_counter(), True
        try:
            with reported("tool"):
                value = await fn(*args, **kwargs)
            failed = False
        finally:
            if observe is not None:
                observe(fn.__name__, time.perf_counter() - started, failed)
        return CallToolResult(
            content=[TextContent(type="text", text=summary_of(value))],
            structured_content=value.model_dump(mode="json"),
        )

    return call


def register(mcp: MCPServer[Any], *, observe: Observer | None = None) -> None:
    """Add every tool of :data:`TOOLS`, the resources and the prompt to ``mcp``, whose
    lifespan must come from :func:`lifespan`."""
    for spec in TOOLS:
        mcp.add_tool(
            _as_tool(spec.fn, observe),
            name=spec.fn.__name__,
            title=spec.title,
            description=inspect.cleandoc(spec.fn.__doc__ or ""),  # what the host model reads
            annotations=spec.annotations,
        )
    mcp.resource("claudecluster://plans/{plan_id}", mime_type="application/json", title="A plan's status")(
        plan_resource
    )
    mcp.resource("claudecluster://tasks/{task_id}/log", mime_type="text/plain", title="A task's agent log")(
        task_log_resource
    )
    mcp.prompt(title="Split a goal into claudecluster tasks")(split_goal)
