"""The per-run reaper: a tiny launcher between the engine and one ``claude`` process.

An agent's Bash command can leave processes that drop everything identifying their run:
``(env -i setsid sleep 1000 &)`` clears the environment tag, leaves the session and is
orphaned at once. With one child subreaper for the whole engine, such an orphan lands on
the engine with nothing saying which of many concurrent runs it came from. So each run
gets its own subreaper: :class:`~claudecluster_mcp.agent.AgentRun` starts

    python -I -S .../reaper.py -- claude -p …

on the pty. The reaper makes itself a child subreaper (``PR_SET_CHILD_SUBREAPER``), starts
``claude`` as its child on the same pty (same session and process group, so the terminal
behaves as if ``claude`` were started directly), forwards the signals the engine sends
(SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2), and reaps whatever is re-parented to
it. When ``claude`` exits, every process still below the reaper belongs to this run and
nothing else: it is killed and reaped (no zombie is left), and the reaper then exits the
way ``claude`` did (same exit code, or the same signal), so the run's outcome stays truthful.

While the reaper lives, everything the run started is in its process subtree, which is
how the engine's sweep (:class:`~claudecluster_mcp.proctree.ProcessTree`) and crash
recovery find it without relying on the environment tag.

Run as a script with the standard library only (``-S``: no site-packages to import) and
as few imports as possible (``_signal`` rather than ``signal``'s enums, no ``contextlib``):
it adds about 10 ms to an agent's start.
"""

from __future__ import annotations

import ctypes
import os
import sys
import time

MYPY = False  # `typing` itself would cost more start-up time than the reaper's own work
if MYPY:
    import signal
else:  # the C module: the same functions and numbers, without importing enum
    import _signal as signal

__all__ = ["FORWARDED_SIGNALS", "descendants", "main", "sweep"]

_PR_SET_CHILD_SUBREAPER = 36
#: Signals passed on to ``claude`` (the engine's SIGINT → SIGTERM escalation among them).
FORWARDED_SIGNALS = (
    signal.SIGINT,
    signal.SIGTERM,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)
_SWEEP_LIMIT = 5.0


def descendants(root: int) -> list[int]:
    """Pids of every living process below ``root`` (from ``/proc``; parents before children)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        children.setdefault(int(fields[1]), []).append(int(entry))
    found: list[int] = []
    queue = list(children.get(root, []))
    while queue:
        pid = queue.pop()
        found.append(pid)
        queue.extend(children.get(pid, []))
    return found


def sweep(limit: float = _SWEEP_LIMIT) -> None:
    """SIGKILL every descendant of this process and reap them all, until none is left.

    As the subreaper, every descendant whose parent dies is re-parented to us, so "no
    child left to wait for" means the whole subtree is gone.
    """
    me = os.getpid()
    deadline = time.monotonic() + limit
    while True:
        for pid in descendants(me):
            try:  # noqa: SIM105 - contextlib would cost start-up time
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass  # gone meanwhile, or not ours to kill (a setuid program)
        try:
            while os.waitpid(-1, os.WNOHANG)[0] > 0:
                pass
        except ChildProcessError:
            return
        if time.monotonic() > deadline:
            return
        time.sleep(0.005)


def _become_subreaper() -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def _exit_like(status: int) -> int:
    """Exit the way the child did: re-raise its signal on ourselves, or return its code."""
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        try:
            import resource

            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a crash of claude, not ours
        except (ImportError, OSError, ValueError):
            pass
        try:  # noqa: SIM105
            signal.signal(number, signal.SIG_DFL)
        except (OSError, ValueError):
            pass  # SIGKILL has no handler to reset
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [number])
        os.kill(os.getpid(), number)
        return 128 + number  # a signal that does not terminate
    return os.waitstatus_to_exitcode(status)


def main(argv: list[str]) -> int:
    """Run ``argv[1:]`` (after an optional ``--``) under this reaper; returns the exit code."""
    command = argv[1:]
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        os.write(2, b"usage: reaper.py -- command [args...]\n")
        return 2
    _become_subreaper()
    child = [0]
    pending: list[int] = []

    def forward(number: int, _frame: object) -> None:
        if child[0]:
            try:  # noqa: SIM105
                os.kill(child[0], number)
            except ProcessLookupError:
                pass
        else:
            pending.append(number)

    for forwarded in FORWARDED_SIGNALS:
        signal.signal(forwarded, forward)
    try:
        # The interpreter ignores SIGPIPE and SIGXFSZ; claude gets the defaults (as with subprocess).
        child[0] = os.posix_spawnp(command[0], command, os.environ, setsigdef=(signal.SIGPIPE, signal.SIGXFSZ))
    except OSError as exc:
        os.write(2, f"claudecluster reaper: cannot start {command[0]}: {exc}\n".encode())
        return 127
    for number in pending:
        forward(number, None)
    while True:
        pid, status = os.waitpid(-1, 0)  # orphans re-parented to us are reaped on the way
        if pid == child[0]:
            break
    sweep()
    return _exit_like(status)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
