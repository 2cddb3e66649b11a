"""Argument completion (``completion/complete``): plan ids for the plan resource template,
``<plan>:<task>`` ids for the task log template, and repositories for the ``split_goal``
prompt, each by prefix. Anything unknown completes to an empty list, never an error.

::

    await complete(hub, ResourceTemplateReference(uri=PLAN_TEMPLATE), "plan_id", "p3")
    # Completion(values=["p3a9c01d2", "p3f00b1e4"], total=2, has_more=False)
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import anyio
from mcp.server.mcpserver import MCPServer
from mcp.types import Completion, CompletionArgument, CompletionContext, PromptReference, ResourceTemplateReference

from .errors import ClusterError
from .hub import Hub, HubRef

__all__ = ["MAX_VALUES", "PLAN_TEMPLATE", "TASK_LOG_TEMPLATE", "complete", "register_completions"]

logger = logging.getLogger(__name__)

PLAN_TEMPLATE = "claudecluster://plans/{plan_id}"
TASK_LOG_TEMPLATE = "claudecluster://tasks/{task_id}/log"
#: The spec's limit of values in one completion.
MAX_VALUES = 100


def _answer(values: list[str]) -> Completion:
    return Completion(values=values[:MAX_VALUES], total=len(values), has_more=len(values) > MAX_VALUES)


async def complete(hub: Hub, ref: PromptReference | ResourceTemplateReference, name: str, value: str) -> Completion:
    """The completions of argument ``name`` of ``ref`` starting with ``value``."""
    if isinstance(ref, ResourceTemplateReference) and ref.uri == PLAN_TEMPLATE and name == "plan_id":
        return _answer(await plan_ids(hub, value))
    if isinstance(ref, ResourceTemplateReference) and ref.uri == TASK_LOG_TEMPLATE and name == "task_id":
        return _answer(await task_ids(hub, value))
    if isinstance(ref, PromptReference) and ref.name == "split_goal" and name == "repo":
        return _answer(await repositories(hub, value))
    return _answer([])


def _inside(hub: Hub, path: Path) -> bool:
    return any(path == root or root in path.parents for root in hub.roots)


async def _known(hub: Hub, prefix: str, limit: int) -> list[tuple[str, Path]]:
    """(plan id, repository) of the plans in the registry whose repository lies in the roots."""
    with contextlib.suppress(ClusterError):
        found = await anyio.to_thread.run_sync(hub.registry.plans, prefix, limit)
        return [(plan_id, repo) for plan_id, repo in found if _inside(hub, repo)]
    return []


async def plan_ids(hub: Hub, prefix: str) -> list[str]:
    """Known plan ids starting with ``prefix``, newest first."""
    return [plan_id for plan_id, _ in await _known(hub, prefix, MAX_VALUES + 1)]


async def task_ids(hub: Hub, prefix: str) -> list[str]:
    """``<plan>:<task>`` ids starting with ``prefix``: the tasks of the plans whose id starts
    with it (of the one plan named before a ``:``, by the task id's prefix)."""
    plan_prefix, colon, task_prefix = prefix.partition(":")
    plans = [p for p in await plan_ids(hub, plan_prefix) if not colon or p == plan_prefix]
    values: list[str] = []
    for plan_id in plans[:10]:
        try:
            async with hub.cluster_of_plan(plan_id) as cluster:
                rows = await cluster.store.task_rows(plan_id)
        except ClusterError as exc:
            logger.info("no task completions for plan %s: %s", plan_id, exc)
            continue
        values += [f"{plan_id}:{row.id}" for row in rows if row.id.startswith(task_prefix)]
        if len(values) > MAX_VALUES:
            break
    return values


async def repositories(hub: Hub, prefix: str) -> list[str]:
    """The roots and the repositories of known plans, starting with ``prefix``."""
    paths = [str(root) for root in hub.roots]
    paths += [str(repo) for _, repo in await _known(hub, "", 1000)]
    return [p for p in dict.fromkeys(paths) if p.startswith(prefix)]


def register_completions(mcp: MCPServer[Any], ref: HubRef) -> None:
    """Serve ``completion/complete`` on ``mcp`` from ``ref``'s hub (empty while it starts)."""

    async def handle(
        reference: PromptReference | ResourceTemplateReference,
        argument: CompletionArgument,
        context: CompletionContext | None,
    ) -> Completion:
        if ref.hub is None:
            return _answer([])
        return await complete(ref.hub, reference, argument.name, argument.value)

    decorate = mcp.completion()  # type: ignore[no-untyped-call]  # (the decorator is untyped in mcp 2.3)
    decorate(handle)
