"""Authorization server metadata. https://www.rfc-editor.org/rfc/rfc8414"""

from __future__ import annotations

from sidecar.oauth import client_auth, rfc7636
from sidecar.oauth.config import OAuthConfig
from sidecar.oauth.token import GRANT_TYPES

WELL_KNOWN_PATH = "/.well-known/oauth-authorization-server"
JWKS_PATH = "/.well-known/jwks.json"
AUTHORIZE_PATH = "/oauth/authorize"
TOKEN_PATH = "/oauth/token"  # noqa: S105 (a path)
REVOKE_PATH = "/oauth/revoke"
INTROSPECT_PATH = "/oauth/introspect"


def metadata(config: OAuthConfig) -> dict[str, object]:
    """The metadata document. §3.3: ``issuer`` must be identical to the configured issuer, and
    the document is served at the well-known path under it."""
    return {
        "issuer": config.issuer,
        "authorization_endpoint": config.endpoint(AUTHORIZE_PATH),
        "token_endpoint": config.endpoint(TOKEN_PATH),
        "jwks_uri": config.endpoint(JWKS_PATH),
        "revocation_endpoint": config.endpoint(REVOKE_PATH),
        "introspection_endpoint": config.endpoint(INTROSPECT_PATH),
        "scopes_supported": list(config.scopes_supported),
        "response_types_supported": ["code"],
        "response_modes_supported": ["query"],
        "grant_types_supported": list(GRANT_TYPES),
        "code_challenge_methods_supported": list(rfc7636.SUPPORTED_METHODS),
        "token_endpoint_auth_methods_supported": list(client_auth.METHODS),
        "revocation_endpoint_auth_methods_supported": list(client_auth.METHODS),
        # Admin API keys (Bearer, admin:full) may introspect too; that is not a registered
        # client authentication method, so it is documented rather than listed here.
        "introspection_endpoint_auth_methods_supported": list(client_auth.CONFIDENTIAL_METHODS),
        # RFC 9207 §3: the authorization response carries "iss".
        "authorization_response_iss_parameter_supported": True,
    }
