"""Placement ``ray``: a real two-node Ray cluster on this machine (``ray start`` on 127.0.0.2,
the head, and 127.0.0.3; Ray rewrites 127.0.0.1 to the host's address), token
authentication on, real ``claude`` agents against the scripted model on its nodes, the
engine and its git refs here."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import psutil
import pytest
import yaml
from mcp import Client, StdioServerParameters

from claudecluster_mcp.claude_cli import ClaudeBinary
from claudecluster_mcp.engine import Cluster, EngineSettings
from claudecluster_mcp.errors import ConfigError
from claudecluster_mcp.model_server import ScriptedModelServer, scripted_env
from claudecluster_mcp.models import TaskState
from claudecluster_mcp.proctree import RUN_TAG_VAR
from claudecluster_mcp.ray_cluster import check_address, connect, disconnect
from claudecluster_mcp.ray_placement import RayPlacement
from claudecluster_mcp.scenario import bash_turn, marker_rule, marker_task, write_turn

if not shutil.which("ray", path=str(Path(sys.executable).parent)):
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        raise RuntimeError("CI=true but Ray is not installed: `make setup` installs the `ray` extra")
    pytest.skip("Ray is not installed (pip install -e '.[ray]')", allow_module_level=True)

pytestmark = [pytest.mark.ray]

StartServer = Callable[[dict[str, Any]], ScriptedModelServer]
Settings = Callable[..., EngineSettings]
Git = Callable[..., str]
HEAD, WORKER = "127.0.0.2", "127.0.0.3"
SLOTS = 2  # per node


# -- the cluster ---------------------------------------------------------------------------------


@dataclass
class Node:
    """One ``ray start --block`` process (and the node processes it started)."""

    ip: str
    process: subprocess.Popen[bytes]

    def raylet(self) -> psutil.Process:
        return next(p for p in psutil.Process(self.process.pid).children() if p.name() == "raylet")

    def stop(self) -> None:
        with contextlib.suppress(psutil.Error):
            family = [psutil.Process(self.process.pid), *psutil.Process(self.process.pid).children(recursive=True)]
            self.process.terminate()  # `ray start --block` stops the node's processes
            _, alive = psutil.wait_procs(family, timeout=15)
            for proc in alive:
                with contextlib.suppress(psutil.Error):
                    proc.kill()
        self.process.wait()


@dataclass
class RayCluster:
    address: str
    head: Node
    worker: Node
    env: dict[str, str]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


def _start_node(ip: str, args: list[str], env: dict[str, str], log: Path) -> Node:
    ray = str(Path(sys.executable).parent / "ray")
    with log.open("wb") as out:
        process = subprocess.Popen(
            [ray, "start", "--block", f"--node-ip-address={ip}", "--num-cpus=2", "--disable-usage-stats", *args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    deadline = time.monotonic() + 90
    while b"Ray runtime started" not in log.read_bytes():
        assert process.poll() is None, log.read_text()
        assert time.monotonic() < deadline, f"ray start on {ip} took too long:\n{log.read_text()}"
        time.sleep(0.1)
    return Node(ip, process)


@pytest.fixture(scope="module")
def ray_cluster(claude: ClaudeBinary) -> Iterator[RayCluster]:
    """Two nodes of SLOTS claude slots each, token authentication on; this process connected."""
    tmp = Path(tempfile.mkdtemp(prefix="ccrt"))  # short: Ray puts unix sockets below it
    token = tmp / "token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    env = {**os.environ, **auth, "CLAUDECLUSTER_CLAUDE_BIN": str(claude.path)}
    slots = json.dumps({"claude_slot": SLOTS})
    port = _free_port()
    common = [f"--temp-dir={tmp}", f"--resources={slots}"]
    saved = {key: os.environ.get(key) for key in auth}
    head = _start_node(HEAD, ["--head", f"--port={port}", "--include-dashboard=false", *common], env, tmp / "head.log")
    worker = None
    try:
        worker = _start_node(WORKER, [f"--address={HEAD}:{port}", *common], env, tmp / "worker.log")
        os.environ.update(auth)
        connect(f"{HEAD}:{port}")
        yield RayCluster(f"{HEAD}:{port}", head, worker, env)
    finally:
        disconnect()
        for node in (worker, head):
            if node is not None:
                node.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(tmp, ignore_errors=True)


def tagged(prefixes: list[str]) -> list[str]:
    """The command lines of the living processes of the given runs (found by their
    environment tag), on any node."""
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            tag = proc.environ().get(RUN_TAG_VAR, "")
            if tag and any(tag.startswith(prefix) for prefix in prefixes) and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(f"{proc.pid} {' '.join(proc.cmdline())}")
    return found


def busy(intervals: list[tuple[float, float]]) -> int:
    """The most intervals that overlap at one moment."""
    edges = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    most = now = 0
    for _, step in edges:
        now += step
        most = max(most, now)
    return most


# -- the address check (no cluster needed) -------------------------------------------------------


@pytest.mark.parametrize("address", ["127.0.0.2:6379", "10.1.2.3:6379", "192.168.0.7:1", "[fd00::1]:6379"])
def test_private_and_loopback_addresses_are_accepted(address: str) -> None:
    assert check_address(address)[1] in (6379, 1)


@pytest.mark.parametrize("address", ["8.8.8.8:6379", "[2001:4860:4860::8888]:6379"])
def test_a_public_address_needs_the_explicit_flag(address: str) -> None:
    with pytest.raises(ConfigError, match="--ray-allow-public"):
        check_address(address)
    assert check_address(address, allow_public=True)[1] == 6379


@pytest.mark.parametrize("address", ["ray://10.0.0.1:10001", "10.0.0.1", "10.0.0.1:http", ":6379"])
def test_malformed_addresses_are_refused(address: str) -> None:
    with pytest.raises(ConfigError, match="ray_address"):
        check_address(address)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--placement", "ray"], "placement ray needs ray_address"),
        (["--placement", "ray", "--ray-address", "8.8.8.8:6379"], "pass --ray-allow-public"),
    ],
)
def test_run_refuses_a_missing_or_public_ray_address_before_any_agent_starts(
    tmp_path: Path,
    repo: Path,
    user_env: dict[str, str],
    cli: Callable[..., subprocess.CompletedProcess[str]],
    flags: list[str],
    message: str,
) -> None:
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text(yaml.safe_dump({"tasks": [marker_task("a")]}))

    done = cli("run", "goal", "--tasks", str(tasks), *flags, cwd=repo, env=user_env)

    assert done.returncode == 2 and message in done.stderr, done.stderr


def test_importing_the_package_does_not_import_ray() -> None:
    # Not even the Ray placement's own modules: Ray is imported when a cluster is used.
    modules = ["placement", "commands", "hub", "server", "cli", "ray_placement", "ray_run", "ray_slots", "ray_actor"]
    code = f"import sys, claudecluster_mcp; import {', '.join(f'claudecluster_mcp.{m}' for m in modules)}; "
    code += "print('ray' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_the_sweep_removes_the_dirs_of_dead_zombie_and_recycled_slot_processes_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from claudecluster_mcp import ray_actor

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    zombie = subprocess.Popen(["true"])  # never waited for: a zombie, as a worker whose raylet died
    while psutil.Process(zombie.pid).status() != psutil.STATUS_ZOMBIE:
        time.sleep(0.01)
    recycled = subprocess.Popen(["sleep", "30"])  # started after its directory was last changed
    dead = subprocess.Popen(["true"])
    dead.wait()
    dirs = {
        "alive": tmp_path / f"ccray-{os.getpid()}-abc",
        "alive run": tmp_path / f"ccrun-0123456789ab-{os.getpid()}",
        "zombie": tmp_path / f"ccray-{zombie.pid}-abc",
        "dead": tmp_path / f"ccrun-0123456789ab-{dead.pid}",
        "recycled": tmp_path / f"ccray-{recycled.pid}-abc",
        "not ours": tmp_path / f"ccray-{dead.pid}-ABC",
    }
    for path in dirs.values():
        path.mkdir()
    os.utime(dirs["recycled"], (time.time() - 3600, time.time() - 3600))
    try:
        ray_actor._sweep_stale_dirs()
    finally:
        recycled.kill()
        recycled.wait()
        zombie.wait()

    assert sorted(name for name, path in dirs.items() if path.exists()) == ["alive", "alive run", "not ours"]


# -- agents on the cluster -----------------------------------------------------------------------


@pytest.mark.claude
@pytest.mark.anyio
async def test_a_dag_runs_on_both_nodes_within_their_slots_and_merges(
    claude: ClaudeBinary,
    repo: Path,
    model_server: StartServer,
    engine_settings: Settings,
    ray_cluster: RayCluster,
    git: Git,
) -> None:
    server = model_server(
        {
            "default_latency": 0.3,
            "rules": [
                # The resolve prompt quotes the original task's prompt, so its rule comes first.
                {
                    "name": "resolve",
                    "match": "[claudecluster:resolve]",
                    "turns": [write_turn("shared.txt", "left\nright\n"), {"text": "resolved"}],
                },
                *(marker_rule(n, write_turn(f"{n}.txt", f"from {n}\n")) for n in ("A", "B")),
                marker_rule("D", bash_turn("cat A.txt B.txt >D.txt; cat .env deps.txt >seen.txt; echo x >notes.txt")),
                marker_rule("left", write_turn("shared.txt", "left\n")),
                marker_rule("right", write_turn("shared.txt", "right\n")),
            ],
        }
    )
    tasks = [
        *(marker_task(n) for n in ("A", "B")),
        marker_task("D", "A", "B"),
        marker_task("left", files=["shared.txt"]),
        marker_task("right", files=["shared.txt"]),
    ]
    # A file copied into each worktree and one the setup makes: both ignored by git, both on the node.
    (repo / ".gitignore").write_text(".env\ndeps.txt\n")
    git(repo, "add", ".gitignore")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "ignore")
    (repo / ".env").write_text("SECRET=local\n")
    settings = engine_settings(
        server, placement="ray", ray_address=ray_cluster.address, workers=6,
        copy_files=[".env"], setup=["sh", "-c", "echo deps > deps.txt"],
    )  # fmt: skip

    async with (
        RayPlacement.open(settings, claude) as placement,
        Cluster.open(repo, settings=settings, placement=placement) as cluster,
    ):
        plan = (await cluster.plan("a DAG on two machines", tasks)).plan
        await cluster.dispatch(plan.id)
        with anyio.fail_after(100):
            status = await cluster.wait(plan.id)
        await cluster.merge(plan.id)

    assert {t.state for t in status.tasks} == {TaskState.MERGED}, [(t.id, t.state, t.reason) for t in status.tasks]
    assert len(status.tasks) == 6  # and a resolve task, which ran on a node too
    # D ran on a node with A's and B's work (bundled from the integration branch); what it
    # left uncommitted there was committed here, as for a local agent.
    assert (repo / "D.txt").read_text() == "from A\nfrom B\n"
    assert (repo / "notes.txt").read_text() == "x\n"
    assert (repo / "seen.txt").read_text() == "SECRET=local\ndeps\n"  # copied, and set up, on the node
    assert (repo / "shared.txt").read_text() == "left\nright\n"
    assert status.task("D").changed_files == ["D.txt", "notes.txt", "seen.txt"]
    assert git(repo, "status", "--porcelain") == ""
    # The transcript of each run came back into the engine's log.
    assert "D done" in (settings.state_dir / "logs" / plan.id / "D.1.log").read_text()
    runs = placement.placed
    assert len(runs) == 6 and all(run.status == "succeeded" for run in runs)
    # A slot's second run got only what was new since its first (D after A and B, and the resolve).
    assert any(run.incremental for run in runs)
    assert {run.node.address for run in runs} == {HEAD, WORKER}
    for node in (HEAD, WORKER):
        assert busy([(r.accepted, r.finished) for r in runs if r.node.address == node]) <= SLOTS
    assert tagged([run.run_id for run in runs]) == []


async def _until(check: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``check`` (process tables have no change notification) until true."""
    with anyio.fail_after(timeout):
        while not check():  # noqa: ASYNC110
            await anyio.sleep(0.2)


def _leftover_dirs(run_ids: list[str]) -> list[Path]:
    tmp = Path(tempfile.gettempdir())
    return [path for run_id in run_ids for path in tmp.glob(f"ccrun-{run_id}*")]


@pytest.mark.claude
@pytest.mark.anyio
async def test_cancel_stops_the_agents_on_both_nodes_and_leaves_no_process(
    claude: ClaudeBinary, repo: Path, model_server: StartServer, engine_settings: Settings, ray_cluster: RayCluster
) -> None:
    sleeper = "python3 -c 'import time; time.sleep(300)'"  # (the CLI refuses a bare long `sleep`)
    server = model_server({"rules": [marker_rule(n, bash_turn(sleeper)) for n in "wxyz"]})
    settings = engine_settings(server, placement="ray", ray_address=ray_cluster.address, workers=4)

    async with (
        RayPlacement.open(settings, claude) as placement,
        Cluster.open(repo, settings=settings, placement=placement) as cluster,
    ):
        plan = (await cluster.plan("four sleepers", [marker_task(n) for n in "wxyz"])).plan
        await cluster.dispatch(plan.id)

        def sleeping() -> list[str]:  # the runs whose Bash tool is running
            return [r.run_id for r in placement.placed if any("time.sleep(300)" in p for p in tagged([r.run_id]))]

        await _until(lambda: len(sleeping()) == 4, 90, "four agents running their Bash tool")
        runs = [run.run_id for run in placement.placed]
        assert {run.node.address for run in placement.placed} == {HEAD, WORKER}
        assert len(_leftover_dirs(runs)) == 4  # each run's TMPDIR, on its node
        status = await cluster.cancel(plan.id)
        with anyio.fail_after(60):
            status = await cluster.wait(plan.id)

    assert {t.state for t in status.tasks} == {TaskState.CANCELLED}, [(t.id, t.state, t.reason) for t in status.tasks]
    assert [run.status for run in placement.placed] == ["cancelled"] * 4
    assert tagged(runs) == []
    assert _leftover_dirs(runs) == []


@pytest.mark.claude
@pytest.mark.sandbox
@pytest.mark.anyio
async def test_an_agent_on_a_node_is_sandboxed_as_a_local_one(
    claude: ClaudeBinary,
    repo: Path,
    model_server: StartServer,
    engine_settings: Settings,
    ray_cluster: RayCluster,
    git: Git,
) -> None:
    def attempt(target: str) -> str:  # the refusal lands in the agent's own file
        return f"{{ echo pwned > {target}; }} 2>> attempts.log"

    # Its worktree's repository lies beside it on the node (as .git does locally): not writable.
    attack = "; ".join([attempt(f"{repo}/evil.txt"), attempt("../wt.git/hooks/post-checkout"), "echo mine > mine.txt"])
    server = model_server({"rules": [marker_rule("boxed", bash_turn(attack))]})
    settings = engine_settings(server, placement="ray", ray_address=ray_cluster.address, isolation="sandbox")

    async with (
        RayPlacement.open(settings, claude) as placement,
        Cluster.open(repo, settings=settings, placement=placement) as cluster,
    ):
        plan = (await cluster.plan("boxed", [marker_task("boxed")])).plan
        await cluster.dispatch(plan.id)
        with anyio.fail_after(90):
            status = await cluster.wait(plan.id)

    assert status.task("boxed").state is TaskState.MERGED, status.task("boxed").reason
    integration = status.plan.integration_branch
    assert git(repo, "show", f"{integration}:mine.txt") == "mine\n"
    assert git(repo, "show", f"{integration}:attempts.log").count("Read-only file system") == 2
    assert not (repo / "evil.txt").exists()


def _state_db(repo: Path) -> Path:
    return repo / ".git" / "claudecluster" / "state.db"


def _running_task(repo: Path) -> tuple[str, str] | None:
    """(plan id, run id) of the task running in ``repo``'s store, if any."""
    with contextlib.suppress(sqlite3.Error), contextlib.closing(sqlite3.connect(_state_db(repo))) as con:
        row = con.execute("SELECT plan_id, run_id FROM tasks WHERE state = 'running'").fetchone()
        return (str(row[0]), str(row[1])) if row else None
    return None


@pytest.mark.claude
@pytest.mark.anyio
async def test_an_engine_killed_mid_run_is_followed_by_a_server_that_reattaches_to_the_run(
    tmp_path: Path,
    repo: Path,
    home: Path,
    user_env: dict[str, str],
    model_server: StartServer,
    ray_cluster: RayCluster,
    git: Git,
) -> None:
    sleeper = "python3 -c 'import time; time.sleep(3)'"
    model = model_server({"rules": [marker_rule("slow", bash_turn(sleeper), write_turn("slow.txt", "slow\n"))]})
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text(yaml.safe_dump({"tasks": [marker_task("slow")]}))
    env = {
        **user_env,
        **{k: ray_cluster.env[k] for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")},
        # Agents on the nodes get the model and their HOME from the engine's settings.
        "CLAUDECLUSTER_AGENT_ENV": json.dumps({**scripted_env(model.url), "HOME": str(home)}),
        "CLAUDECLUSTER_ALLOWED_TOOLS": '["Bash"]',
    }
    cli = [sys.executable, "-m", "claudecluster_mcp.cli"]
    on_ray = ["--placement", "ray", "--ray-address", ray_cluster.address]

    # `claudecluster run` starts the task on a node, and dies (SIGKILL) while its agent works.
    engine = await anyio.open_process(
        [*cli, "run", "slow work", "--tasks", str(tasks), *on_ray],
        cwd=repo, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        with anyio.fail_after(90):
            while not ((found := _running_task(repo)) and any("time.sleep(3)" in p for p in tagged([found[1]]))):
                assert engine.returncode is None, "the engine ended before its agent got to its Bash tool"
                await anyio.sleep(0.2)
    finally:
        engine.kill()
        await engine.wait()
    plan_id, run_id = found
    assert tagged([run_id]), "the run goes on while no engine listens"

    # A server on the same repository (stdio: Ray must not write to its stdout) reopens the
    # running plan, and its recovery finds the run.
    server = StdioServerParameters(command=cli[0], args=[*cli[1:], "serve", "--root", str(tmp_path), *on_ray], env=env)
    async with Client(server) as client:
        done = await client.call_tool("status", {"plan_id": plan_id, "wait_seconds": 90, "until_finished": True})

    assert [t["state"] for t in done.structured_content["tasks"]] == ["merged"], done.structured_content
    # It followed the run the crashed engine started: the model saw one conversation, not
    # two, and the task's work was merged once.
    assert sum(r.turn == 0 for r in model.requests) == 1
    assert git(repo, "show", f"claudecluster/{plan_id}/integration:slow.txt") == "slow\n"
    assert tagged([run_id]) == []
    assert _leftover_dirs([run_id]) == []


# Last: it takes the second node down.
@pytest.mark.claude
@pytest.mark.anyio
async def test_a_task_whose_node_dies_mid_run_completes_on_the_other_node_and_merges_once(
    claude: ClaudeBinary,
    repo: Path,
    model_server: StartServer,
    engine_settings: Settings,
    ray_cluster: RayCluster,
    git: Git,
) -> None:
    import ray

    sleeper = "python3 -c 'import time; time.sleep(4)'"
    server = model_server({"rules": [marker_rule("lost", bash_turn(sleeper), write_turn("lost.txt", "once\n"))]})
    settings = engine_settings(server, placement="ray", ray_address=ray_cluster.address, workers=1)

    class Holder:  # defined here: Ray pickles it by value, the nodes cannot import this test module
        async def ping(self) -> bool:
            return True

    # The head's slots are taken, so the run starts on the other node.
    holder = ray.remote(num_cpus=0, resources={"claude_slot": 1, f"node:{HEAD}": 0.01})(Holder)
    holders = [holder.remote() for _ in range(SLOTS)]
    for held in holders:
        await held.ping.remote()

    async with (
        RayPlacement.open(settings, claude) as placement,
        Cluster.open(repo, settings=settings, placement=placement) as cluster,
    ):
        plan = (await cluster.plan("survive a node", [marker_task("lost")])).plan
        await cluster.dispatch(plan.id)
        await _until(
            lambda: any("time.sleep(4)" in p for p in tagged([r.run_id for r in placement.placed])), 90, "agent"
        )
        for held in holders:
            ray.kill(held)
        ray_cluster.worker.raylet().kill()  # the node dies (its `ray start` ends the rest)
        with anyio.fail_after(90):
            status = await cluster.wait(plan.id)
        await cluster.merge(plan.id)

    task = status.task("lost")
    assert task.state is TaskState.MERGED, (task.state, task.reason)
    assert task.attempts == 1  # losing a node is not the task's fault
    assert [(r.node.address, r.status) for r in placement.placed] == [(WORKER, ""), (HEAD, "succeeded")]
    assert (repo / "lost.txt").read_text() == "once\n"
    assert git(repo, "log", "--format=%s", "--", "lost.txt").strip().count("\n") == 0  # merged once
    assert tagged([placement.placed[0].run_id]) == []
    # What the lost node's slot could not remove, the next slot on the machine did.
    assert _leftover_dirs([placement.placed[0].run_id]) == []
