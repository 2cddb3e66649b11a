"""The MCP resources (a plan's status, a task's agent log) and the prompt that helps a host
split a goal into tasks."""

from __future__ import annotations

from typing import Any

from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.mcpserver import Context, MCPServer
from mcp.shared.exceptions import MCPError
from mcp.types import INVALID_PARAMS

from .mcp_session import check_text, hub_of, reported
from .models import split_task_ref
from .report import event_line
from .views import StatusView

__all__ = ["PromptArguments", "plan_resource", "register_resources", "split_goal", "task_log_resource"]


async def plan_resource(plan_id: str, ctx: Context) -> str:
    """A plan's status as JSON."""
    with reported("resource"):
        check_text(plan_id, "the plan id")
        async with hub_of(ctx).cluster_of_plan(plan_id) as cluster:
            found = await cluster.status(plan_id)
            view = StatusView.of_cluster(found, cluster)
    return view.model_dump_json(indent=2)


async def task_log_resource(task_id: str, ctx: Context) -> str:
    """A task's agent events as text, one line each."""
    with reported("resource"):
        check_text(task_id, "the task id")
        plan_id, local = split_task_ref(task_id)
        async with hub_of(ctx).cluster_of_plan(plan_id) as cluster:
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


class PromptArguments:
    """Server middleware: a ``prompts/get`` naming an unknown prompt, missing a required
    argument or giving an unknown one gets an invalid-params error saying which (the SDK
    answers "Internal server error" and logs a traceback for each)."""

    def __init__(self, mcp: MCPServer[Any]) -> None:
        self.mcp = mcp

    async def __call__(self, ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> HandlerResult:
        if ctx.method == "prompts/get" and isinstance(ctx.params, dict):
            problem = await self.problem(ctx.params.get("name"), ctx.params.get("arguments"))
            if problem is not None:
                raise MCPError(code=INVALID_PARAMS, message=problem)
        return await call_next(ctx)

    async def problem(self, name: object, arguments: object) -> str | None:
        """What is wrong with a request for prompt ``name`` (malformed params are left to the SDK)."""
        if not isinstance(name, str) or not isinstance(arguments, dict | None):
            return None
        prompts = {p.name: p for p in await self.mcp.list_prompts()}
        if name not in prompts:
            return f"unknown prompt {name!r}; the prompts are: {', '.join(sorted(prompts))}"
        given, declared = arguments or {}, prompts[name].arguments or []
        if missing := [a.name for a in declared if a.required and a.name not in given]:
            return f"the prompt {name!r} needs argument(s): {', '.join(missing)}"
        if unknown := sorted(set(given) - {a.name for a in declared}):
            return (
                f"the prompt {name!r} has no argument(s) {', '.join(map(repr, unknown))}; "
                f"its arguments are: {', '.join(a.name for a in declared)}"
            )
        return None


def register_resources(mcp: MCPServer[Any]) -> None:
    """Add the resource templates and the prompt to ``mcp``."""
    mcp.resource("claudecluster://plans/{plan_id}", mime_type="application/json", title="A plan's status")(
        plan_resource
    )
    mcp.resource("claudecluster://tasks/{task_id}/log", mime_type="text/plain", title="A task's agent log")(
        task_log_resource
    )
    mcp.prompt(title="Split a goal into claudecluster tasks")(split_goal)
    mcp.middleware.append(PromptArguments(mcp))
