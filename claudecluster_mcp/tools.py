"""The MCP tools: plan, dispatch, status, merge, cancel, approve, logs and workers, as plain
module-level functions over the engine facade (resources and the prompt are in
:mod:`~claudecluster_mcp.resources`; sessions and error mapping in
:mod:`~claudecluster_mcp.mcp_session`).

Each tool is an ``async def`` taking the :class:`~claudecluster_mcp.hub.Hub` first and its
arguments after, so it can be called (and tested) directly::

    view = await tools.plan(hub, goal="…", repo="~/src/app", tasks=[…])

Inside a server the hub parameter is filled by the SDK's resolver (:data:`HubDep`), so it
is not part of the input schema. :data:`TOOLS` lists the tools as data (title and
annotations each); :func:`register` puts them, the resources and the prompt on a server.
:func:`~claudecluster_mcp.mcp_session.reported` is the one place a
:class:`~claudecluster_mcp.errors.ClusterError` becomes an MCP error, for tools and resources.
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any

from mcp.server.mcpserver import Context, MCPServer
from mcp.types import CallToolResult, TextContent, ToolAnnotations
from pydantic import BaseModel, Field

from .engine import STATUS_FOCUS
from .errors import ConfigError
from .hub import Hub
from .mcp_session import HubDep, check_text, reported
from .merge_queue import FinalMerge
from .models import MergePolicy, PlanStatus, TaskSpec, split_task_ref
from .resources import register_resources
from .views import LogsView, PlanView, StatusView, WorkersView, summary_of

__all__ = [
    "TOOLS",
    "ToolSpec",
    "approve",
    "cancel",
    "dispatch",
    "logs",
    "merge",
    "plan",
    "register",
    "status",
    "workers",
]

#: Observes every tool call: (tool name, seconds, failed).
Observer = Callable[[str, float, bool], None]


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
    max_cost_usd: Annotated[
        float | None,
        Field(
            gt=0,
            description="Budget of all the plan's agents together, in USD (default: the max_cost_usd setting): "
            "once reached, no new agent starts and the plan ends.",
        ),
    ] = None,
    max_tokens: Annotated[
        int | None, Field(gt=0, description="Token budget of all the plan's agents together (default: the setting).")
    ] = None,
    ctx: Context | None = None,
) -> PlanView:
    """Validate and store a plan for a goal in a git repository, without running anything.

    Returns the plan id (use it with `dispatch`, `status`, `merge`), the tasks in dependency
    order, and warnings (e.g. tasks that may edit the same files). Errors name every problem
    (unknown dependency, duplicate id, cycle, bad ref). Without `tasks`, progress notifications
    say what the planning agent does."""
    async with hub.cluster(repo) as cluster:
        stored = await cluster.plan(
            goal,
            tasks,
            base_ref=base_ref,
            target=target,
            merge_policy=merge_policy,
            max_cost_usd=max_cost_usd,
            max_tokens=max_tokens,
            on_progress=ctx.report_progress if ctx is not None else None,
        )
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
        return StatusView.of_cluster(started, cluster)


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
        task_plan, local = split_task_ref(task_id)
        if plan_id not in (None, task_plan):
            raise ConfigError(f"task {task_id} is not in plan {plan_id}; give the task_id alone")
        plan_id = task_plan
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
        return StatusView.of_cluster(found, cluster)


async def merge(
    hub: HubDep,
    plan_id: Annotated[str, Field(description="The plan to merge.")],
    target: Annotated[str | None, Field(description="Branch to merge into (default: the plan's target).")] = None,
    dry_run: Annotated[bool, Field(description="Only report what would happen.")] = False,
    ctx: Context | None = None,
) -> FinalMerge:
    """Merge the plan's integration branch (all merged tasks) into the target branch: a
    fast-forward if the target has not moved, else a merge commit after a conflict check,
    which must pass the plan's gate (progress notifications meanwhile). Conflicts or a failed
    gate are reported and nothing changes; a checked-out target with local changes is
    refused. The answer includes the command that undoes the merge."""
    async with hub.cluster_of_plan(plan_id) as cluster:
        return await cluster.merge(
            plan_id, target, dry_run=dry_run, on_progress=ctx.report_progress if ctx is not None else None
        )


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
        return StatusView.of_cluster(cancelled, cluster)


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
        return StatusView.of_cluster(decided, cluster)


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


# -- registration ------------------------------------------------------------------------------


def _as_tool(fn: Callable[..., Awaitable[BaseModel]], observe: Observer | None) -> Callable[..., Awaitable[Any]]:
    """``fn`` with domain errors reported, every call observed, and its result as structured
    content (for programs) plus one readable line (for the model, instead of a JSON dump)."""

    @functools.wraps(fn)
    async def call(*args: Any, **kwargs: Any) -> CallToolResult:
        started, failed = time.perf_counter(), True
        try:
            with reported("tool"):
                for name, argument in kwargs.items():
                    if not isinstance(argument, Hub | Context):
                        check_text(argument, name)
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
    register_resources(mcp)
