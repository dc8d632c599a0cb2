"""The sidecar's local replica of credential state: digests of usable API keys, token signing keys,
revoked grants and token ids. It is fed by change-log entries
(a snapshot, then ordered changes) and read on every check without locks: one writer thread swaps
immutable entries, readers see either the old or the new one."""

from __future__ import annotations

import json
from dataclasses import dataclass
from ipaddress import ip_network
from typing import Any

from sidecar.authz.decision import Identity
from sidecar.core.models import Change


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
        p = change.payload
        try:
            handler = _HANDLERS.get(change.kind)
            if handler is not None:
                handler(self, p)
        except (KeyError, TypeError, ValueError) as exc:
            raise ReplicaError(f"bad {change.kind} payload at revision {change.revision}") from exc

    def _upsert_credential(self, p: dict[str, Any]) -> None:
        digest = bytes.fromhex(str(p["digest"]))
        old = self._digest_of.get(str(p["id"]))
        if old is not None and old != digest:
            self.by_digest.pop(old, None)
        self._digest_of[str(p["id"])] = digest
        identity = Identity(
            kind="api_key",
            id=str(p["id"]),
            workspace=str(p["workspace"]),
            scopes=frozenset(str(s) for s in p["scopes"]),
            # A replaced key's grace deadline ends it like an expiry, enforced here.
            expires_at=min(int(p["expires_at"]), int(p.get("grace_deadline") or p["expires_at"])),
            rate_limit=int(p.get("rate_limit", 0)),
            rate_period=int(p.get("rate_period", 0)),
            networks=tuple(ip_network(str(c)) for c in p.get("client_cidrs", ())),
        )
        self.by_digest[digest] = Credential(
            identity,
            revoked=bool(p.get("revoked", False)),
            suspended=bool(p.get("suspended", False)),
        )

    def _revoke_credential(self, p: dict[str, Any]) -> None:
        digest = self._digest_of.get(str(p["id"]))
        if digest is None:
            return
        cred = self.by_digest.get(digest)
        if cred is not None:
            # Keep a tombstone so the denial can say "revoked" rather than "unknown".
            self.by_digest[digest] = Credential(cred.identity, revoked=True)

    def _expire_credential(self, p: dict[str, Any]) -> None:
        # Expiry is evaluated against the clock at every check; nothing to change here.
        str(p["id"])

    def _upsert_signing_key(self, p: dict[str, Any]) -> None:
        self.signing_keys[str(p["kid"])] = dict(p)

    def _retire_signing_key(self, p: dict[str, Any]) -> None:
        self.signing_keys.pop(str(p["kid"]), None)

    def _revoke_grant(self, p: dict[str, Any]) -> None:
        self.revoked_grants[str(p["grant_id"])] = float(p.get("expires_at", 0))

    def _revoke_jti(self, p: dict[str, Any]) -> None:
        self.revoked_jtis[str(p["jti"])] = float(p.get("expires_at", 0))

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
            payload: dict[str, object] = {
                "id": ident.id,
                "digest": digest.hex(),
                "workspace": ident.workspace,
                "scopes": sorted(ident.scopes),
                "expires_at": int(ident.expires_at),
            }
            if ident.rate_limit:
                payload["rate_limit"] = ident.rate_limit
                payload["rate_period"] = ident.rate_period
            if cred.revoked:
                payload["revoked"] = True
            out.append(Change("credential.upserted", cred.id, payload))
        out.extend(Change("signing_key.upserted", k, dict(v)) for k, v in self.signing_keys.items())
        out.extend(
            Change("grant.revoked", g, {"grant_id": g, "expires_at": t})
            for g, t in self.revoked_grants.items()
        )
        out.extend(
            Change("token.revoked", j, {"jti": j, "expires_at": t})
            for j, t in self.revoked_jtis.items()
        )
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


_HANDLERS = {
    "credential.upserted": Replica._upsert_credential,
    "credential.revoked": Replica._revoke_credential,
    "credential.expired": Replica._expire_credential,
    "signing_key.upserted": Replica._upsert_signing_key,
    "signing_key.retired": Replica._retire_signing_key,
    "grant.revoked": Replica._revoke_grant,
    "token.revoked": Replica._revoke_jti,
}
