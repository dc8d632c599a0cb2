"""The configuration file: TOML, one file for every process kind.

Top-level keys are the control plane's settings (``Settings`` in sidecar/config.py, the same
names as ``SPAUTH_<NAME>``); the ``[sidecar]`` table holds the sidecar's (``SidecarSettings``,
``SPAUTH_SIDECAR_<NAME>``). ``spauth serve`` reads both. The environment overrides the file and
flags override both. Relative paths in the file are relative to the file's directory."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from sidecar.config import (
    FLAG_SOURCE,
    ConfigError,
    Settings,
    SidecarSettings,
    load_settings,
    load_sidecar_settings,
)

SIDECAR_TABLE = "sidecar"
_SECRET_NAME = re.compile(r"token|secret|password|encryption_key$|webhook_key")
_URL_PASSWORD = re.compile(r"^([a-z][a-z0-9+.-]*://[^:/@]*):[^@/]*@", re.IGNORECASE)


@dataclass(frozen=True)
class ConfigFile:
    """The raw values of one file, split by process kind."""

    path: Path | None = None
    control_plane: dict[str, object] = field(default_factory=dict)
    sidecar: dict[str, object] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return str(self.path) if self.path else "config file"


def read_config_file(path: Path | None) -> ConfigFile:
    """Parse ``path`` (None: no file). Raises ConfigError naming the file and the line."""
    if path is None:
        return ConfigFile()
    try:
        doc = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    sidecar = doc.pop(SIDECAR_TABLE, {})
    if not isinstance(sidecar, dict):
        raise ConfigError(f"{path}: [{SIDECAR_TABLE}] must be a table")
    base = path.parent
    return ConfigFile(
        path, _resolve_paths(doc, Settings, base), _resolve_paths(sidecar, SidecarSettings, base)
    )


def _resolve_paths(values: dict[str, object], cls: type, base: Path) -> dict[str, object]:
    hints = typing.get_type_hints(cls)
    out = dict(values)
    for name, value in values.items():
        kind = hints.get(name)
        if kind is not None and Path in _types(kind) and isinstance(value, str) and value:
            out[name] = str(base / value)  # an absolute value replaces base
    return out


def _types(kind: object) -> tuple[object, ...]:
    args = typing.get_args(kind)
    return args if args else (kind,)


def load_control_plane_config(
    path: Path | None,
    flags: Mapping[str, object] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """The control plane's settings from the file's top level, the environment and flags."""
    cfg = read_config_file(path)
    return load_settings(flags, environ, cfg.control_plane, cfg.label)


def load_sidecar_config(
    path: Path | None,
    flags: Mapping[str, object] | None = None,
    environ: Mapping[str, str] | None = None,
    defaults: Mapping[str, object] | None = None,
) -> SidecarSettings:
    """The sidecar's settings from the file's ``[sidecar]`` table, the environment and flags.
    ``defaults`` apply where the file says nothing (``spauth serve`` turns the separate metrics
    port off that way)."""
    cfg = read_config_file(path)
    values = {**(defaults or {}), **cfg.sidecar}
    label = f"{cfg.label} [{SIDECAR_TABLE}]"
    return load_sidecar_settings(flags, environ, values, label)


def effective(
    settings: Settings | SidecarSettings,
    file_values: Mapping[str, object],
    flags: Mapping[str, object] | None = None,
    environ: Mapping[str, str] | None = None,
) -> list[tuple[str, str, str]]:
    """``(name, value, source)`` for every setting, secrets redacted."""
    env = os.environ if environ is None else environ
    prefix = "SPAUTH_SIDECAR_" if isinstance(settings, SidecarSettings) else "SPAUTH_"
    rows = []
    for f in dataclasses.fields(settings):
        name = f.name
        if (flags or {}).get(name) is not None:
            source = FLAG_SOURCE
        elif env.get(f"{prefix}{name.upper()}"):
            source = f"{prefix}{name.upper()}"
        elif name in file_values:
            source = "config file"
        else:
            source = "default"
        rows.append((name, _show(name, getattr(settings, name)), source))
    return rows


def _show(name: str, value: object) -> str:
    if value is None:
        return '""'
    if isinstance(value, str) and value and _SECRET_NAME.search(name):
        return '"<redacted>"'
    if isinstance(value, str):
        value = _URL_PASSWORD.sub(r"\1:<redacted>@", value)
    if isinstance(value, Path):
        value = str(value)
    return json.dumps(value)


def render(title: str, rows: list[tuple[str, str, str]]) -> str:
    """TOML-looking text: one ``name = value  # source`` line per setting."""
    width = max(len(f"{n} = {v}") for n, v, _ in rows)
    lines = [title]
    lines.extend(f"{f'{n} = {v}':<{width}}  # {s}" for n, v, s in rows)
    return "\n".join(lines)
