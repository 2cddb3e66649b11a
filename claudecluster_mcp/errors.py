"""The one error hierarchy of claudecluster.

Every failure a user can act on is a :class:`ClusterError`. Third-party failures (git,
sqlite, subprocesses, HTTP) are translated into these at one boundary each, with the
original exception chained as ``__cause__``. The server and the CLI catch ``ClusterError``
in one place and show ``str(error)``; anything else is a bug and is logged with its
traceback.

::

    ClusterError
    ├── ConfigError                 bad settings or arguments
    │   └── ScenarioError           a scripted-model scenario file is invalid
    ├── ClaudeNotFoundError         no `claude` executable where we looked
    │   └── ClaudeVersionError      `claude` is there but too old or unusable
    └── AgentError                  an agent run could not be started or supervised
"""

from __future__ import annotations

__all__ = [
    "AgentError",
    "ClaudeNotFoundError",
    "ClaudeVersionError",
    "ClusterError",
    "ConfigError",
    "ScenarioError",
]


class ClusterError(Exception):
    """Base of every error claudecluster reports to a user."""


class ConfigError(ClusterError):
    """A setting, argument or input file is invalid; the message names it."""


class ScenarioError(ConfigError):
    """A scripted-model scenario is invalid or cannot be read."""


class ClaudeNotFoundError(ClusterError):
    """The Claude Code CLI (`claude`) could not be found."""


class ClaudeVersionError(ClaudeNotFoundError):
    """The Claude Code CLI was found but is too old or does not run."""


class AgentError(ClusterError):
    """An agent process could not be started or supervised."""
