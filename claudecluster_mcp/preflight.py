"""Pre-flight model check: is the model API reachable, and will it accept the agents'
credentials? Said once, before any task starts, instead of every agent failing with
"Not logged in".

What is checked follows what Claude Code itself uses, in the environment agents will get
(``EngineSettings.agent_env`` over ``os.environ``; ``EngineSettings.claude_config_dir``):

- another provider (``CLAUDE_CODE_USE_BEDROCK``, ``_VERTEX``, …): nothing to check here;
- ``ANTHROPIC_API_KEY`` / ``ANTHROPIC_AUTH_TOKEN``: one free authenticated request,
  ``POST /v1/messages/count_tokens`` at ``$ANTHROPIC_BASE_URL`` (default
  https://api.anthropic.com). 401/403 means the credentials are refused; no answer at all
  means the API is unreachable; any other answer (even 400 or 5xx) means both are fine;
- otherwise a Claude Code login (``CLAUDE_CODE_OAUTH_TOKEN``, ``.credentials.json`` in the
  config dir, a stored API key, an ``apiKeyHelper``, or the macOS keychain) and a reachable
  API; with none of them the agents are not logged in.

The check errs on the side of letting a run start: only a certain problem stops it.
``CLAUDECLUSTER_SKIP_MODEL_CHECK=1`` skips it altogether.
"""

from __future__ import annotations

import json
import logging
import os
import ssl
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import anyio

from .errors import ModelUnavailableError
from .settings import EngineSettings

__all__ = ["DEFAULT_BASE_URL", "SKIP_VAR", "Credentials", "check_model", "find_credentials", "other_provider"]

logger = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.anthropic.com"
SKIP_VAR = "CLAUDECLUSTER_SKIP_MODEL_CHECK"
_OTHER_PROVIDERS = ("BEDROCK", "VERTEX", "FOUNDRY", "GATEWAY", "ANTHROPIC_AWS", "ANTHROPIC_GOOGLE_CLOUD", "MANTLE")
_PROBE_TIMEOUT = 10.0
_NOT_LOGGED_IN = "agents are not logged in to Claude: run `claude` and /login, or set ANTHROPIC_API_KEY"


@dataclass(frozen=True)
class Credentials:
    """How agents will authenticate: ``source`` names it for people; ``headers`` are what the
    probe can send to prove it (empty for a login only Claude Code can use)."""

    source: str
    headers: dict[str, str] = field(default_factory=dict)


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() not in ("", "0", "false", "no", "off")


def _config_dir(env: Mapping[str, str], config_dir: Path | None) -> Path:
    if config_dir is not None:
        return config_dir
    if env.get("CLAUDE_CONFIG_DIR"):
        return Path(env["CLAUDE_CONFIG_DIR"])
    return Path(env.get("HOME") or Path.home()) / ".claude"


def _json_keys(path: Path) -> set[str]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return set()
    return set(data) if isinstance(data, dict) else set()


def other_provider(env: Mapping[str, str]) -> str | None:
    """The ``CLAUDE_CODE_USE_*`` variable that routes agents to another provider, if any."""
    return next((f"CLAUDE_CODE_USE_{p}" for p in _OTHER_PROVIDERS if _truthy(env.get(f"CLAUDE_CODE_USE_{p}"))), None)


def find_credentials(
    env: Mapping[str, str], config_dir: Path | None = None, repo: Path | None = None
) -> Credentials | None:
    """The credentials a ``claude`` process with ``env`` (and ``config_dir`` as its
    ``CLAUDE_CONFIG_DIR``) would use, or None when it has none."""
    headers = {}
    if env.get("ANTHROPIC_API_KEY"):
        headers["x-api-key"] = env["ANTHROPIC_API_KEY"]
    if env.get("ANTHROPIC_AUTH_TOKEN"):
        headers["authorization"] = f"Bearer {env['ANTHROPIC_AUTH_TOKEN']}"
    if headers:
        names = [n for n in ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN") if env.get(n)]
        return Credentials(" and ".join(names), headers)
    if env.get("CLAUDE_CODE_OAUTH_TOKEN") or env.get("CLAUDE_CODE_OAUTH_TOKEN_FILE_DESCRIPTOR"):
        return Credentials("CLAUDE_CODE_OAUTH_TOKEN")
    folder = _config_dir(env, config_dir)
    if (folder / ".credentials.json").is_file():
        return Credentials(f"Claude Code login ({folder / '.credentials.json'})")
    home = Path(env.get("HOME") or Path.home())
    for state in (folder / ".claude.json", home / ".claude.json"):
        if "primaryApiKey" in _json_keys(state):
            return Credentials(f"API key stored by Claude Code ({state})")
    settings = [folder / "settings.json", Path("/etc/claude-code/managed-settings.json")]
    if repo is not None:
        settings += [repo / ".claude" / "settings.json", repo / ".claude" / "settings.local.json"]
    for path in settings:
        if "apiKeyHelper" in _json_keys(path):
            return Credentials(f"apiKeyHelper in {path}")
    if sys.platform == "darwin":  # the login lives in the keychain, which we do not read
        return Credentials("Claude Code login (macOS keychain)")
    return None


def _proxies(env: Mapping[str, str], url: str) -> dict[str, str]:
    """The proxies the agents' environment asks for (``HTTPS_PROXY``, ``NO_PROXY``, …)."""
    found = {
        scheme: value
        for scheme in ("http", "https")
        if (value := env.get(f"{scheme}_proxy") or env.get(f"{scheme.upper()}_PROXY"))
    }
    host = urllib.parse.urlparse(url).hostname or ""
    if host in ("localhost", "::1") or host.startswith("127."):
        return {}
    for entry in (env.get("no_proxy") or env.get("NO_PROXY") or "").split(","):
        entry = entry.strip().lower().lstrip(".").rsplit(":", 1)[0] if entry.strip() != "*" else "*"
        if entry and (entry == "*" or host == entry or host.endswith("." + entry)):
            return {}
    return found


def _tls(env: Mapping[str, str]) -> ssl.SSLContext:
    context = ssl.create_default_context()
    for name in ("SSL_CERT_FILE", "NODE_EXTRA_CA_CERTS"):  # what the agents' TLS also trusts
        if env.get(name) and Path(env[name]).is_file():
            context.load_verify_locations(cafile=env[name])
    return context


def _post(url: str, headers: dict[str, str], body: bytes, env: Mapping[str, str]) -> tuple[int, str]:
    """POST and return (HTTP status, error message of the body). Raises ``OSError`` when no
    HTTP answer came (``URLError`` and timeouts are ``OSError``s)."""
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler(_proxies(env, url)), urllib.request.HTTPSHandler(context=_tls(env))
    )
    # The caller checked the scheme is http(s): nothing else reaches urlopen.
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")  # noqa: S310
    try:
        with opener.open(request, timeout=_PROBE_TIMEOUT) as response:
            return int(response.status), ""
    except urllib.error.HTTPError as exc:
        try:
            error = json.loads(exc.read()).get("error", {})
            message = str(error.get("message", "")) if isinstance(error, dict) else ""
        except (ValueError, AttributeError, OSError):
            message = ""
        return exc.code, message


def _reason(exc: OSError) -> str:
    reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    if isinstance(reason, TimeoutError):
        return f"no answer within {_PROBE_TIMEOUT:g} s"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    return str(reason) or type(reason).__name__


async def check_model(settings: EngineSettings, *, repo: Path | None = None) -> None:
    """Raise :class:`ModelUnavailableError` when agents started with ``settings`` could not
    use the model: not logged in, credentials refused, or the API unreachable. ``repo``
    adds its ``.claude/settings*.json`` to where an ``apiKeyHelper`` is looked for."""
    env = {**os.environ, **settings.agent_env}
    if _truthy(env.get(SKIP_VAR)):
        return
    provider = other_provider(env)
    if provider is not None:
        logger.info("model check skipped: %s routes agents to another provider", provider)
        return
    credentials = find_credentials(env, settings.claude_config_dir, repo)
    if credentials is None:
        raise ModelUnavailableError(_NOT_LOGGED_IN)
    base = (env.get("ANTHROPIC_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
    if not base.startswith(("http://", "https://")):
        raise ModelUnavailableError(f"ANTHROPIC_BASE_URL={base!r} is not an http(s) URL")
    url = base + "/v1/messages/count_tokens"
    headers = {
        "content-type": "application/json",
        "anthropic-version": "2023-06-01",
        "user-agent": "claudecluster-preflight",
        **credentials.headers,
    }
    body = json.dumps(
        {"model": settings.model or "claude-sonnet-4-5", "messages": [{"role": "user", "content": "ping"}]}
    ).encode()
    started = time.monotonic()
    try:
        with anyio.fail_after(_PROBE_TIMEOUT + 5):  # DNS lookups ignore the socket timeout
            status, message = await anyio.to_thread.run_sync(
                lambda: _post(url, headers, body, env), abandon_on_cancel=True
            )
    except OSError as exc:  # also the timeouts (TimeoutError is an OSError)
        raise ModelUnavailableError(
            f"the model API at {base} is unreachable: {_reason(exc)} "
            "(check ANTHROPIC_BASE_URL, the network and any proxy)"
        ) from exc
    logger.info("model check: %s answered %d in %.0f ms", url, status, (time.monotonic() - started) * 1000)
    if status in (401, 403) and credentials.headers:
        detail = f"HTTP {status}" + (f": {message}" if message else "")
        raise ModelUnavailableError(
            f"the model API at {base} refused {credentials.source} ({detail}): "
            "fix or unset it, or run `claude` and /login"
        )
