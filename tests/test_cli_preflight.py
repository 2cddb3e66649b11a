"""The pre-flight model check: said once, before anything is dispatched, when agents could not
use the model (not logged in, key refused, API unreachable); silent when they can."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from claudecluster_mcp.engine import EngineSettings
from claudecluster_mcp.errors import ModelUnavailableError
from claudecluster_mcp.model_server import ScriptedModelServer, scripted_env
from claudecluster_mcp.preflight import check_model
from claudecluster_mcp.scenario import marker_rule

pytestmark = pytest.mark.anyio

WRITE_SCENARIO = {"rules": [marker_rule("w")]}

Settings = Callable[..., EngineSettings]
FreePort = Callable[[], int]


@pytest.fixture(autouse=True)
def no_credentials_of_our_own(monkeypatch: pytest.MonkeyPatch, home: Path) -> None:
    """Only what a test gives the agents counts: nothing from the machine running the tests."""
    for name in ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "ANTHROPIC_BASE_URL", "CLAUDE_CODE_OAUTH_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    for name in ("BEDROCK", "VERTEX", "FOUNDRY", "GATEWAY", "ANTHROPIC_AWS", "ANTHROPIC_GOOGLE_CLOUD", "MANTLE"):
        monkeypatch.delenv(f"CLAUDE_CODE_USE_{name}", raising=False)
    monkeypatch.delenv("CLAUDECLUSTER_SKIP_MODEL_CHECK", raising=False)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("CLAUDE_CONFIG_DIR", raising=False)


@pytest.fixture
def settings(engine_settings: Settings, home: Path) -> Settings:
    """``settings(**env)``: engine settings whose agents get the empty HOME and ``env`` only
    (no model), and an empty, isolated Claude config dir."""

    def make(**env: str) -> EngineSettings:
        engine = engine_settings(agent_env={"HOME": str(home), **env})
        assert engine.claude_config_dir is not None
        engine.claude_config_dir.mkdir(exist_ok=True)
        return engine

    return make


@pytest.fixture
def refusing_api() -> Iterator[str]:
    """A model API that refuses every key, as api.anthropic.com answers a bad one."""

    class Refuse(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.dumps(
                {"type": "error", "error": {"type": "authentication_error", "message": "invalid x-api-key"}}
            )
            self.send_response(401)
            self.send_header("content-type", "application/json")
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *args: Any) -> None:
            return None

    server = ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


async def test_a_reachable_model_with_a_key_passes_with_one_free_request(
    settings: Settings, model_server: Callable[[dict[str, Any]], ScriptedModelServer]
) -> None:
    model = model_server(WRITE_SCENARIO)

    await check_model(settings(**scripted_env(model.url)))

    assert [r.path for r in model.requests] == ["/v1/messages/count_tokens"]


async def test_nothing_listening_is_unreachable(settings: Settings, free_port: FreePort) -> None:
    url = f"http://127.0.0.1:{free_port()}"

    with pytest.raises(ModelUnavailableError) as caught:
        await check_model(settings(ANTHROPIC_BASE_URL=url, ANTHROPIC_API_KEY="k"))

    assert str(caught.value).startswith(f"the model API at {url} is unreachable: Connection refused")


async def test_a_refused_key_says_which_credentials(settings: Settings, refusing_api: str) -> None:
    with pytest.raises(ModelUnavailableError) as caught:
        await check_model(settings(ANTHROPIC_BASE_URL=refusing_api, ANTHROPIC_API_KEY="bad"))

    assert f"the model API at {refusing_api} refused ANTHROPIC_API_KEY (HTTP 401: invalid x-api-key)" in str(
        caught.value
    )


@pytest.mark.skipif(sys.platform == "darwin", reason="a macOS login lives in the keychain, which is not checked")
async def test_no_credentials_at_all_is_not_logged_in(settings: Settings) -> None:
    with pytest.raises(
        ModelUnavailableError, match=r"not logged in .*run `claude` and /login, or set ANTHROPIC_API_KEY"
    ):
        await check_model(settings())


@pytest.mark.parametrize(
    "login",
    ["credentials file", "stored API key", "apiKeyHelper", "CLAUDE_CODE_OAUTH_TOKEN"],
)
async def test_a_claude_code_login_is_enough(settings: Settings, refusing_api: str, login: str) -> None:
    # Without a key to send, the probe only asks whether the API answers; a 401 is expected.
    engine = settings(ANTHROPIC_BASE_URL=refusing_api)
    config_dir = engine.claude_config_dir
    assert config_dir is not None
    if login == "credentials file":
        (config_dir / ".credentials.json").write_text('{"claudeAiOauth": {}}')
    elif login == "stored API key":
        (config_dir / ".claude.json").write_text('{"primaryApiKey": "sk-stored"}')
    elif login == "apiKeyHelper":
        (config_dir / "settings.json").write_text('{"apiKeyHelper": "~/bin/key.sh"}')
    else:
        engine.agent_env["CLAUDE_CODE_OAUTH_TOKEN"] = "oauth-token"

    await check_model(engine)


async def test_another_provider_is_not_probed(settings: Settings, free_port: FreePort) -> None:
    unreachable = f"http://127.0.0.1:{free_port()}"

    await check_model(settings(CLAUDE_CODE_USE_BEDROCK="1", ANTHROPIC_BASE_URL=unreachable))


async def test_the_check_can_be_skipped(settings: Settings) -> None:
    await check_model(settings(CLAUDECLUSTER_SKIP_MODEL_CHECK="1"))


@pytest.mark.parametrize("problem", ["no credentials", "unreachable"])
def test_run_says_it_once_and_dispatches_nothing(
    tmp_path: Path,
    repo: Path,
    user_env: dict[str, str],
    cli: Callable[..., subprocess.CompletedProcess[str]],
    free_port: FreePort,
    model_server: Callable[[dict[str, Any]], ScriptedModelServer],
    problem: str,
) -> None:
    model = model_server(WRITE_SCENARIO)
    (tmp_path / "tasks.yaml").write_text(
        yaml.safe_dump({"tasks": [{"id": t, "prompt": f"[w] {t}"} for t in ("a", "b", "c")]})
    )
    env = {k: v for k, v in user_env.items() if not k.startswith(("ANTHROPIC_", "CLAUDE_CODE_"))}
    if problem == "no credentials":
        env |= {"ANTHROPIC_BASE_URL": model.url, "CLAUDE_CONFIG_DIR": str(tmp_path / "empty-config")}
        expected = "claudecluster: error: agents are not logged in to Claude"
    else:
        env |= {**scripted_env(f"http://127.0.0.1:{free_port()}")}
        expected = "claudecluster: error: the model API at http://127.0.0.1:"

    done = cli("run", "three tasks", "--tasks", str(tmp_path / "tasks.yaml"), cwd=repo, env=env)

    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.startswith(expected), done.stderr
    assert model.requests == []  # no agent asked the model anything
    assert not (repo / ".git" / "claudecluster" / "state.db").exists()  # no plan, no engine
