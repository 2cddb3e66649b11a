"""Finding and version-checking the `claude` executable."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from claudecluster_mcp.claude_cli import CLAUDE_BIN_ENV, PINNED_CLAUDE_VERSION, find_claude
from claudecluster_mcp.errors import ClaudeNotFoundError, ClaudeVersionError


def fake_claude(path: Path, version_output: str) -> Path:
    path.write_text(f"#!/bin/sh\necho '{version_output}'\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_find_claude_reports_where_it_looked_and_how_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(CLAUDE_BIN_ENV, "/nonexistent/claude")

    with pytest.raises(ClaudeNotFoundError) as caught:
        find_claude()

    message = str(caught.value)
    assert "/nonexistent/claude" in message and CLAUDE_BIN_ENV in message
    assert "npm ci" in message


def test_find_claude_rejects_a_too_old_version(tmp_path: Path) -> None:
    old = fake_claude(tmp_path / "claude", "2.1.197 (Claude Code)")

    with pytest.raises(ClaudeVersionError, match=r"version 2\.1\.197.*needs 2\.1\.300"):
        find_claude(old)


def test_find_claude_rejects_something_that_is_not_claude(tmp_path: Path) -> None:
    impostor = fake_claude(tmp_path / "claude", "hello")

    with pytest.raises(ClaudeVersionError, match="did not report a Claude Code version"):
        find_claude(impostor)


def test_find_claude_prefers_the_env_var(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    chosen = fake_claude(tmp_path / "my-claude", "2.1.400 (Claude Code)")
    monkeypatch.setenv(CLAUDE_BIN_ENV, str(chosen))

    found = find_claude()

    assert found.path == chosen and found.version == "2.1.400"


def test_find_claude_finds_the_pinned_project_install() -> None:
    found = find_claude()

    assert found.version == PINNED_CLAUDE_VERSION == "2.1.332"
