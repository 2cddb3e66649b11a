"""A plan's budget across all its agents (real `claude` against the scripted model, whose
token counts Claude Code turns into cost): once reached, no agent starts, running ones stop
(or finish, as configured), the plan ends saying so, and merged work stays merged."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from claudecluster_mcp.budget import Budget
from claudecluster_mcp.claude_cli import ClaudeBinary
from claudecluster_mcp.engine import Cluster, EngineSettings
from claudecluster_mcp.errors import ConfigError
from claudecluster_mcp.model_server import ScriptedModelServer
from claudecluster_mcp.models import PlanState, TaskState
from claudecluster_mcp.scenario import bash_turn, marker_rule, marker_task, write_turn

pytestmark = pytest.mark.anyio

StartServer = Callable[[dict[str, Any]], ScriptedModelServer]
Settings = Callable[..., EngineSettings]
Git = Callable[..., str]


@pytest.mark.claude
@pytest.mark.parametrize("stop", ["now", "finish"])
async def test_a_plan_stops_at_its_budget_and_keeps_what_merged(
    stop: str,
    claude: ClaudeBinary,
    repo: Path,
    model_server: StartServer,
    engine_settings: Settings,
    git: Git,
    tmp_path: Path,
) -> None:
    started = tmp_path / "slow-started"
    slow = f"touch {started} && python3 -c 'import time; time.sleep(6)' && echo slow > slow.txt"
    wait_for_slow = (
        f"python3 -c 'import os, time; [time.sleep(0.1) for _ in range(600) if not os.path.exists(\"{started}\")]'"
    )
    server = model_server(
        {
            "rules": [
                # quick finishes while slow runs: its tokens alone use up the budget.
                marker_rule("quick", bash_turn(wait_for_slow), write_turn("quick.txt", "q\n")),
                marker_rule("slow", bash_turn(slow)),
                marker_rule("later", write_turn("later.txt", "l\n")),
            ]
        }
    )
    settings = engine_settings(server, budget_stop=stop, max_tokens=1)
    tasks = [marker_task("quick"), marker_task("slow"), marker_task("later", "quick"), marker_task("after", "later")]

    async with Cluster.open(repo, workers=2, settings=settings, claude=claude) as cluster:
        plan = (await cluster.plan("spend", tasks)).plan
        assert plan.max_tokens == 1
        await cluster.dispatch(plan.id)
        with anyio.fail_after(90):
            status = await cluster.wait(plan.id)
        tree = git(repo, "ls-tree", "-r", "--name-only", plan.integration_branch).split()

    states = {t.id: t.state for t in status.tasks}
    assert states["quick"] is TaskState.MERGED and "quick.txt" in tree  # merged work is not touched
    assert started.exists()  # slow was running when the budget was reached
    if stop == "now":
        assert states["slow"] is TaskState.CANCELLED
        assert status.task("slow").reason.startswith("stopped: budget reached (max_tokens 1)")
        assert "slow.txt" not in tree
    else:
        assert states["slow"] is TaskState.MERGED and "slow.txt" in tree
    for never in ("later", "after"):
        assert states[never] is TaskState.CANCELLED and status.task(never).attempts == 0
        assert status.task(never).reason.startswith("not started: budget reached")
    assert status.plan.state is PlanState.DONE
    assert status.plan.reason.startswith("budget reached (max_tokens 1): the plan's agents cost $")
    assert f"used {status.task('quick').input_tokens + status.task('quick').output_tokens:,} tokens" in (
        status.plan.reason
    )
    assert [r.rule for r in server.requests if r.rule == "later"] == []


async def test_a_plan_argument_overrides_the_budget_setting(
    repo: Path, engine_settings: Settings, claude: ClaudeBinary
) -> None:
    async with Cluster.open(repo, settings=engine_settings(max_cost_usd=5.0), claude=claude) as cluster:
        default = (await cluster.plan("a", [marker_task("x")])).plan
        given = (await cluster.plan("b", [marker_task("x")], max_cost_usd=0.5, max_tokens=1000)).plan
        with pytest.raises(ConfigError, match="a budget must be positive"):
            await cluster.plan("c", [marker_task("x")], max_tokens=0)
        stored = await cluster.store.plan(given.id)
    assert (default.max_cost_usd, default.max_tokens) == (5.0, None)
    assert (stored.max_cost_usd, stored.max_tokens) == (0.5, 1000)


@pytest.mark.parametrize(
    ("budget", "cost", "tokens", "reached"),
    [
        (Budget(), 100.0, 10**9, None),
        (Budget(max_cost_usd=1.0), 0.99, 10**9, None),
        (Budget(max_cost_usd=1.0), 1.0, 0, "budget reached (max_cost_usd $1): the plan's agents cost $1.0000"),
        (Budget(max_tokens=500), 0.0, 500, "budget reached (max_tokens 500)"),
        (Budget(2.0, 500), 3.0, 600, "budget reached (max_cost_usd $2 and max_tokens 500)"),
    ],
)
def test_the_budget_is_reached_at_either_limit(budget: Budget, cost: float, tokens: int, reached: str | None) -> None:
    said = budget.reached(cost, tokens)
    assert said == reached if reached is None else said is not None and said.startswith(reached)
