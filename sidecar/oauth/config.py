"""The authorization server's settings (the control plane builds them from its
``sidecar.config.Settings``: ``sidecar.controlplane.oauth_config``)."""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network

from sidecar.core.scopes import SCOPES


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
