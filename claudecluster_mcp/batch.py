"""Batches of the merge queue. When a plan has a gate, the candidates waiting for it are
merged onto the integration tip one after another in memory (a chain of merge commits,
:func:`~claudecluster_mcp.merge.merge_onto`) and the gate runs once, on the chain's end;
when it passes they all land with one compare-and-swap.

When it fails, the gate's output may point at the culprit: when it names files that just
one candidate changed (:func:`suspects`), the batch without that one is gated; passing, it
lands, and the suspect merged onto it gives the very tree that failed — so it is the
culprit, found with one more gate run. Otherwise the batch is bisected (:class:`Bisection`):
prefixes of the chain are gated, each passing prefix lands at once, until the first
candidate whose prefix fails is found. Either way the culprit fails the gate on top of
everything that landed before it — what the gate would have said of it merged alone — so it
goes back to its agent with the gate's output (or ends ``gate_failed``) as a lone candidate
would; candidates nothing was decided for go back to the queue, to be chained again onto
the new tip. Two bad candidates take two rounds.

A candidate that conflicts with the chain before it is taken out and merged by itself
afterwards, the way the queue merges a lone candidate: a conflict with what landed becomes a
resolve task as ever, and one with a candidate the bisection threw out is no conflict.

Every ref move is one journalled compare-and-swap (:func:`~claudecluster_mcp.merge.advance`)
whose journal entry names every task it lands, so that recovery after a crash records all
of them merged or none; a candidate that a crash left landed but unrecorded is found
already merged when its batch is chained again.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import anyio

from .merge import GateResult, MergeOutcome, advance, merge_onto, run_gate
from .models import Plan, Task
from .ports import PORTS, fleet_env
from .prompts import merge_message
from .settings import EngineSettings
from .store import Store
from .workspace import git

__all__ = ["BatchMerge", "Bisection", "Link", "Recorder", "gate_env", "record_gate", "suspects"]


@dataclass
class Bisection:
    """Which prefix of a failed batch to gate next. The first ``passed`` candidates passed
    (and landed), the first ``failed`` fail; it ends when they are neighbours, naming
    candidate ``failed - 1`` (0-based): gated on top of all that landed before it, it fails.

    It needs no more than ⌈log2(size)⌉ gate runs after the batch's own, and its answer is
    right whatever the gate does (it never assumes that adding a candidate cannot fix a
    failure: it only ever names a candidate whose own prefix was seen failing)."""

    passed: int
    failed: int

    def next(self) -> int | None:
        """The length of the prefix to gate next; None once the culprit is known."""
        if self.failed - self.passed <= 1:
            return None
        return (self.passed + self.failed) // 2

    def record(self, prefix: int, ok: bool) -> None:
        """What the gate said of the prefix of length ``prefix``."""
        if ok:
            self.passed = prefix
        else:
            self.failed = prefix

    @property
    def culprit(self) -> int:
        """The index of the candidate that fails the gate (once :meth:`next` is None)."""
        return self.failed - 1


@dataclass(frozen=True)
class Link:
    """A candidate in a batch's chain: its task, and the commit holding it and all before it."""

    task: Task
    commit: str


def suspects(links: Sequence[Link], output: str) -> list[int]:
    """The positions of the candidates that changed a file the gate's output names (as a
    whole path: ``a.py`` is not named by ``data.py``)."""
    return [
        index
        for index, link in enumerate(links)
        if any(re.search(rf"(?<![\w.-]){re.escape(path)}(?![\w-])", output) for path in link.task.changed_files)
    ]


class Recorder(Protocol):
    """What a batch needs of its merge queue: the tips it keeps, and the records it makes."""

    tips: dict[str, str]

    async def integration_tip(self, plan: Plan) -> str:
        """The tip of the plan's integration branch."""
        ...

    async def mark_merged(self, plan: Plan, task: Task, tip: str | None, *, batch: int | None, others: int) -> None:
        """Record a task merged at ``tip``, in merge batch ``batch`` with ``others`` more."""
        ...

    async def gate_failed(self, plan: Plan, task: Task, verdict: GateResult) -> None:
        """Send a task back to its agent with the gate's output, or end it ``gate_failed``."""
        ...


@contextlib.contextmanager
def gate_env(settings: EngineSettings, plan: Plan, task_ids: Sequence[str]) -> Iterator[dict[str, str] | None]:
    """The gate's ``CLAUDECLUSTER_*`` variables, with a block of ports held while it runs:
    ``CLAUDECLUSTER_TASK_IDS`` lists the tasks whose work the gated tree adds, in merge order
    (several in a batch), ``CLAUDECLUSTER_TASK_ID`` is the last of them."""
    if not plan.gate:
        yield None
        return
    with PORTS.block(settings.port_base, settings.ports_per_task) as port_base:
        yield fleet_env(plan.id, task_ids[-1], port_base) | {"CLAUDECLUSTER_TASK_IDS": " ".join(task_ids)}


async def record_gate(store: Store, plan: Plan, task_ids: Sequence[str], verdict: GateResult) -> None:
    """Count a gate run in the plan's totals and log it (which tasks, verdict, time)."""
    with anyio.CancelScope(shield=True):
        await store.count_merges(plan.id, gate_runs=1)
        data = {"tasks": list(task_ids), "ok": verdict.ok, "exit": verdict.returncode}
        await store.append_event(plan.id, None, "gate", {**data, "seconds": round(verdict.seconds, 2)})


class BatchMerge:
    """One plan's candidates through chain, gate, landing and bisection (:meth:`run`).

    What it decided is recorded as it goes; what it did not decide stays in ``unsettled``
    (``alone``: those that conflicted with the chain before them), for the queue to take
    back — after :meth:`run`, and also when it was cancelled or failed half-way."""

    def __init__(
        self, repo: Path, store: Store, settings: EngineSettings, queue: Recorder, plan: Plan, tasks: list[Task]
    ) -> None:
        self.repo = repo
        self.store = store
        self.settings = settings
        self.queue = queue
        self.plan = plan
        self.unsettled = list(tasks)
        self.alone: list[Task] = []
        self._tip = ""

    async def run(self) -> None:
        """Chain the candidates onto the tip, gate the chain, land it or find the culprit."""
        self._tip = await self.queue.integration_tip(self.plan)
        links = await self._chain(self.unsettled)
        if not links:
            return
        failing = await self._gate(links)
        if failing.ok:
            await self._land(links)
            return
        named = suspects(links, failing.output)
        if len(named) == 1 and len(links) > 1:
            left = await self._without(links, links[named[0]].task, failing)
            if left is None:
                return
            links, failing = left
        await self._bisect(links, failing)

    async def _without(
        self, links: list[Link], suspect: Task, failing: GateResult
    ) -> tuple[list[Link], GateResult] | None:
        """Gate the batch without the suspect; if it passes, it lands and the suspect, whose
        merge onto it makes the tree that failed, is the culprit (else it goes back to the
        queue). Returns the chain still to bisect, with its failing verdict, if it fails."""
        rest = await self._chain([link.task for link in links if link.task is not suspect])
        if not rest:
            return None
        verdict = await self._gate(rest)
        if not verdict.ok:
            return rest, verdict  # the suspect goes back to the queue
        if not await self._land(rest):
            return None
        assert suspect.commit is not None
        step = await merge_onto(self.repo, self._tip, suspect.commit, merge_message(self.plan, suspect))
        if step.new is not None and await _tree(self.repo, step.new) == await _tree(self.repo, links[-1].commit):
            await self._culprit(suspect, failing)
        return None

    async def _bisect(self, links: list[Link], failing: GateResult) -> None:
        """Gate prefixes of a failing chain, landing those that pass, until the culprit."""
        bisection = Bisection(passed=0, failed=len(links))
        while (prefix := bisection.next()) is not None:
            verdict = await self._gate(links[:prefix])
            if verdict.ok and not await self._land(links[bisection.passed : prefix]):
                return  # the branch moved under the batch: the rest goes back to the queue
            failing = failing if verdict.ok else verdict
            bisection.record(prefix, verdict.ok)
        await self._culprit(links[bisection.culprit].task, failing)

    async def _culprit(self, task: Task, failing: GateResult) -> None:
        with anyio.CancelScope(shield=True):
            await self.queue.gate_failed(self.plan, task, failing)
            self.unsettled.remove(task)

    async def _chain(self, tasks: Sequence[Task]) -> list[Link]:
        """Merge ``tasks`` one after another onto the tip (no ref moves); one already on the
        tip is recorded merged, one that conflicts is set ``alone``."""
        links: list[Link] = []
        for task in list(tasks):
            assert task.commit is not None
            head = links[-1].commit if links else self._tip
            message = merge_message(self.plan, task)
            step = await merge_onto(self.repo, head, task.commit, message, base=task.base_commit)
            if step.outcome is MergeOutcome.CONFLICT:
                self.unsettled.remove(task)
                self.alone.append(task)
            elif step.outcome is MergeOutcome.ALREADY_MERGED and not links:
                # Landed by a batch whose record a crash cut short.
                with anyio.CancelScope(shield=True):
                    await self.queue.mark_merged(self.plan, task, self._tip, batch=None, others=0)
                    self.unsettled.remove(task)
            else:
                assert step.new is not None
                links.append(Link(task, step.new))
        return links

    async def _gate(self, links: Sequence[Link]) -> GateResult:
        assert self.plan.gate
        head = links[-1]
        with gate_env(self.settings, self.plan, [link.task.id for link in links]) as env:
            verdict = await run_gate(
                self.repo,
                head.commit,
                self.plan.gate,
                timeout=self.settings.gate_timeout,
                sandbox=self.settings.sandbox_policy(),
                env=env,
            )
        await record_gate(self.store, self.plan, [link.task.id for link in links], verdict)
        return verdict

    async def _land(self, links: Sequence[Link]) -> bool:
        """Move the integration branch to the end of ``links`` (one journalled
        compare-and-swap naming all their tasks) and record them merged; False if the
        branch was not where the chain began."""
        ids = [link.task.id for link in links]
        plan, new = self.plan, links[-1].commit
        with anyio.CancelScope(shield=True):
            moved = await advance(
                self.repo,
                f"refs/heads/{plan.integration_branch}",
                new,
                self._tip,
                f"claudecluster: merge {', '.join(ids)} (plan {plan.id})",
                journal=lambda ref, old, new: self.store.begin_merge(plan.id, ids[0], ref, old, new, batch=ids),
                journal_end=self.store.end_merge,
            )
            if not moved:
                return False
            self._tip = self.queue.tips[plan.id] = new
            number = await self.store.count_merges(plan.id, batches=1)
            for link in links:
                await self.queue.mark_merged(plan, link.task, link.commit, batch=number, others=len(links) - 1)
                self.unsettled.remove(link.task)
        return True


async def _tree(repo: Path, commit: str) -> str:
    return (await git(repo, "rev-parse", "--verify", "--end-of-options", f"{commit}^{{tree}}")).stdout.strip()
