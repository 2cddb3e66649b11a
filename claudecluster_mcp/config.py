"""Configuration: command-line flags > ``CLAUDECLUSTER_*`` environment > ``claudecluster.toml``
(at the repository root) > defaults.

::

    # claudecluster.toml
    workers = 4
    model = "sonnet"
    permission_mode = "acceptEdits"
    allowed_tools = ["Bash(pytest *)", "Bash(git diff *)"]
    gate = ["pytest", "-q"]
    merge_policy = "resolve"
    max_budget_usd = 5.0
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from .errors import ConfigError
from .models import MergePolicy
from .settings import EngineSettings

__all__ = ["CONFIG_FILE", "ClusterConfig", "load_config", "render_config"]

CONFIG_FILE = "claudecluster.toml"


class ClusterConfig(BaseSettings, EngineSettings):
    """Every :class:`EngineSettings` field, loadable from ``claudecluster.toml`` and
    ``CLAUDECLUSTER_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="CLAUDECLUSTER_", extra="forbid", validate_default=True)

    def engine(self, **overrides: Any) -> EngineSettings:
        """The engine settings these stand for."""
        return EngineSettings.model_validate({**self.model_dump(), **overrides})


def _sources(toml: Path | None) -> type[ClusterConfig]:
    class _Config(ClusterConfig):
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
            if toml is not None:
                sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml))
            return tuple(sources)

    return _Config


def load_config(repo: Path | None, **flags: Any) -> ClusterConfig:
    """Settings for ``repo``: ``flags`` (None values ignored) > environment > the repo's
    ``claudecluster.toml`` > defaults. Bad values raise :class:`ConfigError` naming the key
    and where it came from."""
    toml = repo / CONFIG_FILE if repo is not None and (repo / CONFIG_FILE).is_file() else None
    if toml is not None:
        try:
            tomllib.loads(toml.read_text())
        except (tomllib.TOMLDecodeError, OSError) as exc:
            raise ConfigError(f"{toml} is not valid TOML: {exc}") from exc
    given = {k: v for k, v in flags.items() if v is not None}
    try:
        config = _sources(toml)(**given)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"]) or "config"
            origin = "flag" if key in given else f"CLAUDECLUSTER_{key.upper()} or {toml or CONFIG_FILE}"
            problems.append(f"{key} ({origin}): {err['msg']}")
        raise ConfigError("bad configuration: " + "; ".join(problems)) from exc
    return ClusterConfig.model_validate(config.model_dump())


def render_config(config: ClusterConfig) -> str:
    """``claudecluster.toml`` text for ``config`` (defaults left as comments)."""
    lines = ["# claudecluster configuration: flags > CLAUDECLUSTER_* environment > this file > defaults", ""]
    defaults = ClusterConfig.model_construct()
    for name, field in ClusterConfig.model_fields.items():
        value = _plain(getattr(config, name))
        text = _toml_value(value)
        lines.append(f"# {field.description}")
        prefix = "# " if value == _plain(getattr(defaults, name, None)) or value is None else ""
        lines.append(f"{prefix}{name} = {text if value is not None else '...'}")
    return "\n".join(lines) + "\n"


def _plain(value: Any) -> Any:
    if isinstance(value, MergePolicy):
        return value.value
    return str(value) if isinstance(value, Path) else value


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_value(str(k))} = {_toml_value(v)}" for k, v in value.items()) + "}"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
