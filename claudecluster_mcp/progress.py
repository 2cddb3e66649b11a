"""Progress of work that takes a while (a planning agent, a merge's gate), for callers that
want to hear about it (the MCP tools pass ``ctx.report_progress``, which sends nothing when
the client gave no progress token).

A :class:`Ticker` reports each new stage at once and, while a stage lasts, a heartbeat every
few seconds with the time spent, so a client (and any proxy between) sees the call is alive.
The progress value only ever grows, as MCP requires::

    async with ticking(on_progress) as ticker:
        await ticker.stage("running the gate: pytest -q")
        ...
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import anyio

__all__ = ["HEARTBEAT_SECONDS", "Progress", "Ticker", "ticking"]

#: ``(progress, total, message)``: the shape of the MCP SDK's ``Context.report_progress``.
Progress = Callable[[float, float | None, str], Awaitable[None]]

HEARTBEAT_SECONDS = 2.0


class Ticker:
    """Reports stages and heartbeats to ``report`` (nothing when it is None)."""

    def __init__(self, report: Progress | None, every: float = HEARTBEAT_SECONDS) -> None:
        self._report = report
        self._every = every
        self._count = 0
        self._message = ""
        self._since = anyio.current_time()

    async def stage(self, message: str) -> None:
        """A new stage begins: report it now."""
        self._message = message
        self._since = anyio.current_time()
        await self._send(message)

    def note(self, message: str) -> None:
        """What the current stage is doing now; the next heartbeat says it."""
        self._message = message

    async def _send(self, message: str) -> None:
        if self._report is not None:
            self._count += 1
            await self._report(self._count, None, message)

    async def beat(self) -> None:
        """Report until cancelled: the current stage and how long it has lasted."""
        while True:
            await anyio.sleep(self._every)
            if self._message:
                await self._send(f"{self._message} ({anyio.current_time() - self._since:.0f}s)")


@asynccontextmanager
async def ticking(report: Progress | None, every: float = HEARTBEAT_SECONDS) -> AsyncIterator[Ticker]:
    """A :class:`Ticker` beating for the duration of the block (idle without ``report``)."""
    ticker = Ticker(report, every)
    if report is None:
        yield ticker
        return
    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker.beat)
        try:
            yield ticker
        finally:
            tg.cancel_scope.cancel()
