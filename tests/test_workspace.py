"""Git plumbing (workspace.py) and worktree-free merging (merge.py) against real repositories."""

from __future__ import annotations

import functools
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from claudecluster_mcp.errors import DirtyWorktreeError, GitError, RepositoryError
from claudecluster_mcp.merge import MergeOutcome, merge_into, merge_tree, run_gate
from claudecluster_mcp.workspace import (
    add_worktree,
    changed_files,
    check_branch_name,
    commit_all,
    confine,
    current_branch,
    git,
    git_common_dir,
    is_ancestor,
    is_dirty,
    remove_worktree,
    repo_root,
    require_clean,
    rev_parse,
    update_ref,
    worktree_of_branch,
)

pytestmark = pytest.mark.anyio

IDENTITY = ["-c", "user.name=Test", "-c", "user.email=test@example.invalid"]

Git = Callable[..., str]
CommitOn = Callable[..., str]
WorktreePaths = Callable[[Path], list[Path]]


@pytest.fixture
def run(git: Git) -> Git:
    """``run(repo, *args)``: git in ``repo`` with a test identity; its output, stripped."""

    def run_git(repo: Path, *args: str) -> str:
        return git(repo, *IDENTITY, *args).strip()

    return run_git


@pytest.fixture
def commit_on(run: Git) -> CommitOn:
    """``commit_on(repo, branch, files, message="change")``: commit ``files`` on ``branch``
    (created from the current HEAD if new); back to main after. Returns the commit."""

    def commit(repo: Path, branch: str, files: dict[str, str], message: str = "change") -> str:
        exists = run(repo, "branch", "--list", branch) != ""
        run(repo, "checkout", "-q", *([] if exists else ["-b"]), branch)
        for name, content in files.items():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            (repo / name).write_text(content)
        run(repo, "add", "-A")
        run(repo, "commit", "-qm", message)
        sha = run(repo, "rev-parse", "HEAD")
        run(repo, "checkout", "-q", "main")
        return sha

    return commit


@pytest.fixture
def worktree_paths(run: Git) -> WorktreePaths:
    """``worktree_paths(repo)``: the paths of ``repo``'s worktrees, as git lists them."""

    def paths(repo: Path) -> list[Path]:
        lines = run(repo, "worktree", "list", "--porcelain").splitlines()
        return [Path(line.removeprefix("worktree ")) for line in lines if line.startswith("worktree ")]

    return paths


@pytest.fixture(autouse=True)
def _no_parent_repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Never let git find a repository above the test directory.
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))


# -- repo_root, refs, names, paths ----------------------------------------------------------


async def test_repo_root_from_a_subdirectory(repo: Path) -> None:
    (repo / "src" / "pkg").mkdir(parents=True)
    assert await repo_root(repo / "src" / "pkg") == repo.resolve()
    assert await repo_root(repo) == repo.resolve()


async def test_repo_root_of_a_file_is_refused(repo: Path) -> None:
    with pytest.raises(RepositoryError, match="is not a directory"):
        await repo_root(repo / "README.md")
    with pytest.raises(RepositoryError, match="is not a directory"):
        await repo_root(repo / "missing")


async def test_repo_root_of_a_plain_directory_says_git_init(tmp_path: Path) -> None:
    (tmp_path / "plain").mkdir()
    with pytest.raises(RepositoryError, match=r"is not a git repository \(run `git init` there first\)"):
        await repo_root(tmp_path / "plain")


@pytest.fixture
def empty_repo(tmp_path: Path, git: Git) -> Path:
    git(tmp_path, "init", "-q", "-b", "main", "empty")
    return tmp_path / "empty"


async def test_repo_root_of_an_empty_repository_says_commit_first(empty_repo: Path) -> None:
    with pytest.raises(RepositoryError, match="has no commits yet; commit something first"):
        await repo_root(empty_repo)


async def test_git_failures_are_git_errors_with_gits_message(repo: Path) -> None:
    with pytest.raises(GitError, match="not-a-command"):
        await git(repo, "not-a-command")
    assert issubclass(GitError, RepositoryError)
    result = await git(repo, "rev-parse", "--verify", "--quiet", "nope", check=False)
    assert result.returncode != 0


async def test_rev_parse(repo: Path, run: Git) -> None:
    head = run(repo, "rev-parse", "HEAD")
    assert await rev_parse(repo, "main") == head
    assert await rev_parse(repo, "refs/heads/main") == head
    assert await rev_parse(repo, "HEAD") == head
    run(repo, "tag", "-a", "v1", "-m", "annotated")
    assert await rev_parse(repo, "v1") == head, "a tag is peeled to its commit"


@pytest.mark.parametrize("ref", ["nope", "main~5", "refs/heads/ghost", "HEAD^{tree}", ""])
async def test_rev_parse_of_unknown_refs(repo: Path, ref: str) -> None:
    with pytest.raises(RepositoryError):
        await rev_parse(repo, ref)


async def test_rev_parse_never_passes_an_option(repo: Path, tmp_path: Path) -> None:
    target = tmp_path / "planted"
    for ref in (f"--output={target}", "-h", "--all"):
        with pytest.raises(RepositoryError, match="must not be empty or start with '-'"):
            await rev_parse(repo, ref)
    assert not target.exists()


@pytest.mark.parametrize("name", ["-x", "--force", "a..b", "a b", "", "x.lock", "a~1", "a:b", "trailing/"])
async def test_check_branch_name_rejects(repo: Path, name: str) -> None:
    with pytest.raises(RepositoryError, match="invalid branch name"):
        await check_branch_name(repo, name)


async def test_check_branch_name_rejects_previous_branch_syntax(repo: Path, run: Git) -> None:
    run(repo, "checkout", "-q", "-b", "other")
    run(repo, "checkout", "-q", "main")
    with pytest.raises(RepositoryError, match="invalid branch name"):
        await check_branch_name(repo, "@{-1}")


@pytest.mark.parametrize("name", ["feature/x", "main", "claudecluster/p1/a.b_c-1"])
async def test_check_branch_name_accepts(repo: Path, name: str) -> None:
    assert await check_branch_name(repo, name) == name


def test_confine_accepts_paths_inside(repo: Path) -> None:
    assert confine(repo, "src/a.py") == repo.resolve() / "src" / "a.py"
    assert confine(repo, repo / "README.md") == repo.resolve() / "README.md"
    assert confine(repo, "src/../README.md") == repo.resolve() / "README.md"


@pytest.mark.parametrize("path", ["../x", "src/../../x", "/etc/passwd", "/"])
def test_confine_rejects_paths_outside(repo: Path, path: str) -> None:
    with pytest.raises(RepositoryError, match="is outside the repository"):
        confine(repo, path)


def test_confine_rejects_a_symlink_pointing_outside(repo: Path, tmp_path: Path) -> None:
    outside = tmp_path / "secret"
    outside.mkdir()
    (outside / "key").write_text("hush")
    (repo / "link").symlink_to(outside)
    (repo / "inner").symlink_to(repo / "README.md")
    with pytest.raises(RepositoryError, match="is outside the repository"):
        confine(repo, "link/key")
    with pytest.raises(RepositoryError):
        confine(repo, "link")
    assert confine(repo, "inner") == repo.resolve() / "README.md"


async def test_update_ref_is_compare_and_swap(repo: Path, run: Git, commit_on: CommitOn) -> None:
    first = run(repo, "rev-parse", "HEAD")
    second = commit_on(repo, "main", {"a.txt": "a"})
    # main is at `second`; claiming it is at `first` fails and changes nothing.
    assert await update_ref(repo, "refs/heads/main", first, first, "rewind") is False
    assert run(repo, "rev-parse", "main") == second
    assert await update_ref(repo, "refs/heads/main", first, second, "rewind") is True
    assert run(repo, "rev-parse", "main") == first


async def test_update_ref_create_only_if_absent(repo: Path, run: Git, commit_on: CommitOn) -> None:
    head = run(repo, "rev-parse", "HEAD")
    assert await update_ref(repo, "refs/heads/new", head, None, "create") is True
    assert run(repo, "rev-parse", "new") == head
    other = commit_on(repo, "side", {"s.txt": "s"})
    assert await update_ref(repo, "refs/heads/new", other, None, "create again") is False
    assert run(repo, "rev-parse", "new") == head


async def test_update_ref_expecting_a_value_of_a_missing_ref_returns_false(repo: Path, run: Git) -> None:
    head = run(repo, "rev-parse", "HEAD")
    assert await update_ref(repo, "refs/heads/ghost", head, head, "move") is False


async def test_update_ref_waits_for_a_ref_lock_another_git_holds_briefly(
    repo: Path, run: Git, commit_on: CommitOn
) -> None:
    first = run(repo, "rev-parse", "HEAD")
    second = commit_on(repo, "side", {"a.txt": "a"})
    lock = repo / ".git" / "refs" / "heads" / "main.lock"
    lock.write_text(first + "\n")  # as while another git process updates main

    async def release() -> None:
        await anyio.sleep(1.0)
        lock.unlink()

    async with anyio.create_task_group() as tg:
        tg.start_soon(release)
        moved = await update_ref(repo, "refs/heads/main", second, first, "merge")

    assert moved is True
    assert run(repo, "rev-parse", "main") == second


async def test_update_ref_behind_a_stale_ref_lock_fails_naming_the_lock(repo: Path, run: Git) -> None:
    head = run(repo, "rev-parse", "HEAD")
    lock = repo / ".git" / "refs" / "heads" / "main.lock"
    lock.write_text("left by a git that crashed\n")

    with pytest.raises(GitError, match=r"main\.lock.*File exists"):
        await update_ref(repo, "refs/heads/main", head, head, "merge", lock_wait=0.3)


async def test_current_branch_ancestry_and_changed_files(repo: Path, run: Git, commit_on: CommitOn) -> None:
    base = run(repo, "rev-parse", "HEAD")
    tip = commit_on(repo, "feature", {"a.txt": "a", "dir/b.txt": "b"})
    assert await current_branch(repo) == "main"
    assert await is_ancestor(repo, base, tip) is True
    assert await is_ancestor(repo, tip, base) is False
    assert await changed_files(repo, base, tip) == ["a.txt", "dir/b.txt"]
    assert await git_common_dir(repo) == (repo / ".git").resolve()
    run(repo, "checkout", "-q", "--detach")
    assert await current_branch(repo) is None


# -- commits and dirtiness ------------------------------------------------------------------


async def test_commit_all_commits_tracked_and_untracked_but_not_ignored(repo: Path, run: Git) -> None:
    (repo / ".gitignore").write_text("*.log\nbuild/\n")
    (repo / "README.md").write_text("# changed\n")
    (repo / "new.txt").write_text("new\n")
    (repo / "pkg").mkdir()
    (repo / "pkg" / "mod.py").write_text("x = 1\n")
    (repo / "debug.log").write_text("noise\n")
    (repo / "build").mkdir()
    (repo / "build" / "out.bin").write_text("binary\n")
    before = run(repo, "rev-parse", "HEAD")

    assert await commit_all(repo, "agent work") is True

    assert run(repo, "rev-parse", "HEAD^") == before
    assert run(repo, "log", "-1", "--format=%s") == "agent work"
    committed = run(repo, "show", "--name-only", "--format=", "HEAD").splitlines()
    assert sorted(committed) == [".gitignore", "README.md", "new.txt", "pkg/mod.py"]
    assert (repo / "debug.log").exists(), "ignored files are left alone"
    assert run(repo, "status", "--porcelain") == ""


async def test_commit_all_commits_deletions(repo: Path, run: Git) -> None:
    (repo / "README.md").unlink()
    assert await commit_all(repo, "remove readme") is True
    assert run(repo, "ls-tree", "--name-only", "HEAD") == ""


async def test_commit_all_with_nothing_to_commit(repo: Path, run: Git) -> None:
    head = run(repo, "rev-parse", "HEAD")
    assert await commit_all(repo, "nothing") is False
    (repo / "ignored.log").write_text("x")
    (repo / ".git" / "info" / "exclude").write_text("*.log\n")
    assert await commit_all(repo, "still nothing") is False
    assert run(repo, "rev-parse", "HEAD") == head


async def test_a_modified_tracked_file_is_dirty(repo: Path) -> None:
    assert await is_dirty(repo) is False
    await require_clean(repo, "merging")
    (repo / "README.md").write_text("edited\n")
    assert await is_dirty(repo) is True
    with pytest.raises(DirtyWorktreeError, match="uncommitted changes; commit or stash them before merging"):
        await require_clean(repo, "merging")


async def test_a_staged_change_is_dirty(repo: Path, run: Git) -> None:
    (repo / "staged.txt").write_text("s")
    run(repo, "add", "staged.txt")
    assert await is_dirty(repo) is True


async def test_untracked_files_alone_are_clean(repo: Path) -> None:
    (repo / "scratch.txt").write_text("notes")
    assert await is_dirty(repo) is False
    await require_clean(repo, "merging")


# -- worktrees ------------------------------------------------------------------------------


async def test_add_and_remove_a_worktree(
    repo: Path, tmp_path: Path, run: Git, commit_on: CommitOn, worktree_paths: WorktreePaths
) -> None:
    tip = commit_on(repo, "feature", {"feature.txt": "f"})
    path = tmp_path / "trees" / "feature"
    assert await add_worktree(repo, path, "feature") == path
    assert (path / "feature.txt").read_text() == "f"
    assert await worktree_of_branch(repo, "feature") == path.resolve()
    assert await current_branch(path) == "feature"
    assert run(path, "rev-parse", "HEAD") == tip

    await remove_worktree(repo, path)
    assert not path.exists()
    assert worktree_paths(repo) == [repo.resolve()]
    assert await worktree_of_branch(repo, "feature") is None
    await remove_worktree(repo, path)  # a missing worktree is fine


async def test_a_detached_worktree_of_a_commit(
    repo: Path, tmp_path: Path, run: Git, commit_on: CommitOn, worktree_paths: WorktreePaths
) -> None:
    tip = commit_on(repo, "feature", {"feature.txt": "f"})
    path = await add_worktree(repo, tmp_path / "detached", commit=tip)
    assert await current_branch(path) is None
    assert run(path, "rev-parse", "HEAD") == tip
    await remove_worktree(repo, path)
    assert worktree_paths(repo) == [repo.resolve()]


async def test_remove_worktree_discards_local_changes(
    repo: Path, tmp_path: Path, commit_on: CommitOn, worktree_paths: WorktreePaths
) -> None:
    commit_on(repo, "feature", {"feature.txt": "f"})
    path = await add_worktree(repo, tmp_path / "wt", "feature")
    (path / "feature.txt").write_text("changed")
    (path / "untracked.txt").write_text("u")
    await remove_worktree(repo, path)
    assert not path.exists()
    assert worktree_paths(repo) == [repo.resolve()]


async def test_a_branch_checked_out_elsewhere_cannot_get_a_second_worktree(repo: Path, tmp_path: Path) -> None:
    with pytest.raises(GitError):
        await add_worktree(repo, tmp_path / "second-main", "main")


async def test_worktree_of_branch(repo: Path, run: Git) -> None:
    assert await worktree_of_branch(repo, "main") == repo.resolve()
    run(repo, "branch", "idle")
    assert await worktree_of_branch(repo, "idle") is None
    assert await worktree_of_branch(repo, "ghost") is None


async def test_concurrent_worktree_adds_and_removes_all_succeed(
    repo: Path, tmp_path: Path, run: Git, worktree_paths: WorktreePaths
) -> None:
    names = [f"task-{n}" for n in range(10)]
    for name in names:
        run(repo, "branch", name)
    paths = {name: tmp_path / "trees" / name for name in names}

    async with anyio.create_task_group() as tg:
        for name in names:
            tg.start_soon(add_worktree, repo, paths[name], name)

    for name, path in paths.items():
        assert await worktree_of_branch(repo, name) == path.resolve()
        assert (path / "README.md").exists()
    assert len(worktree_paths(repo)) == 11

    async with anyio.create_task_group() as tg:
        for path in paths.values():
            tg.start_soon(remove_worktree, repo, path)
    assert worktree_paths(repo) == [repo.resolve()]


# -- merge_tree -----------------------------------------------------------------------------


async def test_merge_tree_clean(repo: Path, run: Git, commit_on: CommitOn) -> None:
    ours = commit_on(repo, "ours", {"a.txt": "a"})
    theirs = commit_on(repo, "theirs", {"b.txt": "b"})
    check = await merge_tree(repo, ours, theirs)
    assert check.clean is True
    assert check.conflicts == []
    assert run(repo, "ls-tree", "--name-only", check.tree).splitlines() == ["README.md", "a.txt", "b.txt"]


async def test_merge_tree_conflict_lists_the_files(repo: Path, run: Git, commit_on: CommitOn) -> None:
    ours = commit_on(repo, "ours", {"README.md": "ours\n", "same.txt": "same\n", "a.txt": "a"})
    theirs = commit_on(repo, "theirs", {"README.md": "theirs\n", "same.txt": "same\n", "z/z.txt": "z"})
    check = await merge_tree(repo, ours, theirs)
    assert check.clean is False
    assert check.conflicts == ["README.md"]
    assert run(repo, "rev-parse", "main") != ours, "nothing was moved"


# -- merge_into -----------------------------------------------------------------------------


async def test_merge_into_fast_forwards(repo: Path, run: Git, commit_on: CommitOn) -> None:
    old = run(repo, "rev-parse", "main")
    run(repo, "branch", "target")
    tip = commit_on(repo, "feature", {"f.txt": "f"})
    result = await merge_into(repo, "target", tip, "merge feature")
    assert result.outcome is MergeOutcome.MERGED
    assert (result.old_tip, result.new_tip) == (old, tip)
    assert run(repo, "rev-parse", "target") == tip


async def test_merge_into_makes_a_two_parent_merge_commit(repo: Path, run: Git, commit_on: CommitOn) -> None:
    run(repo, "branch", "target")
    target_tip = commit_on(repo, "target", {"t.txt": "t"})
    feature_tip = commit_on(repo, "feature", {"f.txt": "f"})

    result = await merge_into(repo, "refs/heads/target", feature_tip, "Merge task feature")

    assert result.outcome is MergeOutcome.MERGED
    assert result.old_tip == target_tip
    new = run(repo, "rev-parse", "target")
    assert result.new_tip == new
    assert run(repo, "rev-list", "--parents", "-n1", "target").split() == [new, target_tip, feature_tip]
    assert run(repo, "log", "-1", "--format=%s", "target") == "Merge task feature"
    assert run(repo, "ls-tree", "--name-only", "target").splitlines() == ["README.md", "f.txt", "t.txt"]
    assert run(repo, "status", "--porcelain") == "", "no working tree was touched"
    assert not (repo / "f.txt").exists()


async def test_merge_into_conflict_leaves_the_ref(repo: Path, run: Git, commit_on: CommitOn) -> None:
    run(repo, "branch", "target")
    target_tip = commit_on(repo, "target", {"README.md": "target\n"})
    feature_tip = commit_on(repo, "feature", {"README.md": "feature\n"})
    result = await merge_into(repo, "target", feature_tip, "merge")
    assert result.outcome is MergeOutcome.CONFLICT
    assert result.conflicts == ["README.md"]
    assert result.old_tip == target_tip
    assert result.new_tip is None
    assert run(repo, "rev-parse", "target") == target_tip


async def test_merge_into_of_an_ancestor_is_already_merged(repo: Path, run: Git, commit_on: CommitOn) -> None:
    base = run(repo, "rev-parse", "main")
    tip = commit_on(repo, "main", {"a.txt": "a"})
    result = await merge_into(repo, "main", base, "merge")
    assert result.outcome is MergeOutcome.ALREADY_MERGED
    assert result.old_tip == result.new_tip == tip
    again = await merge_into(repo, "main", tip, "merge")
    assert again.outcome is MergeOutcome.ALREADY_MERGED


async def test_merge_into_gate_failure_leaves_the_ref(
    repo: Path, run: Git, commit_on: CommitOn, worktree_paths: WorktreePaths
) -> None:
    run(repo, "branch", "target")
    target_tip = commit_on(repo, "target", {"t.txt": "t"})
    feature_tip = commit_on(repo, "feature", {"f.txt": "f"})
    gate = [sys.executable, "-c", "import sys; print('3 tests failed'); sys.exit(3)"]
    journal_calls: list[str] = []

    async def journal(ref: str, old: str, new: str) -> int:
        journal_calls.append(ref)
        return 1

    result = await merge_into(repo, "target", feature_tip, "merge", gate=gate, journal=journal)

    assert result.outcome is MergeOutcome.GATE_FAILED
    assert result.gate is not None
    assert result.gate.ok is False
    assert result.gate.returncode == 3
    assert "3 tests failed" in result.gate.output
    assert run(repo, "rev-parse", "target") == target_tip
    assert journal_calls == [], "nothing is journalled for a merge that will not happen"
    assert worktree_paths(repo) == [repo.resolve()]


async def test_merge_into_gate_sees_the_merge_candidate(repo: Path, run: Git, commit_on: CommitOn) -> None:
    run(repo, "branch", "target")
    commit_on(repo, "target", {"t.txt": "t"})
    feature_tip = commit_on(repo, "feature", {"f.txt": "f"})
    gate = [
        sys.executable,
        "-c",
        "import pathlib; assert pathlib.Path('t.txt').exists() and pathlib.Path('f.txt').exists()",
    ]
    result = await merge_into(repo, "target", feature_tip, "merge", gate=gate)
    assert result.outcome is MergeOutcome.MERGED
    assert result.gate is not None and result.gate.ok  # the verdict it passed, for counting gate runs
    assert run(repo, "rev-parse", "target") == result.new_tip


async def test_merge_into_journals_before_moving_the_ref(repo: Path, run: Git, commit_on: CommitOn) -> None:
    run(repo, "branch", "target")
    target_tip = commit_on(repo, "target", {"t.txt": "t"})
    feature_tip = commit_on(repo, "feature", {"f.txt": "f"})
    calls: list[tuple[str, ...]] = []

    async def journal(ref: str, old: str, new: str) -> int:
        assert await rev_parse(repo, ref) == old, "the journal entry is written before the ref moves"
        calls.append(("begin", ref, old, new))
        return 7

    async def journal_end(entry: int, state: str) -> None:
        calls.append(("end", str(entry), state, await rev_parse(repo, "target")))

    result = await merge_into(repo, "target", feature_tip, "merge", journal=journal, journal_end=journal_end)

    assert result.outcome is MergeOutcome.MERGED
    assert result.new_tip is not None
    assert calls == [
        ("begin", "refs/heads/target", target_tip, result.new_tip),
        ("end", "7", "done", result.new_tip),
    ]


async def test_merge_into_retries_when_the_branch_moves_underneath(repo: Path, run: Git, commit_on: CommitOn) -> None:
    run(repo, "branch", "target")
    target_tip = commit_on(repo, "target", {"t.txt": "t"})
    feature_tip = commit_on(repo, "feature", {"f.txt": "f"})
    interloper = commit_on(repo, "target", {"i.txt": "i"}, message="someone else")
    run(repo, "update-ref", "refs/heads/target", target_tip)  # not there yet
    calls: list[tuple[str, ...]] = []

    async def journal(ref: str, old: str, new: str) -> int:
        calls.append(("begin", old))
        if len(calls) == 1:  # someone else moves the branch between our check and our update
            run(repo, "update-ref", ref, interloper, old)
        return len(calls)

    async def journal_end(entry: int, state: str) -> None:
        calls.append(("end", str(entry), state))

    result = await merge_into(repo, "target", feature_tip, "merge", journal=journal, journal_end=journal_end)

    assert result.outcome is MergeOutcome.MERGED
    assert calls == [("begin", target_tip), ("end", "1", "undone"), ("begin", interloper), ("end", "3", "done")]
    assert result.old_tip == interloper
    assert run(repo, "rev-list", "--parents", "-n1", "target").split() == [result.new_tip, interloper, feature_tip]


# -- run_gate -------------------------------------------------------------------------------


@pytest.fixture
def gate_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private temp dir for run_gate's scratch worktrees, to check it cleans up."""
    path = tmp_path / "tmp"
    path.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(path))
    return path


async def test_run_gate_runs_in_a_detached_worktree_of_the_commit(
    repo: Path, gate_tmp: Path, commit_on: CommitOn, worktree_paths: WorktreePaths
) -> None:
    tip = commit_on(repo, "feature", {"feature.txt": "from the candidate"})
    script = (
        "import pathlib, subprocess;"
        "print(pathlib.Path('feature.txt').read_text());"
        "print(subprocess.run(['git', 'rev-parse', 'HEAD'], capture_output=True, text=True).stdout)"
    )
    verdict = await run_gate(repo, tip, [sys.executable, "-c", script])
    assert verdict.ok is True
    assert verdict.returncode == 0
    assert "from the candidate" in verdict.output
    assert tip in verdict.output
    assert not (repo / "feature.txt").exists(), "the main worktree is untouched"
    assert worktree_paths(repo) == [repo.resolve()]
    assert list(gate_tmp.iterdir()) == []


async def test_run_gate_failure_keeps_stderr(
    repo: Path, gate_tmp: Path, run: Git, worktree_paths: WorktreePaths
) -> None:
    head = run(repo, "rev-parse", "HEAD")
    verdict = await run_gate(repo, head, [sys.executable, "-c", "import sys; sys.exit('broken build')"])
    assert verdict.ok is False
    assert verdict.returncode == 1
    assert "broken build" in verdict.output
    assert worktree_paths(repo) == [repo.resolve()]
    assert list(gate_tmp.iterdir()) == []


async def test_run_gate_timeout(repo: Path, gate_tmp: Path, run: Git, worktree_paths: WorktreePaths) -> None:
    head = run(repo, "rev-parse", "HEAD")
    verdict = await run_gate(repo, head, [sys.executable, "-c", "import time; time.sleep(30)"], timeout=0.5)
    assert verdict.ok is False
    assert verdict.returncode is None
    assert "timed out after 0.5s" in verdict.output
    assert worktree_paths(repo) == [repo.resolve()]
    assert list(gate_tmp.iterdir()) == []


async def test_run_gate_with_a_missing_command(
    repo: Path, gate_tmp: Path, run: Git, worktree_paths: WorktreePaths
) -> None:
    head = run(repo, "rev-parse", "HEAD")
    verdict = await run_gate(repo, head, [str(gate_tmp / "no-such-gate")])
    assert verdict.ok is False
    assert "could not run" in verdict.output
    assert worktree_paths(repo) == [repo.resolve()]


async def test_worktrees_in_a_second_repo_are_independent(
    tmp_path: Path, make_repo: Callable[[Path], Path], worktree_paths: WorktreePaths
) -> None:
    one, two = make_repo(tmp_path / "one"), make_repo(tmp_path / "two")
    async with anyio.create_task_group() as tg:
        tg.start_soon(functools.partial(add_worktree, one, tmp_path / "wt-one", commit="HEAD"))
        tg.start_soon(functools.partial(add_worktree, two, tmp_path / "wt-two", commit="HEAD"))
    assert len(worktree_paths(one)) == len(worktree_paths(two)) == 2
