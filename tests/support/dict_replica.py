"""The sidecar's replica as it was before the dense one (a dict per digest, a Credential and an
Identity per key), kept verbatim as the reference model of tests/test_dense_replica.py: the dense
replica must answer exactly what this one answers. Only the persistence methods are left out."""

from __future__ import annotations

import logging
from collections.abc import Callable
from ipaddress import ip_network
from typing import Any

from sidecar.authz.decision import Identity
from sidecar.authz.replica import Credential, ReplicaError
from sidecar.core import changes
from sidecar.core.models import Change

log = logging.getLogger("tests.dict_replica")


class DictReplica:
    """The dict replica as it was before the dense one (the reference model)."""

    def __init__(self) -> None:
        self.revision = 0
        # The change log ``revision`` counts in (the control plane's store); '' when unknown.
        self.log_id = ""
        self.loaded = False
        self.by_digest: dict[bytes, Credential] = {}
        self._digest_of: dict[str, bytes] = {}
        self.signing_keys: dict[str, dict[str, Any]] = {}
        self.revoked_grants: dict[str, float] = {}
        self.revoked_jtis: dict[str, float] = {}
        self.last_contact = 0.0
        # Changes of a kind this version does not know, by kind, since the process started
        # (reported in health and metrics, never applied).
        self.unknown_kinds: dict[str, int] = {}

    # -- reads (hot path) --------------------------------------------------------------------

    def credential(self, digest: bytes) -> Credential | None:
        return self.by_digest.get(digest)

    # -- writes (one thread) -----------------------------------------------------------------

    def load_snapshot(self, revision: int, entries: list[Change], log_id: str = "") -> None:
        """Replace the whole state with ``entries`` as of ``revision`` of change log
        ``log_id``."""
        fresh = DictReplica()
        for entry in entries:
            fresh._apply(entry)
        # Swap attribute by attribute: each read sees a consistent dict.
        self._digest_of = fresh._digest_of
        self.by_digest = fresh.by_digest
        self.signing_keys = fresh.signing_keys
        self.revoked_grants = fresh.revoked_grants
        self.revoked_jtis = fresh.revoked_jtis
        for kind, count in fresh.unknown_kinds.items():
            self.unknown_kinds[kind] = self.unknown_kinds.get(kind, 0) + count
        self.revision = revision
        self.log_id = log_id
        self.loaded = True

    def apply(self, change: Change) -> None:
        """Apply one change; its revision must follow the current one."""
        if change.revision <= self.revision:
            return  # already applied (at-least-once delivery)
        self._apply(change)
        self.revision = change.revision

    def _apply(self, change: Change) -> None:
        try:
            message = changes.parse(change)
        except changes.UnknownChangeKind as exc:
            # Not a silent skip: counted, logged and reported in health and metrics. The rest
            # of the log still applies (its revisions must not stall behind it).
            self.unknown_kinds[exc.kind[:64]] = self.unknown_kinds.get(exc.kind[:64], 0) + 1
            log.error(
                "change of unknown kind not applied",
                extra={"kind": exc.kind[:64], "revision": change.revision},
            )
            return
        except changes.MalformedChange as exc:
            raise ReplicaError(str(exc)) from exc
        try:
            _APPLY[type(message)](self, message)
        except (KeyError, TypeError, ValueError) as exc:
            raise ReplicaError(f"bad {change.kind} payload at revision {change.revision}") from exc

    def _upsert_credential(self, m: changes.CredentialUpserted) -> None:
        old = self._digest_of.get(m.id)
        if old is not None and old != m.digest:
            self.by_digest.pop(old, None)
        self._digest_of[m.id] = m.digest
        identity = Identity(
            kind="api_key",
            id=m.id,
            workspace=m.workspace,
            scopes=m.scopes,
            # A replaced key's grace deadline ends it like an expiry, enforced here.
            expires_at=min(m.expires_at, m.grace_deadline or m.expires_at),
            rate_limit=m.rate_limit,
            rate_period=m.rate_period,
            networks=tuple(ip_network(c) for c in m.client_cidrs),
        )
        self.by_digest[m.digest] = Credential(identity, revoked=m.revoked, suspended=m.suspended)

    def _revoke_credential(self, m: changes.CredentialRevoked) -> None:
        digest = self._digest_of.get(m.id)
        if digest is None:
            return
        cred = self.by_digest.get(digest)
        if cred is not None:
            # Keep a tombstone so the denial can say "revoked" rather than "unknown".
            self.by_digest[digest] = Credential(cred.identity, revoked=True)

    def _expire_credential(self, m: changes.CredentialExpired) -> None:
        # Expiry is evaluated against the clock at every check; nothing to change here.
        return None

    def _upsert_signing_key(self, m: changes.SigningKeyUpserted) -> None:
        self.signing_keys[m.kid] = m.change().payload

    def _retire_signing_key(self, m: changes.SigningKeyRetired) -> None:
        self.signing_keys.pop(m.kid, None)

    def _revoke_grant(self, m: changes.GrantRevoked) -> None:
        self.revoked_grants[m.grant_id] = m.expires_at

    def _revoke_jti(self, m: changes.TokenRevoked) -> None:
        self.revoked_jtis[m.jti] = m.expires_at

    def prune(self, now: float, margin: float = 86400) -> int:
        """Forget credentials and revocations that expired more than ``margin`` ago."""
        removed = 0
        for digest, cred in list(self.by_digest.items()):
            if cred.expires_at + margin < now:
                self.by_digest.pop(digest, None)
                self._digest_of.pop(cred.id, None)
                removed += 1
        for table in (self.revoked_grants, self.revoked_jtis):
            for key, until in list(table.items()):
                if until and until + margin < now:
                    table.pop(key, None)
                    removed += 1
        return removed


_APPLY: dict[type[changes.Message], Callable[[DictReplica, Any], None]] = {
    changes.CredentialUpserted: DictReplica._upsert_credential,
    changes.CredentialRevoked: DictReplica._revoke_credential,
    changes.CredentialExpired: DictReplica._expire_credential,
    changes.SigningKeyUpserted: DictReplica._upsert_signing_key,
    changes.SigningKeyRetired: DictReplica._retire_signing_key,
    changes.GrantRevoked: DictReplica._revoke_grant,
    changes.TokenRevoked: DictReplica._revoke_jti,
}
