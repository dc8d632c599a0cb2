"""Browser sessions and CSRF tokens for the sign-in and consent pages.

Every visitor gets a random session id in an HttpOnly, SameSite=Lax cookie (Secure behind
TLS). Before sign-in it is stored nowhere; signing in replaces it with a fresh id (no session
fixation) whose SHA-256 digest is stored with the member. A form's CSRF token is an HMAC of the
session id under a server key, so a cross-site page can neither read nor forge it (OWASP's
"signed double-submit cookie")."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading

from sidecar.core.audit import event
from sidecar.core.clock import Clock
from sidecar.core.oauth_models import BrowserSession, Member
from sidecar.core.storage import Store

COOKIE_NAME = "spauth_session"
_CSRF_KEY_NAME = "csrf_key"


def new_session_id() -> str:
    """256 random bits, URL-safe."""
    return secrets.token_urlsafe(32)


def _digest(session_id: str) -> bytes:
    return hashlib.sha256(session_id.encode("utf-8", "surrogateescape")).digest()


class BrowserSessions:
    """Signed-in sessions in the store, and CSRF tokens bound to the session id."""

    def __init__(self, store: Store, clock: Clock, ttl: int) -> None:
        self._store = store
        self._clock = clock
        self.ttl = ttl
        self._key: bytes | None = None
        self._lock = threading.Lock()

    def _csrf_key(self) -> bytes:
        with self._lock:
            if self._key is None:
                self._key = self._load_or_create_key()
            return self._key

    def _load_or_create_key(self) -> bytes:
        with self._store.transaction() as uow:
            key = uow.oauth.server_secrets.get(_CSRF_KEY_NAME)
            if key is None:
                key = secrets.token_bytes(32)
                uow.oauth.server_secrets.insert(_CSRF_KEY_NAME, key, int(self._clock.now()))
        return key

    def csrf_token(self, session_id: str) -> str:
        """The token every form of this session carries."""
        return self.mac("csrf", session_id)

    def mac(self, purpose: str, value: str) -> str:
        """HMAC-SHA256 of ``value`` under the server key, separated by ``purpose`` (a token
        made for one purpose never passes for another)."""
        data = purpose.encode() + b":" + value.encode("utf-8", "surrogateescape")
        return hmac.new(self._csrf_key(), data, hashlib.sha256).hexdigest()

    def check_csrf(self, session_id: str, token: str) -> bool:
        return bool(session_id) and hmac.compare_digest(self.csrf_token(session_id), token)

    def start(self, member: Member) -> str:
        """A new signed-in session for ``member``; returns the new cookie value."""
        session_id = new_session_id()
        now = int(self._clock.now())
        session = BrowserSession(
            digest=_digest(session_id),
            user_id=member.id,
            workspace=member.workspace,
            created_at=now,
            expires_at=now + self.ttl,
        )
        with self._store.transaction() as uow:
            uow.oauth.sessions.insert(session)
        return session_id

    def member(self, session_id: str) -> Member | None:
        """The signed-in, unexpired member of this session, if any."""
        if not session_id:
            return None
        with self._store.read() as uow:
            session = uow.oauth.sessions.get(_digest(session_id))
            if session is None or session.expires_at <= self._clock.now():
                return None
            member = uow.oauth.members.get(session.user_id)
        if member is None or not member.active:
            return None
        return member

    def end(self, session_id: str) -> None:
        with self._store.transaction() as uow:
            uow.oauth.sessions.delete(_digest(session_id))

    def sign_out(self, session_id: str, member: Member, request_id: str) -> None:
        """End a signed-in session at the member's request, audited with the member as actor."""
        with self._store.transaction() as uow:
            uow.oauth.sessions.delete(_digest(session_id))
            uow.audit.append(
                event(
                    self._clock.now(),
                    member.id,
                    "signout",
                    member.workspace,
                    member.id,
                    request_id=request_id,
                )
            )

    def purge(self) -> int:
        with self._store.transaction() as uow:
            return uow.oauth.sessions.purge(int(self._clock.now()))
