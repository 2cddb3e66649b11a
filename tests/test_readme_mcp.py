"""README.md documents the whole MCP surface: a tool, argument, resource template or prompt
added to the server without a line in the README's MCP section fails here."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from mcp import Client

from claudecluster_mcp.server import build_server

README = Path(__file__).parent.parent / "README.md"


def mcp_section() -> str:
    text = README.read_text()
    start = text.index("## The MCP server")
    end = text.index("\n## ", start + 1)
    return text[start:end]


@pytest.mark.anyio
async def test_every_tool_argument_resource_template_and_prompt_is_in_the_readme() -> None:
    mcp, _, _ = build_server()
    async with Client(mcp) as client:  # listing needs no running hub
        tools = (await client.list_tools()).tools
        templates = [t.uri_template for t in (await client.list_resource_templates()).resource_templates]
        prompts = [p.name for p in (await client.list_prompts()).prompts]
    section = mcp_section()
    # A tool's row: | `name` {arg, optional?, one \| other} | what it does |
    rows = {m[1]: set(re.findall(r"\w+", m[2])) for m in re.finditer(r"^\| `(\w+)` \{([^}]*)\}", section, re.M)}

    undocumented = [t.name for t in tools if t.name not in rows]
    missing_args = [
        f"{t.name}.{arg}" for t in tools if t.name in rows for arg in t.input_schema["properties"].keys() - rows[t.name]
    ]
    assert not undocumented, f"tools missing from README's tool table: {undocumented}"
    assert not missing_args, f"tool arguments missing from README's tool table: {missing_args}"
    assert [t for t in templates if f"`{t}`" not in section] == []
    assert [p for p in prompts if f"`{p}`" not in section] == []
    assert len(tools) == 8 and len(templates) == 2 and prompts
