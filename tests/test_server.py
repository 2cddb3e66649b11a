"""The MCP tools through the SDK's in-memory client, with real `claude` agents behind them."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from conftest import agent_home, make_repo
from mcp import Client

from claudecluster_mcp.agent import ClaudeBinary
from claudecluster_mcp.engine import EngineSettings
from claudecluster_mcp.model_server import ScriptedModelServer, scripted_env
from claudecluster_mcp.server import ServerSettings, build_server

pytestmark = [pytest.mark.anyio]

StartServer = Callable[[dict[str, Any]], ScriptedModelServer]


def engine_settings(tmp_path: Path, model: ScriptedModelServer | None = None) -> EngineSettings:
    env = {**scripted_env(model.url), "HOME": str(agent_home(tmp_path))} if model else {}
    return EngineSettings(
        state_dir=tmp_path / "state",
        claude_config_dir=tmp_path / "claude-config",
        agent_env=env,
        allowed_tools=["Bash"],
        inactivity_timeout=60,
        wall_timeout=120,
    )


@asynccontextmanager
async def connected(
    tmp_path: Path, claude: ClaudeBinary, model: ScriptedModelServer | None = None
) -> AsyncIterator[Client]:
    mcp, ref, _ = build_server()
    settings = ServerSettings(roots=[tmp_path], engine=engine_settings(tmp_path, model))
    async with ref.running(settings.hub(claude)), Client(mcp) as client:
        yield client


def write_rule(marker: str, name: str, content: str) -> dict[str, Any]:
    return {
        "name": marker,
        "match": marker,
        "turns": [
            {"tools": [{"name": "Write", "input": {"file_path": "{cwd}/" + name, "content": content}}]},
            {"text": f"wrote {name}"},
        ],
    }


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


async def test_every_tool_is_listed_with_annotations_and_schemas(tmp_path: Path, claude: ClaudeBinary) -> None:
    async with connected(tmp_path, claude) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
        templates = {t.uri_template for t in (await client.list_resource_templates()).resource_templates}
        prompts = {p.name for p in (await client.list_prompts()).prompts}

    assert set(tools) == {"plan", "dispatch", "status", "merge", "cancel", "logs", "workers"}
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
    tmp_path: Path, claude: ClaudeBinary, model_server: StartServer
) -> None:
    repo = make_repo(tmp_path / "repo")
    model = model_server({"rules": [write_rule("[one]", "one.txt", "1\n"), write_rule("[two]", "two.txt", "2\n")]})
    progress: list[tuple[float, float | None, str | None]] = []

    async def on_progress(done: float, total: float | None, message: str | None) -> None:
        progress.append((done, total, message))

    async with connected(tmp_path, claude, model) as client:
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
    assert [p["plan_id"] for p in listing["plans"]] == [plan_id]


@pytest.mark.claude
async def test_plan_without_tasks_asks_a_planning_agent_and_retries_once(
    tmp_path: Path, claude: ClaudeBinary, model_server: StartServer
) -> None:
    repo = make_repo(tmp_path / "repo")
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

    async with connected(tmp_path, claude, model) as client:
        plan = await call(client, "plan", repo=str(repo), goal="do a then b")

    assert [(t["id"], t["deps"]) for t in plan["tasks"]] == [("a", []), ("b", ["a"])]
    # The CLI ends the run as soon as the StructuredOutput tool is called: one request each.
    assert [r.rule for r in model.requests] == ["planner", "retry"]
    assert "dependency cycle" in model.requests[1].first_user_text
    assert (await anyio.run_process(["git", "-C", str(repo), "status", "--porcelain"])).stdout == b""


async def test_bad_input_gives_actionable_errors_and_the_session_goes_on(tmp_path: Path, claude: ClaudeBinary) -> None:
    repo = make_repo(tmp_path / "repo")
    (tmp_path / "not-a-repo").mkdir()
    one = [{"id": "a", "prompt": "x"}]

    async with connected(tmp_path, claude) as client:
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
