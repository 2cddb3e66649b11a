"""Retention: how long a finished plan's leftovers stay on disk, and the collector (``gc``)
that removes them.

A plan leaves behind: the worktrees of tasks that did not merge (a merged task's worktree is
removed at once; a failed, held or conflicted one stays for inspection), raw agent
transcripts (``<state_dir>/logs/<plan>/``), Claude Code's own session files
(``<claude config>/projects/<worktree path>/``), its events and rows in the store, and its
branches. A run's TMPDIR and a gate's checkout go when the run ends; only a killed engine
leaves them, and git leaves half-written objects after it ran out of space.

:meth:`Retention.collect` decides per plan, under these rules:

* a plan still running, with a task active or awaiting its merge, or with a merge half done,
  is never touched, nor is one that finished less than ``older_than`` ago;
* commits that no branch, tag or remote outside ``claudecluster/`` holds are *unmerged work*
  and are never deleted unless asked (``unmerged``): such a plan is **trimmed** — its
  worktrees, transcripts and agent events go; the plan, its state history and the branches
  holding that work stay (``status`` and ``merge`` still work);
* any other old plan is **removed**: everything above, its rows and its branches.

The store's rows go first, in one transaction that re-checks the plan's state (a plan
revived meanwhile is skipped); files and branches follow. A collector killed half-way leaves
files of a plan the store no longer knows: the next manual ``gc`` (``orphans``) finds them.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sqlite3
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

import anyio
from pydantic import BaseModel, Field

from .diskfull import reclaim_git_temp
from .leftovers import LEFTOVER_MIN_AGE, PlanFiles, disk_usage, plan_files, remove_paths, stale_temp_dirs
from .registry import Registry
from .settings import EngineSettings
from .store import Store
from .workspace import git, git_common_dir, remove_worktree

__all__ = ["GcReport", "PlanCleanup", "Retention"]

logger = logging.getLogger(__name__)

#: How often a running engine applies ``retention_days``.
RETENTION_EVERY = 3600.0
# A task ready, running, waiting or awaiting its merge is being worked on: not its plan.
_CANDIDATES = (
    "SELECT p.id, p.state, p.integration_branch, MAX(p.updated_at, COALESCE(MAX(t.updated_at), '')), "
    "SUM(t.state IN ('ready', 'running', 'waiting', 'succeeded')), "
    "(SELECT COUNT(*) FROM merges m WHERE m.plan_id = p.id AND m.state = 'started'), "
    "(SELECT MAX(at) FROM events e WHERE e.plan_id = p.id AND e.task_id IS NULL AND e.kind = 'gc_trimmed') "
    "FROM plans p LEFT JOIN tasks t ON t.plan_id = p.id GROUP BY p.id ORDER BY p.created_at"
)
_STILL = (
    "SELECT state, updated_at, "
    "(SELECT COUNT(*) FROM tasks WHERE plan_id = plans.id AND state IN ('ready', 'running', 'waiting', 'succeeded')) "
    "FROM plans WHERE id = ?"
)
# What a trimmed plan loses of its events: all but its state history.
_AGENT_EVENTS = "SELECT COUNT(*) FROM events WHERE plan_id = ? AND kind NOT IN ('state', 'gc_trimmed')"
_PLAN_ID = re.compile(r"p[0-9a-f]{8}")


class PlanCleanup(BaseModel):
    """What the collector did (or, in a dry run, would do) to one plan."""

    plan_id: str
    state: str
    finished_at: datetime | None
    action: Literal["removed", "trimmed"]
    worktrees: int = Field(description="worktrees removed")
    logs: int = Field(description="agent transcripts (ours and Claude Code's) removed")
    events: int = Field(description="stored events removed")
    branches_deleted: list[str] = Field(default_factory=list)
    branches_kept: list[str] = Field(default_factory=list, description="branches holding unmerged work")
    freed_bytes: int = 0


class GcReport(BaseModel):
    """One collection: the plans, the leftovers, and the space freed."""

    dry_run: bool
    older_than_s: float | None
    plans: list[PlanCleanup] = Field(default_factory=list)
    leftovers: list[str] = Field(default_factory=list, description="temp dirs, git temp files, old planner logs")
    leftover_bytes: int = 0
    compacted_bytes: int = 0

    @property
    def freed_bytes(self) -> int:
        """Everything freed (or, in a dry run, that would be)."""
        return sum(p.freed_bytes for p in self.plans) + self.leftover_bytes + self.compacted_bytes


class _Candidate(BaseModel):
    id: str
    state: str
    last: str
    integration: str


class Retention:
    """The collector of one repository's finished plans (``busy(plan_id)``: the engine is
    working on it right now)."""

    def __init__(
        self,
        repo: Path,
        store: Store,
        settings: EngineSettings,
        registry: Registry,
        busy: Callable[[str], bool] = lambda plan_id: False,
    ) -> None:
        self.repo = repo
        self.store = store
        self.settings = settings
        self.registry = registry
        self.busy = busy
        self._lock = anyio.Lock()

    async def run(self, *, every: float = RETENTION_EVERY) -> None:
        """Apply ``retention_days`` now and every ``every`` seconds until cancelled (never
        raises: a failed pass is logged and the next one tries again)."""
        while self.settings.retention_days > 0:
            try:
                report = await self.collect(timedelta(days=self.settings.retention_days))
                if report.plans or report.leftovers:
                    logger.info("retention: freed %d bytes in %s", report.freed_bytes, self.repo)
            except Exception:
                logger.exception("retention pass in %s failed; trying again later", self.repo)
            await anyio.sleep(every)

    async def collect(
        self,
        older_than: timedelta | None,
        *,
        dry_run: bool = False,
        unmerged: bool = False,
        orphans: bool = False,
        compact: bool = False,
    ) -> GcReport:
        """Remove (or, with ``dry_run``, report) what finished plans older than
        ``older_than`` left (None: no plan, only leftovers), under the rules of the module
        docstring; ``unmerged`` also deletes work found on no other branch; ``orphans``
        also looks for files and branches of plans the store no longer knows (safe only
        while no engine runs: the ``gc`` command); ``compact`` shrinks the database after."""
        report = GcReport(dry_run=dry_run, older_than_s=None if older_than is None else older_than.total_seconds())
        async with self._lock:
            if older_than is not None:
                cutoff = datetime.now(UTC) - older_than
                for candidate in await self._candidates(cutoff, unmerged):
                    done = await self._plan(candidate, dry_run=dry_run, unmerged=unmerged)
                    if done is not None:
                        report.plans.append(done)
                if orphans:
                    report.plans.extend(await self._orphans(dry_run=dry_run, unmerged=unmerged))
            await self._leftovers(report, older_than)
            if compact and not dry_run and report.plans:
                report.compacted_bytes = await anyio.to_thread.run_sync(_vacuum, self.store.path)
        return report

    # -- choosing ------------------------------------------------------------------------------

    async def _candidates(self, cutoff: datetime, unmerged: bool) -> list[_Candidate]:
        """Plans finished before ``cutoff`` that nothing works on (and, unless ``unmerged``,
        not already trimmed since they last changed)."""
        async with self.store.transaction() as db, db.execute(_CANDIDATES) as cursor:  # one consistent read
            rows = await cursor.fetchall()
        found = []
        for plan_id, state, integration, last, busy_tasks, open_merges, trimmed in rows:
            if state == "running" or busy_tasks or open_merges or self.busy(plan_id):
                continue
            if datetime.fromisoformat(last) >= cutoff or (trimmed and trimmed >= last and not unmerged):
                continue
            found.append(_Candidate(id=plan_id, state=state, last=last, integration=integration))
        return found

    async def _branches(self, plan_id: str) -> dict[str, str]:
        listing = await git(
            self.repo, "for-each-ref", "--format=%(refname:short) %(objectname)", f"refs/heads/claudecluster/{plan_id}/"
        )
        found: dict[str, str] = {}
        for line in listing.stdout.splitlines():
            name, _, tip = line.partition(" ")
            if tip:
                found[name] = tip
        return found

    async def _unmerged(self, branches: dict[str, str], integration: str | None) -> list[str]:
        """The branches holding commits that no branch, tag or remote outside
        ``claudecluster/`` holds. A task branch merged into the integration branch is
        covered by it."""
        covered: set[str] = set()
        if integration in branches:
            merged = await git(
                self.repo, "for-each-ref", "--format=%(refname:short)", f"--merged={branches[integration]}",
                f"refs/heads/{integration.rsplit('/', 1)[0]}/",
            )  # fmt: skip
            covered = set(merged.stdout.split()) - {integration}
        unmerged = []
        for name, tip in branches.items():
            if name in covered:
                continue
            unique = await git(
                self.repo, "rev-list", "-n", "1", tip, "--not", "--exclude=claudecluster/*",
                "--branches", "--tags", "--remotes",
            )  # fmt: skip
            if unique.stdout.strip():
                unmerged.append(name)
        return sorted(unmerged)

    # -- one plan --------------------------------------------------------------------------------

    async def _plan(self, candidate: _Candidate, *, dry_run: bool, unmerged: bool) -> PlanCleanup | None:
        branches = await self._branches(candidate.id)
        keep = [] if unmerged else await self._unmerged(branches, candidate.integration)
        action: Literal["removed", "trimmed"] = "trimmed" if keep else "removed"
        # A trimmed plan keeps its integration branch (it may still be landed, a held task
        # approved); a task branch merged into that one holds nothing of its own.
        deleted = sorted(set(branches) - set(keep) - ({candidate.integration} if keep else set()))
        events = await self._count_events(candidate.id, trimmed=action == "trimmed")
        files = plan_files(self.settings, candidate.id)
        freed = await anyio.to_thread.run_sync(files.size)
        if not dry_run:
            # Whole or not at all, also when the engine stops meanwhile.
            with anyio.CancelScope(shield=True):
                if not await self._forget(candidate, action):
                    return None  # revived meanwhile
                await self._delete(candidate.id, files, deleted)
        return PlanCleanup(
            plan_id=candidate.id,
            state=candidate.state,
            finished_at=datetime.fromisoformat(candidate.last) if candidate.last else None,
            action=action,
            worktrees=len(files.worktrees),
            logs=len(files.logs),
            events=events,
            branches_deleted=deleted,
            branches_kept=keep,
            freed_bytes=freed,
        )

    async def _count_events(self, plan_id: str, *, trimmed: bool) -> int:
        query = _AGENT_EVENTS if trimmed else "SELECT COUNT(*) FROM events WHERE plan_id = ?"
        async with self.store.transaction() as db, db.execute(query, [plan_id]) as cursor:
            row = await cursor.fetchone()
        return int(row[0]) if row else 0

    async def _forget(self, candidate: _Candidate, action: str) -> bool:
        """The store's part, in one transaction that first checks that the plan is still as
        chosen: its rows (removed) or its agent events (trimmed)."""
        async with self.store.transaction() as db:
            async with db.execute(_STILL, [candidate.id]) as cursor:
                row = await cursor.fetchone()
            if row is None or row[0] != candidate.state or row[1] > candidate.last or row[2]:
                return False
            if action == "trimmed":
                await db.execute("DELETE" + _AGENT_EVENTS.removeprefix("SELECT COUNT(*)"), [candidate.id])
                await db.execute(
                    "INSERT INTO events (plan_id, task_id, at, kind, data) VALUES (?, NULL, ?, 'gc_trimmed', '{}')",
                    [candidate.id, datetime.now(UTC).isoformat()],
                )
                return True
            await db.execute("DELETE FROM events WHERE plan_id = ?", [candidate.id])
            await db.execute("DELETE FROM merges WHERE plan_id = ?", [candidate.id])
            await db.execute("DELETE FROM tasks WHERE plan_id = ?", [candidate.id])
            await db.execute("DELETE FROM plans WHERE id = ?", [candidate.id])
        await anyio.to_thread.run_sync(self.registry.forget, [candidate.id])
        return True

    async def _delete(self, plan_id: str, files: PlanFiles, branches: list[str]) -> None:
        """The plan's worktrees, transcripts and ``branches``."""
        for worktree in files.worktrees:
            await remove_worktree(self.repo, worktree)
        await anyio.to_thread.run_sync(remove_paths, [*files.logs, files.worktrees_dir, files.logs_dir])
        for start in range(0, len(branches), 200):
            await git(self.repo, "branch", "-D", *branches[start : start + 200], check=False)

    # -- plans the store forgot, and leftovers ---------------------------------------------------

    async def _orphans(self, *, dry_run: bool, unmerged: bool) -> list[PlanCleanup]:
        """Branches and files of plans this repository's store does not know (a collector
        killed half-way, a deleted database): files only where the registry says they were
        this repository's."""
        known = {plan.id for plan in await self.store.plans()}
        listing = await git(self.repo, "for-each-ref", "--format=%(refname:short)", "refs/heads/claudecluster/")
        ids = {name.split("/")[1] for name in listing.stdout.split() if name.count("/") >= 2}
        ids = {plan_id for plan_id in ids if _PLAN_ID.fullmatch(plan_id)}
        for kind in ("worktrees", "logs"):
            directory = self.settings.state_dir / kind
            if directory.is_dir():
                ids |= {p.name for p in directory.iterdir() if _PLAN_ID.fullmatch(p.name) and self._ours(p.name)}
        found = []
        for plan_id in sorted(ids - known):
            integration = f"claudecluster/{plan_id}/integration"
            branches = await self._branches(plan_id)
            keep = [] if unmerged else await self._unmerged(branches, integration)
            files = plan_files(self.settings, plan_id) if self._ours(plan_id) else PlanFiles(Path(), [], Path(), [])
            deleted = sorted(set(branches) - set(keep) - ({integration} if keep else set()))
            freed = await anyio.to_thread.run_sync(files.size)
            if not dry_run:
                await self._delete(plan_id, files, deleted)
            found.append(
                PlanCleanup(
                    plan_id=plan_id, state="unknown", finished_at=None, action="trimmed" if keep else "removed",
                    worktrees=len(files.worktrees), logs=len(files.logs), events=0, branches_deleted=deleted,
                    branches_kept=keep, freed_bytes=freed,
                )
            )  # fmt: skip
        return found

    def _ours(self, plan_id: str) -> bool:
        with contextlib.suppress(Exception):
            return self.registry.lookup(plan_id).resolve() == self.repo.resolve()
        return False

    async def _leftovers(self, report: GcReport, older_than: timedelta | None) -> None:
        """Run TMPDIRs and gate checkouts of killed engines, git's half-written objects,
        and (older than ``older_than``) planner transcripts."""
        paths = await anyio.to_thread.run_sync(stale_temp_dirs)
        if older_than is not None:
            cutoff = time.time() - older_than.total_seconds()
            state = self.settings.state_dir
            for directory in (state / "logs" / "planner", state / "runs"):
                with contextlib.suppress(OSError):
                    paths += [p for p in directory.iterdir() if p.lstat().st_mtime < cutoff]
        report.leftovers = [str(p) for p in paths]
        report.leftover_bytes = await anyio.to_thread.run_sync(lambda: sum(disk_usage(p) for p in paths))
        if not report.dry_run:
            await anyio.to_thread.run_sync(remove_paths, paths)
        git_dir = await git_common_dir(self.repo)
        freed = await anyio.to_thread.run_sync(
            lambda: reclaim_git_temp(git_dir, min_age=LEFTOVER_MIN_AGE, dry_run=report.dry_run)
        )
        if freed:
            report.leftovers.append(f"{git_dir / 'objects'} (git's half-written objects)")
            report.leftover_bytes += freed


def _vacuum(path: Path) -> int:
    """Compact the database when deleted rows left much free space in it; bytes given back."""

    def size() -> int:
        return sum(p.stat().st_size for p in (path, path.with_name(path.name + "-wal")) if p.exists())

    with contextlib.closing(sqlite3.connect(path, timeout=10)) as db:
        free = db.execute("PRAGMA freelist_count").fetchone()[0] * db.execute("PRAGMA page_size").fetchone()[0]
        if free < 1024 * 1024:
            return 0
        before = size()
        try:
            db.execute("VACUUM")
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:
            logger.warning("could not compact %s: %s", path, exc)
            return 0
        return max(0, before - size())
