"""The MCP tools through the SDK's in-memory client, with real `claude` agents behind them."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client
from mcp.shared.exceptions import MCPError

from claudecluster_mcp import tools
from claudecluster_mcp.agent import ClaudeBinary
from claudecluster_mcp.engine import Cluster, EngineSettings
from claudecluster_mcp.errors import ClusterError, GitError, NotFoundError, StateError
from claudecluster_mcp.hub import Hub
from claudecluster_mcp.model_server import ScriptedModelServer
from claudecluster_mcp.models import TaskSpec
from claudecluster_mcp.scenario import marker_rule, write_turn
from claudecluster_mcp.server import ServerSettings, build_server

pytestmark = [pytest.mark.anyio]

StartServer = Callable[[dict[str, Any]], ScriptedModelServer]
Settings = Callable[..., EngineSettings]
Connect = Callable[..., AbstractAsyncContextManager[Client]]
MakeRepo = Callable[[Path], Path]
Git = Callable[..., str]


@pytest.fixture
def connected(tmp_path: Path, claude: ClaudeBinary, engine_settings: Settings) -> Connect:
    """``connected(model=None)``: a client of an in-memory server over tmp_path whose agents
    use the scripted ``model``."""

    @asynccontextmanager
    async def connect(model: ScriptedModelServer | None = None) -> AsyncIterator[Client]:
        mcp, ref, _ = build_server()
        settings = ServerSettings(roots=[tmp_path], engine=engine_settings(model))
        async with ref.running(settings.hub(claude)), Client(mcp) as client:
            yield client

    return connect


async def call(client: Client, tool: str, **arguments: Any) -> dict[str, Any]:
    result = await client.call_tool(tool, arguments)
    assert not result.is_error, result.content
    assert result.structured_content is not None
    return result.structured_content


async def error_of(client: Client, tool: str, **arguments: Any) -> str:
    result = await client.call_tool(tool, arguments)
    assert result.is_error, result.structured_content
    text = result.content[0].text  # type: ignore[union-attr]
    assert "Traceback" not in text
    return text


async def test_every_tool_is_listed_with_annotations_and_schemas(connected: Connect) -> None:
    async with connected() as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
        templates = {t.uri_template for t in (await client.list_resource_templates()).resource_templates}
        prompts = {p.name for p in (await client.list_prompts()).prompts}

    assert set(tools) == {"plan", "dispatch", "status", "merge", "cancel", "approve", "logs", "workers"}
    assert tools["status"].annotations.read_only_hint and tools["logs"].annotations.read_only_hint
    assert tools["merge"].annotations.destructive_hint and tools["cancel"].annotations.destructive_hint
    for tool in tools.values():
        assert tool.description and len(tool.description) > 40
        assert tool.output_schema is not None
    assert "tasks" in tools["plan"].input_schema["properties"]
    assert templates == {"claudecluster://plans/{plan_id}", "claudecluster://tasks/{task_id}/log"}
    assert prompts == {"split_goal"}


@pytest.mark.claude
async def test_plan_dispatch_status_logs_merge_with_real_agents(
    repo: Path, connected: Connect, model_server: StartServer
) -> None:
    model = model_server(
        {"rules": [marker_rule("one", write_turn("one.txt", "1\n")), marker_rule("two", write_turn("two.txt", "2\n"))]}
    )
    progress: list[tuple[float, float | None, str | None]] = []

    async def on_progress(done: float, total: float | None, message: str | None) -> None:
        progress.append((done, total, message))

    async with connected(model) as client:
        plan = await call(
            client,
            "plan",
            repo=str(repo),
            goal="two files",
            tasks=[
                {"id": "one", "prompt": "[one] write one"},
                {"id": "two", "prompt": "[two] write two", "deps": ["one"]},
            ],
        )
        plan_id = plan["plan_id"]
        assert [t["id"] for t in plan["tasks"]] == ["one", "two"]
        with anyio.fail_after(5):  # dispatch never waits for the agents
            started = await call(client, "dispatch", plan_id=plan_id)
        assert started["state"] == "running"
        result = await client.call_tool(
            "status",
            {"plan_id": plan_id, "wait_seconds": 90, "until_finished": True},
            progress_callback=on_progress,
        )
        status = result.structured_content
        assert status is not None and status["finished"], status
        assert "plan " + plan_id in result.content[0].text  # type: ignore[union-attr]
        assert {t["id"]: t["state"] for t in status["tasks"]} == {"one": "merged", "two": "merged"}
        assert status["total_cost_usd"] > 0 and status["total_tokens"] > 0
        assert all(t["turns"] == 2 and t["elapsed_s"] > 0 for t in status["tasks"])
        one = await call(client, "status", task_id=f"{plan_id}:one")
        assert [t["id"] for t in one["tasks"]] == ["one"]
        logs = await call(client, "logs", task_id=f"{plan_id}:one")
        assert any("tool_use" in line and "Write" in line for line in logs["lines"])
        assert logs["transcript"] and Path(logs["transcript"]).exists()
        resource = await client.read_resource(f"claudecluster://tasks/{plan_id}:two/log")
        assert "two.txt" in resource.contents[0].text  # type: ignore[union-attr]
        plan_resource = await client.read_resource(f"claudecluster://plans/{plan_id}")
        assert '"finished": true' in plan_resource.contents[0].text  # type: ignore[union-attr]
        dry = await call(client, "merge", plan_id=plan_id, dry_run=True)
        assert dry["kind"] == "fast-forward" and not (repo / "one.txt").exists()
        merged = await call(client, "merge", plan_id=plan_id)
        listing = await call(client, "status")

    assert merged["kind"] == "fast-forward" and merged["undo"]
    assert (repo / "one.txt").read_text() == "1\n" and (repo / "two.txt").read_text() == "2\n"
    assert progress and progress[-1][1] == 2
    values = [done for done, _, _ in progress]
    assert values == sorted(set(values)), values  # MCP progress only ever increases
    assert [p["plan_id"] for p in listing["plans"]] == [plan_id]


@pytest.mark.claude
async def test_plan_without_tasks_asks_a_planning_agent_and_retries_once(
    repo: Path, connected: Connect, model_server: StartServer, git: Git
) -> None:
    bad = {
        "tasks": [
            {"id": "a", "title": "A", "prompt": "do a", "deps": ["b"]},
            {"id": "b", "title": "B", "prompt": "b", "deps": ["a"]},
        ]
    }
    good = {
        "tasks": [
            {"id": "a", "title": "A", "prompt": "do a"},
            {"id": "b", "title": "B", "prompt": "do b", "deps": ["a"]},
        ]
    }
    model = model_server(
        {
            "rules": [
                # The retry prompt carries the rejection: answer it with the fixed plan.
                {
                    "name": "retry",
                    "match": "previous plan was rejected",
                    "turns": [{"tools": [{"name": "StructuredOutput", "input": good}]}, {"text": "fixed"}],
                },
                {
                    "name": "planner",
                    "match": "[claudecluster:plan]",
                    "turns": [{"tools": [{"name": "StructuredOutput", "input": bad}]}, {"text": "planned"}],
                },
            ]
        }
    )

    async with connected(model) as client:
        plan = await call(client, "plan", repo=str(repo), goal="do a then b")

    assert [(t["id"], t["deps"]) for t in plan["tasks"]] == [("a", []), ("b", ["a"])]
    # The CLI ends the run as soon as the StructuredOutput tool is called: one request each.
    turns = [r for r in model.requests if r.path == "/v1/messages"]  # not the pre-flight check
    assert [r.rule for r in turns] == ["planner", "retry"]
    assert "dependency cycle" in turns[1].first_user_text
    assert git(repo, "status", "--porcelain") == ""


async def test_bad_input_gives_actionable_errors_and_the_session_goes_on(
    tmp_path: Path, repo: Path, connected: Connect
) -> None:
    (tmp_path / "not-a-repo").mkdir()
    one = [{"id": "a", "prompt": "x"}]

    async with connected() as client:
        assert "is not a git repository" in await error_of(
            client, "plan", repo=str(tmp_path / "not-a-repo"), goal="g", tasks=one
        )
        assert "outside the allowed roots" in await error_of(client, "plan", repo="/etc", goal="g", tasks=one)
        assert "outside the allowed roots" in await error_of(
            client, "plan", repo=str(tmp_path / ".."), goal="g", tasks=one
        )
        assert "start with '-'" in await error_of(client, "plan", repo=str(repo), goal="g", tasks=one, base_ref="-x")
        assert "invalid branch name" in await error_of(client, "plan", repo=str(repo), goal="g", tasks=one, target="-t")
        assert "dependency cycle: a → b → a" in await error_of(
            client,
            "plan",
            repo=str(repo),
            goal="g",
            tasks=[{"id": "a", "prompt": "x", "deps": ["b"]}, {"id": "b", "prompt": "y", "deps": ["a"]}],
        )
        assert "validation error" in await error_of(client, "plan", repo=str(repo))  # goal missing
        assert "validation error" in await error_of(
            client, "plan", repo=str(repo), goal="g", tasks=[{"id": "-rf", "prompt": "x"}]
        )
        plan = await call(client, "plan", repo=str(repo), goal="g", tasks=one)
        plan_id = plan["plan_id"]
        assert f"recent plans: {plan_id}" in await error_of(client, "status", plan_id="pnope0000")
        huge = await error_of(client, "status", plan_id="p" + "x" * 200_000)
        assert "unknown plan id 'pxxx" in huge and "characters cut" in huge and len(huge) < 9000
        assert "has no task 'zz' (tasks: a)" in await error_of(client, "logs", task_id=f"{plan_id}:zz")
        assert "must be <plan_id>:<task id>" in await error_of(client, "logs", task_id="no-colon")
        assert "exactly one of plan_id or task_id" in await error_of(client, "cancel")
        assert "still running" in await error_of(client, "merge", plan_id=plan_id)
        assert "validation error" in await error_of(client, "workers", count=0)
        workers = await call(client, "workers", count=7)
        assert workers["workers"] == 7
        cancelled = await call(client, "cancel", plan_id=plan_id)
        assert cancelled["state"] == "cancelled" and cancelled["counts"] == {"cancelled": 1}
        assert "cannot be dispatched" in await error_of(client, "dispatch", plan_id=plan_id)
        prompt = await client.get_prompt("split_goal", {"goal": "add a cache"})
        assert "add a cache" in prompt.messages[0].content.text  # type: ignore[union-attr]


def cluster_errors(base: type[ClusterError] = ClusterError) -> list[type[ClusterError]]:
    """``base`` and every subclass of it, recursively."""
    return [base, *(sub for child in base.__subclasses__() for sub in cluster_errors(child))]


async def test_every_cluster_error_reaches_the_client_with_its_message(
    repo: Path, connected: Connect, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Like httpx's exception-mapping test: the one mapping covers the whole error tree."""
    raising: list[type[ClusterError]] = []

    async def fail(*args: object, **kwargs: object) -> None:
        raise raising[-1](f"{raising[-1].__name__}: here is what to do")

    async with connected() as client:
        plan_id = (await call(client, "plan", repo=str(repo), goal="g", tasks=[{"id": "a", "prompt": "x"}]))["plan_id"]
        monkeypatch.setattr(Cluster, "status", fail)
        monkeypatch.setattr(Cluster, "events", fail)
        for error in cluster_errors():
            raising.append(error)
            message = f"{error.__name__}: here is what to do"
            assert message in await error_of(client, "status", plan_id=plan_id)
            for uri in (f"claudecluster://plans/{plan_id}", f"claudecluster://tasks/{plan_id}:a/log"):
                with pytest.raises(MCPError, match=message):
                    await client.read_resource(uri)

    assert len(raising) >= 15 and {StateError, GitError} <= set(raising)


@asynccontextmanager
async def failing_once(monkeypatch: pytest.MonkeyPatch, repo: Path, trigger: anyio.Event) -> AsyncIterator[None]:
    """The first cluster opened for ``repo`` gets a background task that raises on ``trigger``."""
    original = Cluster.open
    failed: list[Path] = []

    async def explode() -> None:
        await trigger.wait()
        raise RuntimeError("injected engine failure")

    @asynccontextmanager
    async def open_cluster(root: Path, **kwargs: Any) -> AsyncIterator[Cluster]:
        async with original(root, **kwargs) as cluster:
            if root != repo or failed:
                yield cluster
                return
            failed.append(root)
            async with anyio.create_task_group() as tg:
                tg.start_soon(explode)
                yield cluster

    monkeypatch.setattr(Cluster, "open", open_cluster)
    yield


async def test_one_repositorys_failure_leaves_the_others_and_the_session_running(
    tmp_path: Path,
    make_repo: MakeRepo,
    connected: Connect,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    a, b = make_repo(tmp_path / "a"), make_repo(tmp_path / "b")
    one = [{"id": "t", "prompt": "x"}]
    trigger = anyio.Event()

    async def on_progress(done: float, total: float | None, message: str | None) -> None:
        trigger.set()  # the long-poll below is in flight: now fail a's engine

    async with failing_once(monkeypatch, a, trigger), connected() as client:
        plan_a = (await call(client, "plan", repo=str(a), goal="g", tasks=one))["plan_id"]
        plan_b = (await call(client, "plan", repo=str(b), goal="g", tasks=one))["plan_id"]
        with anyio.fail_after(20):
            failed = await client.call_tool(
                "status", {"plan_id": plan_a, "wait_seconds": 60}, progress_callback=on_progress
            )
        still_open = (await call(client, "workers"))["repositories"]
        b_status = await call(client, "status", plan_id=plan_b)
        b_cancelled = await call(client, "cancel", plan_id=plan_b)
        a_again = await call(client, "status", plan_id=plan_a)  # reopened on demand
        reopened = (await call(client, "workers"))["repositories"]

    assert failed.is_error
    text = failed.content[0].text  # type: ignore[union-attr]
    assert f"the engine of {a} failed unexpectedly" in text and "next call reopens it" in text
    assert "injected" not in text  # details stay in the server log
    assert still_open == [str(b)]
    assert b_status["counts"] == {"pending": 1} and b_cancelled["state"] == "cancelled"
    assert a_again["plan_id"] == plan_a and sorted(reopened) == sorted([str(a), str(b)])
    logged = [r for r in caplog.records if r.name == "claudecluster_mcp.hub" and r.exc_info]
    assert logged and "injected engine failure" in caplog.text


async def test_each_repository_uses_its_own_claudecluster_toml_under_the_servers_flags(
    tmp_path: Path, claude: ClaudeBinary, make_repo: MakeRepo, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = make_repo(tmp_path / "a"), make_repo(tmp_path / "b")
    (a / "claudecluster.toml").write_text("workers = 3\n")
    (b / "claudecluster.toml").write_text("workers = 2\n")
    one = [{"id": "t", "prompt": "x"}]

    async def pools(engine: EngineSettings) -> dict[str, int]:
        mcp, ref, _ = build_server()
        async with ref.running(ServerSettings(roots=[tmp_path], engine=engine).hub(claude)), Client(mcp) as client:
            for repo in (a, b):
                await call(client, "plan", repo=str(repo), goal="g", tasks=one)
            return dict((await call(client, "workers"))["pools"])

    assert await pools(EngineSettings(state_dir=tmp_path / "state")) == {str(a): 3, str(b): 2}
    assert await pools(EngineSettings(state_dir=tmp_path / "state", workers=5)) == {str(a): 5, str(b): 5}
    monkeypatch.setenv("CLAUDECLUSTER_WORKERS", "6")  # the environment is above the file
    assert await pools(EngineSettings(state_dir=tmp_path / "state")) == {str(a): 6, str(b): 6}


@pytest.mark.claude
async def test_a_gate_in_the_repositorys_toml_runs_for_a_plan_dispatched_over_mcp(
    tmp_path: Path, repo: Path, connected: Connect, model_server: StartServer, git: Git
) -> None:
    marker = tmp_path / "gate-ran"
    (repo / "claudecluster.toml").write_text(f'gate = ["sh", "-c", "ls > {marker}; exit 1"]\n')
    git(repo, "add", "claudecluster.toml")
    git(repo, "-c", "user.name=T", "-c", "user.email=t@x", "commit", "-qm", "c")
    model = model_server({"rules": [marker_rule("one", write_turn("one.txt", "1\n"))]})

    async with connected(model) as client:
        plan_id = (await call(client, "plan", repo=str(repo), goal="g", tasks=[{"id": "one", "prompt": "[one] w"}]))[
            "plan_id"
        ]
        await call(client, "dispatch", plan_id=plan_id)
        done = await call(client, "status", plan_id=plan_id, wait_seconds=90, until_finished=True)

    assert [t["state"] for t in done["tasks"]] == ["gate_failed"], done["tasks"]
    assert "one.txt" in marker.read_text().split()  # the gate ran on the merge candidate


@pytest.mark.claude
async def test_a_restarted_server_resumes_a_running_plan_of_a_linked_worktree(
    tmp_path: Path,
    claude: ClaudeBinary,
    make_repo: MakeRepo,
    git: Git,
    model_server: StartServer,
    engine_settings: Settings,
) -> None:
    main = make_repo(tmp_path / "main")
    linked = tmp_path / "linked"
    git(main, "worktree", "add", "-q", "-b", "feature", str(linked))
    assert (linked / ".git").is_file()  # its state lives in main's git directory
    model = model_server({"rules": [marker_rule("one", write_turn("one.txt", "1\n"))]})
    settings = ServerSettings(roots=[tmp_path], engine=engine_settings(model))
    tasks = [{"id": "one", "prompt": "[one] write one"}]

    mcp, ref, _ = build_server()
    async with ref.running(settings.hub(claude)), Client(mcp) as client:
        plan_id = (await call(client, "plan", repo=str(linked), goal="g", tasks=tasks))["plan_id"]
        await call(client, "dispatch", plan_id=plan_id)
    # The server stopped with the plan running; a new one picks it up without being asked.
    mcp, ref, _ = build_server()
    async with ref.running(settings.hub(claude)) as hub, Client(mcp) as client:
        resumed = [c.repo for c in hub.clusters]
        done = await call(client, "status", plan_id=plan_id, wait_seconds=90, until_finished=True)

    assert resumed == [linked.resolve()]
    assert [t["state"] for t in done["tasks"]] == ["merged"], done["tasks"]


async def test_tools_are_plain_functions_of_the_hub(
    tmp_path: Path, repo: Path, claude: ClaudeBinary, engine_settings: Settings
) -> None:
    mcp, _, _ = build_server()  # its hub is not running
    async with Client(mcp) as client:
        starting = await error_of(client, "workers")

    async with Hub.open([tmp_path], engine_settings(), claude=claude) as hub:
        planned = await tools.plan(hub, goal="g", repo=str(repo), tasks=[TaskSpec(id="a", prompt="x")])
        one = await tools.status(hub, task_id=f"{planned.plan_id}:a")
        pool = await tools.workers(hub, count=2)
        with pytest.raises(NotFoundError, match="recent plans"):
            await tools.logs(hub, task_id="pnope0000:a")

    assert "still starting" in starting
    assert [t.id for t in one.tasks] == ["a"] and one.counts == {"pending": 1}
    assert pool.pools == {str(repo): 2} and pool.workers == 2
