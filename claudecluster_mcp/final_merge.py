"""The final merge: a finished plan's integration branch into its target branch, through
the same :func:`~claudecluster_mcp.merge.merge_into` as every task merge (journalled,
gated when it makes a merge commit), with the command that undoes it."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field

from .batch import record_gate
from .errors import StateError
from .merge import MergeOutcome, merge_into
from .models import FINAL_STATES, Plan, PlanState, PlanStatus
from .progress import Progress, ticking
from .prompts import merge_message
from .settings import EngineSettings
from .store import Store
from .workspace import check_target_branch, git, require_clean, rev_parse, update_ref, worktree_of_branch

__all__ = ["FinalMerge", "land"]


class FinalMerge(BaseModel):
    """What :meth:`Cluster.merge` did (or, with ``dry_run``, would do)."""

    plan_id: str
    target: str
    kind: str = Field(description="fast-forward | merge | up-to-date | conflict | gate_failed")
    dry_run: bool
    previous_tip: str | None
    new_tip: str | None
    conflicts: list[str] = Field(default_factory=list)
    undo: str | None = Field(default=None, description="command that undoes the merge")
    gate_output: str | None = Field(
        default=None, description="the tail of the gate's output, when it failed on the merge commit"
    )
    tasks: dict[str, str] = Field(default_factory=dict, description="task id → state")


async def land(
    repo: Path,
    store: Store,
    settings: EngineSettings,
    status: PlanStatus,
    target: str | None,
    *,
    dry_run: bool,
    on_progress: Progress | None = None,
) -> FinalMerge:
    """Merge a finished plan's integration branch into ``target`` (default: the plan's
    target branch) through the same :func:`merge_into` as every task: fast-forward when
    possible, else a merge commit after a clean merge-tree check, which must pass the
    plan's gate (a fast-forward lands the integration tip, gated already); journalled; a
    checked-out target must be clean and has its files updated. ``on_progress`` hears
    each stage, and a heartbeat while the gate runs."""
    plan = status.plan
    unfinished = [t.id for t in status.tasks if t.state not in FINAL_STATES]
    if unfinished:
        raise StateError(f"plan {plan.id} is still running (tasks {', '.join(unfinished)}); wait for it first")
    target = await check_target_branch(repo, target or plan.target_branch)
    ref = f"refs/heads/{target}"
    source = await rev_parse(repo, f"refs/heads/{plan.integration_branch}")
    exists = (await git(repo, "rev-parse", "--verify", "--quiet", ref, check=False)).returncode == 0
    previous = await rev_parse(repo, ref) if exists else None
    report = FinalMerge(
        plan_id=plan.id,
        target=target,
        kind="fast-forward",
        dry_run=dry_run,
        previous_tip=previous,
        new_tip=source,
        tasks={t.id: t.state.value for t in status.tasks},
    )
    if previous is None:
        return await _create_target(repo, store, report, plan, ref, source)
    checkout = await worktree_of_branch(repo, target)
    if checkout is not None and not dry_run:
        await require_clean(checkout, f"merging plan {plan.id} into {target}")
    async with ticking(on_progress) as ticker:
        result = await merge_into(
            repo,
            ref,
            source,
            merge_message(plan),
            gate=plan.gate,
            gate_timeout=settings.gate_timeout,
            gate_sandbox=settings.sandbox_policy(),
            gate_fast_forward=False,
            on_stage=ticker.stage,
            journal=lambda ref, old, new: store.begin_merge(plan.id, None, ref, old, new),
            journal_end=store.end_merge,
            tip_hint=previous,
            checkout=checkout,
            dry_run=dry_run,
        )
    if result.gate is not None:
        await record_gate(store, plan, [], result.gate)
    if result.outcome is MergeOutcome.CONFLICT:
        return report.model_copy(update={"kind": "conflict", "new_tip": None, "conflicts": result.conflicts})
    if result.outcome is MergeOutcome.GATE_FAILED:
        output = result.gate.output[-2000:] if result.gate is not None else ""
        return report.model_copy(update={"kind": "gate_failed", "new_tip": None, "gate_output": output})
    if result.outcome is MergeOutcome.ALREADY_MERGED:
        return report.model_copy(update={"kind": "up-to-date", "new_tip": previous})
    kind = "fast-forward" if result.fast_forward else "merge"
    if dry_run:
        return report.model_copy(update={"kind": kind, "new_tip": source if result.fast_forward else None})
    assert result.new_tip is not None
    undo = f"git update-ref {ref} {result.old_tip} {result.new_tip}"
    report = report.model_copy(update={"kind": kind, "new_tip": result.new_tip, "undo": undo})
    await store.update_plan(plan.id, state=PlanState.MERGED, final_merge=report.model_dump(mode="json"))
    return report


async def _create_target(repo: Path, store: Store, report: FinalMerge, plan: Plan, ref: str, source: str) -> FinalMerge:
    if report.dry_run:
        return report
    if not await update_ref(repo, ref, source, None, merge_message(plan)):
        raise StateError(f"{report.target} appeared during the merge; run merge again")
    report = report.model_copy(update={"undo": f"git branch -D {report.target}"})
    await store.update_plan(plan.id, state=PlanState.MERGED, final_merge=report.model_dump(mode="json"))
    return report
