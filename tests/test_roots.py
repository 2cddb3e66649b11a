"""Root confinement on what the server actually opens: the repository's toplevel and its git
directories, not just the path a caller names. Each attack is planted for real (a repository
above the root, a `.git` file or link inside the root pointing elsewhere, a linked worktree of
an outside repository) and tried through the SDK's stdio client against `claudecluster serve`."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from mcp import Client, StdioServerParameters

SERVE = [sys.executable, "-m", "claudecluster_mcp.cli", "serve"]

MakeRepo = Callable[[Path], Path]
Git = Callable[..., str]


def plan_args(repo: Path) -> dict[str, object]:
    return {"repo": str(repo), "goal": "g", "tasks": [{"id": "a", "prompt": "do a"}]}


@pytest.mark.anyio
async def test_only_repositories_wholly_inside_the_roots_are_opened(
    tmp_path: Path, make_repo: MakeRepo, git: Git
) -> None:
    root = tmp_path / "root"
    # `serve --root mono/pkg`: pkg is inside the root, but its repository is mono, above it.
    mono = make_repo(tmp_path / "mono")
    pkg = mono / "pkg"
    pkg.mkdir()
    outside = make_repo(tmp_path / "outside")
    # A .git file inside the root pointing to another repository's git directory.
    planted = root / "planted"
    planted.mkdir(parents=True)
    (planted / ".git").write_text(f"gitdir: {outside / '.git'}\n")
    # The same through a symlink, and a real linked worktree of the outside repository.
    linked_dir = root / "symlinked"
    linked_dir.mkdir()
    (linked_dir / ".git").symlink_to(outside / ".git")
    linked_out = root / "linked-out"
    git(outside, "worktree", "add", "-q", "-b", "out", str(linked_out))
    # Fine: a repository inside the root, and a linked worktree of another one inside it (its
    # common git directory inside the roots too).
    good = make_repo(root / "good")
    linked_in = root / "linked-in"
    git(make_repo(root / "main"), "worktree", "add", "-q", "-b", "in", str(linked_in))
    params = StdioServerParameters(
        command=SERVE[0],
        args=[*SERVE[1:], "--root", str(root), "--root", str(pkg)],
        env={**os.environ, "XDG_STATE_HOME": str(tmp_path / "state"), "CLAUDECLUSTER_TOKEN": ""},
    )

    async with Client(params) as client:
        refused = {p: await client.call_tool("plan", plan_args(p)) for p in (pkg, planted, linked_dir, linked_out)}
        accepted = [await client.call_tool("plan", plan_args(p)) for p in (good, linked_in)]

    texts = {p: r.content[0].text for p, r in refused.items() if r.is_error}  # type: ignore[union-attr]
    assert set(texts) == set(refused), "every planted repository must be refused"
    assert f"belongs to the git repository {mono}, which lies above the allowed roots" in texts[pkg]
    assert f"--root {mono}" in texts[pkg]
    for path in (planted, linked_dir, linked_out):
        assert f"outside the allowed roots ({root}, {pkg})" in texts[path]
        assert f"--root {outside}" in texts[path] and "Traceback" not in texts[path]
    # Nothing was opened there: no state database in the outside repositories.
    assert not (outside / ".git" / "claudecluster").exists() and not (mono / ".git" / "claudecluster").exists()
    assert [r.is_error for r in accepted] == [False, False], [r.content for r in accepted]
