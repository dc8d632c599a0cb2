"""TLS credentials from PEM files: the admin API (which also carries the sidecars' sync stream),
optionally requiring client certificates (mTLS); the sidecar's side of the sync stream; and the
HTTP port. File names come from validated settings; read errors name the setting."""

from __future__ import annotations

from pathlib import Path

import grpc

from sidecar.config import ConfigError, Settings, SidecarSettings


def _read(setting: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{setting}: cannot read {str(path)!r} ({exc.strerror})") from None


def admin_server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """Credentials for the admin port, or None for plaintext. With ``admin_tls_client_ca`` every
    client (CLI, sidecar) must present a certificate signed by that CA."""
    if settings.admin_tls_cert is None or settings.admin_tls_key is None:
        return None
    pair = (
        _read("admin_tls_key", settings.admin_tls_key),
        _read("admin_tls_cert", settings.admin_tls_cert),
    )
    ca = settings.admin_tls_client_ca
    return grpc.ssl_server_credentials(
        [pair],
        root_certificates=_read("admin_tls_client_ca", ca) if ca is not None else None,
        require_client_auth=ca is not None,
    )


def sync_channel_credentials(settings: SidecarSettings) -> grpc.ChannelCredentials | None:
    """Credentials for the sidecar's sync stream, or None for plaintext."""
    files = sync_tls_files(settings)
    if files is None:
        return None
    ca, key, cert = files
    return grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert
    )


def sync_tls_files(settings: SidecarSettings) -> tuple[bytes, bytes | None, bytes | None] | None:
    """The sync stream's CA, client key and client certificate as read from their files (the
    control-plane link process builds its credentials from them), or None for plaintext."""
    if settings.control_plane_tls_ca is None:
        return None
    cert, key = settings.control_plane_tls_cert, settings.control_plane_tls_key
    return (
        _read("control_plane_tls_ca", settings.control_plane_tls_ca),
        _read("control_plane_tls_key", key) if key is not None else None,
        _read("control_plane_tls_cert", cert) if cert is not None else None,
    )


def sync_channel_options(settings: SidecarSettings) -> list[tuple[str, str]]:
    """Channel options: verify the control plane's certificate against another name than the
    one dialled (for example when dialling an IP)."""
    name = settings.control_plane_tls_server_name
    return [("grpc.ssl_target_name_override", name)] if name else []


def http_ssl_files(settings: Settings) -> tuple[str, str] | None:
    """``(certfile, keyfile)`` for the HTTP port, or None for plaintext."""
    if settings.http_tls_cert is None or settings.http_tls_key is None:
        return None
    for setting, path in (("http_tls_cert", settings.http_tls_cert),
                          ("http_tls_key", settings.http_tls_key)):  # fmt: skip
        _read(setting, path)
    return str(settings.http_tls_cert), str(settings.http_tls_key)
