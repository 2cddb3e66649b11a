"""The hub: one :class:`~claudecluster_mcp.engine.Cluster` per repository, shared by every
session and transport of a server process, and outliving connections.

A hub is a long-lived service, started the anyio way::

    hub = Hub([Path("~/src")])
    async with anyio.create_task_group() as tg:
        await tg.start(hub.run)          # returns once running plans were reopened
        async with hub.cluster("~/src/app") as cluster:
            ...

(:meth:`Hub.open` does exactly that.) Each repository's cluster runs in its own task of the
hub and is opened with that repository's own ``claudecluster.toml`` under the server's
flags. One repository's failure is contained: an exception escaping its cluster is logged
with its traceback, calls using that cluster at the time get a :class:`StateError`, the
cluster is dropped (the next call reopens it), and every other repository carries on.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sqlite3
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import TaskGroup, TaskStatus

from .claude_cli import ClaudeBinary, find_claude
from .config import ClusterConfig, load_config
from .engine import Cluster
from .errors import ClusterError, RepositoryError, StateError
from .models import PlanState
from .placement import open_placement
from .registry import Registry
from .settings import EngineSettings
from .signals import Watchers
from .store import Store, state_db_path
from .workspace import git, repo_root

__all__ = ["Hub", "HubRef"]

logger = logging.getLogger(__name__)

#: EngineSettings fields a repository's ``claudecluster.toml`` (or the environment) may set;
#: where agents run (and so where the repository is sent) is the server's choice.
CONFIGURABLE = frozenset(ClusterConfig.model_fields) - {"claude_bin", "placement", "ray_address", "ray_allow_public"}


def _owner(git_dir: Path) -> Path:
    """The directory whose ``.git`` holds ``git_dir`` (``/r/.git/worktrees/x`` → ``/r``)."""
    for path in (git_dir, *git_dir.parents):
        if path.name == ".git":
            return path.parent
    return git_dir


class _Hosted:
    """One repository's cluster inside the hub, and the calls using it right now."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.cluster: Cluster | None = None
        self.failure: str | None = None
        self.users: set[anyio.CancelScope] = set()
        self.closed = False

    def gone(self) -> str:
        """Why calls can no longer use this cluster."""
        return self.failure or f"the engine of {self.root} was closed (the server is stopping)"

    def close(self, failure: str | None) -> None:
        self.closed = True
        self.failure = failure
        for scope in self.users:
            scope.cancel()


class Hub:
    """The engines of one server process: a Cluster per repository, opened on first use.

    ``engine`` holds the settings no configuration file sets (state dir, agent environment,
    …); its fields set explicitly act as the server's flags, above each repository's
    ``CLAUDECLUSTER_*`` environment and ``claudecluster.toml``. ``claude`` (else
    ``claude_bin``, else the repository's ``claude_bin`` setting) is the agents' CLI."""

    def __init__(
        self,
        roots: Sequence[Path],
        engine: EngineSettings | None = None,
        *,
        claude_bin: str | None = None,
        claude: ClaudeBinary | None = None,
    ) -> None:
        if not roots:
            raise RepositoryError("the server needs at least one root directory for repositories")
        self.roots = [root.expanduser().resolve() for root in roots]
        self.engine = engine or EngineSettings()
        self.claude_bin = claude_bin
        self.claude = claude
        self.registry = Registry(self.engine.state_dir / "registry.db")
        self._hosted: dict[Path, _Hosted] = {}
        self._plans: dict[str, Path] = {}  # plan id → repository root, as looked up
        self._lock = anyio.Lock()
        self._tg: TaskGroup | None = None
        #: Every change of every open repository's state (the clusters' own feeds, joined).
        self.changes = Watchers()

    # -- lifecycle ---------------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[Hub] = anyio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; reports started once the repositories with running plans
        have been reopened (so those plans carry on after a restart)."""
        async with anyio.create_task_group() as tg:
            self._tg = tg
            try:
                await self._resume_running()
                task_status.started(self)
                await anyio.sleep_forever()
            finally:
                self._tg = None
                tg.cancel_scope.cancel()

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        roots: Sequence[Path],
        engine: EngineSettings | None = None,
        *,
        claude_bin: str | None = None,
        claude: ClaudeBinary | None = None,
    ) -> AsyncIterator[Hub]:
        """Run a hub for the duration of the block."""
        async with HubRef().running(cls(roots, engine, claude_bin=claude_bin, claude=claude)) as hub:
            yield hub

    async def _resume_running(self) -> None:
        for repo in await self._repos_with_running_plans():
            try:
                async with self.cluster(str(repo)):
                    logger.info("resumed the running plans of %s", repo)
            except ClusterError as exc:
                logger.warning("cannot resume the plans of %s: %s", repo, exc)
            except Exception:
                logger.exception("cannot resume the plans of %s", repo)

    async def _repos_with_running_plans(self) -> list[Path]:
        running = []
        for repo in await anyio.to_thread.run_sync(self._registered_repos):
            if not self._inside_roots(repo) or not repo.is_dir():
                continue
            with contextlib.suppress(ClusterError):
                db_path = await state_db_path(repo)
                if not db_path.exists():
                    continue
                async with Store.open(db_path) as store:
                    if await store.plans([PlanState.RUNNING]):
                        running.append(repo)
        return running

    def _registered_repos(self) -> list[Path]:
        if not self.registry.path.exists():
            return []
        try:
            with contextlib.closing(sqlite3.connect(self.registry.path)) as db:
                return sorted({Path(row[0]) for row in db.execute("SELECT DISTINCT repo FROM plans")})
        except sqlite3.Error as exc:
            logger.warning("cannot read the plan registry %s: %s", self.registry.path, exc)
            return []

    # -- clusters ----------------------------------------------------------------------------

    def _inside_roots(self, path: Path) -> bool:
        return any(path == root or root in path.parents for root in self.roots)

    def _roots_text(self) -> str:
        return ", ".join(str(r) for r in self.roots)

    def _path(self, repo: str | None) -> Path:
        """``repo`` resolved (relative to the first root; default: the first root)."""
        try:
            path = Path(repo).expanduser() if repo else self.roots[0]
            return (path if path.is_absolute() else self.roots[0] / path).resolve()
        except (RuntimeError, ValueError) as exc:  # `~nobody`; a NUL byte
            raise RepositoryError(f"cannot use {repo!r} as a repository path: {exc}") from exc

    async def _root(self, repo: str | None) -> Path:
        path = self._path(repo)
        if not self._inside_roots(path):
            raise RepositoryError(
                f"{path} is outside the allowed roots ({self._roots_text()}); "
                f"start the server with --root {path} to allow it"
            )
        if path in self._hosted:  # a repository root already open (and checked): no git needed
            return path
        root = await repo_root(path)
        await self._confine(path, root)
        return root

    async def _confine(self, asked: Path, root: Path) -> None:
        """Defense in depth: what the engine opens, writes and merges is the repository's
        toplevel and its git directories, not the path asked for. A path inside a root may
        belong to a repository above every root, and a ``.git`` file (or link) inside a root
        may point to another repository's git directory: both would let a caller reach
        outside the roots. Each is checked resolved (symlinks too)."""
        if not self._inside_roots(root):
            raise RepositoryError(
                f"{asked} belongs to the git repository {root}, which lies above the allowed roots "
                f"({self._roots_text()}); the server would open and merge {root} itself. "
                f"Start the server with --root {root} to allow it"
            )
        dirs = await git(root, "rev-parse", "--path-format=absolute", "--git-dir", "--git-common-dir")
        for raw in dict.fromkeys(dirs.stdout.splitlines()):
            git_dir = Path(raw).resolve()
            if not self._inside_roots(git_dir):
                raise RepositoryError(
                    f"the repository {root} keeps its git data in {git_dir} (its .git points there), "
                    f"outside the allowed roots ({self._roots_text()}). Start the server with "
                    f"--root {_owner(git_dir)} to allow it"
                )

    @asynccontextmanager
    async def cluster(self, repo: str | None) -> AsyncIterator[Cluster]:
        """Use the cluster of ``repo`` (default: the first root), opened if needed. If that
        cluster fails meanwhile, the block is cancelled and :class:`StateError` raised."""
        async with self._use(await self._root(repo)) as cluster:
            yield cluster

    @asynccontextmanager
    async def cluster_of_plan(self, plan_id: str) -> AsyncIterator[Cluster]:
        """Use the cluster holding ``plan_id`` (:class:`NotFoundError` listing known plans)."""
        root = self._plans.get(plan_id)
        if root is None:
            root = await self._root(str(await anyio.to_thread.run_sync(self.registry.lookup, plan_id)))
            self._plans[plan_id] = root
        async with self._use(root) as cluster:
            yield cluster

    @asynccontextmanager
    async def _use(self, root: Path) -> AsyncIterator[Cluster]:
        hosted = await self._host_of(root)
        if hosted.closed or hosted.cluster is None:
            raise StateError(hosted.gone())
        with anyio.CancelScope() as scope:
            hosted.users.add(scope)
            try:
                yield hosted.cluster
            finally:
                hosted.users.discard(scope)
        if scope.cancelled_caught:
            raise StateError(hosted.gone())

    async def _host_of(self, root: Path) -> _Hosted:
        if (hosted := self._hosted.get(root)) is not None:
            return hosted
        async with self._lock:
            hosted = self._hosted.get(root)
            if hosted is None:
                if self._tg is None:
                    raise StateError("the server is not running")
                engine, claude = await self._settings_for(root)
                hosted = await self._tg.start(self._host, root, engine, claude)
                self._hosted[root] = hosted
            return hosted

    async def _settings_for(self, root: Path) -> tuple[EngineSettings, ClaudeBinary]:
        """The repository's settings: server flags > environment > its claudecluster.toml >
        defaults, plus the server's non-configurable settings; and its `claude`."""
        flags: dict[str, Any] = {k: getattr(self.engine, k) for k in self.engine.model_fields_set & CONFIGURABLE}
        config = await anyio.to_thread.run_sync(functools.partial(load_config, root, **flags))
        fixed = {k: getattr(self.engine, k) for k in EngineSettings.model_fields if k not in CONFIGURABLE}
        claude = self.claude
        if claude is None:
            claude = await anyio.to_thread.run_sync(find_claude, self.claude_bin or config.claude_bin)
        return config.engine(**fixed), claude

    async def _host(
        self, root: Path, engine: EngineSettings, claude: ClaudeBinary, *, task_status: TaskStatus[_Hosted]
    ) -> None:
        hosted = _Hosted(root)
        failure = None
        try:
            async with (
                open_placement(engine, claude) as placement,
                Cluster.open(root, settings=engine, claude=claude, placement=placement) as cluster,
            ):
                hosted.cluster = cluster
                unwatch = cluster.watch(self.changes.emit)
                try:
                    task_status.started(hosted)
                    await anyio.sleep_forever()
                finally:
                    unwatch()
        except Exception:
            if hosted.cluster is None:
                raise  # failed to open: the caller of tg.start() gets the error
            # Contain it: one repository's failure must not stop the others or the server.
            logger.exception("the engine of %s failed; it is closed and the next call reopens it", root)
            failure = (
                f"the engine of {root} failed unexpectedly (details in the server log); "
                "it was closed, and the next call reopens it"
            )
        finally:
            if self._hosted.get(root) is hosted:
                del self._hosted[root]
            hosted.close(failure)

    # -- the pool ----------------------------------------------------------------------------

    @property
    def clusters(self) -> list[Cluster]:
        """Open clusters."""
        return [h.cluster for h in self._hosted.values() if h.cluster is not None]

    @property
    def workers(self) -> int:
        """Pool size for repositories without their own ``workers`` setting."""
        return self.engine.workers

    def set_workers(self, count: int) -> None:
        """Resize every repository's agent pool (a server flag from now on)."""
        self.engine = self.engine.model_copy(update={"workers": count})
        for cluster in self.clusters:
            cluster.set_workers(count)


class HubRef:
    """Where sessions find the hub: set by the transport while the hub runs."""

    def __init__(self, hub: Hub | None = None) -> None:
        self.hub = hub

    def get(self) -> Hub:
        """The running hub (:class:`StateError` while the server is starting)."""
        if self.hub is None:
            raise StateError("the server is still starting; try again in a moment")
        return self.hub

    @asynccontextmanager
    async def running(self, hub: Hub) -> AsyncIterator[Hub]:
        """Run ``hub`` and publish it here for the duration of the block."""
        async with anyio.create_task_group() as tg:
            self.hub = await tg.start(hub.run)
            try:
                yield self.hub
            finally:
                self.hub = None
                tg.cancel_scope.cancel()
