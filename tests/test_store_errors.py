"""SQLite failures of the store and the registry are StoreErrors that name the file and the
remedy. The broken things are real: a file of garbage, a database with a destroyed page, and a
database file the kernel refuses to write (immutable attribute; root ignores file modes)."""

from __future__ import annotations

import inspect
import sqlite3
import subprocess
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from claudecluster_mcp.errors import StoreError
from claudecluster_mcp.models import Plan, PlanState, Task
from claudecluster_mcp.registry import Registry
from claudecluster_mcp.store import Store

pytestmark = pytest.mark.anyio

GARBAGE = b"this is not a SQLite file \x00\xff" * 500


@pytest.fixture
def make_store(make_plan: Callable[..., Plan], make_task: Callable[..., Task]) -> Callable[..., Awaitable[None]]:
    """``await make_store(path, tasks=n)``: a state database holding one plan of n tasks."""

    async def make(path: Path, tasks: int = 1) -> None:
        async with Store.open(path) as store:
            await store.create_plan(make_plan(), [make_task(f"t{n}") for n in range(tasks)])

    return make


@pytest.fixture
def immutable() -> Iterator[Callable[[Path], None]]:
    """Make files immutable (``chattr +i``: even root cannot write them); undone afterwards."""
    made: list[Path] = []

    def make(path: Path) -> None:
        done = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            pytest.skip(f"cannot make a file immutable here (chattr +i: {done.stderr.strip()})")
        made.append(path)

    yield make
    for path in made:
        subprocess.run(["chattr", "-i", str(path)], check=True)


async def test_a_garbage_file_is_not_a_database_and_should_be_moved_aside(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    path.write_bytes(GARBAGE)

    with pytest.raises(StoreError) as caught:
        async with Store.open(path):
            pass

    assert str(caught.value).startswith(
        f"the state database {path} is not a SQLite database (corrupt?): move it aside to start fresh"
    )
    assert isinstance(caught.value.__cause__, sqlite3.DatabaseError)


async def test_a_destroyed_page_fails_a_later_read_as_a_store_error(
    tmp_path: Path, make_store: Callable[..., Awaitable[None]]
) -> None:
    path = tmp_path / "state.db"
    await make_store(path, tasks=300)
    with sqlite3.connect(path) as db:
        page_size = db.execute("PRAGMA page_size").fetchone()[0]
        (root,) = db.execute("SELECT rootpage FROM sqlite_master WHERE name = 'tasks'").fetchone()
    db.close()
    with path.open("r+b") as file:
        file.seek((root - 1) * page_size)
        file.write(GARBAGE[:page_size])

    async with Store.open(path) as store:
        assert (await store.plan("p1")).goal == "make it better"  # other tables still read
        with pytest.raises(StoreError, match=rf"^the state database {path} is corrupt: move it aside"):
            await store.tasks("p1")


async def test_writing_a_read_only_database_is_a_store_error_saying_to_check_permissions(
    tmp_path: Path, immutable: Callable[[Path], None], make_store: Callable[..., Awaitable[None]]
) -> None:
    path = tmp_path / "state.db"
    await make_store(path)
    immutable(path)

    async with Store.open(path) as store:
        assert (await store.plan("p1")).id == "p1"  # reading still works
        with pytest.raises(StoreError) as caught:
            await store.update_plan("p1", state=PlanState.CANCELLED)
        assert (await store.plan("p1")).state is not PlanState.CANCELLED

    message = str(caught.value)
    assert message.startswith(f"the state database {path} is read-only: check the permissions")
    assert "attempt to write a readonly database" in message


def test_a_read_only_registry_is_a_store_error(tmp_path: Path, immutable: Callable[[Path], None]) -> None:
    registry = Registry(tmp_path / "registry.db")
    registry.register("p1", tmp_path)
    immutable(registry.path)

    assert registry.lookup("p1") == tmp_path
    with pytest.raises(StoreError, match=rf"^the plan registry {registry.path} is read-only"):
        registry.register("p2", tmp_path)


def test_a_garbage_registry_is_a_store_error(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    path.write_bytes(GARBAGE)

    with pytest.raises(StoreError, match=rf"^the plan registry {path} is not a SQLite database"):
        Registry(path).lookup("p1")


def test_every_public_store_coroutine_is_behind_the_boundary() -> None:
    members = {name: member for cls in reversed(Store.__mro__) for name, member in vars(cls).items()}
    public = [
        name for name, member in members.items() if not name.startswith("_") and inspect.iscoroutinefunction(member)
    ]

    assert {"create_plan", "move", "tasks", "events", "begin_merge"} <= set(public)
    assert [name for name in public if not hasattr(getattr(Store, name), "__sqlite_errors__")] == []
