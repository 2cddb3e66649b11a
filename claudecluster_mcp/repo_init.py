"""``claudecluster init``: set a repository up for claudecluster — a validated
``claudecluster.toml``, the MCP server registered in ``.mcp.json``, and a check of what agents
will need (the ``claude`` CLI, a login, the sandbox)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import anyio
from rich.console import Console
from rich.markup import escape

from .claude_cli import find_claude
from .commands import EXIT_OK
from .config import CONFIG_FILE, load_config, render_config
from .errors import ConfigError
from .isolation import sandbox_support
from .preflight import find_credentials, other_provider
from .workspace import repo_root

__all__ = ["init_command"]


async def init_command(
    console: Console, *, repo: Path | None, interactive: bool, force: bool, flags: dict[str, Any]
) -> int:
    """Write claudecluster.toml, register the server in .mcp.json, check `claude`."""
    from rich.prompt import IntPrompt, Prompt

    root = await repo_root(repo or Path.cwd())
    path = root / CONFIG_FILE
    if path.exists() and not force:
        raise ConfigError(f"{path} exists; use --force to overwrite it")
    if interactive:
        flags["workers"] = flags.get("workers") or IntPrompt.ask("agents at once", default=4, console=console)
        flags["model"] = (
            flags.get("model") or Prompt.ask("model (empty: claude's default)", default="", console=console) or None
        )
        gate = Prompt.ask("gate command run before each merge (empty: none)", default="", console=console)
        if gate and not flags.get("gate"):
            flags["gate"] = gate.split()
    config = load_config(None, **flags)  # validated before anything is written
    path.write_text(render_config(config))
    mcp_path = root / ".mcp.json"
    try:
        mcp = json.loads(mcp_path.read_text()) if mcp_path.exists() else {}
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{mcp_path} is not valid JSON ({exc}); fix it or remove it, then run init again") from exc
    command = str(Path(sys.argv[0]).resolve()) if Path(sys.argv[0]).name == "claudecluster" else "claudecluster"
    mcp.setdefault("mcpServers", {})["claudecluster"] = {
        "type": "stdio",
        "command": command,
        "args": ["serve"],
        "env": {},
    }
    mcp_path.write_text(json.dumps(mcp, indent=2) + "\n")
    console.print(
        f"wrote {path}\nregistered the MCP server in {mcp_path} (Claude Code asks to approve it on first use)"
    )
    found = await anyio.to_thread.run_sync(find_claude, config.claude_bin)
    console.print(f"claude {found.version} at {found.path}")
    support = sandbox_support()
    console.print(escape(support.describe()))
    if config.isolation == "sandbox" and not support.available:
        console.print('[yellow]agents will not start until the sandbox is installed, or isolation = "none" is set.[/]')
    credentials = find_credentials(os.environ, repo=root)
    source = other_provider(os.environ) or (credentials.source if credentials else None)
    if source is not None:
        console.print(f"authentication: {escape(source)}")
    else:
        console.print(
            "[yellow]authentication: none found.[/] Run `claude` once and log in (`/login`), or set "
            "ANTHROPIC_API_KEY, before `claudecluster run` uses the real model."
        )
    return EXIT_OK
