"""What a new plan is made of before it is stored: a goal and budgets that make sense, the
base commit it starts from, the target branch its result goes to, and the settings' defaults
for what the caller left out."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from pathlib import Path

from .errors import ConfigError
from .limits import MAX_GOAL_BYTES, utf8_size
from .models import MergePolicy, Plan
from .settings import EngineSettings
from .store import now
from .workspace import check_target_branch, current_branch, rev_parse

__all__ = ["check_goal", "new_plan"]


def check_goal(goal: str, max_cost_usd: float | None, max_tokens: int | None) -> None:
    """Refuse an empty or oversized goal and budgets that are not positive."""
    if any(limit is not None and limit <= 0 for limit in (max_cost_usd, max_tokens)):
        raise ConfigError(f"a budget must be positive (max_cost_usd {max_cost_usd}, max_tokens {max_tokens})")
    if not goal.strip():
        raise ConfigError("the goal is empty")
    if utf8_size(goal) > MAX_GOAL_BYTES:
        raise ConfigError(
            f"the goal is {utf8_size(goal) / 1024:.1f} KiB; the limit is "
            f"{MAX_GOAL_BYTES // 1024} KiB (MAX_GOAL_BYTES): put the details in the tasks' prompts"
        )


async def new_plan(
    repo: Path,
    settings: EngineSettings,
    goal: str,
    warnings: list[str],
    *,
    base_ref: str | None,
    target: str | None,
    merge_policy: MergePolicy | None,
    gate: Sequence[str] | None,
    max_cost_usd: float | None,
    max_tokens: int | None,
) -> Plan:
    """The plan record: based on ``base_ref`` (any commit-ish; default: the branch checked out
    now), to be merged into ``target`` (default: the branch checked out now), with its own
    integration branch name; what the caller left out comes from ``settings``."""
    branch_now = await current_branch(repo)
    base_ref = base_ref or branch_now or "HEAD"
    base_commit = await rev_parse(repo, base_ref)
    # The base may be any commit-ish (origin/main, a tag, a SHA): never a branch to create.
    target = target or branch_now
    if target is None:
        raise ConfigError("HEAD is detached: name the target branch for the final merge")
    await check_target_branch(repo, target)
    plan_id = "p" + secrets.token_hex(4)
    stamp = now()
    return Plan(
        id=plan_id,
        repo=repo,
        goal=goal,
        base_ref=base_ref,
        base_commit=base_commit,
        target_branch=target,
        integration_branch=f"claudecluster/{plan_id}/integration",
        merge_policy=merge_policy or settings.merge_policy,
        gate=list(gate) if gate is not None else settings.gate,
        warnings=warnings,
        max_cost_usd=max_cost_usd if max_cost_usd is not None else settings.max_cost_usd,
        max_tokens=max_tokens if max_tokens is not None else settings.max_tokens,
        created_at=stamp,
        updated_at=stamp,
    )
