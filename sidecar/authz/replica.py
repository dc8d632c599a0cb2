"""The sidecar's local replica of credential state: digests of usable API keys, token signing keys,
revoked grants and token ids. It is fed by change-log entries (a snapshot, then ordered changes)
and read on every check without locks.

The API keys are dense (docs/performance.md, "Replica size"): a packed key table from the last
snapshot (``keytable``: sorted digests, per-key columns, profiles shared between keys) and a small
overlay dict of what changed since (digest -> Credential, or None for a key gone), folded into a
new table once it grows past an eighth of the table. Writers (the sync thread, the housekeeping
prune) take ``_lock``; readers never do: they see one ``_Keys`` at a time, whose overlay only
gains or replaces entries, and a writer swaps in a copy of the lookup cache without the changed
keys *after* each change, so a credential built before the change is never kept while the keys
in use stay cached (clearing it on every change made every key in use rebuild its credential,
3 to 12 µs each, after every revocation anywhere in the fleet)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import replace
from ipaddress import ip_network
from typing import Any, Final

from sidecar.authz.decision import Identity
from sidecar.authz.keytable import Credential, KeyTable
from sidecar.core import changes
from sidecar.core.models import Change
from sidecar.core.packed import PackedKeys, PackError

log = logging.getLogger("sidecar.replica")

__all__ = ["Credential", "Replica", "ReplicaError"]

# Credentials built from table rows, kept for the keys in use (a change drops its own keys).
CACHE_SIZE = 8192
# The overlay is folded into a new table when it holds more than this many entries, or more
# than an eighth of the table's rows.
COMPACT_MIN = 4096
_ABSENT: Final = Credential(Identity("", "", "", frozenset(), 0))


class ReplicaError(ValueError):
    """A change could not be applied (malformed payload or revision out of order)."""


class _Keys:
    """The API keys at one moment: a table, the overlay of later changes, and the lookup cache."""

    __slots__ = ("cache", "overlay", "overlay_ids", "table")

    def __init__(self, table: KeyTable) -> None:
        self.table = table
        self.overlay: dict[bytes, Credential | None] = {}
        self.overlay_ids: dict[str, bytes] = {}  # key id -> digest, for the overlay's keys
        self.cache: dict[bytes, Credential] = {}

    def current(self, digest: bytes) -> Credential | None:
        cred = self.overlay.get(digest, _ABSENT)
        if cred is _ABSENT:
            row = self.table.row(digest)
            return None if row < 0 else self.table.credential_at(row)
        return cred

    def locate(self, key_id: str) -> bytes | None:
        """The digest key ``key_id`` was last known by."""
        digest = self.overlay_ids.get(key_id)
        if digest is not None:
            return digest
        row = self.table.packed.row_of_id(key_id)
        return None if row < 0 else self.table.packed.digest_at(row)

    def forget(self, *digests: bytes) -> None:
        """Swap in a copy of the cache without ``digests`` (after the change is in the overlay:
        a reader still holding the old cache may add a stale entry to it, never to this one)."""
        cache = dict(self.cache)  # one C call under the GIL: readers' inserts cannot interleave
        for digest in digests:
            cache.pop(digest, None)
        self.cache = cache

    def hide(self, digest: bytes) -> None:
        if self.table.row(digest) >= 0:
            self.overlay[digest] = None
        else:
            self.overlay.pop(digest, None)

    def shadowed_rows(self) -> set[int]:
        return {row for row in map(self.table.row, self.overlay) if row >= 0}

    def messages(self, drop: Iterable[int] = ()) -> Iterator[changes.CredentialUpserted]:
        """Every key as its entry: the table's rows the overlay leaves, then the overlay's."""
        skip = self.shadowed_rows().union(drop)
        packed = self.table.packed
        for row in range(len(packed)):
            if row not in skip:
                yield packed.message(row)
        for digest, cred in self.overlay.items():
            if cred is not None:
                yield message_of(digest, cred)

    def __len__(self) -> int:
        n = len(self.table)
        for digest, cred in self.overlay.items():
            in_table = self.table.row(digest) >= 0
            n += (cred is not None) - in_table
        return n

    def __iter__(self) -> Iterator[bytes]:
        skip = self.shadowed_rows()
        packed = self.table.packed
        for row in range(len(packed)):
            if row not in skip:
                yield packed.digest_at(row)
        yield from (d for d, cred in self.overlay.items() if cred is not None)


def message_of(digest: bytes, cred: Credential) -> changes.CredentialUpserted:
    ident = cred.identity
    return changes.CredentialUpserted(
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


def credential_of(m: changes.CredentialUpserted) -> Credential:
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
    return Credential(identity, revoked=m.revoked, suspended=m.suspended)


class CredentialView(Mapping[bytes, Credential]):
    """``replica.by_digest``: the usable API keys as a read-only mapping, digest -> Credential
    (for tools and tests; the check path calls ``Replica.credential``)."""

    def __init__(self, replica: Replica) -> None:
        self._replica = replica

    def __getitem__(self, digest: bytes) -> Credential:
        cred = self._replica.credential(digest)
        if cred is None:
            raise KeyError(digest)
        return cred

    def __iter__(self) -> Iterator[bytes]:
        with self._replica._lock:  # the overlay must not change while it is walked
            return iter(list(self._replica._keys))

    def __len__(self) -> int:
        with self._replica._lock:
            return len(self._replica._keys)


class Replica:
    """Credential state as of ``revision``."""

    def __init__(self) -> None:
        self.revision = 0
        # The change log ``revision`` counts in (the control plane's store); '' when unknown.
        self.log_id = ""
        self.loaded = False
        self._keys = _Keys(KeyTable.empty())
        self.signing_keys: dict[str, dict[str, Any]] = {}
        self.revoked_grants: dict[str, float] = {}
        self.revoked_jtis: dict[str, float] = {}
        self.last_contact = 0.0
        # Changes of a kind this version does not know, by kind, since the process started
        # (reported in health and metrics, never applied).
        self.unknown_kinds: dict[str, int] = {}
        self.compactions = 0
        self._lock = threading.RLock()

    # -- reads (hot path) --------------------------------------------------------------------

    def credential(self, digest: bytes) -> Credential | None:
        keys = self._keys
        cache = keys.cache  # taken before the overlay: see the module's docstring
        cred = cache.get(digest)
        if cred is None:
            cred = keys.overlay.get(digest, _ABSENT)
            if cred is _ABSENT:
                table = keys.table
                row = table.row(digest)
                if row < 0:
                    return None
                cred = table.credential_at(row)
            if cred is not None and len(cache) < CACHE_SIZE:
                cache[digest] = cred
        return cred

    @property
    def by_digest(self) -> CredentialView:
        return CredentialView(self)

    @property
    def table(self) -> KeyTable:
        """The packed key table of the last snapshot or compaction (without the overlay)."""
        return self._keys.table

    @property
    def overlay_size(self) -> int:
        return len(self._keys.overlay)

    # -- writes (under _lock) -------------------------------------------------------------------

    def load_snapshot(self, revision: int, entries: list[Change], log_id: str = "") -> None:
        """Replace the whole state with ``entries`` as of ``revision`` of change log
        ``log_id`` (the snapshot of a control plane that sends no packed key table, and the
        replica file of the previous format)."""
        fresh = Replica()
        pending: dict[str, changes.CredentialUpserted] = {}
        for entry in entries:
            message = fresh._parse(entry)
            if isinstance(message, changes.CredentialUpserted):
                pending[message.id] = message
            elif isinstance(message, changes.CredentialRevoked):
                if message.id in pending:
                    # A tombstone keeps the identity, so the denial can say "revoked".
                    pending[message.id] = replace(
                        pending[message.id], revoked=True, suspended=False
                    )
            elif message is not None:
                _APPLY[type(message)](fresh, message)
        fresh._keys = _Keys(_table(lambda: PackedKeys.pack(pending.values())))
        self._install(fresh, revision, log_id)

    def load_packed(
        self, revision: int, packed: PackedKeys, entries: list[Change], log_id: str = ""
    ) -> None:
        """Replace the whole state with the key table ``packed`` and the other ``entries``."""
        fresh = Replica()
        fresh._keys = _Keys(_table(lambda: packed))
        for entry in entries:
            fresh._apply(entry)
        self._install(fresh, revision, log_id)

    def _install(self, fresh: Replica, revision: int, log_id: str) -> None:
        with self._lock:
            # Swap attribute by attribute: each read sees a consistent table or dict.
            self._keys = fresh._keys
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
        with self._lock:
            if change.revision <= self.revision:
                return  # already applied (at-least-once delivery)
            self._apply(change)
            self.revision = change.revision
            keys = self._keys
            if len(keys.overlay) > max(COMPACT_MIN, len(keys.table) // 8):
                self._compact()

    def _parse(self, change: Change) -> changes.Message | None:
        try:
            return changes.parse(change)
        except changes.UnknownChangeKind as exc:
            # Not a silent skip: counted, logged and reported in health and metrics. The rest
            # of the log still applies (its revisions must not stall behind it).
            self.unknown_kinds[exc.kind[:64]] = self.unknown_kinds.get(exc.kind[:64], 0) + 1
            log.error(
                "change of unknown kind not applied",
                extra={"kind": exc.kind[:64], "revision": change.revision},
            )
            return None
        except changes.MalformedChange as exc:
            raise ReplicaError(str(exc)) from exc

    def _apply(self, change: Change) -> None:
        message = self._parse(change)
        if message is None:
            return
        try:
            _APPLY[type(message)](self, message)
        except (KeyError, TypeError, ValueError) as exc:
            raise ReplicaError(f"bad {change.kind} payload at revision {change.revision}") from exc

    def _upsert_credential(self, m: changes.CredentialUpserted) -> None:
        keys = self._keys
        cred = credential_of(m)
        old = keys.locate(m.id)
        if old is not None and old != m.digest:
            keys.hide(old)
        keys.overlay[m.digest] = cred
        keys.overlay_ids[m.id] = m.digest
        keys.forget(m.digest, old or m.digest)

    def _revoke_credential(self, m: changes.CredentialRevoked) -> None:
        keys = self._keys
        digest = keys.locate(m.id)
        if digest is None:
            return
        cred = keys.current(digest)
        if cred is not None:
            # Keep a tombstone so the denial can say "revoked" rather than "unknown".
            keys.overlay[digest] = Credential(cred.identity, revoked=True)
            keys.forget(digest)

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

    def _compact(self, drop: Iterable[int] = ()) -> None:
        """Fold the overlay into a new table (without the rows in ``drop``) and swap it in."""
        keys = self._keys
        gone = keys.shadowed_rows().union(drop)
        added = [message_of(d, cred) for d, cred in keys.overlay.items() if cred is not None]
        table = _table(lambda: keys.table.packed.merged(gone, added))
        self._keys = _Keys(table)
        self.compactions += 1

    def prune(self, now: float, margin: float = 86400) -> int:
        """Forget credentials and revocations that expired more than ``margin`` ago."""
        removed = 0
        with self._lock:
            keys = self._keys
            for digest, cred in list(keys.overlay.items()):
                if cred is not None and cred.expires_at + margin < now:
                    keys.hide(digest)
                    keys.overlay_ids.pop(cred.id, None)
                    removed += 1
            packed = keys.table.packed
            expired: list[int] = []
            if len(packed) and min(packed.expires) + margin < now:
                shadowed = keys.shadowed_rows()
                expired = [
                    row
                    for row, until in enumerate(packed.expires)
                    if until + margin < now and row not in shadowed
                ]
            if expired:
                self._compact(expired)
            elif removed:
                keys.cache = {}
            removed += len(expired)
            for table in (self.revoked_grants, self.revoked_jtis):
                for key, until in list(table.items()):
                    if until and until + margin < now:
                        table.pop(key, None)
                        removed += 1
        return removed

    # -- persistence ----------------------------------------------------------------------------

    def entries(self) -> list[Change]:
        """The state as change entries (the snapshot format of a control plane that sends no
        packed key table)."""
        out = [m.change() for m in self._keys.messages()]
        out.extend(self.other_entries())
        return out

    def other_entries(self) -> list[Change]:
        """Everything but the API keys, as change entries."""
        out = [changes.SigningKeyUpserted.parse(v).change() for v in self.signing_keys.values()]
        out.extend(changes.GrantRevoked(g, t).change() for g, t in self.revoked_grants.items())
        out.extend(changes.TokenRevoked(j, t).change() for j, t in self.revoked_jtis.items())
        return out

    def dumps(self) -> bytes:
        """The replica file's bytes (``replica_file``: digests and public keys only)."""
        from sidecar.authz import replica_file

        with self._lock:
            return replica_file.encode(self)

    def loads(self, data: bytes) -> None:
        """Restore state written by ``dumps``, or by the JSON format before it."""
        from sidecar.authz import replica_file

        replica_file.decode(self, data)


def _table(build: Callable[[], PackedKeys]) -> KeyTable:
    try:
        return KeyTable(build())
    except (PackError, ValueError) as exc:
        raise ReplicaError(f"bad key table: {exc}") from exc


_APPLY: dict[type[changes.Message], Callable[[Replica, Any], None]] = {
    changes.CredentialUpserted: Replica._upsert_credential,
    changes.CredentialRevoked: Replica._revoke_credential,
    changes.CredentialExpired: Replica._expire_credential,
    changes.SigningKeyUpserted: Replica._upsert_signing_key,
    changes.SigningKeyRetired: Replica._retire_signing_key,
    changes.GrantRevoked: Replica._revoke_grant,
    changes.TokenRevoked: Replica._revoke_jti,
}
