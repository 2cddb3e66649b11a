"""The server the fuzz tests call: one hub over two repositories and paths that must be
refused, plans in several states, a scripted model, and a log of errors the server wrote
(see ``test_fuzz_tools``)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from anyio.from_thread import BlockingPortal
from conftest import agent_home, make_repo
from fuzz_inputs import Known
from mcp import Client

from claudecluster_mcp.claude_cli import ClaudeBinary
from claudecluster_mcp.model_server import ScriptedModelServer, scripted_env
from claudecluster_mcp.scenario import load_scenario, marker_rule, marker_task, write_turn
from claudecluster_mcp.server import ServerSettings, build_server
from claudecluster_mcp.settings import EngineSettings

T = TypeVar("T")


class ErrorLog(logging.Handler):
    """Collects what the server logs at ERROR and above: a crash the client did not see."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    @contextmanager
    def none_new(self) -> Iterator[None]:
        """Fail if anything is logged at ERROR within the block."""
        before = len(self.records)
        yield
        new = self.records[before:]
        assert not new, "the server logged: " + "\n".join(self.format(r) for r in new)


@dataclass(repr=False)
class World:
    """One running server, its client, and what it knows; ``run`` calls into its event loop."""

    client: Client
    known: Known
    errors: ErrorLog
    portal: BlockingPortal
    runnable: str  # a plan only the tests that run agents use
    model: ScriptedModelServer

    def __repr__(self) -> str:
        return f"World(plans={self.known.plans})"

    def run(self, check: Callable[[World], Awaitable[T]]) -> T:
        """Run ``check(self)`` on the server's event loop, failing if it logs an error."""
        with self.errors.none_new():
            return self.portal.call(check, self)


def plant(root: Path, outside: Path) -> list[str]:
    """Repositories under ``root`` and paths that must be refused: outside it, a symlink and
    a ``.git`` file pointing out of it, a plain directory, a missing one."""
    elsewhere = make_repo(outside / "repo")
    (root / "link-out").symlink_to(elsewhere)
    (root / "gitfile").mkdir()
    (root / "gitfile" / ".git").write_text(f"gitdir: {elsewhere / '.git'}\n")
    (root / "plain").mkdir()
    (root / "a" / "sub").mkdir()
    return [
        str(root / "a"),
        str(root / "b"),
        str(root / "a" / "sub"),
        "a",
        "b/../a",
        str(root),
        str(root / "plain"),
        str(root / "missing"),
        str(root / "link-out"),
        str(root / "gitfile"),
        str(root / ".." / outside.name / "repo"),
        str(elsewhere),
        str(root / "a" / ".git"),
        "/",
        "../",
        "~",
    ]


#: The scripted model: tasks whose prompt holds [a] or [b] write a file; anything else ends
#: after one text turn.
SCENARIO = {
    "rules": [
        marker_rule("a", write_turn("a.txt", "a\n")),
        marker_rule("b", write_turn("b.txt", "b\n")),
        {"name": "other", "match": "", "turns": [{"text": "ok"}]},
    ]
}


async def make_plan(client: Client, repo: Path, tasks: list[dict[str, Any]]) -> str:
    """The id of a new plan of ``tasks`` in ``repo``."""
    plan = await client.call_tool("plan", {"goal": "g", "repo": str(repo), "tasks": tasks})
    assert plan.structured_content is not None, plan.content
    return str(plan.structured_content["plan_id"])


@asynccontextmanager
async def serving(base: Path, claude: ClaudeBinary, errors: ErrorLog, portal: BlockingPortal) -> AsyncIterator[World]:
    """A server over two repositories below ``base / "root"``: a cancelled plan in one and a
    planned one in the other, which the fuzzed tools get, and one more plan kept for the
    tests that run its agents (against the scripted model)."""
    root = base / "root"
    repos = [make_repo(root / "a"), make_repo(root / "b")]
    paths = plant(root, base / "outside")
    model = ScriptedModelServer(load_scenario(SCENARIO)).start()
    engine = EngineSettings(
        state_dir=base / "state",
        claude_config_dir=base / "claude-config",
        agent_env={**scripted_env(model.url), "HOME": str(agent_home(base))},
        isolation="none",
        retry_backoff=0.2,
        inactivity_timeout=30,
        wall_timeout=60,
        cancel_grace=2,
    )
    mcp, ref, _ = build_server()
    try:
        async with ref.running(ServerSettings(roots=[root], engine=engine).hub(claude)), Client(mcp) as client:
            known = Known(paths=paths, valid_repos=[str(r) for r in repos], plans=[])
            for repo in repos:
                tasks = [{"id": "a", "prompt": "x"}, {"id": "b", "prompt": "y", "deps": ["a"]}]
                plan_id = await make_plan(client, repo, tasks)
                known.plans.append(plan_id)
                known.tasks += [f"{plan_id}:a", f"{plan_id}:b"]
            await client.call_tool("cancel", {"plan_id": known.plans[0]})
            runnable = await make_plan(client, repos[1], [marker_task("a"), marker_task("b")])
            yield World(client, known, errors, portal, runnable, model)
    finally:
        model.stop()
