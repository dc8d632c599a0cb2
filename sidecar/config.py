"""One typed, frozen configuration per process kind, read from a config file, ``SPAUTH_*``
environment variables and flags in one place, and validated at start-up with messages that name
the setting, the value and where it came from. Nothing else reads ``os.environ``.

Precedence, lowest first: defaults, the config file (sidecar/ops/configfile.py reads it), the
environment, flags."""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
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
    """One or more settings have bad values; each message names the setting and the value."""

    def __init__(self, errors: str | list[str]) -> None:
        self.errors = [errors] if isinstance(errors, str) else list(errors)
        super().__init__("; ".join(self.errors))


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
    # Keys expiring within this window are "expiring": an audit event, a webhook, the metric.
    key_expiry_warning: int = 14 * 86400
    sweep_interval: float = 5.0
    sync_heartbeat: float = 1.0
    # The credential sidecars replicate and ship decision records with. Neither set: generated
    # into <data_dir>/sync-token (mode 0600) on first start, never anonymous.
    sync_token: str = ""
    sync_token_file: Path | None = None
    policy_file: Path | None = None
    log_level: str = "info"
    # Refused keys per source address per window on the admin API (gRPC and HTTP); 0: off.
    admin_failure_limit: int = 50
    admin_failure_window: float = 60.0
    # TLS: the admin API (and the sync stream it carries); a client CA turns on mTLS.
    admin_tls_cert: Path | None = None
    admin_tls_key: Path | None = None
    admin_tls_client_ca: Path | None = None
    # TLS on the HTTP port (OAuth endpoints, /metrics, /healthz, /readyz).
    http_tls_cert: Path | None = None
    http_tls_key: Path | None = None
    # The HTTP port's limits: seconds to receive a request's headers, then its body, and open
    # connections at most (a slow client is disconnected, not waited for).
    http_read_timeout: float = 10.0
    http_body_timeout: float = 30.0
    http_max_connections: int = 512
    # OpenTelemetry: OTLP/gRPC collector URL (http:// = plaintext); empty = tracing off.
    tracing_endpoint: str = ""
    tracing_sample_ratio: float = 1.0
    # SIGTERM: seconds NOT_SERVING but still answering, then seconds to finish in-flight calls.
    drain_delay: float = 0.0
    shutdown_grace: float = 5.0
    # OAuth (issue 4). An empty issuer means http://<http_addr> (with the bound port).
    oauth_issuer: str = ""
    oauth_audience: str = "statuspulse-api"
    oauth_access_token_ttl: int = 3600
    oauth_refresh_token_ttl: int = 30 * 86400
    oauth_signing_key_rotation: int = 30 * 86400
    # The web console (/console): a session ends after this long without a request, and at the
    # latest this long after sign-in.
    console_idle_timeout: int = 30 * 60
    console_session_lifetime: int = 8 * 3600
    # A new signing key is published (JWKS, every replica) this long before it signs.
    oauth_signing_key_lead_time: int = 300
    # A grant's absolute lifetime: after it the member signs in again, however often the
    # refresh token was rotated.
    oauth_grant_lifetime: int = 90 * 86400
    # Key-encryption keys for the signing keys' private parts (sidecar/core/kek.py), newest
    # first: the variable SPAUTH_KEY_ENCRYPTION_KEY, or a file; with neither, a KEK is generated
    # into <data_dir>/key-encryption-key (mode 0600) on first start.
    key_encryption_key: str = ""
    key_encryption_key_file: Path | None = None
    # Proxies whose X-Forwarded-For names the client of an OAuth request (sign-in throttling,
    # audit): comma-separated addresses or CIDR blocks. Empty: the TCP peer is the client.
    trusted_proxies: str = ""
    # An operator key expiring within this many seconds is warned about (log and metric).
    operator_key_warning: int = 14 * 86400
    # Audit records older than this are pruned behind a signed checkpoint (0: keep forever).
    audit_retention: int = 0
    # Ingest refuses decision records dated more than this many seconds ahead of this clock.
    audit_max_future_skew: float = 300.0
    # The key that signs audit chain heads and checkpoints: a file (or SPAUTH_AUDIT_SIGNING_KEY)
    # kept outside the database and the same on every replica. Unset: <data_dir>/audit-hmac-key.
    audit_signing_key: str = ""
    audit_signing_key_file: Path | None = None
    # Every chain's head is signed this often (when it moved): a chain shorter than its last
    # signed head, rewritten from it or gone is reported by `spauth audit verify`.
    audit_sign_interval: float = 60.0
    # Scale-out (issue 8): Redis carries change notifications between control-plane replicas and
    # the sidecars' audit stream. Empty: no bus (the sync heartbeat bounds propagation).
    redis_url: str = ""
    # Webhooks (issue 17): "public" calls only https URLs that resolve to public addresses
    # (a tenant cannot aim the control plane at its internal network); "any" lifts that
    # (development, tests). Due deliveries are sent every webhook_poll_interval seconds.
    webhook_destinations: str = "public"
    webhook_poll_interval: float = 1.0
    # Upgrades only: the AES-256 key (64 hex digits) older releases sealed webhook signing
    # secrets with; they are re-sealed under the key-encryption key at start-up. Empty: the
    # key file data_dir/webhook-key when it exists.
    webhook_key: str = ""

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
    # HOST:PORT of a control plane, or several replicas as "a:50051,b:50051".
    control_plane: str = "127.0.0.1:50051"
    policy_file: Path | None = None
    state_dir: Path = Path(".spauth-sidecar")
    max_staleness: float = 900.0
    # The control plane's sync token, or a file holding it (e.g. <data_dir>/sync-token).
    sync_token: str = ""
    sync_token_file: Path | None = None
    threads: int = 4
    workers: int = 1
    policy_poll_interval: float = 1.0
    log_level: str = "info"
    # /metrics, /healthz, /readyz over HTTP; empty = off.
    metrics_addr: str = "127.0.0.1:9192"
    # Sync over TLS when a CA is set; a client certificate for a control plane that wants mTLS.
    control_plane_tls_ca: Path | None = None
    control_plane_tls_cert: Path | None = None
    control_plane_tls_key: Path | None = None
    control_plane_tls_server_name: str = ""
    tracing_endpoint: str = ""
    tracing_sample_ratio: float = 1.0
    # Denial log lines per second, per class (with / without a known credential); 0 = all.
    denial_log_rate: float = 100.0
    # Envoy's Check: "compiled" (the C extension decides what it can decide exactly, the
    # Python path the rest; Python when the extension is not built) or "python" (the
    # reference). Compiled by default: +0.11 of the do-nothing ratio in one quiet run.
    check_path: str = "compiled"
    drain_delay: float = 0.0
    shutdown_grace: float = 5.0
    # OAuth access tokens: the issuer and audience they must name (RFC 9068 §4).
    oauth_issuer: str = "http://127.0.0.1:8080"
    oauth_audience: str = "statuspulse-api"
    # The control plane's access-token lifetime: a token claiming a longer one (exp - iat,
    # beyond the clock-skew leeway) is refused, whoever signed it.
    oauth_access_token_ttl: int = 3600
    # Verified access tokens kept (by digest) so a repeat skips the signature check; 0 = verify
    # every request (for measuring cold verification, or a policy that wants no cache).
    token_cache_size: int = 100_000
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
    # Credential uses (last used, daily counts) are reported to the control plane every
    # usage_report_interval seconds; 0 turns usage reporting off.
    usage_report_interval: float = 10.0
    # Who makes the calls to the control plane (replication stream, audit shipping, usage
    # reports): "process" (a child process started and replaced by the sidecar: the serving
    # process holds no gRPC client call, ≈ 2.5 fewer context switches per check,
    # docs/performance.md) or "inprocess" (threads of the serving process).
    control_plane_link: str = "process"


_DURATIONS = {
    "key_default_lifetime",
    "key_expiry_warning",
    "key_max_lifetime",
    "oauth_access_token_ttl",
    "oauth_refresh_token_ttl",
    "oauth_signing_key_rotation",
    "oauth_signing_key_lead_time",
    "oauth_grant_lifetime",
    "operator_key_warning",
    "audit_retention",
    "console_idle_timeout",
    "console_session_lifetime",
}
_LEVELS = {"debug", "info", "warning", "error"}
FILE_SOURCE = "config file"
FLAG_SOURCE = "command line"


def _convert(name: str, kind: Any, raw: object) -> object:
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        if raw == "":
            return None  # an empty value unsets an optional path
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    if kind is Path:
        if not isinstance(raw, str | Path):
            raise ConfigError(f"{name}: expected a path, got {raw!r}")
        return Path(raw)
    if name in _DURATIONS and not isinstance(raw, int):
        try:
            return parse_duration(str(raw), name)
        except InvalidArgument:
            raise ConfigError(f"{name}: expected a duration such as 90d, got {raw!r}") from None
    if kind in (int, float):
        expected = "an integer" if kind is int else "a number"
        # TOML gives typed values: a bool or a fraction is never silently truncated.
        if isinstance(raw, bool) or (kind is int and isinstance(raw, float)):
            raise ConfigError(f"{name}: expected {expected}, got {raw!r}")
        try:
            return kind(str(raw))
        except ValueError:
            raise ConfigError(f"{name}: expected {expected}, got {raw!r}") from None
    if not isinstance(raw, str):
        raise ConfigError(f"{name}: expected a string, got {raw!r}")
    return raw


class _Errors:
    """Collects every problem, each tagged with where the offending value came from."""

    def __init__(self, sources: dict[str, str]) -> None:
        self.sources = sources
        self.items: list[str] = []

    def add(self, name: str, message: str) -> None:
        source = self.sources.get(name)
        self.items.append(f"{name}: {message}" + (f" (from {source})" if source else ""))

    def extend(self, name: str, exc: ConfigError) -> None:
        source = self.sources.get(name)
        self.items.extend(e + (f" (from {source})" if source else "") for e in exc.errors)

    def raise_any(self) -> None:
        if self.items:
            raise ConfigError(self.items)


def _load(
    cls: type[T],
    prefix: str,
    overrides: Mapping[str, object] | None,
    environ: Mapping[str, str],
    file_values: Mapping[str, object] | None,
    file_label: str,
) -> tuple[T, _Errors]:
    """The settings object, and an error collector that knows where each value came from."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]  # type: ignore[arg-type]
    layers: list[tuple[str, Mapping[str, object]]] = [(file_label, file_values or {})]
    env = {n: environ[f"{prefix}{n.upper()}"] for n in names if environ.get(f"{prefix}{n.upper()}")}
    layers.append(("", env))
    layers.append((FLAG_SOURCE, {k: v for k, v in (overrides or {}).items() if v is not None}))
    values: dict[str, object] = {}
    sources: dict[str, str] = {}
    errors = _Errors(sources)
    for label, layer in layers:
        for name, raw in layer.items():
            sources[name] = label or f"{prefix}{name.upper()}"
            if name not in hints:
                close = difflib.get_close_matches(name, names, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                errors.add(name, f"unknown setting{hint}")
                continue
            try:
                values[name] = _convert(name, hints[name], raw)
            except ConfigError as exc:
                errors.extend(name, exc)
    # A bad value keeps its default so the checks below still run: every error is reported.
    return cls(**values), errors


def _check_addr(errors: _Errors, name: str, value: str) -> None:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        errors.add(name, f"expected HOST:PORT, got {value!r}")


def _check_oauth(errors: _Errors, settings: Settings) -> None:
    issuer = settings.oauth_issuer
    # RFC 8414 §2: an http(s) URL with no query or fragment; compared by exact string match.
    if issuer and (
        not issuer.startswith(("https://", "http://"))
        or any(c in issuer for c in "?#")
        or issuer.endswith("/")
        or len(issuer.split("/", 3)[2]) == 0
    ):
        errors.add(
            "oauth_issuer",
            f"expected an http(s) URL without query, fragment or trailing slash, got {issuer!r}",
        )
    if not settings.oauth_audience.strip():
        errors.add("oauth_audience", "must not be empty")
    if not 60 <= settings.oauth_access_token_ttl <= 86400:
        errors.add("oauth_access_token_ttl", "must be between 1m and 1d")
    if settings.oauth_refresh_token_ttl < settings.oauth_access_token_ttl:
        errors.add("oauth_refresh_token_ttl", "must be at least oauth_access_token_ttl")
    if settings.oauth_signing_key_rotation < 2 * settings.oauth_access_token_ttl:
        errors.add("oauth_signing_key_rotation", "must be at least twice the token lifetime")
    if not 60 <= settings.console_idle_timeout <= 86400:
        errors.add("console_idle_timeout", "must be between 1m and 1d")
    if not settings.console_idle_timeout <= settings.console_session_lifetime <= 7 * 86400:
        errors.add("console_session_lifetime", "must be between console_idle_timeout and 7d")
    if not 0 <= settings.oauth_signing_key_lead_time < settings.oauth_signing_key_rotation:
        errors.add(
            "oauth_signing_key_lead_time", "must be at least 0 and less than the rotation interval"
        )
    if not settings.oauth_access_token_ttl <= settings.oauth_grant_lifetime <= 366 * 86400:
        errors.add("oauth_grant_lifetime", "must be between oauth_access_token_ttl and 366d")
    if settings.key_encryption_key and settings.key_encryption_key_file is not None:
        errors.add("key_encryption_key", "set key_encryption_key or key_encryption_key_file")
    kek_set = settings.key_encryption_key or settings.key_encryption_key_file is not None
    if settings.database_url and not kek_set:
        # A KEK generated into one replica's data directory would leave the others unable to
        # sign: a shared store needs the same KEK on every replica.
        errors.add(
            "key_encryption_key",
            "a shared store (database_url) needs the same key-encryption key on every "
            "control-plane replica: set SPAUTH_KEY_ENCRYPTION_KEY or key_encryption_key_file "
            "(generate one with `spauth oauth generate-kek`)",
        )
    try:
        trusted_networks(settings.trusted_proxies)
    except ValueError as exc:
        errors.add("trusted_proxies", str(exc))


def trusted_networks(text: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """``trusted_proxies`` parsed: comma-separated addresses or CIDR blocks."""
    out = []
    for item in (i.strip() for i in text.split(",")):
        if not item:
            continue
        try:
            out.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"expected addresses or CIDR blocks, got {item!r}") from None
    return tuple(out)


def _check_level(errors: _Errors, value: str) -> None:
    if value.lower() not in _LEVELS:
        errors.add("log_level", f"expected debug|info|warning|error, got {value!r}")


def _check_file(errors: _Errors, name: str, value: Path | None) -> None:
    if value is not None and not value.is_file():
        errors.add(name, f"no such file {str(value)!r}")


def _check_pair(errors: _Errors, cert: str, key: str, obj: object) -> None:
    if (getattr(obj, cert) is None) != (getattr(obj, key) is None):
        errors.add(cert if getattr(obj, cert) is None else key, f"set both {cert} and {key}")


def _check_tracing(errors: _Errors, endpoint: str, ratio: float) -> None:
    if endpoint and not endpoint.startswith(("http://", "https://")):
        errors.add("tracing_endpoint", f"expected http(s)://HOST:PORT, got {endpoint!r}")
    if not 0.0 <= ratio <= 1.0:
        errors.add("tracing_sample_ratio", f"must be between 0 and 1, got {ratio}")


def _check_shutdown(errors: _Errors, drain_delay: float, grace: float) -> None:
    if drain_delay < 0:
        errors.add("drain_delay", f"must not be negative, got {drain_delay}")
    if grace < 0:
        errors.add("shutdown_grace", f"must not be negative, got {grace}")


def load_settings(
    overrides: Mapping[str, object] | None = None,
    environ: Mapping[str, str] | None = None,
    file_values: Mapping[str, object] | None = None,
    file_label: str = FILE_SOURCE,
) -> Settings:
    """Defaults, then ``file_values``, then ``SPAUTH_<NAME>`` variables, then ``overrides``."""
    env = os.environ if environ is None else environ
    s, errors = _load(Settings, "SPAUTH_", overrides, env, file_values, file_label)
    for name in ("admin_addr", "http_addr", "sidecar_addr"):
        _check_addr(errors, name, getattr(s, name))
    if not 60 <= s.key_default_lifetime <= s.key_max_lifetime:
        errors.add("key_default_lifetime", "must be at least 60s and at most key_max_lifetime")
    if not 0 <= s.key_expiry_warning <= s.key_max_lifetime:
        errors.add("key_expiry_warning", "must be between 0 and key_max_lifetime")
    if s.webhook_destinations not in ("public", "any"):
        errors.add("webhook_destinations", f"expected public|any, got {s.webhook_destinations!r}")
    if s.webhook_key and not re.fullmatch(r"[0-9a-fA-F]{64}", s.webhook_key):
        errors.add("webhook_key", "must be 64 hex digits (a 256-bit key): openssl rand -hex 32")
    if not 0.05 <= s.webhook_poll_interval <= 3600:
        errors.add("webhook_poll_interval", "must be between 0.05 and 3600 seconds")
    if s.sweep_interval <= 0:
        errors.add("sweep_interval", "must be positive")
    if s.sync_heartbeat <= 0:
        errors.add("sync_heartbeat", "must be positive")
    _check_oauth(errors, s)
    _check_level(errors, s.log_level)
    for name in ("admin_tls_cert", "admin_tls_key", "admin_tls_client_ca"):
        _check_file(errors, name, getattr(s, name))
    for name in ("http_tls_cert", "http_tls_key", "policy_file"):
        _check_file(errors, name, getattr(s, name))
    for name in ("sync_token_file", "audit_signing_key_file"):
        _check_file(errors, name, getattr(s, name))
    for name in ("http_read_timeout", "http_body_timeout"):
        if getattr(s, name) <= 0:
            errors.add(name, "must be a positive number of seconds")
    if s.http_max_connections < 1:
        errors.add("http_max_connections", f"must be at least 1, got {s.http_max_connections}")
    if s.audit_sign_interval <= 0:
        errors.add("audit_sign_interval", "must be a positive number of seconds")
    if s.audit_max_future_skew < 0:
        errors.add("audit_max_future_skew", "must be 0 or a positive number of seconds")
    _check_pair(errors, "admin_tls_cert", "admin_tls_key", s)
    _check_pair(errors, "http_tls_cert", "http_tls_key", s)
    if s.admin_tls_client_ca is not None and s.admin_tls_cert is None:
        errors.add("admin_tls_client_ca", "mTLS needs admin_tls_cert and admin_tls_key too")
    _check_tracing(errors, s.tracing_endpoint, s.tracing_sample_ratio)
    _check_shutdown(errors, s.drain_delay, s.shutdown_grace)
    _check_redis_url(errors, s.redis_url)
    if s.admin_failure_limit < 0:
        errors.add("admin_failure_limit", "must be 0 (off) or a positive count")
    if not 1 <= s.admin_failure_window <= 86400:
        errors.add("admin_failure_window", "must be between 1 and 86400 seconds")
    errors.raise_any()
    return s


def _check_redis_url(errors: _Errors, value: str) -> None:
    if value and not value.startswith(("redis://", "rediss://", "unix://")):
        errors.add("redis_url", f"expected redis://, rediss:// or unix://, got {value!r}")


def _check_limits(errors: _Errors, s: SidecarSettings) -> None:
    for name in ("failure_limit_source", "failure_limit_key"):
        if getattr(s, name) < 0:
            errors.add(name, "must be 0 (off) or a positive count")
    if not 1 <= s.failure_window <= 86400:
        errors.add("failure_window", f"must be between 1 and 86400 seconds, got {s.failure_window}")
    if not 0.01 <= s.ratelimit_sync_interval <= 60:
        errors.add("ratelimit_sync_interval", "must be between 0.01 and 60 seconds")
    if s.usage_report_interval and not 0.05 <= s.usage_report_interval <= 3600:
        errors.add("usage_report_interval", "must be 0 (off) or between 0.05 and 3600 seconds")
    _check_redis_url(errors, s.redis_url)


def load_sidecar_settings(
    overrides: Mapping[str, object] | None = None,
    environ: Mapping[str, str] | None = None,
    file_values: Mapping[str, object] | None = None,
    file_label: str = FILE_SOURCE,
) -> SidecarSettings:
    """Defaults, then ``file_values``, then ``SPAUTH_SIDECAR_<NAME>`` variables, then flags."""
    env = os.environ if environ is None else environ
    s, errors = _load(SidecarSettings, "SPAUTH_SIDECAR_", overrides, env, file_values, file_label)
    _check_addr(errors, "listen", s.listen)
    # One or more control-plane replicas, comma-separated; the sidecar moves between them.
    for target in s.control_plane.split(","):
        _check_addr(errors, "control_plane", target.strip())
    if s.metrics_addr:
        _check_addr(errors, "metrics_addr", s.metrics_addr)
    if s.max_staleness < 0:
        errors.add("max_staleness", "must be 0 (never) or a positive number of seconds")
    if not 1 <= s.threads <= 64:
        errors.add("threads", f"must be between 1 and 64, got {s.threads}")
    if not 60 <= s.oauth_access_token_ttl <= 86400:
        errors.add("oauth_access_token_ttl", "must be between 1m and 1d")
    if s.token_cache_size < 0:
        errors.add("token_cache_size", f"must be 0 (off) or more, got {s.token_cache_size}")
    if not 1 <= s.workers <= 64:
        errors.add("workers", f"must be between 1 and 64, got {s.workers}")
    if s.policy_poll_interval <= 0:
        errors.add("policy_poll_interval", "must be positive")
    if s.denial_log_rate < 0:
        errors.add("denial_log_rate", "must be 0 (log every denial) or positive")
    if s.check_path not in ("python", "compiled"):
        errors.add("check_path", f"expected python|compiled, got {s.check_path!r}")
    if s.control_plane_link not in ("process", "inprocess"):
        errors.add(
            "control_plane_link", f"expected process|inprocess, got {s.control_plane_link!r}"
        )
    for name in ("policy_file", "control_plane_tls_ca", "control_plane_tls_cert"):
        _check_file(errors, name, getattr(s, name))
    _check_file(errors, "control_plane_tls_key", s.control_plane_tls_key)
    _check_file(errors, "sync_token_file", s.sync_token_file)
    _check_pair(errors, "control_plane_tls_cert", "control_plane_tls_key", s)
    if s.control_plane_tls_cert is not None and s.control_plane_tls_ca is None:
        errors.add("control_plane_tls_cert", "a client certificate needs control_plane_tls_ca")
    _check_audit(errors, s)
    _check_limits(errors, s)
    _check_level(errors, s.log_level)
    _check_tracing(errors, s.tracing_endpoint, s.tracing_sample_ratio)
    _check_shutdown(errors, s.drain_delay, s.shutdown_grace)
    errors.raise_any()
    return s


def _check_audit(errors: _Errors, s: SidecarSettings) -> None:
    if s.audit not in ("on", "off"):
        errors.add("audit", f"expected on|off, got {s.audit!r}")
    if s.audit_queue_capacity < 1:
        errors.add("audit_queue_capacity", f"must be at least 1, got {s.audit_queue_capacity}")
    if not 0 <= s.audit_allow_sample_rate <= 1:
        errors.add(
            "audit_allow_sample_rate", f"must be between 0 and 1, got {s.audit_allow_sample_rate}"
        )
    for name in ("audit_write_interval", "audit_fsync_interval"):
        if getattr(s, name) <= 0:
            errors.add(name, "must be a positive number of seconds")
