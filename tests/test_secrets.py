"""No secret is written anywhere: a key planted in a real agent's tool calls, text and tool
output is absent from the store, the transcripts and the reports, which show the redaction
marker instead; the state and transcript directories are private. Plus the redactor's parts:
the name rule, token shapes, a secret split across pty reads, and log records."""

from __future__ import annotations

import logging
import random
import secrets
import sqlite3
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from claudecluster_mcp.claude_cli import ClaudeBinary
from claudecluster_mcp.engine import Cluster
from claudecluster_mcp.model_server import ScriptedModelServer
from claudecluster_mcp.models import TaskSpec, TaskState
from claudecluster_mcp.redact import Redactor, is_secret_name, redact, redactor, register_secrets
from claudecluster_mcp.report import diffstats, to_json, to_markdown
from claudecluster_mcp.report_html import to_html
from claudecluster_mcp.scenario import bash_turn, marker_rule, write_turn
from claudecluster_mcp.settings import EngineSettings
from claudecluster_mcp.store import state_db_path

StartServer = Callable[[dict[str, Any]], ScriptedModelServer]
Settings = Callable[..., EngineSettings]

MARKER = b"[redacted:ANTHROPIC_API_KEY]"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def files_under(*roots: Path) -> list[Path]:
    return [p for root in roots for p in ([root] if root.is_file() else root.rglob("*")) if p.is_file()]


@pytest.mark.anyio
@pytest.mark.claude
async def test_a_key_in_an_agents_tool_calls_is_written_nowhere_and_the_state_is_private(
    claude: ClaudeBinary,
    repo: Path,
    model_server: StartServer,
    engine_settings: Settings,
    git: Callable[..., str],
) -> None:
    key = "fake-anthropic-key-" + secrets.token_hex(12)  # no well-known shape: the env rule must catch it
    rule = marker_rule(
        "A",
        {"text": f"I will check the key {key} first", **bash_turn(f"echo {key} | wc -c")},
        bash_turn("echo the key is $ANTHROPIC_API_KEY"),
        write_turn("a.txt", "from A\n"),  # a change, so that a commit is made
    )
    rule["turns"][-1] = {"text": f"A done: the key {key} works"}  # the summary in the commit message
    server = model_server({"rules": [rule]})
    base = engine_settings(server)
    settings = base.model_copy(update={"agent_env": {**base.agent_env, "ANTHROPIC_API_KEY": key}})

    async with Cluster.open(repo, workers=1, settings=settings, claude=claude) as cluster:
        plan = (await cluster.plan("use the key", [TaskSpec(id="A", prompt="[A] check the key")])).plan
        await cluster.dispatch(plan.id)
        with anyio.fail_after(90):
            status = await cluster.wait(plan.id)
        assert status.task("A").state is TaskState.MERGED, status.task("A").reason
        stats = await diffstats(repo, status.tasks)
        for name, text in [("json", to_json(status, stats)), ("md", to_markdown(status, stats))]:
            (settings.state_dir / f"report.{name}").write_text(text)
        (settings.state_dir / "report.html").write_text(to_html(status, stats))

    db = await state_db_path(repo)
    with sqlite3.connect(db) as conn:
        events = [row[0] for row in conn.execute("SELECT data FROM events WHERE task_id = 'A'")]
    # The agent really saw and used the key: its tool calls and their output are recorded.
    assert any(MARKER.decode() in e and "wc -c" in e for e in events), events
    assert any(MARKER.decode() in e and "the key is" in e for e in events), events
    transcripts = list((settings.state_dir / "logs").rglob("*.log"))
    assert transcripts
    assert any(MARKER in t.read_bytes() for t in transcripts)

    written = files_under(settings.state_dir, db.parent)
    assert {p.name for p in written} >= {"state.db", "registry.db", "report.json", "report.md", "report.html"}
    leaks = [str(p) for p in written if key.encode() in p.read_bytes()]
    assert leaks == [], f"the key was written to {leaks}"
    history = git(repo, "log", "--all", "--format=%B")
    assert "the key [redacted:ANTHROPIC_API_KEY] works" in history
    assert key not in history

    # Private: 0700 directories, 0600 files for the state db, the registry and transcripts.
    state = settings.state_dir
    for directory in [db.parent, state, state / "logs", state / "logs" / plan.id, state / "worktrees"]:
        assert mode(directory) == 0o700, directory
    for file in [db, state / "registry.db", *transcripts, *db.parent.glob("state.db-*")]:
        assert mode(file) == 0o600, file


# -- the parts ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "secret"),
    [
        ("ANTHROPIC_API_KEY", True),
        ("ANTHROPIC_AUTH_TOKEN", True),
        ("CLAUDECLUSTER_TOKEN", True),
        ("CLAUDE_CODE_OAUTH_TOKEN", True),
        ("AWS_SECRET_ACCESS_KEY", True),
        ("AWS_SESSION_TOKEN", True),
        ("GOOGLE_APPLICATION_CREDENTIALS", True),
        ("DB_PASSWORD", True),
        ("GITHUB_APIKEY", True),
        ("MAX_THINKING_TOKENS", False),
        ("CLAUDE_CODE_MAX_OUTPUT_TOKENS", False),
        ("PWD", False),
        ("SSH_AUTH_SOCK", False),
        ("ANTHROPIC_BASE_URL", False),
    ],
)
def test_which_variables_hold_secrets(name: str, secret: bool) -> None:
    assert is_secret_name(name) is secret


def test_short_values_and_non_secret_names_are_left_alone() -> None:
    env = {"MY_TOKEN": "true", "MAX_THINKING_TOKENS": "32000000", "ANTHROPIC_API_KEY": "k" * 20}
    text = "true 32000000 " + "k" * 20
    assert redactor(env).text(text) == "true 32000000 [redacted:ANTHROPIC_API_KEY]"


@pytest.mark.parametrize(
    ("token", "label"),
    [
        ("sk-ant-api03-" + "Ab1_-" * 18, "anthropic-key"),
        ("ghp_" + "a1B2" * 9, "github-token"),
        ("AKIA" + "ABCDEFGHIJ234567", "aws-access-key-id"),
        ("xoxb-1234567890-abcdefghij", "slack-token"),
        ("-----BEGIN RSA PRIVATE KEY-----\\nMIIEowIBAAKCAQEA\\n-----END RSA PRIVATE KEY-----", "private-key"),
        ("Bearer abcdefghijklmnopqrstuvwxyz0123", "bearer-token"),
    ],
)
def test_well_known_token_shapes_are_redacted_anywhere(token: str, label: str) -> None:
    assert redact(f"before {token} after") == f"before [redacted:{label}] after"


def test_a_secret_split_across_reads_never_reaches_the_transcript() -> None:
    key = "split-secret-" + secrets.token_hex(16)
    shaped = "sk-ant-api03-" + secrets.token_urlsafe(60)
    red = Redactor({key: "ANTHROPIC_API_KEY"})
    stream = ('{"type":"tool","input":"' + key + '", "x": "' + shaped + '", "t": "é…"}\n').encode() * 40
    at_once = red.stream()
    whole = at_once.feed(stream) + at_once.close()
    rng = random.Random(7)
    for _ in range(200):
        transcript, out, at = red.stream(), b"", 0
        while at < len(stream):
            size = rng.randint(1, 97)
            out += transcript.feed(stream[at : at + size])
            at += size
        out += transcript.close()
        assert out == whole
    assert key.encode() not in whole and shaped.encode() not in whole
    assert whole.count(b"[redacted:ANTHROPIC_API_KEY]") == 40
    assert whole.count(b"[redacted:anthropic-key]") == 40


def test_the_packages_log_records_are_redacted(caplog: pytest.LogCaptureFixture) -> None:
    key = "log-secret-" + secrets.token_hex(8)
    register_secrets({"CLAUDECLUSTER_TOKEN": key})
    logger = logging.getLogger("claudecluster_mcp.some.module.made.later")
    with caplog.at_level(logging.INFO, logger="claudecluster_mcp"):
        logger.info("token is %s", key)
        try:
            raise RuntimeError(f"refused {key}")
        except RuntimeError:
            logger.exception("failed")
    text = caplog.text
    assert key not in text
    assert text.count("[redacted:CLAUDECLUSTER_TOKEN]") == 2
    # Other libraries' records are not touched.
    assert (
        "[redacted"
        not in logging.getLogger("somebody.else")
        .makeRecord("somebody.else", logging.INFO, __file__, 1, key, None, None)
        .getMessage()
    )


def test_a_secret_value_shaped_like_a_token_is_named_after_its_variable() -> None:
    key = "sk-ant-api03-" + secrets.token_urlsafe(30)
    red = Redactor({key: "ANTHROPIC_API_KEY"})
    assert red.text(f"a {key} b") == "a [redacted:ANTHROPIC_API_KEY] b"
    transcript = red.stream()
    assert transcript.feed(f"a {key} b\n".encode()) + transcript.close() == b"a [redacted:ANTHROPIC_API_KEY] b\n"
