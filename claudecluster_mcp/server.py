"""The MCP server: plan, dispatch, status, merge, cancel, logs and workers as MCP tools, over
stdio, legacy SSE and Streamable HTTP.

One :class:`Hub` per server process holds one :class:`~claudecluster_mcp.engine.Cluster`
per repository, opened on first use and shared by every session and transport; it outlives
connections. Domain errors become ``isError`` results with the error's message; invalid
arguments are rejected by the SDK with the field names; nothing crashes a session.
"""

from __future__ import annotations

import contextlib
import functools
import hmac
import inspect
import logging
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal, ParamSpec, TypeVar

import anyio
from anyio.abc import TaskGroup, TaskStatus
from mcp.server.auth.provider import AccessToken
from mcp.server.auth.settings import AuthSettings
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ResourceNotFoundError, ToolError
from mcp.server.transport_security import TransportSecuritySettings
from mcp.types import CallToolResult, TextContent, ToolAnnotations
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, Field
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from . import __version__
from .agent import ClaudeBinary
from .engine import STATUS_FOCUS, Cluster, EngineSettings, FinalMerge
from .errors import ClusterError, ConfigError, NotFoundError, RepositoryError
from .models import ACTIVE_STATES, FINAL_STATES, MergePolicy, PlanStatus, Task, TaskSpec, TaskState, split_task_ref
from .registry import Registry
from .report import event_line
from .workspace import repo_root

__all__ = [
    "Hub",
    "PlanView",
    "ServerSettings",
    "StatusView",
    "TaskView",
    "build_http_app",
    "build_server",
    "serve_stdio",
]

logger = logging.getLogger(__name__)
P = ParamSpec("P")
R = TypeVar("R")
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class ServerSettings(BaseModel):
    """How the server runs: where repositories may be, how agents run, how HTTP is secured."""

    roots: list[Path] = Field(default_factory=lambda: [Path.cwd()], description="repositories must lie below these")
    engine: EngineSettings = Field(default_factory=EngineSettings)
    host: str = "127.0.0.1"
    port: int = 8765
    token: str | None = None
    allowed_hosts: list[str] = Field(default_factory=list, description="extra Host header values to accept")
    allowed_origins: list[str] = Field(default_factory=list, description="extra Origin header values to accept")


# -- views: what the tools return ----------------------------------------------------------


class TaskView(BaseModel):
    """A task as the tools report it."""

    task_id: str = Field(description="global id: <plan_id>:<task id>")
    id: str
    title: str
    kind: str
    state: TaskState
    deps: list[str]
    priority: str
    category: str
    attempts: int
    elapsed_s: float | None
    turns: int
    cost_usd: float
    input_tokens: int
    output_tokens: int
    last_activity: str
    reason: str
    branch: str | None
    commit: str | None
    merge_commit: str | None
    changed_files: list[str]

    @classmethod
    def of(cls, task: Task) -> TaskView:
        """The view of a stored task."""
        elapsed = None
        if task.started_at is not None:
            end = task.finished_at if task.state not in ACTIVE_STATES and task.finished_at else datetime.now(UTC)
            elapsed = round((end - task.started_at).total_seconds(), 1)
        return cls(
            task_id=f"{task.plan_id}:{task.id}",
            id=task.id,
            title=task.title,
            kind=task.kind.value,
            state=task.state,
            deps=task.deps,
            priority=task.priority.value,
            category=task.category.value,
            attempts=task.attempts,
            elapsed_s=elapsed,
            turns=task.turns,
            cost_usd=round(task.cost_usd, 6),
            input_tokens=task.input_tokens,
            output_tokens=task.output_tokens,
            last_activity=task.last_activity,
            reason=task.reason,
            branch=task.branch,
            commit=task.commit,
            merge_commit=task.merge_commit,
            changed_files=task.changed_files,
        )


class PlanView(BaseModel):
    """A stored plan: its id, where its work goes, and its tasks in dependency order."""

    plan_id: str
    repo: str
    goal: str
    state: str
    base_commit: str
    integration_branch: str
    target_branch: str
    warnings: list[str]
    tasks: list[TaskView]

    def summary(self) -> str:
        """One line for humans."""
        order = " → ".join(t.id for t in self.tasks)
        warn = f"; {len(self.warnings)} warning(s): {' | '.join(self.warnings)}" if self.warnings else ""
        return f"plan {self.plan_id}: {len(self.tasks)} tasks ({order}); dispatch it to start{warn}"


class PlanSummary(BaseModel):
    """One line per plan, for `status` without ids."""

    plan_id: str
    repo: str
    goal: str
    state: str
    counts: dict[str, int]


class StatusView(BaseModel):
    """Live state of a plan (or of one task), with counts and totals; without ids, `plans`
    lists every plan of the open repositories instead."""

    plan_id: str | None = None
    goal: str = ""
    state: str = ""
    finished: bool = False
    counts: dict[str, int] = Field(default_factory=dict)
    total_cost_usd: float = 0.0
    total_tokens: int = 0
    workers: int = 0
    agents_running: int = 0
    tasks: list[TaskView] = Field(default_factory=list)
    tasks_omitted: int = Field(default=0, description="tasks left out of `tasks` (pending or merged, big plans)")
    final_merge: dict[str, Any] | None = None
    plans: list[PlanSummary] = Field(default_factory=list)

    def summary(self) -> str:
        """One line for humans."""
        if self.plan_id is None:
            if not self.plans:
                return "no plans yet: create one with the plan tool"
            return f"{len(self.plans)} plan(s): " + "; ".join(f"{p.plan_id} {p.state} {p.counts}" for p in self.plans)
        counts = ", ".join(f"{n} {s}" for s, n in sorted(self.counts.items()))
        return (
            f"plan {self.plan_id} {self.state}{' (finished)' if self.finished else ''}: {counts}; "
            f"{self.agents_running} agents running; ${self.total_cost_usd:.4f}, {self.total_tokens:,} tokens"
        )


class LogsView(BaseModel):
    """A task's recorded agent events, oldest first."""

    task_id: str
    state: TaskState
    lines: list[str]
    transcript: str | None = Field(description="path of the raw agent transcript of the last attempt")

    def summary(self) -> str:
        """The log itself, as text."""
        return f"{self.task_id} ({self.state.value}), last {len(self.lines)} events:\n" + "\n".join(self.lines)


class WorkersView(BaseModel):
    """The agent pool."""

    workers: int
    agents_running: int
    repositories: list[str]

    def summary(self) -> str:
        """One line for humans."""
        return f"{self.workers} agent slots, {self.agents_running} running"


def _summary_of(value: BaseModel) -> str:
    if isinstance(value, FinalMerge):
        if value.kind == "conflict":
            return (
                f"plan {value.plan_id} conflicts with {value.target} in: {', '.join(value.conflicts)}; nothing changed"
            )
        verb = "would be" if value.dry_run else "was"
        return f"plan {value.plan_id} {verb} merged into {value.target} ({value.kind}); undo: {value.undo or '-'}"
    summary = getattr(value, "summary", None)
    return str(summary()) if callable(summary) else value.model_dump_json()


def _plan_view(status: PlanStatus) -> PlanView:
    plan = status.plan
    return PlanView(
        plan_id=plan.id,
        repo=str(plan.repo),
        goal=plan.goal,
        state=plan.state.value,
        base_commit=plan.base_commit,
        integration_branch=plan.integration_branch,
        target_branch=plan.target_branch,
        warnings=plan.warnings,
        tasks=[TaskView.of(t) for t in status.tasks],
    )


def _status_view(status: PlanStatus, cluster: Cluster) -> StatusView:
    return StatusView(
        plan_id=status.plan.id,
        goal=status.plan.goal,
        state=status.plan.state.value,
        finished=status.finished,
        counts=status.counts,
        total_cost_usd=round(status.total_cost_usd, 6),
        total_tokens=status.total_tokens,
        workers=cluster.workers,
        agents_running=cluster.running,
        tasks=[TaskView.of(t) for t in status.tasks],
        tasks_omitted=status.omitted,
        final_merge=status.plan.final_merge,
    )


# -- the hub ---------------------------------------------------------------------------------


class _BearerToken:
    """Accepts exactly one shared bearer token (compared in constant time)."""

    def __init__(self, token: str) -> None:
        self._token = token

    async def verify_token(self, token: str) -> AccessToken | None:
        if hmac.compare_digest(token.encode(), self._token.encode()):
            return AccessToken(token=token, client_id="claudecluster", scopes=["claudecluster"])
        return None


class Hub:
    """The engines of one server process: a Cluster per repository, shared by all sessions."""

    def __init__(self, settings: ServerSettings, claude: ClaudeBinary | None, tg: TaskGroup) -> None:
        self.settings = settings
        self.claude = claude
        self._tg = tg
        self._clusters: dict[Path, Cluster] = {}
        self._lock = anyio.Lock()
        self.registry = Registry(settings.engine.state_dir / "registry.db")
        self.roots = [root.expanduser().resolve() for root in settings.roots]

    @classmethod
    @asynccontextmanager
    async def open(cls, settings: ServerSettings, *, claude: ClaudeBinary | None = None) -> AsyncIterator[Hub]:
        """Run a hub; reopens repositories with running plans so they carry on."""
        async with anyio.create_task_group() as tg:
            hub = cls(settings, claude, tg)
            await hub._resume_running()
            try:
                yield hub
            finally:
                tg.cancel_scope.cancel()

    async def _resume_running(self) -> None:
        for repo in await anyio.to_thread.run_sync(self._repos_with_running_plans):
            with contextlib.suppress(ClusterError):
                await self.cluster(str(repo))

    def _repos_with_running_plans(self) -> list[Path]:
        if not self.registry.path.exists():
            return []
        with contextlib.closing(sqlite3.connect(self.registry.path)) as db:
            repos = {Path(row[0]) for row in db.execute("SELECT DISTINCT repo FROM plans")}
        running = []
        for repo in repos:
            state_db = repo / ".git" / "claudecluster" / "state.db"
            if not state_db.exists() or not any(self._inside_roots(repo)):
                continue
            with contextlib.suppress(sqlite3.Error), contextlib.closing(sqlite3.connect(state_db)) as db:
                if db.execute("SELECT 1 FROM plans WHERE state = 'running' LIMIT 1").fetchone():
                    running.append(repo)
        return running

    def _inside_roots(self, path: Path) -> list[Path]:
        return [root for root in self.roots if path == root or root in path.parents]

    async def cluster(self, repo: str | None) -> Cluster:
        """The cluster of ``repo`` (default: the first root), opened if needed."""
        path = Path(repo).expanduser() if repo else self.roots[0]
        if not path.is_absolute():
            path = self.roots[0] / path
        path = path.resolve()
        if not self._inside_roots(path):
            roots = ", ".join(str(r) for r in self.roots)
            raise RepositoryError(
                f"{path} is outside the allowed roots ({roots}); start the server with --root {path} to allow it"
            )
        root = await repo_root(path)
        async with self._lock:
            if root not in self._clusters:
                self._clusters[root] = await self._tg.start(self._host, root)
            return self._clusters[root]

    async def _host(self, repo: Path, *, task_status: TaskStatus[Cluster]) -> None:
        try:
            async with Cluster.open(repo, settings=self.settings.engine, claude=self.claude) as cluster:
                task_status.started(cluster)
                await anyio.sleep_forever()
        finally:
            self._clusters.pop(repo, None)

    async def cluster_of_plan(self, plan_id: str) -> Cluster:
        """The cluster holding ``plan_id`` (:class:`NotFoundError` listing known plans)."""
        for cluster in self._clusters.values():
            with contextlib.suppress(NotFoundError):
                await cluster.store.plan(plan_id)
                return cluster
        repo = await anyio.to_thread.run_sync(self.registry.lookup, plan_id)
        return await self.cluster(str(repo))

    @property
    def clusters(self) -> list[Cluster]:
        """Open clusters."""
        return list(self._clusters.values())

    def set_workers(self, count: int) -> None:
        """Resize every repository's agent pool."""
        self.settings.engine = self.settings.engine.model_copy(update={"workers": count})
        for cluster in self._clusters.values():
            cluster.set_workers(count)


# -- metrics ---------------------------------------------------------------------------------


class Metrics:
    """Prometheus metrics of one server (a private registry, so tests can build several)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.tasks = Gauge("claudecluster_tasks", "Tasks by state", ["state"], registry=self.registry)
        self.agents = Gauge("claudecluster_agents_running", "Agent processes running", registry=self.registry)
        self.queue = Gauge("claudecluster_queue_depth", "Tasks ready and waiting for a slot", registry=self.registry)
        self.merges = Gauge(
            "claudecluster_merge_outcomes", "Tasks by merge outcome", ["outcome"], registry=self.registry
        )
        self.latency = Histogram(
            "claudecluster_tool_seconds",
            "MCP tool latency",
            ["tool"],
            buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=self.registry,
        )
        self.errors = Counter("claudecluster_tool_errors", "MCP tool errors", ["tool"], registry=self.registry)

    async def refresh(self, hub: Hub) -> None:
        """Recompute the gauges from the clusters' stores."""
        counts: dict[str, int] = dict.fromkeys((s.value for s in TaskState), 0)
        running = 0
        for cluster in hub.clusters:
            running += cluster.running
            for plan in await cluster.store.plans():
                for row in await cluster.store.task_rows(plan.id):
                    counts[row.state.value] += 1
        for state, count in counts.items():
            self.tasks.labels(state).set(count)
        self.agents.set(running)
        self.queue.set(counts[TaskState.READY.value])
        for outcome in (TaskState.MERGED, TaskState.CONFLICTED, TaskState.GATE_FAILED):
            self.merges.labels(outcome.value).set(counts[outcome.value])


# -- the MCP server ----------------------------------------------------------------------------


class _State:
    hub: Hub | None = None


def build_server(
    state: _State | None = None, *, token: str | None = None, metrics: Metrics | None = None, public_url: str = ""
) -> tuple[MCPServer, _State, Metrics]:
    """The MCPServer with every tool, resource and prompt; ``state.hub`` must be set (by the
    transport's lifespan) before tools are called."""
    state = state or _State()
    metrics = metrics or Metrics()
    auth: dict[str, Any] = {}
    if token:
        base = public_url or "http://127.0.0.1"
        auth = {
            "token_verifier": _BearerToken(token),
            "auth": AuthSettings(
                issuer_url=base,  # type: ignore[arg-type]
                resource_server_url=f"{base}/mcp",  # type: ignore[arg-type]
                validate_token_resource=False,
                required_scopes=["claudecluster"],
            ),
        }
    mcp = MCPServer(
        "claudecluster",
        title="claudecluster",
        version=__version__,
        instructions=(
            "claudecluster runs coding work as parallel Claude Code agents, each in its own git worktree, "
            "and merges their results. Typical flow: `plan` (a goal, optionally split into tasks by you) → "
            "`dispatch` (returns at once) → `status` with wait_seconds to follow progress → `merge` into the "
            "target branch. `logs` shows what an agent did; `cancel` stops work."
        ),
        log_level="WARNING",
        **auth,
    )

    def hub() -> Hub:
        if state.hub is None:
            raise ToolError("the server is still starting; try again in a moment")
        return state.hub

    def tool(fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
        """Map domain errors to isError results in one place, and time every call."""

        @functools.wraps(fn)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            started = time.perf_counter()
            try:
                value = await fn(*args, **kwargs)
                # Structured content for programs, one readable line (not a JSON dump) for the model.
                if isinstance(value, BaseModel):
                    reply = CallToolResult(
                        content=[TextContent(type="text", text=_summary_of(value))],
                        structured_content=value.model_dump(mode="json"),
                    )
                    return reply  # type: ignore[return-value]
                return value
            except ClusterError as exc:
                metrics.errors.labels(fn.__name__).inc()
                raise ToolError(str(exc)) from exc
            finally:
                metrics.latency.labels(fn.__name__).observe(time.perf_counter() - started)

        wrapper.__doc__ = inspect.cleandoc(fn.__doc__ or "")  # the description the host model reads
        return wrapper

    readonly = ToolAnnotations(read_only_hint=True, destructive_hint=False, idempotent_hint=True, open_world_hint=False)

    @mcp.tool(
        title="Plan a goal as a task DAG",
        annotations=ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=False),
    )
    @tool
    async def plan(
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
        cluster = await hub().cluster(repo)
        status = await cluster.plan(goal, tasks, base_ref=base_ref, target=target, merge_policy=merge_policy)
        return _plan_view(status)

    @mcp.tool(
        title="Start running a plan",
        annotations=ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=True),
    )
    @tool
    async def dispatch(
        plan_id: Annotated[str, Field(description="The id `plan` returned.")],
        workers: Annotated[
            int | None, Field(ge=1, le=64, description="Agents to run at once (default: the pool size).")
        ] = None,
        task_ids: Annotated[
            list[str] | None, Field(description="Run only these tasks of the plan (default: all).")
        ] = None,
    ) -> StatusView:
        """Start the plan's agents and return at once. Each task runs as a Claude Code agent in its own
        git worktree as soon as its dependencies are merged. Follow it with `status`."""
        cluster = await hub().cluster_of_plan(plan_id)
        if workers is not None:
            hub().set_workers(workers)
        status = await cluster.dispatch(plan_id, task_ids)
        return _status_view(status, cluster)

    @mcp.tool(title="Progress of a plan or task", annotations=readonly)
    @tool
    async def status(
        ctx: Context,
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
            bool,
            Field(description="With wait_seconds: keep waiting until every task is final, not just until a change."),
        ] = False,
        all_tasks: Annotated[
            bool,
            Field(
                description=f"List every task. By default a plan of more than {STATUS_FOCUS} tasks lists only "
                "those needing attention (running, waiting, awaiting merge, failed, …); the rest are counted."
            ),
        ] = False,
    ) -> StatusView:
        """Live state of a plan: per-task state, attempts, elapsed time, turns, cost, tokens, last
        activity and merge state, plus counts by state and totals."""
        if plan_id is None and task_id is None:
            summaries = []
            for cluster in hub().clusters:
                for plan in await cluster.store.plans():
                    counts: dict[str, int] = {}
                    for row in await cluster.store.task_rows(plan.id):
                        counts[row.state.value] = counts.get(row.state.value, 0) + 1
                    summaries.append(
                        PlanSummary(
                            plan_id=plan.id, repo=str(plan.repo), goal=plan.goal, state=plan.state.value, counts=counts
                        )
                    )
            return StatusView(plans=summaries)
        local: str | None = None
        if task_id is not None:
            plan_id, local = split_task_ref(task_id)
        assert plan_id is not None
        cluster = await hub().cluster_of_plan(plan_id)
        if local is not None:
            await cluster.store.task(plan_id, local)  # NotFoundError naming the plan's tasks
        if wait_seconds:
            before = [(r.id, r.state) for r in await cluster.store.task_rows(plan_id)]
            deadline = anyio.current_time() + wait_seconds
            while anyio.current_time() < deadline:
                rows = await cluster.store.task_rows(plan_id)
                if all(r.state in FINAL_STATES for r in rows):
                    break
                if not until_finished and [(r.id, r.state) for r in rows] != before:
                    break
                done = sum(r.state in FINAL_STATES for r in rows)
                running = sum(r.state in ACTIVE_STATES for r in rows)
                await ctx.report_progress(done, len(rows), f"{done}/{len(rows)} tasks final, {running} running")
                await cluster.changed(min(2.0, deadline - anyio.current_time()))
        if local is not None:
            one = await cluster.store.task(plan_id, local)
            counts, cost, tokens = await cluster.store.tally(plan_id)
            plan_status = PlanStatus(
                plan=await cluster.store.plan(plan_id),
                tasks=[one],
                counts=counts,
                total_cost_usd=cost,
                total_tokens=tokens,
                omitted=sum(counts.values()) - 1,
            )
        else:
            plan_status = await cluster.status(plan_id, focus=None if all_tasks else STATUS_FOCUS)
        return _status_view(plan_status, cluster)

    @mcp.tool(
        title="Merge a finished plan into its target branch",
        annotations=ToolAnnotations(read_only_hint=False, destructive_hint=True, idempotent_hint=False),
    )
    @tool
    async def merge(
        plan_id: Annotated[str, Field(description="The plan to merge.")],
        target: Annotated[str | None, Field(description="Branch to merge into (default: the plan's target).")] = None,
        dry_run: Annotated[bool, Field(description="Only report what would happen.")] = False,
    ) -> FinalMerge:
        """Merge the plan's integration branch (all merged tasks) into the target branch: a
        fast-forward if the target has not moved, else a merge commit after a conflict check.
        Conflicts are listed and nothing changes; a checked-out target with local changes is
        refused. The answer includes the command that undoes the merge."""
        cluster = await hub().cluster_of_plan(plan_id)
        return await cluster.merge(plan_id, target, dry_run=dry_run)

    @mcp.tool(
        title="Cancel a plan or a task",
        annotations=ToolAnnotations(read_only_hint=False, destructive_hint=True, idempotent_hint=True),
    )
    @tool
    async def cancel(
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
        cluster = await hub().cluster_of_plan(plan_id)
        return _status_view(await cluster.cancel(plan_id, local), cluster)

    @mcp.tool(title="What an agent did", annotations=readonly)
    @tool
    async def logs(
        task_id: Annotated[str, Field(description="The task, '<plan_id>:<task>'.")],
        tail: Annotated[int, Field(ge=1, le=5000, description="How many of the last events to return.")] = 100,
    ) -> LogsView:
        """A task's agent events (text, tool calls and results, state changes), oldest first."""
        plan_id, local = split_task_ref(task_id)
        cluster = await hub().cluster_of_plan(plan_id)
        task = await cluster.store.task(plan_id, local)
        events = await cluster.store.events(plan_id, local, limit=tail)
        transcript = cluster.settings.state_dir / "logs" / plan_id / f"{local}.{task.attempts}.log"
        return LogsView(
            task_id=f"{plan_id}:{local}",
            state=task.state,
            lines=[event_line(e) for e in events],
            transcript=str(transcript) if transcript.exists() else None,
        )

    @mcp.tool(
        title="Agent pool size",
        annotations=ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=True),
    )
    @tool
    async def workers(
        count: Annotated[int | None, Field(ge=1, le=64, description="New pool size; omit to only read it.")] = None,
    ) -> WorkersView:
        """Read or resize the pool of agent slots (1 to 64); a resize applies at once."""
        if count is not None:
            hub().set_workers(count)
        clusters = hub().clusters
        return WorkersView(
            workers=hub().settings.engine.workers,
            agents_running=sum(c.running for c in clusters),
            repositories=[str(c.repo) for c in clusters],
        )

    @mcp.resource("claudecluster://plans/{plan_id}", mime_type="application/json", title="A plan's status")
    async def plan_resource(plan_id: str) -> str:
        try:
            cluster = await hub().cluster_of_plan(plan_id)
            return _status_view(await cluster.status(plan_id), cluster).model_dump_json(indent=2)
        except ClusterError as exc:
            raise ResourceNotFoundError(str(exc)) from exc

    @mcp.resource("claudecluster://tasks/{task_id}/log", mime_type="text/plain", title="A task's agent log")
    async def task_log_resource(task_id: str) -> str:
        try:
            plan_id, local = split_task_ref(task_id)
            cluster = await hub().cluster_of_plan(plan_id)
            await cluster.store.task(plan_id, local)
            return "\n".join(event_line(e) for e in await cluster.store.events(plan_id, local)) + "\n"
        except ClusterError as exc:
            raise ResourceNotFoundError(str(exc)) from exc

    @mcp.prompt(title="Split a goal into claudecluster tasks")
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

    return mcp, state, metrics


# -- transports ------------------------------------------------------------------------------


async def serve_stdio(settings: ServerSettings, *, claude: ClaudeBinary | None = None) -> None:
    """Serve MCP over stdin/stdout (nothing but protocol on stdout; logs go to stderr)."""
    mcp, state, _ = build_server()
    async with Hub.open(settings, claude=claude) as hub:
        state.hub = hub
        await mcp.run_stdio_async()


def _is_loopback(host: str) -> bool:
    return host in LOOPBACK or host.startswith("127.")


def build_http_app(settings: ServerSettings, *, claude: ClaudeBinary | None = None) -> Starlette:
    """One Starlette app: Streamable HTTP at /mcp, legacy SSE at /sse + /messages/, /health and
    /metrics. The hub is created in the app's lifespan and shared by every session."""
    if not _is_loopback(settings.host) and not settings.token:
        raise ConfigError(
            f"refusing to listen on {settings.host} without a bearer token: pass --token/--token-file "
            "or set CLAUDECLUSTER_TOKEN (or bind 127.0.0.1)"
        )
    public = f"http://{settings.host}:{settings.port}"
    mcp, state, metrics = build_server(token=settings.token, public_url=public)
    hosts = [f"{h}:*" for h in ("127.0.0.1", "localhost", "[::1]")] + settings.allowed_hosts
    origins = [f"http://{h}:*" for h in ("127.0.0.1", "localhost", "[::1]")] + settings.allowed_origins
    if not _is_loopback(settings.host):
        hosts.append(f"{settings.host}:*")
    security = TransportSecuritySettings(
        enable_dns_rebinding_protection=True, allowed_hosts=hosts, allowed_origins=origins
    )
    http_app = mcp.streamable_http_app(transport_security=security, host=settings.host)
    sse_app = mcp.sse_app(transport_security=security, host=settings.host)

    async def health(request: Request) -> Response:
        hub = state.hub
        return JSONResponse(
            {
                "status": "ok" if hub is not None else "starting",
                "version": __version__,
                "repositories": [str(c.repo) for c in hub.clusters] if hub else [],
                "agents_running": sum(c.running for c in hub.clusters) if hub else 0,
            }
        )

    async def metrics_endpoint(request: Request) -> Response:
        if settings.token and not _authorized(request, settings.token):
            return JSONResponse({"error": "invalid_token"}, status_code=401)
        if state.hub is not None:
            await metrics.refresh(state.hub)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with Hub.open(settings, claude=claude) as hub, mcp.session_manager.run():
            state.hub = hub
            try:
                yield
            finally:
                state.hub = None

    return Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            Route("/metrics", metrics_endpoint, methods=["GET"]),
            *http_app.routes,
            *sse_app.routes,
        ],
        middleware=[Middleware(m.cls, *m.args, **m.kwargs) for m in http_app.user_middleware],
        lifespan=lifespan,
    )


def _authorized(request: Request, token: str) -> bool:
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.encode(), token.encode())


def serve_http(
    settings: ServerSettings, transport: Literal["sse", "http"], *, claude: ClaudeBinary | None = None
) -> None:
    """Serve the HTTP app with uvicorn until interrupted."""
    import uvicorn

    app = build_http_app(settings, claude=claude)
    path = "/sse" if transport == "sse" else "/mcp"
    logger.warning("claudecluster MCP server on http://%s:%d%s", settings.host, settings.port, path)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning", timeout_graceful_shutdown=5)


def token_from(flag: str | None, file: Path | None) -> str | None:
    """The bearer token from a flag, a file, or ``$CLAUDECLUSTER_TOKEN``."""
    if flag:
        return flag
    if file is not None:
        try:
            return file.read_text().strip() or None
        except OSError as exc:
            raise ConfigError(f"cannot read the token file {file}: {exc.strerror}") from exc
    return os.environ.get("CLAUDECLUSTER_TOKEN") or None
