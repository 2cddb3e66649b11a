"""``crash_worker.py`` with one more way to die: given ``kill-after-batch-swap``, the engine
kills itself (SIGKILL) right after the compare-and-swap of a merge batch of several tasks
moved the integration branch, before its journal entry is closed and the tasks recorded.
Usage: python batch_crash_worker.py SETTINGS_JSON TASKS_JSON REPO PLAN_ID_FILE [kill-after-batch-swap]"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

import anyio
from crash_worker import main

from claudecluster_mcp.store import Store


def kill_after_batch_swap() -> None:
    begin, end = Store.begin_merge, Store.end_merge
    batches: set[int] = set()

    async def begin_merge(self: Store, *args: Any, batch: Sequence[str] = ()) -> int:
        seq = await begin(self, *args, batch=batch)
        if len(batch) > 1:
            batches.add(seq)
        return seq

    async def end_merge(self: Store, seq: int, state: str) -> None:
        if seq in batches and state == "done":
            os.kill(os.getpid(), signal.SIGKILL)
        await end(self, seq, state)

    Store.begin_merge = begin_merge  # type: ignore[method-assign]
    Store.end_merge = end_merge  # type: ignore[method-assign]


if __name__ == "__main__":
    if sys.argv[5:6] == ["kill-after-batch-swap"]:
        kill_after_batch_swap()
    anyio.run(main, *sys.argv[1:5])
