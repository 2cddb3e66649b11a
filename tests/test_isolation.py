"""Isolation levels without an agent: what is available, what is refused, the settings and
argv an agent gets, and the merge gate confined (scrubbed environment, private TMPDIR, a
read-only file system under ``sandbox``). The gate runs for real, in bubblewrap."""

from __future__ import annotations

import json
import socket
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from claudecluster_mcp.agent_spec import AgentSpec, build_argv
from claudecluster_mcp.config import load_config
from claudecluster_mcp.errors import ConfigError
from claudecluster_mcp.isolation import (
    SandboxPolicy,
    claude_sandbox_settings,
    require_isolation,
    sandbox_support,
)
from claudecluster_mcp.merge import run_gate
from claudecluster_mcp.models import Plan, PlanStatus, Task
from claudecluster_mcp.report import to_json, to_markdown
from claudecluster_mcp.report_html import to_html
from claudecluster_mcp.settings import EngineSettings
from claudecluster_mcp.views import StatusView

pytestmark = pytest.mark.anyio

Git = Callable[..., str]
ON_PATH = {"bwrap": "/usr/bin/bwrap", "socat": "/usr/bin/socat", "sandbox-exec": "/usr/bin/sandbox-exec"}


def which_only(*names: str) -> Callable[[str], str | None]:
    return lambda name: ON_PATH[name] if name in names else None


@pytest.mark.parametrize(
    ("platform", "present", "available", "missing"),
    [
        ("linux", ("bwrap", "socat"), True, ()),
        ("linux", ("socat",), False, ("bwrap",)),
        ("linux", (), False, ("bwrap", "socat")),
        ("darwin", ("sandbox-exec",), True, ()),
        ("win32", ("bwrap", "socat"), False, ()),
    ],
)
def test_sandbox_support_names_what_is_missing(
    platform: str, present: tuple[str, ...], available: bool, missing: tuple[str, ...]
) -> None:
    support = sandbox_support(platform=platform, which=which_only(*present))
    assert (support.available, support.missing) == (available, missing)
    assert "isolation: sandbox" in support.describe()


def test_sandbox_where_it_is_missing_is_refused_with_what_to_install() -> None:
    support = sandbox_support(platform="linux", which=which_only("socat"))
    with pytest.raises(ConfigError) as caught:
        require_isolation("sandbox", support)
    message = str(caught.value)
    assert "\n" not in message
    assert "bwrap" in message and "apt-get install bubblewrap socat" in message
    assert 'isolation = "none"' in message
    require_isolation("none", support)  # never refused: it is the explicit choice


def test_the_default_is_sandbox_and_none_is_chosen_explicitly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert EngineSettings().isolation == "sandbox"
    assert EngineSettings().agent_options()["sandbox"] == SandboxPolicy()
    assert EngineSettings(isolation="none").agent_options()["sandbox"] is None
    monkeypatch.setenv("CLAUDECLUSTER_ISOLATION", "none")
    assert load_config(tmp_path).isolation == "none"
    monkeypatch.setenv("CLAUDECLUSTER_ISOLATION", "chroot")
    with pytest.raises(ConfigError, match="isolation"):
        load_config(tmp_path)


def test_sandbox_write_paths_are_absolute_or_start_with_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    settings = EngineSettings(sandbox_write_paths=[Path("~/.cache/pip")], sandbox_allowed_domains=["pypi.org"])
    policy = settings.sandbox_policy()
    assert policy == SandboxPolicy(write_paths=[tmp_path / ".cache/pip"], allowed_domains=["pypi.org"])
    with pytest.raises(ValueError, match="absolute"):
        EngineSettings(sandbox_write_paths=[Path("cache")])


def test_agents_load_only_user_settings_and_get_the_sandbox_on_argv(tmp_path: Path) -> None:
    policy = SandboxPolicy(write_paths=[Path("/cache")], allowed_domains=["pypi.org"])
    spec = AgentSpec(prompt="p", cwd=tmp_path, sandbox=policy)
    argv = build_argv(spec, Path("/bin/claude"), "s", tmpdir=Path("/tmp/ccrun-1"))
    assert "--setting-sources=user" in argv
    assert "--allowedTools=Bash" in argv  # inside the sandbox, every command may run
    settings = json.loads(next(a for a in argv if a.startswith("--settings="))[len("--settings=") :])
    assert settings == claude_sandbox_settings(policy, [tmp_path, Path("/tmp/ccrun-1")])
    sandbox = settings["sandbox"]
    assert sandbox["enabled"] and sandbox["failIfUnavailable"] and sandbox["autoAllowBashIfSandboxed"]
    assert sandbox["allowUnsandboxedCommands"] is False  # no dangerouslyDisableSandbox escape
    assert sandbox["filesystem"]["allowWrite"] == [str(tmp_path), "/tmp/ccrun-1", "/cache"]
    assert sandbox["network"]["allowedDomains"] == ["pypi.org"]
    unconfined = build_argv(AgentSpec(prompt="p", cwd=tmp_path), Path("/bin/claude"), "s")
    assert "--setting-sources=user" in unconfined
    assert not any(a.startswith("--settings=") for a in unconfined)


# -- the gate ---------------------------------------------------------------------------------


def gate(code: str) -> list[str]:
    return [sys.executable, "-c", code]


async def test_the_gate_gets_no_secrets_and_a_private_tmpdir(
    repo: Path, git: Git, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLAUDECLUSTER_TOKEN", "server-bearer-token")
    monkeypatch.setenv("GITHUB_TOKEN", "ghp_fake_secret")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-fake")
    monkeypatch.setenv("LANG", "C.UTF-8")
    show = "import json, os; print(json.dumps(dict(os.environ)))"
    verdict = await run_gate(repo, git(repo, "rev-parse", "HEAD").strip(), gate(show))
    assert verdict.ok, verdict.output
    env = json.loads(verdict.output)
    assert not {"CLAUDECLUSTER_TOKEN", "GITHUB_TOKEN", "ANTHROPIC_API_KEY"} & set(env)
    assert "server-bearer-token" not in verdict.output and "ghp_fake_secret" not in verdict.output
    assert env["LANG"] == "C.UTF-8" and env["PATH"]
    tmpdir = Path(env["TMPDIR"])
    assert tmpdir.name == "tmp" and tmpdir.parent.name.startswith("claudecluster-gate-")
    assert not tmpdir.exists()  # removed afterwards


@pytest.mark.sandbox
async def test_a_sandboxed_gate_cannot_write_outside_its_worktree(repo: Path, git: Git, tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    code = (
        "import os, pathlib, tempfile\n"
        "pathlib.Path('built.txt').write_text('ok')\n"  # its own worktree
        "tempfile.NamedTemporaryFile(delete=False).write(b'ok')\n"  # its TMPDIR
        f"for target in [{str(repo / 'evil.txt')!r}, {str(repo / '.git/hooks/post-merge')!r}, {str(outside)!r}]:\n"
        "    try:\n"
        "        open(target, 'w').write('pwned')\n"
        "    except OSError as exc:\n"
        "        print(target, exc)\n"
    )
    commit = git(repo, "rev-parse", "HEAD").strip()
    verdict = await run_gate(repo, commit, gate(code), sandbox=SandboxPolicy())
    assert verdict.ok, verdict.output
    assert verdict.output.count("Read-only file system") == 3, verdict.output
    assert not (repo / "evil.txt").exists()
    assert not (repo / ".git/hooks/post-merge").exists()
    assert not outside.exists()
    # The same gate unconfined writes the main checkout: the sandbox is what stopped it.
    await run_gate(repo, commit, gate(code))
    assert (repo / "evil.txt").read_text() == "pwned"


@pytest.mark.sandbox
async def test_a_sandboxed_gate_has_no_network_unless_domains_are_allowed(repo: Path, git: Git) -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        code = (
            "import socket\n"
            "try:\n"
            f"    socket.create_connection(('127.0.0.1', {port}), timeout=5); print('connected')\n"
            "except OSError as exc:\n"
            "    print('refused', exc)\n"
        )
        commit = git(repo, "rev-parse", "HEAD").strip()
        closed = await run_gate(repo, commit, gate(code), sandbox=SandboxPolicy())
        opened = await run_gate(repo, commit, gate(code), sandbox=SandboxPolicy(allowed_domains=["pypi.org"]))
    assert closed.output.startswith("refused"), closed.output
    assert opened.output.startswith("connected"), opened.output


async def test_a_sandboxed_gate_where_the_sandbox_is_missing_is_refused(
    repo: Path, git: Git, monkeypatch: pytest.MonkeyPatch
) -> None:
    commit = git(repo, "rev-parse", "HEAD").strip()
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(ConfigError, match='isolation "sandbox"'):
        await run_gate(repo, commit, ["true"], sandbox=SandboxPolicy())


def test_reports_and_status_say_when_agents_ran_unconfined(
    make_plan: Callable[..., Plan], make_task: Callable[..., Task]
) -> None:
    status = PlanStatus(plan=make_plan(), tasks=[make_task("a")], counts={"pending": 1})
    view = StatusView.of(status, workers=2, agents_running=0, isolation="none")
    assert view.isolation == "none" and "isolation none: agents run unconfined" in view.summary()
    assert "unconfined" not in StatusView.of(status, workers=2, agents_running=0, isolation="sandbox").summary()
    assert json.loads(to_json(status, isolation="none"))["isolation"] == "none"
    assert "- Isolation: **none** (agents and the gate ran unconfined)" in to_markdown(status, isolation="none")
    page = to_html(status, isolation="none")
    assert '<b id="isolation">isolation none: agents and the gate ran unconfined</b>' in page
    assert "- Isolation: **sandbox**" in to_markdown(status, isolation="sandbox")
