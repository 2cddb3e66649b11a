"""Helpers shared by the benchmark scripts (run as `python bench/<script>.py`)."""

from __future__ import annotations

import subprocess
from pathlib import Path


def make_repo(path: Path) -> Path:
    """A fresh git repository with one empty commit on `main`."""
    path.mkdir(parents=True)
    for args in (["init", "-q", "-b", "main"], ["commit", "-q", "--allow-empty", "-m", "init"]):
        subprocess.run(["git", "-C", str(path), "-c", "user.name=b", "-c", "user.email=b@b", *args], check=True)
    return path


def write_scenario(n: int, latency: float, marker: str) -> dict[str, object]:
    """N scripted 2-turn tasks: task i (prompt holding `[<marker><i>]`) writes f<i>.txt, then says done."""
    return {
        "default_latency": latency,
        "rules": [
            {
                "name": f"r{i}",
                "match": f"[{marker}{i}]",
                "turns": [
                    {
                        "tools": [
                            {"name": "Write", "input": {"file_path": "{cwd}/f" + str(i) + ".txt", "content": "x\n"}}
                        ]
                    },
                    {"text": "done"},
                ],
            }
            for i in range(n)
        ],
    }
