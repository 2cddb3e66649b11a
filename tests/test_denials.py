"""Agents that were denied say so: a tool call Claude Code's permissions refuse, or a command
the sandbox refuses, becomes a warning on the task with the setting that would allow it, in
status, logs and reports; a plan whose tasks all fail on the same denial says so once.
The denials come from the real `claude` (the scripted model asks for what it may not do)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from claudecluster_mcp.claude_cli import ClaudeBinary
from claudecluster_mcp.denials import DenialWatch, allow_rule, common_denial, warning_lines
from claudecluster_mcp.engine import Cluster, EngineSettings
from claudecluster_mcp.events import PermissionDenied, ToolResult, ToolUse
from claudecluster_mcp.model_server import ScriptedModelServer
from claudecluster_mcp.models import Task, TaskState
from claudecluster_mcp.report import event_line, to_json, to_markdown
from claudecluster_mcp.scenario import bash_turn, marker_rule, marker_task
from claudecluster_mcp.views import StatusView

pytestmark = pytest.mark.anyio

StartServer = Callable[[dict[str, Any]], ScriptedModelServer]
Settings = Callable[..., EngineSettings]
DENIED = "wanted Bash(npm test): add it to allowed_tools"


@pytest.mark.claude
async def test_tasks_failing_on_the_same_denial_say_it_once_with_the_rule_to_allow_it(
    claude: ClaudeBinary, repo: Path, model_server: StartServer, engine_settings: Settings
) -> None:
    # acceptEdits without an allow rule for Bash: Claude Code refuses `npm test`; with one
    # turn allowed, each agent then ends on max turns.
    server = model_server({"rules": [marker_rule(n, bash_turn("npm test")) for n in ("a", "b")]})
    settings = engine_settings(server, allowed_tools=[], permission_mode="acceptEdits", max_turns=1, max_attempts=1)

    async with Cluster.open(repo, workers=2, settings=settings, claude=claude) as cluster:
        plan = (await cluster.plan("test it", [marker_task("a"), marker_task("b")])).plan
        await cluster.dispatch(plan.id)
        with anyio.fail_after(90):
            status = await cluster.wait(plan.id)
        view = StatusView.of_cluster(status, cluster)
        events = await cluster.events(plan.id, "a")

    assert [(t.state, t.warnings) for t in status.tasks] == [(TaskState.FAILED, [DENIED])] * 2
    assert view.notice == f"all 2 tasks failed after the same denial: {DENIED}"
    assert view.tasks[0].warnings == [DENIED] and view.notice in view.summary()
    assert any(e["kind"] == "warning" and DENIED in event_line(e) for e in events)  # `claudecluster logs`
    markdown = to_markdown(status)
    assert markdown.count("npm test") == 1 and f"- all 2 tasks failed after the same denial: {DENIED}" in markdown
    assert json.loads(to_json(status))["tasks"][1]["warnings"] == [DENIED]


@pytest.mark.claude
@pytest.mark.sandbox
@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
async def test_a_sandbox_refusal_names_the_setting_that_would_allow_it(
    claude: ClaudeBinary, repo: Path, model_server: StartServer, engine_settings: Settings
) -> None:
    server = model_server({"rules": [marker_rule("net", bash_turn("curl -sS -m 3 http://example.com/ -o /dev/null"))]})

    async with Cluster.open(repo, settings=engine_settings(server, isolation="sandbox"), claude=claude) as cluster:
        plan = (await cluster.plan("fetch", [marker_task("net")])).plan
        await cluster.dispatch(plan.id)
        with anyio.fail_after(90):
            status = await cluster.wait(plan.id)

    assert status.task("net").warnings == [
        "the sandbox blocked network access to example.com: add it to sandbox_allowed_domains"
    ]


@pytest.mark.parametrize(
    ("tool", "given", "rule"),
    [
        ("Bash", {"command": "npm   test\n"}, "Bash(npm test)"),
        ("Write", {"file_path": "/etc/motd", "content": "x"}, "Edit(//etc/motd)"),
        ("Edit", {"file_path": "src/app.py"}, "Edit(src/app.py)"),
        ("Read", {"file_path": "/home/me/.ssh/id_rsa"}, "Read(//home/me/.ssh/id_rsa)"),
        ("WebFetch", {"url": "https://docs.python.org/3/"}, "WebFetch(domain:docs.python.org)"),
        ("mcp__db__query", {"sql": "select 1"}, "mcp__db__query"),
        ("Bash", {"command": "x" * 500}, "Bash(" + "x" * 159 + "…)"),
    ],
)
def test_the_rule_that_would_allow_a_call(tool: str, given: dict[str, Any], rule: str) -> None:
    assert allow_rule(tool, given) == rule


def test_sandbox_refusals_are_read_from_the_tool_results() -> None:
    watch = DenialWatch(sandboxed=True)
    watch.feed(ToolUse(id="1", name="Bash", input={"command": "touch /opt/x"}))
    watch.feed(ToolUse(id="2", name="Bash", input={"command": "curl http://pypi.org/simple"}))
    watch.feed(ToolUse(id="3", name="Bash", input={"command": "grep -r 'Read-only file system' ."}))
    refused = "Exit code 1\ntouch: cannot touch '/opt/x': Read-only file system"
    assert watch.feed(ToolResult(tool_use_id="1", content=refused, is_error=True)) == [
        "the sandbox refused a write to /opt/x (touch /opt/x): add the path to sandbox_write_paths"
    ]
    blocked = "rc=0\n<sandbox_violations>\ndeny network-outbound pypi.org:80 (user denied)\n</sandbox_violations>"
    assert watch.feed(ToolResult(tool_use_id="2", content=blocked)) == [
        "the sandbox blocked network access to pypi.org: add it to sandbox_allowed_domains"
    ]
    # A command that merely prints the words is no refusal; a repeated denial is said once.
    assert watch.feed(ToolResult(tool_use_id="3", content="notes.md: Read-only file system")) == []
    assert watch.feed(ToolResult(tool_use_id="2", content=blocked)) == []
    assert DenialWatch(sandboxed=False).feed(ToolResult(tool_use_id="1", content=refused, is_error=True)) == []


def test_a_live_denial_and_the_final_result_are_one_warning() -> None:
    watch = DenialWatch(sandboxed=False)
    watch.feed(ToolUse(id="t1", name="Bash", input={"command": "npm test"}))
    assert watch.feed(PermissionDenied(tool_name="Bash", tool_use_id="t1", message="requires approval")) == [DENIED]
    final = [{"tool_name": "Bash", "tool_use_id": "t1", "tool_input": {"command": "npm test"}}]
    assert watch.result(final) == []
    assert watch.warnings == [DENIED]


def test_warnings_are_said_once_with_the_tasks_they_hit(make_task: Callable[..., Task]) -> None:
    other = "wanted WebFetch(domain:example.com): add it to allowed_tools"
    tasks = [
        make_task("a", attempts=1, state=TaskState.MERGED, warnings=[DENIED, other]),
        make_task("b", attempts=1, state=TaskState.FAILED, warnings=[DENIED]),
        make_task("c", attempts=0, state=TaskState.CANCELLED),
    ]
    assert common_denial(tasks) == f"all 2 tasks hit the same denial: {DENIED}"
    assert warning_lines(tasks) == [f"all 2 tasks hit the same denial: {DENIED}", f"{other} (a)"]
    tasks[1] = make_task("b", attempts=1, state=TaskState.FAILED, warnings=[other])
    assert common_denial(tasks) == f"all 2 tasks hit the same denial: {other}"
    tasks[1] = make_task("b", attempts=1, state=TaskState.FAILED)
    assert common_denial(tasks) is None
    assert warning_lines(tasks) == [f"{DENIED} (a)", f"{other} (a)"]
