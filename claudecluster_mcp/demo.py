"""``claudecluster demo``: a goal's task DAG run by real Claude Code agents in parallel
against the scripted model, merged through the merge queue into one branch.

``examples/demo/repo`` is copied into a fresh git repository; ``examples/demo/tasks.yaml``
is the plan; ``examples/demo/scenario.yaml`` is what the scripted model answers. Two tasks
edit the same file, so the merge queue meets a real conflict and hands it to a resolve task.
Offline, no API key.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import yaml
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .claude_cli import ClaudeBinary, find_claude
from .engine import Cluster
from .errors import ConfigError
from .model_server import ScriptedModelServer, scripted_env
from .models import PlanStatus, TaskState
from .report import diffstats, state_colour
from .report_html import to_html
from .scenario import load_scenario
from .settings import EngineSettings
from .terminal import follow

__all__ = ["find_examples", "run_demo"]

_GIT_IDENTITY = ["-c", "user.name=claudecluster demo", "-c", "user.email=demo@claudecluster.invalid"]


def find_examples() -> Path:
    """The ``examples/demo`` folder of the source checkout."""
    examples = Path(__file__).resolve().parent.parent / "examples" / "demo"
    if not (examples / "scenario.yaml").is_file():
        raise ConfigError(f"demo files not found at {examples}; run the demo from a claudecluster source checkout")
    return examples


def _git(repo: Path, *args: str) -> str:
    done = subprocess.run(["git", "-C", str(repo), *_GIT_IDENTITY, *args], capture_output=True, text=True, check=True)
    return done.stdout


def _prepare_repo(template: Path, target: Path) -> Path:
    shutil.copytree(template, target)
    _git(target, "init", "-q", "-b", "main")
    _git(target, "add", "-A")
    _git(target, "commit", "-q", "-m", "demo: starting point")
    return target


def _table(status: PlanStatus, wall: float) -> Table:
    table = Table(title=f"plan {status.plan.id}: {len(status.tasks)} tasks in {wall:.1f}s wall")
    for column in ("task", "state", "attempts", "turns", "cost", "tokens", "files"):
        numeric = column in ("attempts", "turns", "cost", "tokens")
        table.add_column(column, justify="right" if numeric else "left", overflow="fold")
    for task in status.tasks:
        colour = state_colour(task.state)
        label = task.id + (" (resolve)" if task.kind.value == "resolve" else "")
        table.add_row(
            escape(label),
            f"[{colour}]{task.state}[/]",
            str(task.attempts),
            str(task.turns),
            f"${task.cost_usd:.4f}",
            f"{task.input_tokens + task.output_tokens:,}",
            escape(", ".join(task.changed_files)) or "-",
        )
    return table


async def run_demo(console: Console, *, workdir: Path | None = None, workers: int = 4) -> int:
    """Run the demo; returns the process exit code (0 when every task merged)."""
    examples = find_examples()
    plan_file: dict[str, Any] = yaml.safe_load((examples / "tasks.yaml").read_text())
    claude: ClaudeBinary = await anyio.to_thread.run_sync(find_claude)
    scenario = load_scenario(examples / "scenario.yaml")
    base = workdir or Path(tempfile.mkdtemp(prefix="claudecluster-demo-"))
    repo = _prepare_repo(examples / "repo", base / "repo")
    home = base / "agent-home"
    home.mkdir(exist_ok=True)
    console.print(
        f"[bold]claudecluster demo[/]: {len(plan_file['tasks'])} tasks, real Claude Code {claude.version} "
        f"agents ({workers} at a time) against the scripted model, offline\nrepository: {repo}\n"
    )
    started = time.monotonic()
    async with ScriptedModelServer(scenario) as server:
        settings = EngineSettings(
            workers=workers,
            state_dir=base / "state",
            claude_config_dir=base / "claude-config",
            # An empty HOME: the agents' Bash tool must not source this user's shell rc files.
            agent_env={**scripted_env(server.url), "HOME": str(home)},
            allowed_tools=["Bash"],
            inactivity_timeout=60,
            wall_timeout=120,
        )
        async with Cluster.open(repo, settings=settings, claude=claude) as cluster:
            status = await cluster.plan(plan_file["goal"], plan_file["tasks"])
            plan_id = status.plan.id
            for warning in status.plan.warnings:
                console.print(f"[dim]plan warning: {escape(warning)}[/]")
            await cluster.dispatch(plan_id)
            with anyio.fail_after(240):
                await follow(console, cluster, plan_id, live=True)
            status = await cluster.wait(plan_id)
            merged = all(t.state is TaskState.MERGED for t in status.tasks)
            report = await cluster.merge(plan_id) if merged else None
            status = await cluster.status(plan_id)
    wall = time.monotonic() - started
    report_path = base / "report.html"
    report_path.write_text(to_html(status, await diffstats(repo, status.tasks)))

    console.print()
    console.print(_table(status, wall))
    if report is None:
        console.print("[bold red]not every task merged; nothing was merged into main[/]")
        console.print(f"HTML report: {report_path}")
        return 1
    console.print(f"\nmerged into [bold]{report.target}[/] ({report.kind}); undo with: {report.undo}\n")
    console.print(_git(repo, "log", "--graph", "--oneline", "--decorate=no", "main").rstrip(), markup=False)
    console.print("\n[bold]files on main:[/] " + " ".join(_git(repo, "ls-files").split()))
    for name in ("CHANGELOG.md", "calc/__main__.py"):
        console.rule(name, align="left", style="dim")
        console.print((repo / name).read_text().rstrip(), markup=False, highlight=False)
    check = await anyio.run_process(["python3", "-m", "calc", "2", "+", "3"], cwd=repo, check=False)
    console.print(f"\n$ python3 -m calc 2 + 3\n{(check.stdout or check.stderr).decode().strip()}")
    console.print(
        f"\n[bold green]{len(status.tasks)}/{len(status.tasks)} tasks merged[/] — "
        f"repository {repo}, agent transcripts in {base / 'state' / 'logs'}"
    )
    console.print(f"HTML report: {report_path}")
    return 0
