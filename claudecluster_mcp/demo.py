"""``claudecluster demo``: real Claude Code agents in parallel against the scripted model.

Each task of ``examples/demo/tasks.yaml`` gets its own copy of ``examples/demo/repo`` as a
fresh git repository and its own real ``claude`` process; the model behind them is the
scripted model server playing ``examples/demo/scenario.yaml``. Offline, no API key.
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
from rich.table import Table

from .agent import AgentOutcome, AgentRun, AgentSpec, ClaudeBinary, find_claude
from .errors import ConfigError
from .events import AgentEvent, ToolUse
from .model_server import ScriptedModelServer, scripted_env
from .scenario import load_scenario

__all__ = ["find_examples", "run_demo"]

_GIT_IDENTITY = [
    "-c",
    "user.name=claudecluster demo",
    "-c",
    "user.email=demo@claudecluster.invalid",
]


def find_examples() -> Path:
    """The ``examples/demo`` folder of the source checkout."""
    examples = Path(__file__).resolve().parent.parent / "examples" / "demo"
    if not (examples / "scenario.yaml").is_file():
        raise ConfigError(f"demo files not found at {examples}; run the demo from a claudecluster source checkout")
    return examples


def _git(repo: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(repo), *_GIT_IDENTITY, *args],
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout


def _prepare_repo(template: Path, target: Path) -> Path:
    shutil.copytree(template, target)
    _git(target, "init", "-q", "-b", "main")
    _git(target, "add", "-A")
    _git(target, "commit", "-q", "-m", "demo: starting point")
    return target


def _describe(event: ToolUse) -> str:
    target = event.input.get("file_path") or event.input.get("command") or ""
    return f"{event.name} {Path(target).name if 'file_path' in event.input else target}".strip()


async def run_demo(console: Console, *, workdir: Path | None = None) -> int:
    """Run the demo; returns the process exit code (0 when every agent succeeded)."""
    examples = find_examples()
    tasks: list[dict[str, Any]] = yaml.safe_load((examples / "tasks.yaml").read_text())["tasks"]
    claude: ClaudeBinary = await anyio.to_thread.run_sync(find_claude)
    scenario = load_scenario(examples / "scenario.yaml")
    base = workdir or Path(tempfile.mkdtemp(prefix="claudecluster-demo-"))
    console.print(
        f"[bold]claudecluster demo[/]: {len(tasks)} real Claude Code {claude.version} agents in "
        f"parallel against the scripted model (offline)\nworking in {base}\n"
    )
    outcomes: dict[str, AgentOutcome] = {}
    repos: dict[str, Path] = {}
    started = time.monotonic()
    async with ScriptedModelServer(scenario) as server:

        async def one(task: dict[str, Any]) -> None:
            task_id = task["id"]
            repo = repos[task_id] = _prepare_repo(examples / "repo", base / task_id)

            def show(event: AgentEvent) -> None:
                if isinstance(event, ToolUse):
                    console.print(f"  [cyan]{task_id:>6}[/] {_describe(event)}")

            spec = AgentSpec(
                prompt=task["prompt"],
                cwd=repo,
                env=scripted_env(server.url),
                allowed_tools=["Bash"],
                config_dir=base / ".claude-config" / task_id,
                log_path=base / "logs" / f"{task_id}.log",
                wall_timeout=120,
                inactivity_timeout=60,
            )
            outcomes[task_id] = await AgentRun(spec, claude=claude, on_event=show).run()

        async with anyio.create_task_group() as tg:
            for task in tasks:
                tg.start_soon(one, task)
    wall = time.monotonic() - started

    table = Table(title=f"{len(tasks)} agents in {wall:.1f}s wall")
    for column in ("task", "outcome", "turns", "cost", "tokens", "duration", "files written"):
        table.add_column(column, justify="right" if column in ("turns", "cost", "tokens", "duration") else "left")
    for task in tasks:
        outcome = outcomes[task["id"]]
        changed = _git(repos[task["id"]], "status", "--porcelain", "--untracked-files=all").split("\n")
        files = ", ".join(line[3:] for line in changed if line)
        colour = "green" if outcome.ok else "red"
        table.add_row(
            task["id"],
            f"[{colour}]{outcome.status}[/]" + (f" ({outcome.reason})" if outcome.reason else ""),
            str(outcome.num_turns),
            f"${outcome.cost_usd:.4f}",
            f"{outcome.usage.total_tokens:,}",
            f"{outcome.duration_s:.1f}s",
            files or "-",
        )
    console.print()
    console.print(table)
    for task in tasks:
        repo = repos[task["id"]]
        diff = _git(repo, "diff", "--stat")
        untracked = _git(repo, "ls-files", "--others", "--exclude-standard").split()
        console.print(f"\n[bold]{task['id']}[/] ({repo})")
        if diff.strip():
            console.print(diff.rstrip())
        for name in untracked:
            console.rule(name, align="left", style="dim")
            text = (repo / name).read_text(errors="replace").rstrip()
            console.print(text or "(empty)", markup=False, highlight=False)
    ok = all(o.ok for o in outcomes.values())
    console.print(
        f"\n[bold {'green' if ok else 'red'}]"
        f"{sum(o.ok for o in outcomes.values())}/{len(outcomes)} agents succeeded[/]"
        f" — transcripts in {base / 'logs'}"
    )
    return 0 if ok else 1
