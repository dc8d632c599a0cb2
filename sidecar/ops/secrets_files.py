"""Shared secrets kept in files: the sync token (sidecars replicate and ship decision records
with it) and the audit signing key (signs chain heads and checkpoints, outside the database).

Secure by default: when neither a value nor a file is configured, the control plane generates
the secret into its data dir (mode 0600) on first start and reads it back on every later one;
``spauth serve`` hands it to its embedded sidecar, and standalone sidecars are given the file
(``sync_token_file``) or the value (``SPAUTH_SIDECAR_SYNC_TOKEN``)."""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

from sidecar.config import ConfigError, Settings, SidecarSettings

SYNC_TOKEN_FILE = "sync-token"  # noqa: S105 (a file name)
AUDIT_KEY_FILE = "audit-hmac-key"


def read_secret(path: Path, setting: str) -> str:
    """The secret in ``path`` (surrounding whitespace removed); ConfigError naming ``setting``
    when it is missing or empty."""
    try:
        value = path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"{setting}: cannot read {str(path)!r}: {exc.strerror}") from None
    if not value:
        raise ConfigError(f"{setting}: {str(path)!r} is empty")
    return value


def ensure_secret(path: Path) -> str:
    """The secret in ``path``, created first (32 random bytes, hex, mode 0600) if absent."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with contextlib.suppress(FileExistsError):  # another replica or process won the race
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_hex(32) + "\n")
    return read_secret(path, str(path))


def control_plane_sync_token(settings: Settings) -> str:
    """``sync_token``, else the file ``sync_token_file``, else ``<data_dir>/sync-token``
    (generated on first start)."""
    if settings.sync_token:
        return settings.sync_token
    if settings.sync_token_file is not None:
        return read_secret(settings.sync_token_file, "sync_token_file")
    return ensure_secret(settings.data_dir / SYNC_TOKEN_FILE)


def sidecar_sync_token(settings: SidecarSettings) -> str:
    """``sync_token``, else the file ``sync_token_file``; '' when neither is set (the control
    plane then refuses the sidecar, and says why)."""
    if settings.sync_token:
        return settings.sync_token
    if settings.sync_token_file is not None:
        return read_secret(settings.sync_token_file, "sync_token_file")
    return ""


def audit_signing_key(settings: Settings) -> bytes:
    """The audit signing key: ``audit_signing_key`` (hex), else the file
    ``audit_signing_key_file``, else ``<data_dir>/audit-hmac-key`` (generated on first start;
    with several replicas give them all the same file instead)."""
    if settings.audit_signing_key:
        text = settings.audit_signing_key
        setting = "audit_signing_key"
    elif settings.audit_signing_key_file is not None:
        text = read_secret(settings.audit_signing_key_file, "audit_signing_key_file")
        setting = "audit_signing_key_file"
    else:
        text = ensure_secret(settings.data_dir / AUDIT_KEY_FILE)
        setting = AUDIT_KEY_FILE
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise ConfigError(f"{setting}: expected hex (e.g. openssl rand -hex 32)") from None
    if len(key) < 16:
        raise ConfigError(f"{setting}: at least 16 bytes (32 hex characters)")
    return key
