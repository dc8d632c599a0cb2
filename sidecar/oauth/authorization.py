"""The authorization endpoint: validate the request, sign the member in, record consent, issue
the code. https://www.rfc-editor.org/rfc/rfc6749#section-4.1.1

Errors come in two kinds (§4.1.2.1): ``PageError`` when the client or redirect URI cannot be
trusted — shown to the member, never redirected — and ``RedirectError`` for everything else,
sent back to the client's verified redirect URI with ``state`` unchanged."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from sidecar.core import credentials, passwords
from sidecar.core.apps import uri_problem
from sidecar.core.audit import AuditEvent, event
from sidecar.core.clock import Clock
from sidecar.core.errors import InvalidArgument
from sidecar.core.oauth_models import AuthorizationCode, Member, OAuthApp
from sidecar.core.scopes import SCOPES, satisfies, sort_scopes
from sidecar.core.storage import Store, UnitOfWork
from sidecar.core.users import normalize_email
from sidecar.oauth import rfc7636
from sidecar.oauth.config import OAuthConfig
from sidecar.oauth.errors import (
    AccessDenied,
    InvalidRequest,
    InvalidScope,
    OAuth2Error,
    UnsupportedResponseType,
)
from sidecar.oauth.throttle import SignInThrottle

log = logging.getLogger("sidecar.oauth")
MAX_STATE = 2000
_KNOWN_SCOPES = frozenset(SCOPES)
# Parameters of the authorization request that travel through the sign-in and consent forms.
REQUEST_PARAMS = (
    "response_type",
    "client_id",
    "redirect_uri",
    "scope",
    "state",
    "code_challenge",
    "code_challenge_method",
)


class PageError(Exception):
    """Shown to the member; the client or redirect URI is not trusted enough to redirect to."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class RedirectError(Exception):
    """Sent to the client as a redirect to its verified redirect URI."""

    def __init__(self, error: OAuth2Error, redirect_uri: str, state: str, issuer: str) -> None:
        super().__init__(error.error)
        self.error = error
        self.location = response_uri(redirect_uri, {**error.body(), "state": state, "iss": issuer})


class SignInRefused(Exception):
    """Wrong e-mail address or password, or too many failures (``retry_after`` seconds)."""

    def __init__(self, message: str, retry_after: int = 0) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class AuthorizationRequest:
    """A validated authorization request."""

    app: OAuthApp
    redirect_uri: str
    redirect_uri_given: bool
    scopes: frozenset[str]
    state: str
    code_challenge: str
    code_challenge_method: str

    def form_params(self) -> list[tuple[str, str]]:
        """The request as hidden form fields (re-validated when the form comes back)."""
        params = [
            ("response_type", "code"),
            ("client_id", self.app.id),
            ("scope", " ".join(sort_scopes(self.scopes))),
            ("code_challenge", self.code_challenge),
            ("code_challenge_method", self.code_challenge_method),
        ]
        if self.redirect_uri_given:
            params.append(("redirect_uri", self.redirect_uri))
        if self.state:
            params.append(("state", self.state))
        return params


def _well_formed_email(typed: str) -> str | None:
    """The normalized address, or None when what was typed is not an e-mail address."""
    try:
        return normalize_email(typed)
    except InvalidArgument:
        return None


def response_uri(redirect_uri: str, params: dict[str, str]) -> str:
    """§4.1.2: add parameters to the redirect URI's query, keeping the query it already has."""
    parts = urlsplit(redirect_uri)
    query = parse_qsl(parts.query, keep_blank_values=True)
    query.extend((k, v) for k, v in params.items() if v)
    return urlunsplit(parts._replace(query=urlencode(query)))


class AuthorizationEndpoint:
    """Use cases behind GET/POST /oauth/authorize."""

    def __init__(
        self, store: Store, clock: Clock, config: OAuthConfig, throttle: SignInThrottle
    ) -> None:
        self._store = store
        self._clock = clock
        self._config = config
        self._throttle = throttle

    # -- the request ---------------------------------------------------------------------------

    def validate(self, params: Sequence[tuple[str, str]]) -> AuthorizationRequest:
        """Check an authorization request; raises PageError or RedirectError."""
        values: dict[str, str] = {}
        repeated: set[str] = set()
        for name, value in params:
            if name in values:
                repeated.add(name)
            values[name] = value
        # §3.1: "Request and response parameters MUST NOT be included more than once."
        if repeated & {"client_id", "redirect_uri"}:
            raise PageError("The request repeats client_id or redirect_uri.")
        app, redirect_uri = self._client_and_redirect(values)
        state = values.get("state", "")

        def fail(error: OAuth2Error) -> RedirectError:
            return RedirectError(error, redirect_uri, state, self._config.issuer)

        if repeated:
            raise fail(InvalidRequest(f"repeated parameter {sorted(repeated)[0]}"))
        if len(state) > MAX_STATE:
            raise fail(InvalidRequest("state is too long"))
        response_type = values.get("response_type", "")
        if not response_type:
            raise fail(InvalidRequest("response_type is required"))
        if response_type != "code":
            raise fail(UnsupportedResponseType("only response_type=code is supported"))
        challenge = values.get("code_challenge", "")
        method = values.get("code_challenge_method", "")
        try:
            rfc7636.validate_challenge(challenge, method)
        except OAuth2Error as exc:
            raise fail(exc) from None
        scopes = self._requested_scopes(app, values.get("scope"), fail)
        return AuthorizationRequest(
            app=app,
            redirect_uri=redirect_uri,
            redirect_uri_given="redirect_uri" in values,
            scopes=scopes,
            state=state,
            code_challenge=challenge,
            code_challenge_method=method,
        )

    def _client_and_redirect(self, values: dict[str, str]) -> tuple[OAuthApp, str]:
        client_id = values.get("client_id", "")
        if not client_id:
            raise PageError("The request has no client_id.")
        with self._store.read() as uow:
            app = uow.oauth.apps.get(client_id[:100])
        # §4.1.2.1: with a missing or invalid client_id or redirect URI the server "MUST NOT
        # automatically redirect the user-agent to the invalid redirection URI".
        if app is None or app.deleted:
            raise PageError("Unknown application (client_id).")
        if "redirect_uri" in values:
            # RFC 9700 §4.1.3 / §2.1: exact string comparison with a registered URI.
            if values["redirect_uri"] not in app.redirect_uris:
                raise PageError("The redirect_uri is not registered for this application.")
            uri = values["redirect_uri"]
        elif len(app.redirect_uris) == 1:
            # §3.1.2.3: may be omitted only when exactly one URI is registered.
            uri = app.redirect_uris[0]
        else:
            raise PageError("The request has no redirect_uri.")
        # Parsed again as a browser will (a URI registered before that check existed may be
        # one a browser sends elsewhere): never redirect to it.
        if uri_problem(uri):
            raise PageError("The registered redirect_uri is not safe to redirect to.")
        return app, uri

    @staticmethod
    def _requested_scopes(
        app: OAuthApp, raw: str | None, fail: Callable[[OAuth2Error], RedirectError]
    ) -> frozenset[str]:
        # §3.3: an omitted scope means the server's default: everything the app registered.
        if raw is None or not raw.strip():
            return app.scopes
        requested = frozenset(raw.split())
        unknown = sorted(requested - _KNOWN_SCOPES)
        if unknown:
            raise fail(InvalidScope(f"unknown scope {unknown[0]}"))
        beyond = sort_scopes(requested - app.scopes)
        if beyond:
            raise fail(InvalidScope(f"scope {beyond[0]} is not registered for this app"))
        return requested

    # -- sign-in -------------------------------------------------------------------------------

    def sign_in(
        self, workspace: str, email: str, password: str, *, source: str, request_id: str
    ) -> Member:
        """Check the member's password, throttled per account and source together (so a
        stranger's failures never lock the member out of their own browser) and per source."""
        address = _well_formed_email(email)
        # Whatever was typed is throttled under some name; a malformed one (perhaps a password)
        # only as a digest, even in memory.
        typed = hashlib.sha256(email.encode("utf-8", "replace")).hexdigest()
        account = f"{workspace}/{address or '#' + typed}"
        wait = self._throttle.retry_after(account, source)
        if wait:
            # Logged, not audited: a flood of attempts must not fill the audit trail.
            log.warning(
                "sign-in throttled",
                extra={"workspace": workspace, "source": source, "request_id": request_id},
            )
            raise SignInRefused("Too many failed sign-ins. Try again later.", wait)
        member = None
        if address is not None:
            with self._store.read() as uow:
                member = uow.oauth.members.get_by_email(workspace, address)
        stored = member.password_hash if member and member.password_hash else None
        ok = passwords.verify_password(
            password[: passwords.MAX_LENGTH], stored or passwords.dummy_hash()
        )
        if member is None or stored is None or not ok or not member.active:
            self._throttle.failed(account, source)
            self._audit_sign_in(member, workspace, address, source, request_id, ok=False)
            raise SignInRefused("Wrong e-mail address or password.")
        self._throttle.succeeded(account, source)
        return self._signed_in(member, source, request_id)

    def _signed_in(self, member: Member, source: str, request_id: str) -> Member:
        now = int(self._clock.now())
        with self._store.transaction() as uow:
            fresh = uow.oauth.members.get(member.id) or member
            member = replace(fresh, last_signin_at=now)
            uow.oauth.members.update(member)
            uow.audit.append(
                self._sign_in_event(
                    member, member.workspace, member.email, source, request_id, ok=True
                )
            )
        return member

    def _audit_sign_in(
        self,
        member: Member | None,
        workspace: str,
        address: str | None,
        source: str,
        request_id: str,
        *,
        ok: bool,
    ) -> None:
        with self._store.transaction() as uow:
            uow.audit.append(
                self._sign_in_event(member, workspace, address, source, request_id, ok=ok)
            )

    def _sign_in_event(
        self,
        member: Member | None,
        workspace: str,
        address: str | None,
        source: str,
        request_id: str,
        *,
        ok: bool,
    ) -> AuditEvent:
        if ok:
            reason = ""
        elif address is None:
            reason = "malformed e-mail address"
        elif member is None:
            reason = "unknown e-mail address"
        else:
            reason = "wrong password" if member.active else f"member {member.state}"
        # Only a well-formed address is recorded: what is typed into the e-mail box of a failed
        # sign-in is often a password, and the trail is append-only.
        metadata = {"source": source}
        if address is not None:
            metadata["email"] = address
        return event(
            self._clock.now(),
            member.id if member else "anonymous",
            "signin.succeeded" if ok else "signin.failed",
            workspace,
            member.id if member else "",
            outcome="success" if ok else "failure",
            reason=reason,
            request_id=request_id,
            metadata=metadata,
        )

    # -- consent -------------------------------------------------------------------------------

    def missing_scopes(self, request: AuthorizationRequest, member: Member) -> list[str]:
        """Requested scopes the member does not hold (they cannot delegate them)."""
        return sort_scopes(s for s in request.scopes if not satisfies(member.scopes, s))

    def approve(self, request: AuthorizationRequest, member: Member, request_id: str) -> str:
        """Record consent and issue a code; returns where to send the browser."""
        missing = self.missing_scopes(request, member)
        if missing:
            # The requested scopes must be within the member's (as well as the app's).
            raise RedirectError(
                InvalidScope(f"the member does not hold scope {missing[0]}"),
                request.redirect_uri,
                request.state,
                self._config.issuer,
            )
        code = credentials.mint(credentials.AUTHORIZATION_CODE)
        now = int(self._clock.now())
        record = AuthorizationCode(
            digest=credentials.digest(code),
            app_id=request.app.id,
            user_id=member.id,
            workspace=member.workspace,
            scopes=request.scopes,
            redirect_uri=request.redirect_uri,
            redirect_uri_given=request.redirect_uri_given,
            code_challenge=request.code_challenge,
            code_challenge_method=request.code_challenge_method,
            created_at=now,
            expires_at=now + self._config.code_ttl,
        )
        with self._store.transaction() as uow:
            uow.oauth.codes.insert(record)
            self._audit_consent(uow, request, member, request_id, granted=True)
        # §4.1.2: code and the exact state; RFC 9207: iss, against mix-up attacks.
        params = {"code": code, "state": request.state, "iss": self._config.issuer}
        return response_uri(request.redirect_uri, params)

    def deny(self, request: AuthorizationRequest, member: Member, request_id: str) -> str:
        """Record the refusal; returns the access_denied redirect (§4.1.2.1)."""
        with self._store.transaction() as uow:
            self._audit_consent(uow, request, member, request_id, granted=False)
        error = AccessDenied("the member denied the request")
        params = {**error.body(), "state": request.state, "iss": self._config.issuer}
        return response_uri(request.redirect_uri, params)

    def _audit_consent(
        self,
        uow: UnitOfWork,
        request: AuthorizationRequest,
        member: Member,
        request_id: str,
        *,
        granted: bool,
    ) -> None:
        uow.audit.append(
            event(
                self._clock.now(),
                member.id,
                "consent.granted" if granted else "consent.denied",
                member.workspace,
                request.app.id,
                request_id=request_id,
                metadata={"scopes": " ".join(sort_scopes(request.scopes))},
            )
        )
