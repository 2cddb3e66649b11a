"""claudecluster-mcp: turn Claude Code into a coding cluster.

The foundation layer runs real Claude Code agents (:func:`run_agent`, :class:`AgentRun`)
and ships a scripted Anthropic Messages API (:class:`ScriptedModelServer`) so that they
can run offline and deterministically.
"""

from .agent import (
    AgentOutcome,
    AgentRun,
    AgentSpec,
    ClaudeBinary,
    OutcomeStatus,
    RunState,
    find_claude,
    run_agent,
)
from .errors import (
    AgentError,
    ClaudeNotFoundError,
    ClaudeVersionError,
    ClusterError,
    ConfigError,
    ScenarioError,
)
from .model_server import ScriptedModelServer, scripted_env
from .scenario import Scenario, load_scenario

__version__ = "0.1.0"

__all__ = [
    "AgentError",
    "AgentOutcome",
    "AgentRun",
    "AgentSpec",
    "ClaudeBinary",
    "ClaudeNotFoundError",
    "ClaudeVersionError",
    "ClusterError",
    "ConfigError",
    "OutcomeStatus",
    "RunState",
    "Scenario",
    "ScenarioError",
    "ScriptedModelServer",
    "__version__",
    "find_claude",
    "load_scenario",
    "run_agent",
    "scripted_env",
]
