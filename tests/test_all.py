"""The public API: everything exported exists, and every public module declares __all__."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys

import pytest

import claudecluster_mcp
from claudecluster_mcp.errors import ConfigError
from claudecluster_mcp.settings import MAX_WORKERS, check_workers


def test_top_level_exports_exist() -> None:
    for name in claudecluster_mcp.__all__:
        assert hasattr(claudecluster_mcp, name), name


def test_every_module_declares_an_accurate_all() -> None:
    for info in pkgutil.iter_modules(claudecluster_mcp.__path__):
        module = importlib.import_module(f"claudecluster_mcp.{info.name}")
        exported = getattr(module, "__all__", None)
        assert exported is not None, f"{module.__name__} has no __all__"
        for name in exported:
            assert hasattr(module, name), f"{module.__name__}.__all__ names missing {name}"


def test_importing_the_package_does_not_start_an_http_stack() -> None:
    # A library user (or the CLI's `status`) should not pay for uvicorn and starlette;
    # checked in a fresh interpreter, since this one has imported everything by now.
    code = "import sys, claudecluster_mcp; print(sorted(m for m in ('uvicorn', 'starlette') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("count", [0, -1, MAX_WORKERS + 1])
def test_a_pool_size_outside_1_to_max_workers_is_refused_naming_the_range(count: int) -> None:
    with pytest.raises(ConfigError, match=f"workers must be between 1 and {MAX_WORKERS}, not {count}"):
        check_workers(count)
    assert check_workers(MAX_WORKERS) == MAX_WORKERS
