"""kill -9 at random points: a seeded loop that SIGKILLs ``claudecluster serve`` (a real
subprocess over Streamable HTTP) at chosen moments of a DAG run with merges, a gate and a
resolve task, restarts it each time, and checks afterwards that nothing was lost or done twice.

Each kill is aimed by watching the system from outside: ``agent`` kills while an agent runs
(a task ``running`` with a pid in the store, then a random delay); ``gate`` while the gate
runs (its start marker, then a delay shorter than the gate); ``merge`` just after a gate
passed (its end marker, then 0-150 ms, or the moment the integration ref's file changes: the ref
update, its journal entry, the store's record);
``recovery`` while the restarted server recovers (its first re-queued task in the store, before
it answers /health). After a kill the integration ref is recorded and the server restarted;
once one answers, every process the killed servers had must be gone (its recovery reaped
them), and a client re-dispatches over MCP. At the end the client waits over MCP for the plan
to finish and :mod:`killcheck` judges the run.

    from killloop import KillLoop, LoopConfig
    report = KillLoop(LoopConfig(tasks=12, kills=5, seed=1), workdir, claude_path).run()
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx2
from killcheck import Report, judge
from killdag import PAIR, SHARED, SHARED_TEXT, KillDag, build_dag, write_gate
from killserver import Server, StoreView, alive, become_subreaper, reap_orphans
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from claudecluster_mcp.model_server import ScriptedModelServer, scripted_env
from claudecluster_mcp.scenario import load_scenario

KINDS = ("agent", "gate", "merge", "recovery")


@dataclass(frozen=True)
class LoopConfig:
    """What to run: the DAG's size, how many kills, the seed, the pool."""

    tasks: int = 50
    kills: int = 20
    seed: int = 1
    workers: int = 4
    gate_seconds: tuple[float, float] = (0.3, 0.8)
    gap: tuple[float, float] = (0.5, 3.0)  # run time between a server answering and the next aim
    trigger_timeout: float = 30.0
    finish_timeout: float = 600.0
    kinds: tuple[str, ...] | None = None  # the kills in order (default: a seeded mix)


@dataclass
class Kill:
    """One SIGKILL and what it left."""

    kind: str
    aimed: str  # what the kill actually hit ("gate", "merge: ref moved", "timeout", …)
    at: float
    tip: str
    processes: int  # below the server just before the kill
    alive_at_restart: int  # of those, still alive when the next server started
    open_journal: bool
    left: list[str] = field(default_factory=list)  # names of the processes alive at restart
    recovered: int = 0  # tasks the next answering server's recovery re-queued
    restart_s: float = 0.0  # spawn → /health of the next server


@dataclass
class LoopState:
    """What the loop saw, for the report."""

    plan_id: str = ""
    base: str = ""
    kills: list[Kill] = field(default_factory=list)
    leaked_after_recovery: list[str] = field(default_factory=list)
    mcp_calls: int = 0
    mcp_errors: list[str] = field(default_factory=list)


def schedule(count: int, rng: random.Random) -> list[str]:
    """A seeded mix of kill kinds, each a quarter; a recovery kill follows an agent kill (so
    that its server has runs to reap and tasks to re-queue)."""
    others = [KINDS[i % 3] for i in range(count - count // 4)]
    rng.shuffle(others)
    recoveries = count // 4
    kinds: list[str] = []
    for kind in others:
        kinds.append(kind)
        if kind == "agent" and recoveries:
            kinds.append("recovery")
            recoveries -= 1
    return kinds + ["recovery"] * recoveries


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class KillLoop:
    """One run of the loop in ``workdir`` (a fresh directory) with the ``claude`` at ``claude``."""

    def __init__(self, config: LoopConfig, workdir: Path, claude: Path) -> None:
        self.config = config
        self.rng = random.Random(config.seed)
        self.dag: KillDag = build_dag(config.tasks, config.seed)
        self.workdir = workdir
        self.claude = claude
        self.repo = workdir / "repo"
        self.state = LoopState()
        self.store = StoreView(self.repo / ".git" / "claudecluster" / "state.db")
        self.pending: dict[tuple[int, float], str] = {}  # left by killed servers, not yet checked
        self.tracked: set[tuple[int, float]] = set()  # agent pids the store recorded
        self.server: Server | None = None
        self.gate_runs: Path | None = None
        self.restart_mark = 0  # the store's last event when the current server was started
        self.open_entries: list[int] = []  # journal entries the last kill left open

    # -- the run ---------------------------------------------------------------------------

    def run(self) -> Report:
        """Plan, dispatch, kill and restart, wait for the end; judge it."""
        become_subreaper()
        started = time.monotonic()
        model = ScriptedModelServer(load_scenario(self.dag.scenario)).start()
        try:
            self.server = self._prepare(model.url)
            self.server.start()
            self._await_ready(None)
            self._plan_and_dispatch()
            self._wait_for_pair()
            kinds = list(self.config.kinds or schedule(self.config.kills, self.rng))
            for number, kind in enumerate(kinds):
                if self.store.finished(self.state.plan_id):
                    break
                self._kill_once(kind, next_kind=kinds[number + 1] if number + 1 < len(kinds) else None)
            if not self.server.ready():
                self._await_ready(None)
            final = self._finish()
            self.server.stop()
            time.sleep(0.5)
            reap_orphans(set())
        finally:
            if self.server is not None:
                self.server.stop()
            model.stop()
        return judge(self, final, time.monotonic() - started)

    def _prepare(self, model_url: str) -> Server:
        self.repo.mkdir(parents=True)
        (self.repo / SHARED).write_text(SHARED_TEXT)
        ident = ["-c", "user.name=loop", "-c", "user.email=loop@example.invalid"]
        for args in (["init", "-q", "-b", "main"], ["add", "."], [*ident, "commit", "-qm", "init"]):
            subprocess.run(["git", "-C", str(self.repo), *args], check=True)
        home, tmp, logs = (self.workdir / name for name in ("home", "tmp", "logs"))
        for directory in (home, tmp, logs):
            directory.mkdir()
        gate, self.gate_runs = write_gate(self.workdir, sys.executable, self.config.gate_seconds)
        clean = {k: v for k, v in os.environ.items() if not k.startswith("CLAUDECLUSTER_")}
        env = {
            **clean,
            "HOME": str(home),
            "TMPDIR": str(tmp),
            "XDG_STATE_HOME": str(self.workdir / "state"),
            "CLAUDECLUSTER_CLAUDE_BIN": str(self.claude),
            "CLAUDECLUSTER_ISOLATION": "none",
            "CLAUDECLUSTER_SKIP_MODEL_CHECK": "1",
            "CLAUDECLUSTER_AGENT_ENV": json.dumps({**scripted_env(model_url), "HOME": str(home)}),
            "CLAUDECLUSTER_CLAUDE_CONFIG_DIR": str(self.workdir / "claude-config"),
            "CLAUDECLUSTER_ALLOWED_TOOLS": json.dumps(["Bash"]),
            "CLAUDECLUSTER_GATE": json.dumps(gate),
            "CLAUDECLUSTER_RETRY_BACKOFF": "0.2",
            "CLAUDECLUSTER_RESTART_STAGGER": "0.1",
            "CLAUDECLUSTER_CANCEL_GRACE": "2",
            "CLAUDECLUSTER_INACTIVITY_TIMEOUT": "60",
            "CLAUDECLUSTER_WALL_TIMEOUT": "300",
        }
        return Server(self.workdir, free_port(), env, logs, self.config.workers)

    # -- over MCP --------------------------------------------------------------------------

    def _call(self, tool: str, args: dict[str, Any], timeout: float = 60) -> dict[str, Any]:
        """One MCP tool call over Streamable HTTP with the SDK's client (a fresh session)."""
        assert self.server is not None
        url = self.server.url + "/mcp"

        async def call() -> dict[str, Any]:
            http = httpx2.AsyncClient(timeout=timeout + 30)
            async with http, Client(streamable_http_client(url, http_client=http)) as client:
                result = await client.call_tool(tool, args)
            if result.is_error:
                raise RuntimeError(f"{tool}: {result.content}")
            return dict(result.structured_content or {})

        self.state.mcp_calls += 1
        return anyio.run(call)

    def _plan_and_dispatch(self) -> None:
        planned = self._call("plan", {"repo": str(self.repo), "goal": "kill -9 loop", "tasks": self.dag.tasks})
        self.state.plan_id = planned["plan_id"]
        self.state.base = self._tip()
        self._call("dispatch", {"plan_id": self.state.plan_id})

    def _redispatch(self) -> None:
        """What a client does after the server came back: dispatch again (a no-op for a plan
        the server resumed), then look at the status."""
        try:
            self._call("dispatch", {"plan_id": self.state.plan_id})
            self._call("status", {"plan_id": self.state.plan_id})
        except Exception as exc:  # recorded, judged: a restarted server must answer
            self.state.mcp_errors.append(f"{type(exc).__name__}: {exc}")

    def _finish(self) -> dict[str, Any]:
        """Wait over MCP until every task is final."""
        deadline = time.monotonic() + self.config.finish_timeout
        status: dict[str, Any] = {}
        while time.monotonic() < deadline:
            args = {"plan_id": self.state.plan_id, "wait_seconds": 30, "until_finished": True, "all_tasks": True}
            status = self._call("status", args)
            if status.get("finished"):
                break
        return status

    # -- kills -----------------------------------------------------------------------------

    def _kill_once(self, kind: str, next_kind: str | None) -> None:
        assert self.server is not None
        if kind != "recovery":
            time.sleep(self.rng.uniform(*self.config.gap))
        aimed = self._aim(kind)
        if (code := self.server.exited()) is not None:  # only we may end a server
            raise RuntimeError(f"the server died on its own (exit {code}):\n{self.server.log_tail()}")
        for task in self.store.tasks(self.state.plan_id):
            if task["pid"] and task["pid_started"]:
                self.tracked.add((task["pid"], task["pid_started"]))
        below = self.server.kill()
        killed_at = time.monotonic()
        tip = self._tip()
        self.open_entries = [e["seq"] for e in self.store.journal() if e["state"] == "started"]
        reap_orphans(set())
        self.pending.update(below)
        left = sorted(name for (pid, started), name in below.items() if alive(pid, started))
        kill = Kill(kind, aimed, killed_at, tip, len(below), len(left), bool(self.open_entries), left)
        self.state.kills.append(kill)
        self.restart_mark = self.store.last_event()
        self.server.start()
        if next_kind != "recovery":
            self._await_ready(kill, self.restart_mark)
            self._redispatch()

    def _aim(self, kind: str) -> str:
        """Wait for the moment ``kind`` aims at; returns what was hit."""
        assert self.server is not None and self.gate_runs is not None
        deadline = time.monotonic() + self.config.trigger_timeout
        gates = len(list(self.gate_runs.glob("*.start"))), len(list(self.gate_runs.glob("*.end")))
        while time.monotonic() < deadline:
            if kind == "agent" and self._agent_running():
                time.sleep(self.rng.uniform(0, 1.5))
                return "agent"
            if kind == "gate" and len(list(self.gate_runs.glob("*.start"))) > gates[0]:
                time.sleep(self.rng.uniform(0, self.config.gate_seconds[0]))
                return "gate"
            if kind == "merge" and len(list(self.gate_runs.glob("*.end"))) > gates[1]:
                if self.rng.random() < 0.5 and self._ref_moved(before=self._tip_file()):
                    return "merge: ref moved"
                time.sleep(self.rng.uniform(0, 0.15))
                return "merge"
            if kind == "recovery":
                if self.store.recovered_since(self.restart_mark) or self._settled():
                    return "recovery"
                if self.server.ready():
                    time.sleep(self.rng.uniform(0, 0.3))
                    return "recovery: after it (nothing to recover)"
            if self.store.finished(self.state.plan_id):
                return "finished"
            time.sleep(0.01)
        return "timeout"

    def _agent_running(self) -> bool:
        return any(t["state"] == "running" and t["pid"] for t in self.store.tasks(self.state.plan_id))

    def _tip_file(self) -> str:
        ref = self.repo / ".git" / "refs" / "heads" / "claudecluster" / self.state.plan_id / "integration"
        return ref.read_text() if ref.exists() else ""

    def _ref_moved(self, before: str) -> bool:
        """Watch the integration ref's file closely (for up to 5 s): the kill then lands right
        after the ref update, inside the window its journal entry covers."""
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            if self._tip_file() != before:
                return True
            time.sleep(0.002)
        return False

    def _settled(self) -> bool:
        """Whether a journal entry the last kill left open has been settled since."""
        states = {e["seq"]: e["state"] for e in self.store.journal()}
        return any(states.get(seq) != "started" for seq in self.open_entries)

    def _await_ready(self, kill: Kill | None, mark: int = 0) -> None:
        """Until the server answers; then every process of the killed servers must be gone."""
        assert self.server is not None
        spawned = time.monotonic()
        deadline = spawned + 120
        while not self.server.ready():
            code = self.server.exited()
            if code is not None:
                raise RuntimeError(f"the server exited with {code}:\n{self.server.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not come up:\n{self.server.log_tail()}")
            time.sleep(0.05)
        if kill is not None:
            kill.restart_s = round(time.monotonic() - spawned, 2)
            kill.recovered = self.store.recovered_since(mark)
        reap_orphans({self.server.process.pid} if self.server.process else set())
        for (pid, started), name in self.pending.items():
            if alive(pid, started):
                self.state.leaked_after_recovery.append(f"{name} (pid {pid}) after kill {len(self.state.kills)}")
        self.pending.clear()

    def _tip(self) -> str:
        branch = f"refs/heads/claudecluster/{self.state.plan_id}/integration"
        done = subprocess.run(["git", "-C", str(self.repo), "rev-parse", branch], capture_output=True, text=True)
        return done.stdout.strip()

    def _wait_for_pair(self) -> None:
        """The first kill waits until both of the conflict pair have their line in their
        worktree (each then resumes on its own base), so that the conflict really happens."""
        worktrees = self.workdir / "state" / "claudecluster" / "worktrees" / self.state.plan_id
        deadline = time.monotonic() + self.config.trigger_timeout * 2
        while time.monotonic() < deadline:
            lines = [worktrees / task / SHARED for task in PAIR]
            if all(p.exists() and task in p.read_text().split() for p, task in zip(lines, PAIR, strict=True)):
                return
            time.sleep(0.05)
