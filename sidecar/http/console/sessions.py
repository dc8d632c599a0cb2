"""Signed-in console sessions: an absolute lifetime kept by the store, an idle timeout kept in
the cookie.

The cookie is ``<session id>.<last seen>.<mac>``: the session id is the same random secret the
sign-in page's sessions use (stored only as a digest, with its absolute expiry), and
``last seen`` is the time of the member's latest request, sealed with an HMAC under the server
key so a client can neither forge nor extend it. Every request re-seals the cookie with the
current time; a cookie whose ``last seen`` is older than the idle timeout ends the session.
Nothing is written to the store per request, and every control-plane replica that shares the
store (and so the key) accepts the cookie."""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from sidecar.core.clock import Clock
from sidecar.core.oauth_models import Member
from sidecar.oauth.sessions import BrowserSessions, new_session_id

COOKIE_NAME = "spauth_console"
# Before sign-in: a random id that only binds the sign-in form's CSRF token.
PRE_COOKIE_NAME = "spauth_console_pre"
_IDLE_PURPOSE = "console-idle"


@dataclass(frozen=True, slots=True)
class SessionPolicy:
    """Idle and absolute session lifetimes, in seconds (OWASP: 15-30 min idle for
    high-value applications, a few hours absolute)."""

    idle: int = 30 * 60
    absolute: int = 8 * 3600


@dataclass(frozen=True, slots=True)
class SignedIn:
    """A live session: its member, its id (binds CSRF tokens) and the re-sealed cookie."""

    member: Member
    session_id: str
    cookie: str


class ConsoleSessions:
    """Start, open (check and refresh) and end console sessions."""

    def __init__(self, sessions: BrowserSessions, clock: Clock, policy: SessionPolicy) -> None:
        self._sessions = sessions
        self._clock = clock
        self.policy = policy

    def start(self, member: Member) -> str:
        """A new session for ``member``; returns the cookie value."""
        return self._seal(self._sessions.start(member))

    def open(self, cookie: str) -> SignedIn | None:
        """The signed-in member of ``cookie``, or None when it is forged, idle too long,
        past its absolute expiry, or its member was disabled."""
        session_id = self._unseal(cookie)
        if session_id is None:
            return None
        member = self._sessions.member(session_id)
        if member is None:
            return None
        return SignedIn(member, session_id, self._seal(session_id))

    def sign_out(self, signed: SignedIn, request_id: str) -> None:
        self._sessions.sign_out(signed.session_id, signed.member, request_id)

    def end(self, cookie: str) -> None:
        session_id = cookie.split(".", 1)[0]
        if session_id:
            self._sessions.end(session_id)

    def csrf_token(self, session_id: str) -> str:
        return self._sessions.csrf_token(session_id)

    def check_csrf(self, session_id: str, token: str) -> bool:
        return self._sessions.check_csrf(session_id, token)

    @staticmethod
    def new_pre_session() -> str:
        return new_session_id()

    def _seal(self, session_id: str) -> str:
        seen = str(int(self._clock.now()))
        return f"{session_id}.{seen}.{self._sessions.mac(_IDLE_PURPOSE, session_id + '.' + seen)}"

    def _unseal(self, cookie: str) -> str | None:
        parts = cookie.split(".")
        if len(parts) != 3 or not parts[1].isdigit() or len(parts[1]) > 12:
            return None
        session_id, seen, mac = parts
        expected = self._sessions.mac(_IDLE_PURPOSE, session_id + "." + seen)
        if not hmac.compare_digest(expected, mac):
            return None
        idle = self._clock.now() - int(seen)
        if idle >= self.policy.idle or idle < -60:
            # Idle too long (or sealed in the future): the session is over for good.
            self._sessions.end(session_id)
            return None
        return session_id
