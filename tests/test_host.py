"""Claude Code itself as the MCP host: a real `claude` is given `claudecluster serve` through
`--mcp-config`, and the scripted model drives it through plan → dispatch → status → merge.
The tasks it dispatches run as real `claude` agents too."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from claudecluster_mcp.agent import run_agent
from claudecluster_mcp.claude_cli import ClaudeBinary
from claudecluster_mcp.events import AgentEvent, InitEvent, ToolResult, ToolUse
from claudecluster_mcp.model_server import ScriptedModelServer
from claudecluster_mcp.outcome import OutcomeStatus
from claudecluster_mcp.scenario import write_turn

pytestmark = [pytest.mark.anyio, pytest.mark.claude]

TOOLS = [f"mcp__claudecluster__{name}" for name in ("plan", "dispatch", "status", "merge")]


def mcp_call(name: str, **arguments: Any) -> dict[str, Any]:
    return {"tools": [{"name": f"mcp__claudecluster__{name}", "input": arguments}]}


async def test_claude_code_drives_the_cluster_through_our_mcp_server(
    claude: ClaudeBinary,
    repo: Path,
    tmp_path: Path,
    home: Path,
    git: Callable[..., str],
    model_server: Callable[[dict[str, Any]], ScriptedModelServer],
    spec_for: Callable[..., Any],
) -> None:
    model = model_server(
        {
            "rules": [
                {
                    "name": "host",
                    "match": "[host-flow]",
                    # The plan id the plan tool returned, for the following calls.
                    "captures": {"plan_id": r"\b(p[0-9a-f]{8})\b"},
                    "turns": [
                        mcp_call(
                            "plan",
                            repo="{cwd}",
                            goal="say hello",
                            tasks=[{"id": "hello", "title": "Hello", "prompt": "[host-task] write hello.txt"}],
                        ),
                        mcp_call("dispatch", plan_id="{plan_id}"),
                        mcp_call("status", plan_id="{plan_id}", wait_seconds=120, until_finished=True),
                        mcp_call("merge", plan_id="{plan_id}"),
                        {"text": "The plan is merged."},
                    ],
                },
                {
                    "name": "task",
                    "match": "[host-task]",
                    "turns": [write_turn("hello.txt", "hello\n"), {"text": "wrote hello.txt"}],
                },
            ]
        }
    )
    server = {
        "command": sys.executable,
        "args": ["-m", "claudecluster_mcp.cli", "serve", "--root", str(tmp_path)],
        "env": {"XDG_STATE_HOME": str(tmp_path / "server-state"), "HOME": str(home)},
    }
    events: list[AgentEvent] = []
    spec = spec_for(
        model,
        "[host-flow] Use claudecluster to say hello in this repository.",
        repo,
        mcp_config={"mcpServers": {"claudecluster": server}},
        allowed_tools=TOOLS,
        wall_timeout=240,
    )

    outcome = await run_agent(spec, claude=claude, on_event=events.append)

    assert outcome.status is OutcomeStatus.SUCCEEDED, outcome.reason
    called = [e.name for e in events if isinstance(e, ToolUse)]
    assert called == TOOLS
    results = [e for e in events if isinstance(e, ToolResult)]
    assert not any(r.is_error for r in results), [r.content for r in results]
    assert [r.rule for r in model.requests].count("task") == 2
    # The merged branch holds the agent's file, checked out in the user's repository.
    assert (repo / "hello.txt").read_text() == "hello\n"
    log = git(repo, "log", "--format=%s", "main")
    assert "Hello" in log


async def test_the_repositorys_mcp_json_registers_the_server_for_claude_code(
    claude: ClaudeBinary,
    tmp_path: Path,
    model_server: Callable[[dict[str, Any]], ScriptedModelServer],
    spec_for: Callable[..., Any],
) -> None:
    project = Path(__file__).parent.parent
    model = model_server(
        {"rules": [{"name": "r", "match": "[workers]", "turns": [mcp_call("workers"), {"text": "ok"}]}]}
    )
    events: list[AgentEvent] = []
    spec = spec_for(
        model,
        "[workers] how many agent slots are there?",
        project,
        mcp_config=project / "mcp.json",
        allowed_tools=["mcp__claudecluster__workers"],
        env={"XDG_STATE_HOME": str(tmp_path / "state")},
    )

    outcome = await run_agent(spec, claude=claude, on_event=events.append)

    assert outcome.status is OutcomeStatus.SUCCEEDED, outcome.reason
    init = next(e for e in events if isinstance(e, InitEvent))
    assert {"name": "claudecluster", "status": "connected"}.items() <= init.mcp_servers[0].items()
    (result,) = [e for e in events if isinstance(e, ToolResult)]
    # Claude Code hands the model the structured content (JSON), not the text summary.
    assert not result.is_error and '"workers":4' in result.content
