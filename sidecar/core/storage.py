"""The storage contract. One Protocol per aggregate, grouped in a unit of work so that a change,
its audit record and its change-log entry commit together or not at all."""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Protocol

from sidecar.core.audit import AuditEvent, AuditQuery
from sidecar.core.audit_batch import PreparedBatch
from sidecar.core.audit_chain import ChainedRecord, Checkpoint, Link, SignedHeads
from sidecar.core.models import ApiKey, Change, KeyState
from sidecar.core.oauth_models import (
    AuthorizationCode,
    BrowserSession,
    Grant,
    Member,
    OAuthApp,
    RefreshToken,
    RevokedToken,
    SigningKey,
)
from sidecar.core.usage import CredentialUse
from sidecar.core.webhooks import Delivery, Webhook

# A key as a replica snapshot carries it, in the field order of changes.CredentialUpserted:
# id, digest, workspace, scopes, expires_at, rate_limit, rate_period, revoked, grace_deadline,
# suspended, client_cidrs.
KeyRow = tuple[
    str, bytes, str, frozenset[str], int, int, int, bool, int | None, bool, tuple[str, ...]
]

# A key as the packed key table takes it from the store (sidecar/replication/packing.py): digest,
# id, expiry with a replaced key's grace deadline folded in (the earlier of the two), and what it
# shares with other keys as the JSON text of [workspace, scopes, rate_limit, rate_period,
# client_cidrs, suspended], scopes and networks as stored (space-separated).
PackRow = tuple[bytes, str, int, str]

Cursor = tuple[int, str]


class KeyRepository(Protocol):
    """API keys, by id and by digest."""

    def insert(self, key: ApiKey) -> None: ...

    def update(self, key: ApiKey) -> None: ...

    def get(self, key_id: str) -> ApiKey | None: ...

    def get_by_digest(self, digest: bytes) -> ApiKey | None: ...

    def page(
        self,
        *,
        workspace: str | None,
        state: KeyState | None,
        now: int,
        limit: int,
        after: Cursor | None,
        unused_since: int | None = None,
        expiring_before: int | None = None,
        rotation_due: bool = False,
    ) -> list[ApiKey]:
        """Keys newest first, strictly after ``after`` = (created_at, id). ``unused_since``
        keeps keys whose last use (or, never used, creation) is before that time;
        ``expiring_before`` usable keys expiring by then; ``rotation_due`` usable, unreplaced
        keys past their rotation schedule."""
        ...

    def due_for_sweep(self, now: int) -> list[ApiKey]:
        """Unrevoked keys whose expiry is not yet recorded but has passed, or whose grace
        deadline has passed."""
        ...

    def due_for_notice(self, now: int, warn_before: int) -> list[ApiKey]:
        """Usable keys not yet warned of that expire by ``warn_before``, and usable, unreplaced
        keys past their rotation schedule not yet recorded as due."""
        ...

    def expiring_by_workspace(self, now: int, before: int) -> dict[str, int]:
        """Usable keys expiring by ``before``, counted per workspace."""
        ...

    def usable(self, now: int) -> Iterator[ApiKey]:
        """Every unrevoked, unexpired key (the replica snapshot)."""
        ...

    def replica_rows(self, now: int) -> Iterator[KeyRow]:
        """The keys of ``usable``, each as only what a replica keeps (a snapshot of a million
        keys is read in seconds, not tens of seconds of full ``ApiKey`` objects)."""
        ...

    def packing_rows(self, now: int, *, ordered: bool = True) -> Iterator[PackRow]:
        """The keys of ``usable``, each as one ``PackRow``, in digest order (in the table's
        own order when not ``ordered``: a caller that sorts them itself saves the database's
        sort): four values per key instead of ten, the rest computed by the database (a cold
        start's snapshot build reads a million of them)."""
        ...

    def has_operator(self) -> bool: ...

    def active_operators(self, now: int) -> list[ApiKey]:
        """Unrevoked, unexpired operator keys (workspace ``*``), latest expiry first."""
        ...


class IdAlreadyStored(Exception):
    """``append_batch`` met a record whose id is stored already (the caller did not look its ids
    up): the transaction is void (rolled back on SQLite, aborted on PostgreSQL), so nothing more
    may run in it. Never reaches a transport: the audit trail stores the call again, with the
    lookup."""


class AuditRepository(Protocol):
    """The audit trail: append-only, one hash chain per workspace."""

    def append(self, event: AuditEvent) -> bool:
        """Store ``event`` (its secrets redacted) linked to its workspace's chain, in the
        current transaction. False, and nothing stored, when its id is stored already."""
        ...

    def append_new(self, events: Sequence[AuditEvent]) -> None:
        """Store ``events`` (secrets redacted), in order, each linked to its workspace's chain,
        in the current transaction. Their ids must not be stored yet, nor repeat: the caller
        looked them up with ``get_many`` in this same transaction (a stored id is a fault)."""
        ...

    def append_batch(self, batch: PreparedBatch, indices: Sequence[int]) -> None:
        """Store the records of an ingest batch at ``indices``, in that order, each linked to
        its workspace's chain, in the current transaction. Their ids must not repeat; they need
        not have been looked up: a stored one raises ``IdAlreadyStored``, and the transaction
        is then void."""
        ...

    def get(self, event_id: str) -> AuditEvent | None:
        """The stored record with this id, as stored (scrubbed)."""
        ...

    def get_many(self, event_ids: Collection[str]) -> dict[str, AuditEvent]:
        """The stored records among ``event_ids``, as stored, by id (absent ids are left out)."""
        ...

    def recent(self, limit: int) -> list[AuditEvent]: ...

    def page(
        self, query: AuditQuery, limit: int, before: tuple[float, int] | None
    ) -> list[ChainedRecord]:
        """Records newest first by (time, seq), strictly before ``before``."""
        ...

    def after(self, seq: int, query: AuditQuery, limit: int) -> list[ChainedRecord]:
        """Records in storage order, strictly after storage position ``seq``."""
        ...

    def last_seq(self) -> int:
        """The storage position of the newest record (0 when empty)."""
        ...

    def head(self, workspace: str) -> Link | None:
        """The link of a workspace's newest record, or of its checkpoint when pruned empty."""
        ...

    def chain(self, workspace: str, after_chain_seq: int, limit: int) -> list[ChainedRecord]:
        """A workspace's records in chain order, strictly after ``after_chain_seq``."""
        ...

    def workspaces(self) -> list[str]:
        """Every workspace that has a chain (records or a checkpoint)."""
        ...

    def checkpoint(self, workspace: str) -> Checkpoint | None:
        """The newest retention checkpoint of a workspace."""
        ...

    def prune_point(self, workspace: str, before: float) -> Link | None:
        """The last link of the longest chain prefix whose records are all older than
        ``before`` (None: nothing to prune)."""
        ...

    def latest_signed_heads(self) -> SignedHeads | None:
        """The newest signed heads, or None."""
        ...

    def add_signed_heads(self, signed: SignedHeads) -> None:
        """Store signed heads (newer than every stored one)."""
        ...

    def prune(self, checkpoint: Checkpoint) -> int:
        """Store ``checkpoint`` and delete its workspace's records up to its position."""
        ...


class UsageRepository(Protocol):
    """Credential uses reported by sidecars: last use per credential, counts per UTC day."""

    def record(self, report_id: str, uses: Sequence[CredentialUse], now: int) -> bool:
        """Add a report's counts; False, and nothing added, when ``report_id`` was recorded
        before."""
        ...

    def last_used(self, credential_ids: Sequence[str]) -> dict[str, int]:
        """Last use time of each id that was ever used."""
        ...

    def daily(self, credential_id: str, since_day: int) -> list[tuple[int, int]]:
        """(epoch day, uses) from ``since_day`` on, oldest first."""
        ...

    def prune(self, before_day: int, reports_before: int) -> int:
        """Delete daily counts older than ``before_day`` and report ids received before
        ``reports_before``."""
        ...


class WebhookRepository(Protocol):
    """Per-workspace webhooks and the outbox of their deliveries."""

    def insert(self, hook: Webhook) -> None: ...

    def update(self, hook: Webhook) -> None:
        """Change a webhook's url, events, sealed secret or deletion time."""
        ...

    def get(self, webhook_id: str) -> Webhook | None: ...

    def of_workspace(self, workspace: str) -> list[Webhook]:
        """Undeleted webhooks of a workspace, oldest first."""
        ...

    def all(self) -> list[Webhook]:
        """Every webhook of every workspace, deleted ones included (re-sealing their secrets)."""
        ...

    def enqueue(self, delivery: Delivery) -> None: ...

    def due(self, now: int, limit: int) -> list[Delivery]:
        """Pending deliveries whose next attempt is due, soonest first."""
        ...

    def record_attempt(self, delivery: Delivery) -> None:
        """Store a delivery's status, attempts, next attempt time and last error."""
        ...

    def recent_deliveries(self, webhook_id: str, limit: int) -> list[Delivery]: ...


class ChangeLog(Protocol):
    """Ordered changes with monotonically increasing revisions, for replica resume."""

    def append(self, change: Change) -> int: ...

    def since(self, revision: int, limit: int) -> list[Change]: ...

    def head(self) -> int: ...

    def log_id(self) -> str:
        """This log's identity (random, fixed at creation): revisions count within one log."""
        ...


class UnitOfWork(Protocol):
    """The repositories, bound to one transaction."""

    @property
    def keys(self) -> KeyRepository: ...

    @property
    def audit(self) -> AuditRepository: ...

    @property
    def changes(self) -> ChangeLog: ...

    @property
    def oauth(self) -> OAuthRepositories: ...

    @property
    def usage(self) -> UsageRepository: ...

    @property
    def webhooks(self) -> WebhookRepository: ...


class Store(Protocol):
    """A backend: transactions, consistent reads, and change notifications."""

    def transaction(self) -> AbstractContextManager[UnitOfWork]:
        """A write transaction: commits on success, rolls back on any exception."""
        ...

    def read(self) -> AbstractContextManager[UnitOfWork]:
        """A consistent read-only view."""
        ...

    def subscribe(self, callback: Callable[[int], None]) -> Callable[[], None]:
        """Call ``callback(head_revision)`` after each commit that appended changes; returns an
        unsubscribe function. Callbacks run on the committing thread and must be quick."""
        ...

    def close(self) -> None: ...


# -- OAuth (issue 4) -------------------------------------------------------------------------
# One repository per OAuth aggregate, reached through ``uow.oauth`` so the OAuth tables stay in
# their own classes and share the unit of work (one transaction with audit and change log).


class OAuthAppRepository(Protocol):
    """Registered applications, by client_id."""

    def insert(self, app: OAuthApp) -> None: ...

    def update(self, app: OAuthApp) -> None: ...

    def get(self, app_id: str) -> OAuthApp | None: ...

    def list(self, *, workspace: str | None, limit: int) -> list[OAuthApp]:
        """Undeleted apps, newest first."""
        ...


class MemberRepository(Protocol):
    """Workspace members, by id and by (workspace, e-mail)."""

    def insert(self, member: Member) -> None: ...

    def update(self, member: Member) -> None: ...

    def get(self, user_id: str) -> Member | None: ...

    def get_by_email(self, workspace: str, email: str) -> Member | None: ...

    def list(self, *, workspace: str | None, limit: int) -> list[Member]:
        """Undeleted members, newest first."""
        ...


class GrantRepository(Protocol):
    """Grants (an app's sessions)."""

    def insert(self, grant: Grant) -> None: ...

    def update(self, grant: Grant) -> None: ...

    def get(self, grant_id: str) -> Grant | None: ...

    def active_for_app(self, app_id: str) -> list[Grant]:
        """Unrevoked grants of an app, newest first."""
        ...

    def active_for_user(self, user_id: str) -> list[Grant]:
        """Unrevoked grants of a member, newest first."""
        ...

    def revoked_unexpired(self, now: int) -> list[Grant]:
        """Revoked grants whose access tokens may still be unexpired (the replica snapshot)."""
        ...


class AuthorizationCodeRepository(Protocol):
    """Authorization codes, by digest."""

    def insert(self, code: AuthorizationCode) -> None: ...

    def update(self, code: AuthorizationCode) -> None: ...

    def get(self, digest: bytes) -> AuthorizationCode | None: ...

    def purge(self, before: int) -> int:
        """Delete codes that expired before ``before``; returns how many."""
        ...


class RefreshTokenRepository(Protocol):
    """Refresh tokens, by digest."""

    def insert(self, token: RefreshToken) -> None: ...

    def update(self, token: RefreshToken) -> None: ...

    def get(self, digest: bytes) -> RefreshToken | None: ...


class RevokedTokenRepository(Protocol):
    """Access tokens revoked one by one."""

    def insert(self, token: RevokedToken) -> bool:
        """Record a revocation; False when the jti was revoked already."""
        ...

    def get(self, jti: str) -> RevokedToken | None: ...

    def unexpired(self, now: int) -> list[RevokedToken]: ...


class SigningKeyRepository(Protocol):
    """JWT signing keys."""

    def insert(self, key: SigningKey) -> None: ...

    def update(self, key: SigningKey) -> None: ...

    def current(self, now: int) -> SigningKey | None:
        """The key that signs new tokens at ``now``: the newest unsuperseded key whose
        ``activates_at`` has come."""
        ...

    def pending(self, now: int) -> list[SigningKey]:
        """Published keys that do not sign yet (ahead-of-time rollover), newest first."""
        ...

    def all(self) -> list[SigningKey]:
        """Every key, retired ones included, newest first."""
        ...

    def published(self) -> list[SigningKey]:
        """Keys in the JWKS (not retired), newest first."""
        ...


class BrowserSessionRepository(Protocol):
    """Signed-in browser sessions at the authorization endpoint, by digest of the cookie."""

    def insert(self, session: BrowserSession) -> None: ...

    def get(self, digest: bytes) -> BrowserSession | None: ...

    def delete(self, digest: bytes) -> None: ...

    def delete_for_user(self, user_id: str) -> int:
        """Sign a member out of every browser; returns how many sessions ended."""
        ...

    def purge(self, before: int) -> int: ...


class ServerSecretRepository(Protocol):
    """Random server-side keys shared by every control-plane process."""

    def get(self, name: str) -> bytes | None: ...

    def insert(self, name: str, value: bytes, now: int) -> None: ...


class OAuthRepositories(Protocol):
    """The OAuth repositories, bound to the same transaction as the rest of the unit of work."""

    @property
    def apps(self) -> OAuthAppRepository: ...

    @property
    def members(self) -> MemberRepository: ...

    @property
    def grants(self) -> GrantRepository: ...

    @property
    def codes(self) -> AuthorizationCodeRepository: ...

    @property
    def refresh_tokens(self) -> RefreshTokenRepository: ...

    @property
    def revoked_tokens(self) -> RevokedTokenRepository: ...

    @property
    def signing_keys(self) -> SigningKeyRepository: ...

    @property
    def sessions(self) -> BrowserSessionRepository: ...

    @property
    def server_secrets(self) -> ServerSecretRepository: ...
