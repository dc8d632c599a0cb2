"""The OAuth routes, ready to be composed into the control plane's HTTP app."""

from __future__ import annotations

from starlette.routing import BaseRoute, Route

from sidecar.http.authorize import AuthorizePages
from sidecar.http.oauth_api import ApiKeyAuthenticator, OAuthApi, json_endpoint
from sidecar.oauth import rfc8414
from sidecar.oauth.server import AuthorizationServer


def oauth_routes(server: AuthorizationServer, api_keys: ApiKeyAuthenticator) -> list[BaseRoute]:
    """GET/POST /oauth/authorize, POST /oauth/token, /oauth/revoke, /oauth/introspect, and the
    two well-known documents."""
    api = OAuthApi(server, api_keys)
    pages = AuthorizePages(server)
    return [
        Route(rfc8414.AUTHORIZE_PATH, pages.get, methods=["GET"]),
        Route(rfc8414.AUTHORIZE_PATH, pages.post, methods=["POST"]),
        Route(rfc8414.TOKEN_PATH, json_endpoint(api.token), methods=["POST"]),
        Route(rfc8414.REVOKE_PATH, json_endpoint(api.revoke), methods=["POST"]),
        Route(rfc8414.INTROSPECT_PATH, json_endpoint(api.introspect), methods=["POST"]),
        Route(rfc8414.WELL_KNOWN_PATH, json_endpoint(api.metadata), methods=["GET"]),
        Route(rfc8414.JWKS_PATH, json_endpoint(api.jwks), methods=["GET"]),
    ]
