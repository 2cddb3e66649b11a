"""The batching, bisecting merge queue: with a gate, the candidates waiting in the queue are
merged together and gated once; a failing batch is bisected until the bad candidates are
found, which go back to their agents with the gate's output, while the others land. Real
`claude` agents against the scripted model, real git, a real store, a real gate command.

The gate (:data:`GATE`) holds its first run until the test releases it, so that the other
candidates pile up in the queue meanwhile: what the queue then does with them is the same
whatever the machine's speed. Tasks that must not be the first candidate wait (in their
agent's Bash call) until that first gate run has begun."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st

from claudecluster_mcp.batch import Bisection, Link, suspects
from claudecluster_mcp.claude_cli import ClaudeBinary
from claudecluster_mcp.engine import Cluster
from claudecluster_mcp.model_server import ScriptedModelServer
from claudecluster_mcp.models import PlanStatus, TaskState
from claudecluster_mcp.report import to_markdown
from claudecluster_mcp.scenario import bash_turn, marker_rule, marker_task, write_turn
from claudecluster_mcp.settings import EngineSettings

StartServer = Callable[[dict[str, Any]], ScriptedModelServer]
Settings = Callable[..., EngineSettings]
Git = Callable[..., str]
Cli = Callable[..., subprocess.CompletedProcess[str]]

# Runs in the candidate's worktree; its state lives in the directory given as argument: a
# line per run in "runs" (the .txt files it saw), the first run holds until "release"
# exists, the run numbered in "hang-at" never ends (its pid in "hanging.pid"). A file saying
# "bad" fails the check, and the output names it unless "anonymous" exists.
GATE = """
import os, pathlib, sys, time
state = pathlib.Path(sys.argv[1])
runs = state / "runs"
number = len(runs.read_text().splitlines()) + 1 if runs.exists() else 1
seen = sorted(p.name for p in pathlib.Path(".").glob("*.txt"))
with runs.open("a") as log:
    log.write(" ".join(seen) + "\\n")
with (state / "task-ids").open("a") as log:
    log.write(os.environ["CLAUDECLUSTER_TASK_IDS"] + " / " + os.environ["CLAUDECLUSTER_TASK_ID"] + "\\n")
if number == 1:
    (state / "go").touch()
    while not (state / "release").exists():
        time.sleep(0.05)
hang = state / "hang-at"
if hang.exists() and int(hang.read_text()) == number:
    (state / "hanging.pid").write_text(str(os.getpid()))
    time.sleep(3600)
time.sleep(0.2)
bad = [name for name in seen if "bad" in pathlib.Path(name).read_text()]
if bad:
    named = not (state / "anonymous").exists()
    print("2 tests failed" + (": bad content in " + ", ".join(bad) if named else ""))
    sys.exit(1)
print("all tests passed")
"""


@pytest.fixture
def gate_dir(tmp_path: Path) -> Path:
    path = tmp_path / "gate"
    path.mkdir()
    (path / "gate.py").write_text(GATE)
    return path


def gate_runs(gate_dir: Path) -> list[list[str]]:
    """What each gate run saw, in order."""
    runs = gate_dir / "runs"
    return [line.split() for line in runs.read_text().splitlines()] if runs.exists() else []


def good(task_id: str) -> dict[str, Any]:
    """A task that writes ``<id>.txt`` at once: it may be the first candidate."""
    return marker_rule(task_id, write_turn(f"{task_id}.txt", f"good {task_id}\n"))


def late(task_id: str, gate_dir: Path, content: str | None = None, name: str | None = None) -> dict[str, Any]:
    """A task that writes ``name`` (default ``<id>.txt``) only once the first gate run has begun."""
    go = gate_dir / "go"
    text = content or f"good {task_id}"
    command = f"while [ ! -e {go} ]; do sleep 0.1; done; echo '{text}' > {name or task_id + '.txt'}"
    return marker_rule(task_id, bash_turn(command))


async def release_when_all_succeeded(cluster: Cluster, plan_id: str, gate_dir: Path, count: int) -> None:
    """Let the first gate run end once ``count`` candidates wait in the queue."""
    with anyio.fail_after(120):
        while (await cluster.status(plan_id)).counts.get("succeeded", 0) < count:
            await cluster.changed(0.1)
    (gate_dir / "release").touch()


def landed_in_order(status: PlanStatus, git: Git, repo: Path, events: list[dict[str, Any]]) -> None:
    """Each merged task's merge commit holds those of the tasks that succeeded before it."""
    succeeded = [e["task_id"] for e in events if e["kind"] == "state" and e["data"]["state"] == "succeeded"]
    order = [t for t in dict.fromkeys(succeeded) if status.task(t).state is TaskState.MERGED]
    commits = [status.task(t).merge_commit for t in order]
    for earlier, later in itertools.pairwise(commits):
        assert earlier and later and is_ancestor(repo, earlier, later)


def is_ancestor(repo: Path, commit: str, of: str) -> bool:
    done = subprocess.run(["git", "-C", str(repo), "merge-base", "--is-ancestor", commit, of], check=False)
    return done.returncode == 0


async def wait_for(condition: Callable[[], bool], seconds: float = 120) -> None:
    with anyio.fail_after(seconds):
        while not condition():  # noqa: ASYNC110 (polls files and another process)
            await anyio.sleep(0.1)


def merged_once(status: PlanStatus, git: Git, repo: Path, events: list[dict[str, Any]]) -> None:
    """One 'merged' move, and one agent commit on the integration branch, per merged task."""
    merged = [e["task_id"] for e in events if e["kind"] == "state" and e["data"]["state"] == "merged"]
    assert sorted(merged) == sorted(t.id for t in status.tasks if t.state is TaskState.MERGED)
    log = git(repo, "log", "--format=%B%x00", status.plan.integration_branch)
    for task in status.tasks:
        if task.state is TaskState.MERGED:
            assert log.count(f"claudecluster plan {status.plan.id}, task {task.id}\n") == 1, (task.id, log)


# -- the bisection itself ------------------------------------------------------------------------


def bisect(bad: set[int], size: int) -> tuple[int, int]:
    """(culprit, gate runs) of a failed batch of ``size`` whose candidates in ``bad`` break
    the gate (a prefix fails when it holds one)."""
    bisection, runs = Bisection(passed=0, failed=size), 0
    while (prefix := bisection.next()) is not None:
        runs += 1
        bisection.record(prefix, not any(i < prefix for i in bad))
    return bisection.culprit, runs


@given(
    st.integers(min_value=1, max_value=64).flatmap(
        lambda n: st.tuples(st.just(n), st.sets(st.integers(0, n - 1), min_size=1))
    )
)
def test_bisection_names_the_first_bad_candidate_in_log2_gate_runs(case: tuple[int, set[int]]) -> None:
    size, bad = case
    culprit, runs = bisect(bad, size)
    assert culprit == min(bad)
    assert runs <= (size - 1).bit_length()


def test_bisection_trusts_only_what_it_saw_fail() -> None:
    # A gate that fails the prefix of 2 but passes that of 3 (a later candidate "fixes" it):
    # the culprit is still one whose own prefix failed, on top of prefixes that passed.
    bisection = Bisection(passed=0, failed=4)
    assert bisection.next() == 2
    bisection.record(2, ok=False)
    assert bisection.next() == 1
    bisection.record(1, ok=True)
    assert bisection.next() is None and bisection.culprit == 1


def test_the_suspects_are_the_candidates_that_changed_a_file_the_output_names(make_task: Callable[..., Any]) -> None:
    links = [
        Link(make_task("api", changed_files=["src/api.py", "README.md"]), "1" * 40),
        Link(make_task("data", changed_files=["data.py"]), "2" * 40),
        Link(make_task("docs", changed_files=["docs/a.py"]), "3" * 40),
    ]
    output = "FAILED tests/test_api.py::test_get - in src/api.py:12: KeyError\n1 failed"
    assert suspects(links, output) == [0]
    assert suspects(links, "ImportError in mydata.py and docs/a.pyc") == []
    assert suspects(links, "E   File 'data.py', line 3") == [1]
    assert suspects(links, "2 tests failed") == []


# -- through the engine ----------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.claude
async def test_waiting_candidates_are_gated_once_and_land_together_in_order(
    claude: ClaudeBinary,
    repo: Path,
    model_server: StartServer,
    engine_settings: Settings,
    gate_dir: Path,
    git: Git,
    cli: Cli,
    user_env: dict[str, str],
) -> None:
    names = ["a", "b", "c", "d", "e"]
    server = model_server({"rules": [good("a"), *(late(n, gate_dir) for n in names[1:])]})
    gate = [sys.executable, str(gate_dir / "gate.py"), str(gate_dir)]
    settings = engine_settings(server, gate=gate)

    async with Cluster.open(repo, workers=5, settings=settings, claude=claude) as cluster:
        plan = (await cluster.plan("five at once", [marker_task(n) for n in names])).plan
        await cluster.dispatch(plan.id)
        await release_when_all_succeeded(cluster, plan.id, gate_dir, len(names))
        with anyio.fail_after(120):
            status = await cluster.wait(plan.id)
        events = await cluster.store.events(plan.id)

    assert {t.id: t.state for t in status.tasks} == dict.fromkeys(names, TaskState.MERGED)
    # Two gate runs for five candidates: the first alone, then the four that waited together.
    runs = gate_runs(gate_dir)
    assert runs == [["a.txt"], [f"{n}.txt" for n in names]], runs
    # The batch's gate is told which tasks it gates, in merge order (the last one's id alone too).
    succeeded = [e["task_id"] for e in events if e["kind"] == "state" and e["data"]["state"] == "succeeded"]
    order = [t for t in dict.fromkeys(succeeded) if t != "a"]
    told = [line.split(" / ") for line in (gate_dir / "task-ids").read_text().splitlines()]
    assert told == [["a", "a"], [" ".join(order), order[-1]]], (told, order)
    assert (status.plan.gate_runs, status.plan.merge_batches) == (2, 2)
    batched = [t for t in status.tasks if t.id != "a"]
    assert {t.merge_batch for t in batched} == {2}
    assert {t.last_activity for t in batched} == {"merged in batch 2 with 3 others"}
    # One compare-and-swap landed the four: the last one's merge commit is the tip.
    tip = git(repo, "rev-parse", plan.integration_branch).strip()
    assert tip in {t.merge_commit for t in batched}
    landed_in_order(status, git, repo, events)
    merged_once(status, git, repo, events)
    gate_events = [e["data"] for e in events if e["kind"] == "gate"]
    assert [len(e["tasks"]) for e in gate_events] == [1, 4] and all(e["ok"] for e in gate_events)
    # What a person reads: the status table and its summary line, and the report.
    shown = cli("status", plan.id, cwd=repo, env={**user_env, "COLUMNS": "160"})
    assert shown.returncode == 0, shown.stderr
    assert "merged in batch 2 with 3 others" in shown.stdout
    assert "5 tasks merged in 2 batches; 2 gate runs" in shown.stdout
    markdown = to_markdown(status)
    assert "- Merge queue: 5 tasks merged in 2 batches; 2 gate runs" in markdown
    assert "| b | merged (batch 2) |" in markdown


@pytest.mark.anyio
@pytest.mark.claude
@pytest.mark.parametrize(
    ("bad", "named"),
    [(["c"], True), (["c"], False), (["b", "e"], True)],
    ids=["one-bad-named", "one-bad-bisected", "two-bad"],
)
async def test_the_bad_candidates_of_a_failing_batch_go_back_with_the_gate_output_the_rest_land(
    claude: ClaudeBinary,
    repo: Path,
    model_server: StartServer,
    engine_settings: Settings,
    gate_dir: Path,
    git: Git,
    bad: list[str],
    named: bool,
) -> None:
    # The gate's output names the bad file (the one candidate that changed it is tried out
    # first), or says nothing of it (bisection); two bad candidates are both named.
    if not named:
        (gate_dir / "anonymous").touch()
    names = ["a", "b", "c", "d", "e", "f"]
    rules = [good("a"), *(late(n, gate_dir, f"bad {n}" if n in bad else None) for n in names[1:])]
    server = model_server({"rules": rules})
    gate = [sys.executable, str(gate_dir / "gate.py"), str(gate_dir)]
    settings = engine_settings(server, gate=gate)  # gate_retries: 1 by default
    assert settings.gate_retries == 1

    async with Cluster.open(repo, workers=6, settings=settings, claude=claude) as cluster:
        plan = (await cluster.plan("six, some bad", [marker_task(n) for n in names])).plan
        await cluster.dispatch(plan.id)
        await release_when_all_succeeded(cluster, plan.id, gate_dir, len(names))
        with anyio.fail_after(180):
            status = await cluster.wait(plan.id)
        events = await cluster.store.events(plan.id)

    good_ones = [n for n in names if n not in bad]
    states = {t.id: t.state for t in status.tasks}
    assert states == {n: TaskState.GATE_FAILED if n in bad else TaskState.MERGED for n in names}, [
        (t.id, t.state, t.reason) for t in status.tasks
    ]
    for name in bad:
        task = status.task(name)
        # Sent back once with the gate's output, then final with it.
        assert task.attempts == 2
        output = f"2 tests failed: bad content in {name}.txt" if named else "2 tests failed"
        assert task.reason.startswith("gate failed (exit 1)") and output in task.reason, task.reason
        moves = [e["data"] for e in events if e["task_id"] == name and e["kind"] == "state"]
        retried = [m for m in moves if m["state"] == "pending" and m.get("reason", "").startswith("gate failed")]
        assert len(retried) == 1 and output in retried[0]["reason"], moves
    files = set(git(repo, "ls-tree", "--name-only", plan.integration_branch).split())
    assert files >= {f"{n}.txt" for n in good_ones} and not files & {f"{n}.txt" for n in bad}
    landed_in_order(status, git, repo, events)
    merged_once(status, git, repo, events)
    # Every passing gate run landed something; the failing ones are the batches that held a
    # bad candidate and their bisection: at most 1 + ⌈log2 5⌉ for each time one is found.
    verdicts = [e["data"]["ok"] for e in events if e["kind"] == "gate"]
    assert len(verdicts) == status.plan.gate_runs == len(gate_runs(gate_dir))
    assert len(gate_runs(gate_dir)[1]) == 6 and verdicts[:2] == [True, False]  # a; then the five together
    assert verdicts.count(True) == status.plan.merge_batches
    assert verdicts.count(False) <= 4 * 2 * len(bad), gate_runs(gate_dir)
    if named and len(bad) == 1:
        # a; the five (failing); the four without c (landing: c is the culprit); c's retry.
        assert verdicts == [True, False, True, False], gate_runs(gate_dir)
        assert {status.task(n).last_activity for n in "bdef"} == {"merged in batch 2 with 3 others"}


@pytest.mark.anyio
@pytest.mark.claude
async def test_a_candidate_that_conflicts_inside_a_batch_is_resolved_after_it_as_ever(
    claude: ClaudeBinary, repo: Path, model_server: StartServer, engine_settings: Settings, gate_dir: Path, git: Git
) -> None:
    rules = [
        # The resolve prompt quotes the original task's prompt, so its rule comes first.
        {
            "name": "resolve",
            "match": "[claudecluster:resolve]",
            "turns": [write_turn("shared.txt", "good from x\ngood from y\n"), {"text": "resolved"}],
        },
        good("a"),
        late("x", gate_dir, "good from x", "shared.txt"),
        late("y", gate_dir, "good from y", "shared.txt"),
        late("z", gate_dir),
    ]
    server = model_server({"rules": rules})
    gate = [sys.executable, str(gate_dir / "gate.py"), str(gate_dir)]

    async with Cluster.open(repo, workers=4, settings=engine_settings(server, gate=gate), claude=claude) as cluster:
        plan = (await cluster.plan("x and y collide", [marker_task(n) for n in "axyz"])).plan
        await cluster.dispatch(plan.id)
        await release_when_all_succeeded(cluster, plan.id, gate_dir, 4)
        with anyio.fail_after(180):
            status = await cluster.wait(plan.id)
        events = await cluster.store.events(plan.id)

    states = {t.id: (t.state, t.kind.value) for t in status.tasks}
    resolver = next(t for t in status.tasks if t.kind.value == "resolve")
    # Of x and y, the one that came second conflicts with the batch: taken out, merged
    # alone after it (a real conflict with what landed: a resolve task), the rest landed.
    second = resolver.resolves
    first = "y" if second == "x" else "x"
    assert states == {
        "a": (TaskState.MERGED, "task"),
        first: (TaskState.MERGED, "task"),
        "z": (TaskState.MERGED, "task"),
        second: (TaskState.MERGED, "task"),
        resolver.id: (TaskState.MERGED, "resolve"),
    }, [(t.id, t.state, t.reason) for t in status.tasks]
    assert status.task(first).merge_batch == status.task("z").merge_batch == 2
    assert git(repo, "show", f"{plan.integration_branch}:shared.txt") == "good from x\ngood from y\n"
    merged_once(status, git, repo, events)


@pytest.mark.anyio
@pytest.mark.claude
async def test_cancelling_a_task_in_a_batch_stops_its_gate_and_the_others_land_without_it(
    claude: ClaudeBinary, repo: Path, model_server: StartServer, engine_settings: Settings, gate_dir: Path, git: Git
) -> None:
    names = ["a", "b", "c", "d"]
    server = model_server({"rules": [good("a"), *(late(n, gate_dir) for n in names[1:])]})
    gate = [sys.executable, str(gate_dir / "gate.py"), str(gate_dir)]
    (gate_dir / "hang-at").write_text("2")  # the batch's gate run

    async with Cluster.open(repo, workers=4, settings=engine_settings(server, gate=gate), claude=claude) as cluster:
        plan = (await cluster.plan("cancel one", [marker_task(n) for n in names])).plan
        await cluster.dispatch(plan.id)
        await release_when_all_succeeded(cluster, plan.id, gate_dir, len(names))
        await wait_for(lambda: (gate_dir / "hanging.pid").exists())
        await cluster.cancel(plan.id, "c")
        with anyio.fail_after(60):
            status = await cluster.wait(plan.id)

    states = {t.id: t.state for t in status.tasks}
    assert states == {"a": TaskState.MERGED, "b": TaskState.MERGED, "c": TaskState.CANCELLED, "d": TaskState.MERGED}
    assert status.task("c").reason == "cancelled during its merge"
    assert status.task("b").last_activity == "merged in batch 2 with 1 other"
    with pytest.raises(ProcessLookupError):  # the hanging gate's whole group was killed
        os.killpg(int((gate_dir / "hanging.pid").read_text()), 0)
    assert "c.txt" not in git(repo, "ls-tree", "--name-only", plan.integration_branch).split()


# -- kill -9 in the middle of a batch ----------------------------------------------------------------


def start_worker(
    settings: EngineSettings, tasks: list[dict[str, Any]], repo: Path, plan_file: Path, *extra: str
) -> subprocess.Popen[bytes]:
    script = Path(__file__).parent / "batch_crash_worker.py"
    return subprocess.Popen(
        [sys.executable, str(script), settings.model_dump_json(), json.dumps(tasks), str(repo), str(plan_file), *extra],
        stdin=subprocess.DEVNULL,
    )


def journal(repo: Path) -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(repo / ".git" / "claudecluster" / "state.db", timeout=10)) as db:
        return db.execute("SELECT task_ids, old, new, state FROM merges ORDER BY seq").fetchall()


@pytest.mark.anyio
@pytest.mark.claude
@pytest.mark.parametrize("moment", ["bisecting", "after-the-swap"])
async def test_kill_9_during_a_batch_loses_nothing_and_merges_nothing_twice(
    claude: ClaudeBinary,
    repo: Path,
    model_server: StartServer,
    engine_settings: Settings,
    gate_dir: Path,
    git: Git,
    tmp_path: Path,
    moment: str,
) -> None:
    names = ["a", "b", "c", "d", "e"]
    bad = "d" if moment == "bisecting" else None
    rules = [good("a"), *(late(n, gate_dir, "bad d" if n == bad else None) for n in names[1:])]
    server = model_server({"rules": rules})
    gate = [sys.executable, str(gate_dir / "gate.py"), str(gate_dir)]
    settings = engine_settings(server, gate=gate)
    if moment == "bisecting":
        (gate_dir / "anonymous").touch()  # no suspect: the batch is bisected
        # Run 1: a alone; 2: the batch of four, failing; 3: its first half (landing if it
        # passes); 4, the next step of the bisection, hangs until the engine is killed.
        (gate_dir / "hang-at").write_text("4")
    plan_file = tmp_path / "plan-id"
    extra = ("kill-after-batch-swap",) if moment == "after-the-swap" else ()
    worker = start_worker(settings, [marker_task(n) for n in names], repo, plan_file, *extra)
    db = repo / ".git" / "claudecluster" / "state.db"

    def succeeded() -> int:
        with contextlib.closing(sqlite3.connect(db, timeout=10)) as con:
            return int(con.execute("SELECT COUNT(*) FROM tasks WHERE state = 'succeeded'").fetchone()[0])

    try:
        await wait_for(lambda: plan_file.exists() and db.exists() and succeeded() == len(names))
        (gate_dir / "release").touch()
        if moment == "bisecting":
            await wait_for(lambda: (gate_dir / "hanging.pid").exists())
        else:  # the worker kills itself once a batch's ref moved, before it closes its journal entry
            await wait_for(lambda: worker.poll() is not None)
    finally:
        if worker.poll() is None:
            os.kill(worker.pid, signal.SIGKILL)
        worker.wait()
        # The gate ran in its own session: the engine's death leaves it to run out alone.
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            os.killpg(int((gate_dir / "hanging.pid").read_text()), signal.SIGKILL)
    plan_id = plan_file.read_text()
    integration = f"refs/heads/claudecluster/{plan_id}/integration"
    tip_at_kill = git(repo, "rev-parse", integration).strip()
    if moment == "after-the-swap":
        assert worker.returncode == -signal.SIGKILL
        task_ids, _, new, state = journal(repo)[-1]
        assert state == "started" and new == tip_at_kill and len(json.loads(task_ids)) == 4

    (gate_dir / "hang-at").unlink(missing_ok=True)
    async with Cluster.open(repo, settings=settings, claude=claude) as cluster:
        with anyio.fail_after(180):
            status = await cluster.wait(plan_id)
        events = await cluster.store.events(plan_id)

    expected = {n: TaskState.GATE_FAILED if n == bad else TaskState.MERGED for n in names}
    assert {t.id: t.state for t in status.tasks} == expected, [(t.id, t.state, t.reason) for t in status.tasks]
    assert all(state != "started" for *_, state in journal(repo))
    # The branch only went forward from where the kill left it.
    tip = git(repo, "rev-parse", integration).strip()
    assert is_ancestor(repo, tip_at_kill, tip)
    merged_once(status, git, repo, events)
    if moment == "after-the-swap":
        # Recovery recorded the four that the interrupted swap landed, as one batch.
        batched = [t for t in status.tasks if t.id != "a"]
        assert {t.last_activity for t in batched} == {"merged in batch 2 with 3 others"}
