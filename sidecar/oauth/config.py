"""The authorization server's settings (built from ``sidecar.config.Settings``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network

from sidecar.config import Settings, trusted_networks
from sidecar.core.scopes import SCOPES
from sidecar.oauth import kek
from sidecar.oauth.kek import KeyEncryption


@dataclass(frozen=True, slots=True)
class OAuthConfig:
    """Issuer, audience and lifetimes (seconds)."""

    issuer: str
    audience: str
    access_token_ttl: int = 3600
    refresh_token_ttl: int = 30 * 86400
    # RFC 6749 §4.1.2: "A maximum authorization code lifetime of 10 minutes is RECOMMENDED."
    code_ttl: int = 600
    session_ttl: int = 3600
    signing_key_rotation: int = 30 * 86400
    signing_key_lead_time: int = 300
    grant_lifetime: int = 90 * 86400
    # Proxies whose X-Forwarded-For names the client (sidecar/http/client_address.py).
    trusted_proxies: tuple[IPv4Network | IPv6Network, ...] = ()
    scopes_supported: tuple[str, ...] = SCOPES

    @property
    def secure_cookies(self) -> bool:
        """Cookies get ``Secure`` when the issuer is served over TLS."""
        return self.issuer.startswith("https://")

    def endpoint(self, path: str) -> str:
        return self.issuer.rstrip("/") + path


def from_settings(settings: Settings, http_port: int) -> OAuthConfig:
    """The OAuth configuration of a control plane whose HTTP server is bound to ``http_port``
    (the default issuer names the bound port, so ``--http-addr 127.0.0.1:0`` works)."""
    issuer = settings.oauth_issuer
    if not issuer:
        host = settings.http_addr.rpartition(":")[0]
        issuer = f"http://{host}:{http_port}"
        if host in ("0.0.0.0", "::", "[::]"):  # noqa: S104 (comparing, not binding)
            logging.getLogger("sidecar.oauth").warning(
                "oauth_issuer is not set and http_addr is a wildcard address: tokens will name "
                "an issuer clients cannot reach; set oauth_issuer to the public URL",
                extra={"issuer": issuer},
            )
    return OAuthConfig(
        issuer=issuer,
        audience=settings.oauth_audience,
        access_token_ttl=settings.oauth_access_token_ttl,
        refresh_token_ttl=settings.oauth_refresh_token_ttl,
        signing_key_rotation=settings.oauth_signing_key_rotation,
        signing_key_lead_time=settings.oauth_signing_key_lead_time,
        grant_lifetime=settings.oauth_grant_lifetime,
        trusted_proxies=trusted_networks(settings.trusted_proxies),
    )


def key_encryption(settings: Settings) -> KeyEncryption:
    """The KEKs from ``key_encryption_key`` (env SPAUTH_KEY_ENCRYPTION_KEY), from
    ``key_encryption_key_file``, or generated into the data directory on first start."""
    if settings.key_encryption_key:
        return KeyEncryption(kek.parse(settings.key_encryption_key, "key_encryption_key"))
    if settings.key_encryption_key_file is not None:
        path = settings.key_encryption_key_file
        try:
            return KeyEncryption(kek.parse(path.read_text(), f"key_encryption_key_file {path}"))
        except OSError as exc:
            raise kek.KekError(f"key_encryption_key_file: cannot read {path}: {exc}") from None
    return KeyEncryption(kek.load_or_create(settings.data_dir / kek.KEK_FILE))
