"""Runs the engine in its own process for the crash test: plan, dispatch, then wait to be
killed. Usage: python crash_worker.py SETTINGS_JSON TASKS_JSON REPO PLAN_ID_FILE"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import anyio

from claudecluster_mcp.engine import Cluster, EngineSettings


async def main(settings_json: str, tasks_json: str, repo: str, plan_file: str) -> None:
    settings = EngineSettings.model_validate_json(settings_json)
    async with Cluster.open(Path(repo), settings=settings) as cluster:
        status = await cluster.plan("crash test", json.loads(tasks_json))
        await cluster.dispatch(status.plan.id)
        Path(plan_file).write_text(status.plan.id)
        await anyio.sleep_forever()


if __name__ == "__main__":
    anyio.run(main, *sys.argv[1:5])
