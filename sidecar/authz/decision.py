"""A decision is a value: allowed or not, a stable reason code, and what to tell the caller.
Reason codes double as metric labels and audit fields, so they never change meaning."""

from __future__ import annotations

import enum
import os
import time
from collections.abc import Callable
from ipaddress import IPv4Network, IPv6Network
from typing import NamedTuple

from sidecar.core.clock import Clock, SystemClock


class Reason(enum.StrEnum):
    """Why a request was allowed or denied."""

    OK = "ok"
    PUBLIC_ROUTE = "public_route"
    # 401: the credential itself is the problem.
    MISSING_CREDENTIAL = "missing_credential"
    MALFORMED_CREDENTIAL = "malformed_credential"
    UNKNOWN_CREDENTIAL = "unknown_credential"
    EXPIRED_CREDENTIAL = "expired_credential"
    REVOKED_CREDENTIAL = "revoked_credential"
    SUSPENDED_CREDENTIAL = "suspended_credential"
    MALFORMED_TOKEN = "malformed_token"  # noqa: S105 (a reason code)
    UNKNOWN_KEY = "unknown_key"
    BAD_SIGNATURE = "bad_signature"
    ALG_NOT_ALLOWED = "alg_not_allowed"
    WRONG_TYPE = "wrong_type"
    WRONG_ISSUER = "wrong_issuer"
    WRONG_AUDIENCE = "wrong_audience"
    TOKEN_EXPIRED = "token_expired"  # noqa: S105 (a reason code)
    TOKEN_NOT_YET_VALID = "token_not_yet_valid"  # noqa: S105 (a reason code)
    INSUFFICIENT_CLAIMS = "insufficient_claims"
    LIFETIME_TOO_LONG = "lifetime_too_long"
    INVALID_WORKSPACE = "invalid_workspace"
    TOKEN_REVOKED = "token_revoked"  # noqa: S105 (a reason code)
    # 403: the credential is fine but does not reach this request.
    INSUFFICIENT_SCOPE = "insufficient_scope"
    WORKSPACE_MISMATCH = "workspace_mismatch"
    NO_ROUTE = "no_route"
    # The operator key (workspace ``*``) is an admin credential, not a data-plane one.
    OPERATOR_NOT_ALLOWED = "operator_not_allowed"
    # The key may be used only from its client networks, and this request came from elsewhere.
    CLIENT_NOT_ALLOWED = "client_not_allowed"
    # Others.
    MALFORMED_REQUEST = "malformed_request"
    # 400: dot-segments, encoded '.', '/' or '\\', backslashes or ';' parameters in the path.
    NON_CANONICAL_PATH = "non_canonical_path"
    RATE_LIMITED = "rate_limited"
    REPLICA_NOT_READY = "replica_not_ready"
    REPLICA_STALE = "replica_stale"


class Outcome(enum.StrEnum):
    """How a front end should answer, per reason."""

    ALLOW = "allow"
    UNAUTHENTICATED = "unauthenticated"
    FORBIDDEN = "forbidden"
    BAD_REQUEST = "bad_request"
    TOO_MANY = "too_many_requests"
    UNAVAILABLE = "unavailable"


OUTCOMES: dict[Reason, Outcome] = {
    Reason.OK: Outcome.ALLOW,
    Reason.PUBLIC_ROUTE: Outcome.ALLOW,
    Reason.INSUFFICIENT_SCOPE: Outcome.FORBIDDEN,
    Reason.WORKSPACE_MISMATCH: Outcome.FORBIDDEN,
    Reason.NO_ROUTE: Outcome.FORBIDDEN,
    Reason.OPERATOR_NOT_ALLOWED: Outcome.FORBIDDEN,
    Reason.NON_CANONICAL_PATH: Outcome.BAD_REQUEST,
    Reason.CLIENT_NOT_ALLOWED: Outcome.FORBIDDEN,
    Reason.MALFORMED_REQUEST: Outcome.BAD_REQUEST,
    Reason.RATE_LIMITED: Outcome.TOO_MANY,
    Reason.REPLICA_NOT_READY: Outcome.UNAVAILABLE,
    Reason.REPLICA_STALE: Outcome.UNAVAILABLE,
}
for _reason in Reason:
    OUTCOMES.setdefault(_reason, Outcome.UNAUTHENTICATED)

HTTP_STATUS: dict[Outcome, int] = {
    Outcome.ALLOW: 200,
    Outcome.UNAUTHENTICATED: 401,
    Outcome.FORBIDDEN: 403,
    Outcome.BAD_REQUEST: 400,
    Outcome.TOO_MANY: 429,
    Outcome.UNAVAILABLE: 503,
}


class Identity(NamedTuple):
    """Who a verified credential speaks for (never the credential itself).

    Immutable, hashable and compared by value, like the frozen dataclass it was; a NamedTuple
    because one is built for every cold access token (token cache off: every check), and a
    frozen dataclass sets its 12 fields one ``object.__setattr__`` at a time (≈ 2.3 against
    ≈ 0.9 µs). Being a tuple, it also compares equal to a plain tuple of the same values:
    nothing compares identities with anything but identities."""

    kind: str  # "api_key" or "access_token"
    id: str  # key id, or the token's jti
    workspace: str
    scopes: frozenset[str]
    expires_at: float
    subject: str = ""
    client_id: str = ""
    grant_id: str = ""
    # The signing key that verified an access token: a cached token is denied once its key
    # leaves the replica (retired, e.g. by ``rotate-signing-key --now``).
    key_id: str = ""
    # An API key's own request-rate limit: ``rate_limit`` requests per ``rate_period`` seconds
    # (0: none), enforced per sidecar and shared through Redis in scale-out.
    rate_limit: int = 0
    rate_period: int = 0
    # An API key's client networks (empty: any source), enforced against the request's source.
    networks: tuple[IPv4Network | IPv6Network, ...] = ()


class Decision(NamedTuple):
    """The answer to one check (a NamedTuple: built on every check, so it must be cheap)."""

    reason: Reason
    decision_id: str
    identity: Identity | None = None
    detail: str = ""

    @property
    def allowed(self) -> bool:
        return OUTCOMES[self.reason] is Outcome.ALLOW

    @property
    def outcome(self) -> Outcome:
        return OUTCOMES[self.reason]

    @property
    def http_status(self) -> int:
        return HTTP_STATUS[OUTCOMES[self.reason]]


DECISION_ID_BYTES = 12  # 96 random bits
DECISION_ID_TIME_HEX = 12  # 48 bits of Unix milliseconds, big-endian: until the year 10889
_MS_MASK = (1 << 48) - 1
DECISION_ID_LENGTH = len("dec_") + DECISION_ID_TIME_HEX + 2 * DECISION_ID_BYTES  # 40


class DecisionIds:
    """Time-ordered, unguessable decision ids: ``dec_``, the Unix time in milliseconds (12 hex
    digits, big-endian, so text order is time order) and 96 random bits (24 hex digits), no
    counter. A decision id is printed in every 401/403 body and names the decision's audit
    record, so a reader of one id must not be able to predict another (and claim its record
    first): the random part alone carries that. The time part puts each new id at the end of
    the audit store's id index instead of at a random page of it (docs/audit.md, "Decision
    ids"). ``random`` and ``clock`` are injectable (tests pass a seeded source and a fake
    clock); the compiled Check path builds the same text in C (``_fastcheck.c``,
    ``system_decision_id``) when both are the system's."""

    def __init__(
        self, random: Callable[[int], bytes] = os.urandom, clock: Clock | None = None
    ) -> None:
        self._random = random
        self._clock: Clock = clock if clock is not None else _SYSTEM_CLOCK
        # On every Python-path check: time.time itself, not SystemClock.now's extra frame.
        self._now = time.time if type(self._clock) is SystemClock else self._clock.now

    def next(self) -> str:
        ms = int(self._now() * 1000) & _MS_MASK
        return "dec_" + (ms.to_bytes(6, "big") + self._random(DECISION_ID_BYTES)).hex()

    def uses_system_sources(self) -> bool:
        """Whether ids come from ``os.urandom`` and the system clock (the compiled Check path
        then draws the same bytes from getrandom(2) and reads CLOCK_REALTIME itself; otherwise
        it calls ``next``)."""
        return self._random is os.urandom and type(self._clock) is SystemClock


_SYSTEM_CLOCK = SystemClock()
