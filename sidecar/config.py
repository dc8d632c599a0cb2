"""One typed, frozen configuration per process kind, read from flags and ``SPAUTH_*`` environment
variables in one place and validated at start-up with messages that name the setting. Nothing else
reads ``os.environ``."""

from __future__ import annotations

import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

from sidecar.core.errors import InvalidArgument
from sidecar.core.validation import parse_duration

T = TypeVar("T")


class ConfigError(ValueError):
    """A setting has a bad value; the message names the setting and the value."""


@dataclass(frozen=True, slots=True)
class Settings:
    """The control plane and the embedded product (``spauth serve``). Env: ``SPAUTH_<NAME>``."""

    data_dir: Path = Path(".spauth")
    database_url: str = ""
    admin_addr: str = "127.0.0.1:50051"
    http_addr: str = "127.0.0.1:8080"
    sidecar_addr: str = "127.0.0.1:9191"
    key_default_lifetime: int = 90 * 86400
    key_max_lifetime: int = 365 * 86400
    sweep_interval: float = 5.0
    sync_heartbeat: float = 1.0
    sync_token: str = ""
    policy_file: Path | None = None
    log_level: str = "info"
    # OAuth (issue 4). An empty issuer means http://<http_addr> (with the bound port).
    oauth_issuer: str = ""
    oauth_audience: str = "statuspulse-api"
    oauth_access_token_ttl: int = 3600
    oauth_refresh_token_ttl: int = 30 * 86400
    oauth_signing_key_rotation: int = 30 * 86400
    # Audit records older than this are pruned behind a signed checkpoint (0: keep forever).
    audit_retention: int = 0
    # Scale-out (issue 8): Redis carries change notifications between control-plane replicas and
    # the sidecars' audit stream. Empty: no bus (the sync heartbeat bounds propagation).
    redis_url: str = ""

    @property
    def store_url(self) -> str:
        """The database to open: ``database_url`` or the SQLite file in ``data_dir``."""
        # Absolute: open_store reads "sqlite:///x" as "/x", so a relative data_dir would put the
        # database under the filesystem root while the bootstrap key stays in the working dir.
        return self.database_url or f"sqlite:///{self.data_dir.absolute() / 'spauth.db'}"


@dataclass(frozen=True, slots=True)
class SidecarSettings:
    """The sidecar (``spauth sidecar``). Env: ``SPAUTH_SIDECAR_<NAME>``."""

    listen: str = "127.0.0.1:9191"
    control_plane: str = "127.0.0.1:50051"
    policy_file: Path | None = None
    state_dir: Path = Path(".spauth-sidecar")
    max_staleness: float = 900.0
    sync_token: str = ""
    threads: int = 4
    workers: int = 1
    policy_poll_interval: float = 1.0
    log_level: str = "info"
    # OAuth access tokens: the issuer and audience they must name (RFC 9068 §4).
    oauth_issuer: str = "http://127.0.0.1:8080"
    oauth_audience: str = "statuspulse-api"
    # Decision records (docs/audit.md): "off" disables them; the spool lives in audit_dir
    # (default <state_dir>/audit).
    audit: str = "on"
    audit_dir: Path | None = None
    audit_queue_capacity: int = 10_000
    audit_allow_sample_rate: float = 1.0
    audit_write_interval: float = 0.01
    audit_fsync_interval: float = 1.0
    # Abuse limits (issue 8): failed credential attempts per source address and per key id
    # within a sliding window of failure_window seconds; 0 turns a limit off.
    failure_limit_source: int = 50
    failure_limit_key: int = 20
    failure_window: float = 60.0
    # Scale-out: Redis shares rate-limit counts between sidecars (pushed every
    # ratelimit_sync_interval seconds) and carries the audit stream. Empty: all local.
    redis_url: str = ""
    ratelimit_sync_interval: float = 0.2


_DURATIONS = {
    "key_default_lifetime",
    "key_max_lifetime",
    "oauth_access_token_ttl",
    "oauth_refresh_token_ttl",
    "oauth_signing_key_rotation",
    "audit_retention",
}
_LEVELS = {"debug", "info", "warning", "error"}


def _convert(name: str, kind: Any, raw: object) -> object:
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    if kind is Path:
        return Path(str(raw))
    if name in _DURATIONS and not isinstance(raw, int):
        try:
            return parse_duration(str(raw), name)
        except InvalidArgument:
            raise ConfigError(f"{name}: expected a duration such as 90d, got {raw!r}") from None
    if kind in (int, float):
        try:
            return kind(str(raw))
        except ValueError:
            raise ConfigError(f"{name}: expected a number, got {raw!r}") from None
    return str(raw)


def _load(
    cls: type[T], prefix: str, overrides: Mapping[str, object] | None, environ: Mapping[str, str]
) -> T:
    hints = typing.get_type_hints(cls)
    values: dict[str, object] = {}
    for f in fields(cls):  # type: ignore[arg-type]
        raw = environ.get(f"{prefix}{f.name.upper()}")
        if raw:
            values[f.name] = _convert(f.name, hints[f.name], raw)
    for name, value in (overrides or {}).items():
        if value is not None:
            values[name] = _convert(name, hints[name], value)
    return cls(**values)


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


def _check_level(value: str) -> None:
    if value.lower() not in _LEVELS:
        raise ConfigError(f"log_level: expected debug|info|warning|error, got {value!r}")


def load_settings(
    overrides: Mapping[str, object] | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Defaults, then ``SPAUTH_<NAME>`` environment variables, then explicit overrides (flags)."""
    s = _load(Settings, "SPAUTH_", overrides, os.environ if environ is None else environ)
    for name in ("admin_addr", "http_addr", "sidecar_addr"):
        _check_addr(name, getattr(s, name))
    if not 60 <= s.key_default_lifetime <= s.key_max_lifetime:
        raise ConfigError("key_default_lifetime: must be at least 60s and at most key_max_lifetime")
    if s.sweep_interval <= 0:
        raise ConfigError("sweep_interval: must be positive")
    if s.sync_heartbeat <= 0:
        raise ConfigError("sync_heartbeat: must be positive")
    _check_oauth(s)
    _check_level(s.log_level)
    return s


def _check_limits(s: SidecarSettings) -> None:
    for name in ("failure_limit_source", "failure_limit_key"):
        if getattr(s, name) < 0:
            raise ConfigError(f"{name}: must be 0 (off) or a positive count")
    if not 1 <= s.failure_window <= 86400:
        raise ConfigError(
            f"failure_window: must be between 1 and 86400 seconds, got {s.failure_window}"
        )
    if not 0.01 <= s.ratelimit_sync_interval <= 60:
        raise ConfigError("ratelimit_sync_interval: must be between 0.01 and 60 seconds")
    if s.redis_url and not s.redis_url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(
            f"redis_url: expected redis://, rediss:// or unix://, got {s.redis_url!r}"
        )


def load_sidecar_settings(
    overrides: Mapping[str, object] | None = None, environ: Mapping[str, str] | None = None
) -> SidecarSettings:
    """Defaults, then ``SPAUTH_SIDECAR_<NAME>`` environment variables, then flags."""
    env = os.environ if environ is None else environ
    s = _load(SidecarSettings, "SPAUTH_SIDECAR_", overrides, env)
    _check_addr("listen", s.listen)
    _check_addr("control_plane", s.control_plane)
    if s.max_staleness < 0:
        raise ConfigError("max_staleness: must be 0 (never) or a positive number of seconds")
    if not 1 <= s.threads <= 64:
        raise ConfigError(f"threads: must be between 1 and 64, got {s.threads}")
    if not 1 <= s.workers <= 64:
        raise ConfigError(f"workers: must be between 1 and 64, got {s.workers}")
    _check_audit(s)
    if s.policy_file is not None and not s.policy_file.is_file():
        raise ConfigError(f"policy_file: no such file {str(s.policy_file)!r}")
    _check_limits(s)
    _check_level(s.log_level)
    return s


def _check_audit(s: SidecarSettings) -> None:
    if s.audit not in ("on", "off"):
        raise ConfigError(f"audit: expected on|off, got {s.audit!r}")
    if s.audit_queue_capacity < 1:
        raise ConfigError(f"audit_queue_capacity: must be at least 1, got {s.audit_queue_capacity}")
    if not 0 <= s.audit_allow_sample_rate <= 1:
        raise ConfigError(
            f"audit_allow_sample_rate: must be between 0 and 1, got {s.audit_allow_sample_rate}"
        )
    for name in ("audit_write_interval", "audit_fsync_interval"):
        if getattr(s, name) <= 0:
            raise ConfigError(f"{name}: must be a positive number of seconds")
