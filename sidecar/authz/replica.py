"""The sidecar's local replica of credential state: digests of usable API keys, token signing keys,
revoked grants and token ids. It is fed by change-log entries
(a snapshot, then ordered changes) and read on every check without locks: one writer thread swaps
immutable entries, readers see either the old or the new one."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import ip_network
from typing import Any

from sidecar.authz.decision import Identity
from sidecar.core import changes
from sidecar.core.models import Change

log = logging.getLogger("sidecar.replica")


@dataclass(frozen=True, slots=True)
class Credential:
    """A replicated API key: its digest is the dict key, never the secret. The identity is built
    once here so the hot path allocates nothing for it."""

    identity: Identity
    revoked: bool = False
    suspended: bool = False

    @property
    def id(self) -> str:
        return self.identity.id

    @property
    def expires_at(self) -> float:
        return self.identity.expires_at


class ReplicaError(ValueError):
    """A change could not be applied (malformed payload or revision out of order)."""


class Replica:
    """Credential state as of ``revision``."""

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
        fresh = Replica()
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

    # -- persistence ----------------------------------------------------------------------------

    def entries(self) -> list[Change]:
        """The state as change entries (the snapshot format)."""
        out: list[Change] = []
        for digest, cred in self.by_digest.items():
            ident = cred.identity
            message = changes.CredentialUpserted(
                ident.id,
                digest,
                ident.workspace,
                ident.scopes,
                int(ident.expires_at),
                ident.rate_limit,
                ident.rate_period,
                cred.revoked,
                suspended=cred.suspended,
                client_cidrs=tuple(str(n) for n in ident.networks),
            )
            out.append(message.change())
        out.extend(changes.SigningKeyUpserted.parse(v).change() for v in self.signing_keys.values())
        out.extend(changes.GrantRevoked(g, t).change() for g, t in self.revoked_grants.items())
        out.extend(changes.TokenRevoked(j, t).change() for j, t in self.revoked_jtis.items())
        return out

    def dumps(self) -> str:
        """A JSON document that ``loads`` restores (digests and public keys only)."""
        return json.dumps(
            {
                "format": 1,
                "revision": self.revision,
                "log_id": self.log_id,
                "last_contact": self.last_contact,
                "entries": [
                    {"kind": c.kind, "subject": c.subject, "payload": c.payload}
                    for c in self.entries()
                ],
            }
        )

    def loads(self, text: str) -> None:
        """Restore state written by ``dumps``."""
        try:
            doc = json.loads(text)
            if doc.get("format") != 1:
                raise ReplicaError("unknown replica file format")
            entries = [Change(e["kind"], e["subject"], e["payload"]) for e in doc["entries"]]
            revision = int(doc["revision"])
            log_id = str(doc.get("log_id", ""))  # files written before it existed: unknown
            last_contact = float(doc.get("last_contact", 0.0))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ReplicaError(f"unreadable replica file: {exc}") from exc
        self.load_snapshot(revision, entries, log_id)
        # Staleness counts from the last time the control plane was heard, not from the restart.
        self.last_contact = last_contact


_APPLY: dict[type[changes.Message], Callable[[Replica, Any], None]] = {
    changes.CredentialUpserted: Replica._upsert_credential,
    changes.CredentialRevoked: Replica._revoke_credential,
    changes.CredentialExpired: Replica._expire_credential,
    changes.SigningKeyUpserted: Replica._upsert_signing_key,
    changes.SigningKeyRetired: Replica._retire_signing_key,
    changes.GrantRevoked: Replica._revoke_grant,
    changes.TokenRevoked: Replica._revoke_jti,
}
