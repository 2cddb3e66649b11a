"""The one error hierarchy of claudecluster.

Every failure a user can act on is a :class:`ClusterError`. Third-party failures (git,
sqlite, subprocesses, HTTP) are translated into these at one boundary each, with the
original exception chained as ``__cause__``. The server and the CLI catch ``ClusterError``
in one place and show ``str(error)``; anything else is a bug and is logged with its
traceback.

::

    ClusterError
    ├── ConfigError                 bad settings or arguments
    │   ├── ScenarioError           a scripted-model scenario file is invalid
    │   └── PlanValidationError     a task list is not a valid DAG (cycle, unknown dep, …)
    ├── NotFoundError               unknown plan or task id (the message lists known ones)
    ├── StateError                  the operation does not fit the current state
    │   └── EngineBusyError         another process runs the engine of this repository
    ├── RepositoryError             not a git repository, path outside it, bad ref name
    │   ├── DirtyWorktreeError      refusing to touch a working tree with local changes
    │   └── GitError                a git command failed (its stderr is in the message)
    ├── StoreError                  the state database cannot be opened, read or written
    ├── DiskFullError               a disk (or quota) filled up; the message says doing what
    ├── ClaudeNotFoundError         no `claude` executable where we looked
    │   └── ClaudeVersionError      `claude` is there but too old or unusable
    ├── ModelUnavailableError       the model API is unreachable or refuses our credentials
    └── AgentError                  an agent run could not be started or supervised
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

__all__ = [
    "AgentError",
    "ClaudeNotFoundError",
    "ClaudeVersionError",
    "ClusterError",
    "ConfigError",
    "DirtyWorktreeError",
    "DiskFullError",
    "EngineBusyError",
    "GitError",
    "ModelUnavailableError",
    "NotFoundError",
    "PlanValidationError",
    "RepositoryError",
    "ScenarioError",
    "StateError",
    "StoreError",
    "leaves",
    "single_errors",
]


class ClusterError(Exception):
    """Base of every error claudecluster reports to a user."""


class ConfigError(ClusterError):
    """A setting, argument or input file is invalid; the message names it."""


class ScenarioError(ConfigError):
    """A scripted-model scenario is invalid or cannot be read."""


class PlanValidationError(ConfigError):
    """A task list is not a valid DAG; the message lists every problem."""


class NotFoundError(ClusterError):
    """An unknown plan or task id."""


class StateError(ClusterError):
    """The operation does not fit the current state (e.g. merging a plan still running)."""


class EngineBusyError(StateError):
    """Another process holds this repository's engine lease (``run`` or ``serve``)."""


class RepositoryError(ClusterError):
    """The repository, a path in it, or a ref name is unusable."""


class DirtyWorktreeError(RepositoryError):
    """A working tree has local changes we will not overwrite."""


class GitError(RepositoryError):
    """A git command failed."""


class StoreError(ClusterError):
    """The state database cannot be opened, migrated or written."""


class DiskFullError(ClusterError):
    """A disk or quota filled up; the message says what was being written and what was kept."""


class ClaudeNotFoundError(ClusterError):
    """The Claude Code CLI (`claude`) could not be found."""


class ClaudeVersionError(ClaudeNotFoundError):
    """The Claude Code CLI was found but is too old or does not run."""


class ModelUnavailableError(ClusterError):
    """The model API cannot be reached, or it refuses the credentials (not logged in)."""


class AgentError(ClusterError):
    """An agent process could not be started or supervised."""


def leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) exception groups, or ``[exc]``: anyio task groups wrap
    what their body raises, and a user's error must still be seen as itself."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in leaves(inner)]
    return [exc]


@contextlib.contextmanager
def single_errors() -> Iterator[None]:
    """Re-raise an exception group holding one error as that error."""
    try:
        yield
    except BaseExceptionGroup as group:
        found = leaves(group)
        if len(found) == 1 and isinstance(found[0], Exception):
            raise found[0] from None
        raise
