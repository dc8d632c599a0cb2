"""Client authentication at the token, revocation and introspection endpoints.
https://www.rfc-editor.org/rfc/rfc6749#section-2.3

Confidential clients use ``client_secret_basic`` or ``client_secret_post``; public clients send
only ``client_id`` (``none``) and are bound by PKCE and refresh-token rotation instead.
``ClientAuthenticator`` is the one seam every endpoint calls (as authlib's
``AuthorizationServer.authenticate_client``), each naming the methods it accepts."""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import unquote_plus

from sidecar.core import credentials
from sidecar.core.clock import Clock
from sidecar.core.oauth_models import OAuthApp
from sidecar.core.storage import Store
from sidecar.oauth.errors import InvalidClient, InvalidRequest

BASIC = "client_secret_basic"
POST = "client_secret_post"
NONE = "none"
METHODS = (BASIC, POST, NONE)
# RFC 7662 §2.1 asks for "some form of authorization": only clients that can hold a secret.
CONFIDENTIAL_METHODS = (BASIC, POST)


@dataclass(frozen=True, slots=True)
class ClientCredentials:
    """What the client presented; ``client_secret`` is empty for ``none``."""

    client_id: str
    client_secret: str = ""
    method: str = NONE


def _basic(value: str) -> tuple[str, str]:
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise InvalidClient("malformed HTTP Basic credentials") from None
    client_id, sep, secret = decoded.partition(":")
    if not sep:
        raise InvalidClient("malformed HTTP Basic credentials")
    # §2.3.1: client_id and secret are form-urlencoded before being used as user and password.
    return unquote_plus(client_id), unquote_plus(secret)


def from_request(authorization: str, form: Mapping[str, str]) -> ClientCredentials | None:
    """The credentials in the ``Authorization`` header or the form, or None if there are none.
    ``authorization`` is the header's value ('' when absent)."""
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() == "basic":
        # §2.3: "The client MUST NOT use more than one authentication method in each request."
        if "client_secret" in form:
            raise InvalidRequest("use one client authentication method, not two")
        client_id, secret = _basic(value)
        if form.get("client_id", client_id) != client_id:
            raise InvalidRequest("client_id differs from the authenticated client")
        return ClientCredentials(client_id, secret, BASIC)
    if authorization.strip():
        raise InvalidClient("unsupported Authorization scheme")
    client_id = form.get("client_id", "")
    if not client_id:
        return None
    if "client_secret" in form:
        return ClientCredentials(client_id, form["client_secret"], POST)
    return ClientCredentials(client_id, "", NONE)


def _secret_matches(app: OAuthApp, secret: str, now: float) -> bool:
    if not credentials.is_well_formed(secret, credentials.CLIENT_SECRET):
        return False
    presented = credentials.digest(secret)
    current = app.secret_digest is not None and hmac.compare_digest(app.secret_digest, presented)
    # The previous secret keeps working during the rotation overlap.
    previous = (
        app.previous_secret_digest is not None
        and app.previous_secret_expires_at is not None
        and now < app.previous_secret_expires_at
        and hmac.compare_digest(app.previous_secret_digest, presented)
    )
    return current or previous


def authenticate(app: OAuthApp | None, creds: ClientCredentials | None, now: float) -> OAuthApp:
    """The authenticated app, or InvalidClient (RFC 6749 §5.2) without saying which part failed."""
    if creds is None:
        raise InvalidClient("client authentication is required")
    if app is None or app.deleted or app.id != creds.client_id:
        raise InvalidClient("client authentication failed")
    if app.confidential:
        # §3.2.1: a confidential client must authenticate at the token endpoint.
        if creds.method == NONE or not _secret_matches(app, creds.client_secret, now):
            raise InvalidClient("client authentication failed")
    elif creds.method != NONE:
        raise InvalidClient("client authentication failed: public clients have no secret")
    return app


class ClientAuthenticator:
    """Authenticates the client of a token, revocation or introspection request."""

    def __init__(self, store: Store, clock: Clock) -> None:
        self._store = store
        self._clock = clock

    def authenticate_client(
        self, authorization: str, form: Mapping[str, str], methods: Sequence[str] = METHODS
    ) -> OAuthApp:
        """The app that sent the request with one of ``methods``, or InvalidClient.
        Blocking (it reads the store): call from a thread."""
        creds = from_request(authorization, form)
        app = None
        if creds is not None:
            with self._store.read() as uow:
                app = uow.oauth.apps.get(creds.client_id[:100])
        authenticated = authenticate(app, creds, self._clock.now())
        if creds is not None and creds.method not in methods:
            raise InvalidClient(f"client authentication method {creds.method} is not accepted here")
        return authenticated
