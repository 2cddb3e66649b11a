"""The README documents every CLI command and every setting (as sqlite-utils tests its docs)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from claudecluster_mcp.cli import build_parser
from claudecluster_mcp.settings import EngineSettings

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def _commands() -> list[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sorted(sub.choices)


@pytest.mark.parametrize("command", _commands())
def test_every_command_is_in_the_readme_commands_table(command: str) -> None:
    assert re.search(rf"^\| `claudecluster {re.escape(command)}\b", README, re.MULTILINE), (
        f"`claudecluster {command}` is not documented in README.md's command table"
    )


@pytest.mark.parametrize("name", sorted(EngineSettings.model_fields))
def test_every_setting_is_documented(name: str) -> None:
    assert f"`{name}`" in README, f"setting {name} is not documented in README.md"


def test_every_command_has_a_handler() -> None:
    from claudecluster_mcp.cli import _HANDLERS

    assert set(_commands()) == set(_HANDLERS)
