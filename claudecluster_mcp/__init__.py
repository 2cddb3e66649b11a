"""claudecluster-mcp: turn Claude Code into a coding cluster.

:class:`Cluster` plans a goal into a task DAG, runs each task as a real Claude Code agent
(:class:`AgentRun`) in its own git worktree, and merges the results. The scripted model
server (:class:`ScriptedModelServer`) lets all of it run offline and deterministically.
"""

import importlib
from typing import TYPE_CHECKING, Any

from .agent import AgentRun, run_agent
from .agent_spec import AgentSpec
from .claude_cli import ClaudeBinary, find_claude
from .engine import Cluster, EngineSettings, FinalMerge
from .errors import (
    AgentError,
    ClaudeNotFoundError,
    ClaudeVersionError,
    ClusterError,
    ConfigError,
    DirtyWorktreeError,
    DiskFullError,
    EngineBusyError,
    GitError,
    ModelUnavailableError,
    NotFoundError,
    PlanValidationError,
    RepositoryError,
    ScenarioError,
    StateError,
    StoreError,
)
from .models import Category, MergePolicy, Plan, PlanState, PlanStatus, Priority, Task, TaskSpec, TaskState
from .outcome import AgentOutcome, OutcomeStatus, RunState
from .scenario import Scenario, load_scenario

if TYPE_CHECKING:
    from .model_server import ScriptedModelServer, scripted_env

__version__ = "0.1.0"

# The scripted model server pulls in an HTTP stack (uvicorn, starlette): imported on first use.
_LAZY = {"ScriptedModelServer": "model_server", "scripted_env": "model_server"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AgentError",
    "AgentOutcome",
    "AgentRun",
    "AgentSpec",
    "Category",
    "ClaudeBinary",
    "ClaudeNotFoundError",
    "ClaudeVersionError",
    "Cluster",
    "ClusterError",
    "ConfigError",
    "DirtyWorktreeError",
    "DiskFullError",
    "EngineBusyError",
    "EngineSettings",
    "FinalMerge",
    "GitError",
    "MergePolicy",
    "ModelUnavailableError",
    "NotFoundError",
    "OutcomeStatus",
    "Plan",
    "PlanState",
    "PlanStatus",
    "PlanValidationError",
    "Priority",
    "RepositoryError",
    "RunState",
    "Scenario",
    "ScenarioError",
    "ScriptedModelServer",
    "StateError",
    "StoreError",
    "Task",
    "TaskSpec",
    "TaskState",
    "__version__",
    "find_claude",
    "load_scenario",
    "run_agent",
    "scripted_env",
]
