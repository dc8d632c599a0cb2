"""One typed, frozen configuration, read from flags and ``SPAUTH_*`` environment variables in one
place and validated at start-up with messages that name the setting. Nothing else reads
``os.environ``."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

from sidecar.core.errors import InvalidArgument
from sidecar.core.validation import parse_duration


class ConfigError(ValueError):
    """A setting has a bad value; the message names the setting and the value."""


@dataclass(frozen=True, slots=True)
class Settings:
    """Every setting of the control plane and the embedded product."""

    data_dir: Path = Path(".spauth")
    database_url: str = ""
    admin_addr: str = "127.0.0.1:50051"
    http_addr: str = "127.0.0.1:8080"
    sidecar_addr: str = "127.0.0.1:9191"
    key_default_lifetime: int = 90 * 86400
    key_max_lifetime: int = 365 * 86400
    sweep_interval: float = 5.0
    log_level: str = "info"
    # OAuth (issue 4). An empty issuer means http://<http_addr> (with the bound port).
    oauth_issuer: str = ""
    oauth_audience: str = "statuspulse-api"
    oauth_access_token_ttl: int = 3600
    oauth_refresh_token_ttl: int = 30 * 86400
    oauth_signing_key_rotation: int = 30 * 86400

    @property
    def store_url(self) -> str:
        """The database to open: ``database_url`` or the SQLite file in ``data_dir``."""
        return self.database_url or f"sqlite:///{self.data_dir / 'spauth.db'}"


_DURATIONS = {
    "key_default_lifetime",
    "key_max_lifetime",
    "oauth_access_token_ttl",
    "oauth_refresh_token_ttl",
    "oauth_signing_key_rotation",
}


def _convert(name: str, raw: object) -> object:
    if name == "data_dir":
        return Path(str(raw))
    if name in _DURATIONS:
        if isinstance(raw, int):
            return raw
        try:
            return parse_duration(str(raw), name)
        except InvalidArgument as exc:
            raise ConfigError(f"{name}: {exc.message.split(': ', 1)[1]}") from None
    if name == "sweep_interval":
        try:
            return float(str(raw))
        except ValueError:
            raise ConfigError(f"{name}: expected seconds, got {raw!r}") from None
    return str(raw)


def _check_addr(name: str, value: str) -> None:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{name}: expected HOST:PORT, got {value!r}")


def _check_oauth(settings: Settings) -> None:
    issuer = settings.oauth_issuer
    # RFC 8414 §2: an http(s) URL with no query or fragment; compared by exact string match.
    if issuer and (
        not issuer.startswith(("https://", "http://"))
        or any(c in issuer for c in "?#")
        or issuer.endswith("/")
        or len(issuer.split("/", 3)[2]) == 0
    ):
        raise ConfigError(
            f"oauth_issuer: expected an http(s) URL without query, fragment or trailing slash, "
            f"got {issuer!r}"
        )
    if not settings.oauth_audience.strip():
        raise ConfigError("oauth_audience: must not be empty")
    if not 60 <= settings.oauth_access_token_ttl <= 86400:
        raise ConfigError("oauth_access_token_ttl: must be between 1m and 1d")
    if settings.oauth_refresh_token_ttl < settings.oauth_access_token_ttl:
        raise ConfigError("oauth_refresh_token_ttl: must be at least oauth_access_token_ttl")
    if settings.oauth_signing_key_rotation < 2 * settings.oauth_access_token_ttl:
        raise ConfigError("oauth_signing_key_rotation: must be at least twice the token lifetime")


def load_settings(
    overrides: Mapping[str, object] | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Defaults, then ``SPAUTH_<NAME>`` environment variables, then explicit overrides (flags)."""
    env = os.environ if environ is None else environ
    values: dict[str, object] = {}
    for f in fields(Settings):
        raw = env.get(f"SPAUTH_{f.name.upper()}")
        if raw is not None and raw != "":
            values[f.name] = _convert(f.name, raw)
    for name, value in (overrides or {}).items():
        if value is not None:
            values[name] = _convert(name, value)
    settings = Settings(**values)  # type: ignore[arg-type]
    for name in ("admin_addr", "http_addr", "sidecar_addr"):
        _check_addr(name, getattr(settings, name))
    if not 60 <= settings.key_default_lifetime <= settings.key_max_lifetime:
        raise ConfigError("key_default_lifetime: must be at least 60s and at most key_max_lifetime")
    if settings.sweep_interval <= 0:
        raise ConfigError("sweep_interval: must be positive")
    _check_oauth(settings)
    if settings.log_level.lower() not in {"debug", "info", "warning", "error"}:
        raise ConfigError(
            f"log_level: expected debug|info|warning|error, got {settings.log_level!r}"
        )
    return settings
