"""The race: the same N independent 2-turn tasks, D s of model latency per turn, done
(a) by N bare `claude -p` processes started at once in one directory (no isolation, nothing
to merge), and (b) by claudecluster: a worktree per task, and everything merged into the
target branch. Target: (b) <= 1.1 x (a) in wall time and in peak memory.

    .venv/bin/python bench/bench_race.py [--tasks 10] [--latency 3] [--rounds 2] [--json FILE]

Memory is the peak sum of RSS over every process below this one (claude, its children, git),
sampled every 50 ms; for (b) the engine's own growth in RSS is added.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import anyio
import psutil

ROOT = Path(__file__).resolve().parent.parent
ISOLATION = "none"
sys.path.insert(0, str(ROOT))

from _common import make_repo, write_scenario  # noqa: E402

from claudecluster_mcp.agent_spec import AgentSpec, agent_env, build_argv  # noqa: E402
from claudecluster_mcp.claude_cli import find_claude  # noqa: E402
from claudecluster_mcp.engine import Cluster, EngineSettings  # noqa: E402
from claudecluster_mcp.model_server import ScriptedModelServer, scripted_env  # noqa: E402
from claudecluster_mcp.models import TaskState  # noqa: E402
from claudecluster_mcp.scenario import load_scenario  # noqa: E402


class PeakRss:
    """Samples the summed RSS of this process's descendants in a thread."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for child in me.children(recursive=True):
                try:
                    total += child.memory_info().rss
                except psutil.Error:
                    continue
            self.peak = max(self.peak, total)
            self._stop.wait(0.05)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def bare(n: int, url: str, tmp: Path) -> tuple[float, int]:
    """(a): N `claude -p` at once in one directory."""
    claude = find_claude()
    repo = make_repo(tmp / "bare")
    home = tmp / "home"
    home.mkdir(exist_ok=True)
    procs = []
    with PeakRss() as rss:
        started = time.monotonic()
        for i in range(n):
            spec = AgentSpec(prompt=f"[race{i}] write f{i}.txt", cwd=repo, config_dir=tmp / "claude-config")
            run_tmp = tmp / f"tmp-{i}"
            run_tmp.mkdir()
            env = {**agent_env(spec, tmpdir=run_tmp, run_tag="bare"), **scripted_env(url), "HOME": str(home)}
            argv = build_argv(spec, claude.path, str(uuid.uuid4()))
            procs.append(
                subprocess.Popen(
                    argv,
                    cwd=repo,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        codes = [p.wait(timeout=300) for p in procs]
        wall = time.monotonic() - started
    assert codes == [0] * n and all((repo / f"f{i}.txt").exists() for i in range(n)), codes
    return wall, rss.peak


async def clustered(n: int, url: str, tmp: Path) -> tuple[float, int]:
    """(b): claudecluster, a worktree per task, everything merged into main."""
    repo = make_repo(tmp / "cluster")
    home = tmp / "home"
    home.mkdir(exist_ok=True)
    settings = EngineSettings(
        workers=n,
        state_dir=tmp / "state",
        claude_config_dir=tmp / "claude-config",
        agent_env={**scripted_env(url), "HOME": str(home)},
        # Like for like: the bare runs are unconfined too (the sandbox's own cost is
        # measured side by side in bench_sandbox.py).
        isolation=ISOLATION,
    )
    tasks = [{"id": f"t{i}", "prompt": f"[race{i}] write f{i}.txt"} for i in range(n)]
    engine_rss0 = psutil.Process().memory_info().rss
    engine_peak = engine_rss0
    with PeakRss() as rss:
        started = time.monotonic()
        async with Cluster.open(repo, settings=settings) as cluster:
            plan = (await cluster.plan("race", tasks)).plan
            await cluster.dispatch(plan.id)
            status = await cluster.wait(plan.id, timeout=300)
            await cluster.merge(plan.id)
            engine_peak = max(engine_peak, psutil.Process().memory_info().rss)
        wall = time.monotonic() - started
    assert all(t.state is TaskState.MERGED for t in status.tasks), [(t.id, t.state, t.reason) for t in status.tasks]
    assert all((repo / f"f{i}.txt").exists() for i in range(n))
    return wall, rss.peak + max(0, engine_peak - engine_rss0)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=10)
    parser.add_argument("--latency", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of (a) and (b)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    walls: dict[str, list[float]] = {"bare": [], "cluster": []}
    mems: dict[str, list[int]] = {"bare": [], "cluster": []}
    async with ScriptedModelServer(load_scenario(write_scenario(args.tasks, args.latency, "race"))) as server:
        for _ in range(args.rounds):
            with tempfile.TemporaryDirectory(prefix="cc-race-") as tmp:
                wall, mem = await anyio.to_thread.run_sync(bare, args.tasks, server.url, Path(tmp))
                walls["bare"].append(wall)
                mems["bare"].append(mem)
            with tempfile.TemporaryDirectory(prefix="cc-race-") as tmp:
                wall, mem = await clustered(args.tasks, server.url, Path(tmp))
                walls["cluster"].append(wall)
                mems["cluster"].append(mem)
    result = {
        "tasks": args.tasks,
        "latency_per_turn_s": args.latency,
        "bare_wall_s": round(statistics.median(walls["bare"]), 2),
        "cluster_wall_s": round(statistics.median(walls["cluster"]), 2),
        "wall_ratio": round(statistics.median(walls["cluster"]) / statistics.median(walls["bare"]), 3),
        "bare_peak_mb": round(statistics.median(mems["bare"]) / 2**20),
        "cluster_peak_mb": round(statistics.median(mems["cluster"]) / 2**20),
        "memory_ratio": round(statistics.median(mems["cluster"]) / statistics.median(mems["bare"]), 3),
        "walls": walls,
        "cores": os.cpu_count(),
    }
    print(json.dumps(result, indent=2))
    print(f"\nwall (b)/(a) = {result['wall_ratio']}  memory (b)/(a) = {result['memory_ratio']}  (target <= 1.1 each)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    anyio.run(main)
