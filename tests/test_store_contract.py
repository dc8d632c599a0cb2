"""One contract for every storage backend: each test runs against a real SQLite file and a real
PostgreSQL database (the ``store`` fixture is parametrized; see conftest). What one backend
promises, the other must keep, including under concurrent writers on several replicas."""

from __future__ import annotations

import base64
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import psycopg
import pytest
from authlib.oauth2.rfc7636 import create_s256_code_challenge

from sidecar.core.apikeys import ApiKeyService
from sidecar.core.apps import AppService
from sidecar.core.audit import AuditQuery, event
from sidecar.core.audit_trail import AuditTrail
from sidecar.core.changes import CredentialUpserted
from sidecar.core.clock import FakeClock
from sidecar.core.errors import Unavailable
from sidecar.core.models import ApiKey, Change, KeyState, Principal, RequestContext
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
from sidecar.core.packed import AS_ROW, PackedKeys
from sidecar.core.storage import Store
from sidecar.core.users import UserService
from sidecar.oauth.config import OAuthConfig
from sidecar.oauth.errors import InvalidGrant
from sidecar.oauth.server import AuthorizationServer
from sidecar.replication import packing
from sidecar.replication.packing import native_table, pack_store_rows
from sidecar.store import open_store
from sidecar.store.sql import migrations
from sidecar.store.sql.postgres import PostgresStore
from sidecar.store.sql.sqlite import SqliteStore
from tests.support.postgres import PostgresServer
from tests.support.signing import TEST_KEK

# -- helpers ------------------------------------------------------------------------------------


def make_key(n: int, **kw: object) -> ApiKey:
    fields: dict[str, object] = {
        "id": f"key_{n:04d}",
        "digest": bytes([n % 256]) * 32,
        "last_four": f"{n:04d}",
        "name": f"key {n}",
        "workspace": "acme",
        "scopes": frozenset({"checks:read", "metrics:read"}),
        "created_at": 1000 + n,
        "expires_at": 10_000,
        "created_by": "key_operator",
    }
    fields.update(kw)
    return ApiKey(**fields)  # type: ignore[arg-type]


@pytest.fixture
def second(store: Store) -> Iterator[Store]:
    """Another store on the same database: a second control-plane replica."""
    other = open_store(_url_of(store))
    yield other
    other.close()


def _url_of(store: Store) -> str:
    if isinstance(store, PostgresStore):
        return store.url
    assert isinstance(store, SqliteStore)
    return str(store.path)


# -- API keys -----------------------------------------------------------------------------------


def test_key_round_trip_and_update(store: Store) -> None:
    key = make_key(1, expiry_recorded=False, grace_deadline=None)
    with store.transaction() as uow:
        uow.keys.insert(key)
    with store.read() as uow:
        assert uow.keys.get(key.id) == key
        assert uow.keys.get_by_digest(key.digest) == key
        assert uow.keys.get("key_missing") is None
        assert uow.keys.get_by_digest(b"\x00" * 32) is None
    changed = make_key(
        1,
        revoked_at=2000,
        revoke_reason="leaked",
        replaced_by="key_0002",
        grace_deadline=3000,
        expiry_recorded=True,
    )
    with store.transaction() as uow:
        uow.keys.update(changed)
    with store.read() as uow:
        assert uow.keys.get(key.id) == changed


def test_key_digest_is_unique(store: Store) -> None:
    with store.transaction() as uow:
        uow.keys.insert(make_key(1))
    with pytest.raises(Exception, match=r"(?i)unique"), store.transaction() as uow:
        uow.keys.insert(make_key(2, digest=make_key(1).digest))


def test_key_pages_newest_first_by_state_and_cursor(store: Store) -> None:
    keys = [
        make_key(1),
        make_key(2, workspace="other"),
        make_key(3, revoked_at=1500),
        make_key(4, expires_at=1100),
        make_key(5),
        make_key(6, created_at=1005),  # same created_at as key 5: id breaks the tie
    ]
    with store.transaction() as uow:
        for k in keys:
            uow.keys.insert(k)
    now = 2000
    with store.read() as uow:

        def ids(**kw: object) -> list[str]:
            args: dict[str, object] = {"workspace": None, "state": None, "after": None}
            args.update(kw)
            return [k.id for k in uow.keys.page(now=now, limit=10, **args)]  # type: ignore[arg-type]

        assert ids() == ["key_0006", "key_0005", "key_0004", "key_0003", "key_0002", "key_0001"]
        assert ids(workspace="acme", state=KeyState.ACTIVE) == ["key_0006", "key_0005", "key_0001"]
        assert ids(state=KeyState.REVOKED) == ["key_0003"]
        assert ids(state=KeyState.EXPIRED) == ["key_0004"]
        assert ids(after=(1005, "key_0006")) == [
            "key_0005",
            "key_0004",
            "key_0003",
            "key_0002",
            "key_0001",
        ]
        first = uow.keys.page(workspace=None, state=None, now=now, limit=2, after=None)
        assert [k.id for k in first] == ["key_0006", "key_0005"]


def test_replica_rows_are_the_usable_keys_as_a_replica_keeps_them(store: Store) -> None:
    """The lean snapshot read answers exactly the entries built from full usable keys."""
    with store.transaction() as uow:
        uow.keys.insert(make_key(1, expires_at=1500))  # expired
        uow.keys.insert(make_key(2, grace_deadline=1800, rate_limit=5, rate_period=60))
        uow.keys.insert(make_key(3, suspended_at=1900, client_cidrs=("10.0.0.0/8",)))
        uow.keys.insert(make_key(4, revoked_at=1200))
        uow.keys.insert(make_key(5, workspace="globex", scopes=frozenset()))
    with store.read() as uow:
        rows = sorted(uow.keys.replica_rows(2000))
        expected = sorted(AS_ROW(CredentialUpserted.of(k)) for k in uow.keys.usable(2000))
    assert rows == expected
    assert [r[0] for r in rows] == ["key_0002", "key_0003", "key_0005"]


def test_packing_rows_pack_to_the_table_the_replica_rows_pack_to(store: Store) -> None:
    """The snapshot build's lean read (sidecar/replication/packing.py) packs byte for byte as
    the replica rows do, on both backends: revoked and expired keys left out, a replaced key's
    grace folded in, suspended keys, limits, networks, several workspaces."""
    with store.transaction() as uow:
        uow.keys.insert(make_key(1, expires_at=1500))  # expired
        uow.keys.insert(make_key(2, grace_deadline=1800, rate_limit=5, rate_period=60))
        uow.keys.insert(make_key(3, suspended_at=1900, client_cidrs=("10.0.0.0/8", "::1/128")))
        uow.keys.insert(make_key(4, revoked_at=1200))
        uow.keys.insert(make_key(5, workspace="globex", scopes=frozenset()))
        uow.keys.insert(make_key(6, workspace='ü "quoted" \\ ws', grace_deadline=0))
        uow.keys.insert(make_key(7, grace_deadline=20_000))  # a deadline after the expiry
        uow.keys.insert(make_key(11, id="key_a", workspace="globex", scopes=frozenset()))
    with store.read() as uow:
        lean = pack_store_rows(uow.keys.packing_rows(2000)).encode()
        reference = PackedKeys.pack_rows(list(uow.keys.replica_rows(2000))).encode()
        assert len(list(uow.keys.packing_rows(2000))) == 6
        # In the table's own order, for the compiled packing (when it is built here).
        unordered = sorted(uow.keys.packing_rows(2000, ordered=False))
        assert unordered == sorted(uow.keys.packing_rows(2000))
        native = native_table(uow.keys.packing_rows(2000, ordered=False))
        assert native is None if packing.unavailable() else native is not None
    assert lean == reference
    assert native is None or native.encode() == reference


def test_expiring_keys_are_counted_per_workspace(store: Store) -> None:
    """The expiry metric's count: unrevoked keys expiring inside the window, per workspace."""
    with store.transaction() as uow:
        uow.keys.insert(make_key(1, expires_at=2500))
        uow.keys.insert(make_key(2, expires_at=3000))  # the window's end is inside it
        uow.keys.insert(make_key(3, expires_at=2500, workspace="globex"))
        uow.keys.insert(make_key(4, expires_at=2500, revoked_at=1500))
        uow.keys.insert(make_key(5, expires_at=2000))  # expired at ``now``
        uow.keys.insert(make_key(6, expires_at=3001))
    with store.read() as uow:
        assert uow.keys.expiring_by_workspace(2000, 3000) == {"acme": 2, "globex": 1}


def test_key_sweep_usable_and_operator(store: Store) -> None:
    with store.transaction() as uow:
        assert not uow.keys.has_operator()
        uow.keys.insert(make_key(1, expires_at=1500))  # expired, not yet recorded
        uow.keys.insert(make_key(2, expires_at=1500, expiry_recorded=True))
        uow.keys.insert(make_key(3, grace_deadline=1800))  # replaced, grace over
        uow.keys.insert(make_key(4))  # usable
        uow.keys.insert(make_key(5, revoked_at=1200))
        uow.keys.insert(make_key(6, workspace="*"))
    with store.read() as uow:
        assert sorted(k.id for k in uow.keys.due_for_sweep(2000)) == ["key_0001", "key_0003"]
        assert sorted(k.id for k in uow.keys.usable(2000)) == ["key_0003", "key_0004", "key_0006"]
        assert uow.keys.has_operator()
    with store.transaction() as uow:
        uow.keys.insert(make_key(7, workspace="*", expires_at=20_000))
        uow.keys.insert(make_key(8, workspace="*", revoked_at=1900))
    with store.read() as uow:
        operators = uow.keys.active_operators(2000)
        assert [k.id for k in operators] == ["key_0007", "key_0006"]  # latest expiry first
        assert [k.id for k in uow.keys.active_operators(10_000)] == ["key_0007"]
        assert uow.keys.active_operators(20_000) == []


# -- change log, transactions, notifications -----------------------------------------------------


def test_change_log_appends_in_order_and_resumes(store: Store) -> None:
    with store.read() as uow:
        assert uow.changes.head() == 0
        assert uow.changes.since(0, 10) == []
    revisions = []
    for i in range(5):
        with store.transaction() as uow:
            revisions.append(uow.changes.append(Change("credential.revoked", f"k{i}", {"n": i})))
    assert revisions == sorted(revisions) and len(set(revisions)) == 5
    with store.read() as uow:
        assert uow.changes.head() == revisions[-1]
        tail = uow.changes.since(revisions[1], 2)
    assert [(c.revision, c.subject, c.payload) for c in tail] == [
        (revisions[2], "k2", {"n": 2}),
        (revisions[3], "k3", {"n": 3}),
    ]
    assert tail[0].kind == "credential.revoked"


def test_change_log_has_a_fixed_random_id(store: Store, tmp_path: Path) -> None:
    """Sidecars resume only within the log their revision counts in: its id is random per
    database, and the same for every store opened on it."""
    with store.read() as uow:
        first = uow.changes.log_id()
    with store.transaction() as uow:
        uow.changes.append(Change("credential.revoked", "k", {}))
    with store.read() as uow:
        assert uow.changes.log_id() == first
    assert len(first) == 32 and int(first, 16) >= 0
    other = SqliteStore(tmp_path / "another.db")
    try:
        with other.read() as uow:
            other_id = uow.changes.log_id()
        assert other_id not in ("", first)
    finally:
        other.close()
    again = SqliteStore(tmp_path / "another.db")  # reopened: migrations do not run twice
    try:
        with again.read() as uow:
            assert uow.changes.log_id() == other_id
    finally:
        again.close()


def test_a_failed_transaction_writes_nothing_and_notifies_no_one(store: Store) -> None:
    seen: list[int] = []
    store.subscribe(seen.append)

    def fail_midway() -> None:
        with store.transaction() as uow:
            uow.keys.insert(make_key(1))
            ev = event(time=1.5, actor="t", action="key.create", workspace="acme", target="k")
            uow.audit.append(ev)
            uow.changes.append(Change("credential.upserted", "key_0001", {}))
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        fail_midway()
    with store.read() as uow:
        assert uow.keys.get("key_0001") is None
        assert uow.audit.recent(10) == []
        assert uow.changes.head() == 0
    assert seen == []


def test_subscribers_hear_the_head_after_commit_until_unsubscribed(store: Store) -> None:
    seen: list[tuple[int, int]] = []

    def listener(revision: int) -> None:
        # Called after commit: a fresh read already sees the change.
        with store.read() as uow:
            seen.append((revision, uow.changes.head()))

    unsubscribe = store.subscribe(listener)
    with store.transaction() as uow:
        uow.changes.append(Change("a", "1", {}))
        last = uow.changes.append(Change("a", "2", {}))
    with store.transaction() as uow:
        uow.keys.insert(make_key(1))  # no change-log entry: no notification
    assert seen == [(last, last)]
    unsubscribe()
    with store.transaction() as uow:
        uow.changes.append(Change("a", "3", {}))
    assert len(seen) == 1


def test_a_read_is_one_consistent_snapshot(store: Store, second: Store) -> None:
    with store.transaction() as uow:
        uow.changes.append(Change("a", "1", {}))
    with store.read() as uow:
        head = uow.changes.head()
        # Another replica commits while this read is open: the read does not see it.
        with second.transaction() as other:
            other.keys.insert(make_key(1))
            other.changes.append(Change("credential.upserted", "key_0001", {}))
        assert uow.changes.head() == head
        assert uow.keys.get("key_0001") is None
    with store.read() as uow:
        assert uow.changes.head() > head
        assert uow.keys.get("key_0001") is not None


def test_concurrent_writers_on_two_replicas_never_lose_a_revision(
    store: Store, second: Store
) -> None:
    """A reader that resumes after the newest revision it saw must never miss one that commits
    later with a lower number (the gap a bare sequence would leave)."""
    writers, per_writer = 6, 10
    committed: list[int] = []
    lock = threading.Lock()
    done = threading.Event()

    def write(s: Store, seed: int) -> None:
        rnd = random.Random(seed)
        for i in range(per_writer):
            with s.transaction() as uow:
                revision = uow.changes.append(Change("a", f"{seed}-{i}", {}))
                time.sleep(rnd.uniform(0, 0.004))  # commit late, after others took numbers
            with lock:
                committed.append(revision)

    seen: list[int] = []

    def tail() -> None:
        after = 0
        while True:
            finished = done.is_set()
            with store.read() as uow:
                batch = uow.changes.since(after, 1000)
            seen.extend(c.revision for c in batch)
            after = batch[-1].revision if batch else after
            if finished and not batch:
                return

    reader = threading.Thread(target=tail)
    reader.start()
    threads = [
        threading.Thread(target=write, args=((store, second)[n % 2], n)) for n in range(writers)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    reader.join(30)
    assert len(committed) == writers * per_writer
    assert seen == sorted(committed)


# -- audit --------------------------------------------------------------------------------------


def test_audit_is_append_only_newest_first(store: Store) -> None:
    events = [
        event(
            time=100.0 + i,
            actor="key_op",
            action="key.create",
            workspace="acme",
            target=f"key_{i}",
            request_id=f"req-{i}",
            metadata={"scopes": "checks:read", "n": str(i)},
        )
        for i in range(3)
    ]
    for ev in events:
        with store.transaction() as uow:
            uow.audit.append(ev)
    with store.read() as uow:
        assert uow.audit.recent(2) == [events[2], events[1]]


def test_concurrent_audit_appends_on_two_replicas_keep_one_valid_chain(
    store: Store, second: Store, clock: FakeClock
) -> None:
    """Each append reads its workspace's chain head and links after it: two replicas appending
    at once must neither fork the chain nor store records out of commit order."""

    def write(s: Store, n: int) -> None:
        for i in range(8):
            with s.transaction() as uow:
                uow.audit.append(event(100.0 + i, f"key_{n}", "key.created", "acme", f"k{n}-{i}"))

    threads = [threading.Thread(target=write, args=((store, second)[n % 2], n)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    op = RequestContext(Principal("key_op", "*", frozenset({"admin:full"})), "req")
    (report,) = AuditTrail(store, clock, b"k" * 32).verify(op)
    assert report.ok and report.records_checked == 48
    with store.read() as uow:
        stored = uow.audit.after(0, AuditQuery(), 100)
    assert [r.link.chain_seq for r in stored] == list(range(1, 49))


# -- OAuth repositories -------------------------------------------------------------------------


def test_oauth_apps_and_members(store: Store) -> None:
    app = OAuthApp(
        id="app_1",
        workspace="acme",
        name="Dashboard",
        redirect_uris=("https://a.test/cb", "http://127.0.0.1:9/cb"),
        scopes=frozenset({"dashboard:read"}),
        confidential=True,
        created_at=100,
        created_by="key_op",
        secret_digest=b"\x01" * 32,
        secret_last_four="abcd",
    )
    public = OAuthApp(
        "app_2", "other", "CLI", ("http://127.0.0.1/cb",), frozenset(), False, 101, "k"
    )
    member = Member(
        "usr_1", "acme", "dev@acme.test", "scrypt$x", frozenset({"checks:read"}), 5, "k"
    )
    with store.transaction() as uow:
        uow.oauth.apps.insert(app)
        uow.oauth.apps.insert(public)
        uow.oauth.members.insert(member)
        uow.oauth.members.insert(Member("usr_2", "other", "x@o.test", "h", frozenset(), 6, "k"))
    rotated = OAuthApp(
        **{
            **{f: getattr(app, f) for f in app.__dataclass_fields__},
            "secret_digest": b"\x02" * 32,
            "previous_secret_digest": b"\x01" * 32,
            "previous_secret_expires_at": 500,
        }
    )
    with store.transaction() as uow:
        uow.oauth.apps.update(rotated)
    with store.read() as uow:
        assert uow.oauth.apps.get("app_1") == rotated
        assert uow.oauth.apps.get("app_2") == public
        assert [a.id for a in uow.oauth.apps.list(workspace=None, limit=10)] == ["app_2", "app_1"]
        assert [a.id for a in uow.oauth.apps.list(workspace="acme", limit=10)] == ["app_1"]
        assert uow.oauth.members.get("usr_1") == member
        assert uow.oauth.members.get_by_email("acme", "dev@acme.test") == member
        assert uow.oauth.members.get_by_email("other", "dev@acme.test") is None
        assert [m.id for m in uow.oauth.members.list(workspace=None, limit=10)] == [
            "usr_2",
            "usr_1",
        ]
        assert [m.id for m in uow.oauth.members.list(workspace="acme", limit=1)] == ["usr_1"]
    offboarded = replace(member, disabled_at=7, last_signin_at=6, deleted_at=8, email="x@y.z")
    with store.transaction() as uow:
        uow.oauth.members.update(offboarded)
    with store.read() as uow:
        assert uow.oauth.members.get("usr_1") == offboarded
        assert [m.id for m in uow.oauth.members.list(workspace=None, limit=10)] == ["usr_2"]


def test_oauth_grants_codes_and_tokens(store: Store) -> None:
    grant = Grant("grt_1", "app_1", "usr_1", "acme", frozenset({"dashboard:read"}), 10, 10)
    code = AuthorizationCode(
        b"\x03" * 32, "app_1", "usr_1", "acme", frozenset({"a"}), "http://x/cb", True,
        "challenge", "S256", 10, 610,
    )  # fmt: skip
    refresh = RefreshToken(b"\x04" * 32, "grt_1", 10, 1000)
    with store.transaction() as uow:
        uow.oauth.grants.insert(grant)
        uow.oauth.grants.insert(Grant("grt_2", "app_1", "usr_1", "acme", frozenset(), 20, 20))
        uow.oauth.codes.insert(code)
        uow.oauth.codes.insert(
            AuthorizationCode(b"\x05" * 32, "app_1", "u", "acme", frozenset(), "", False, "c",
                              "S256", 1, 5)
        )  # fmt: skip
        uow.oauth.refresh_tokens.insert(refresh)
    revoked = Grant(
        "grt_1", "app_1", "usr_1", "acme", frozenset({"dashboard:read"}), 10, 50, 4000, 60, "reuse"
    )
    used = AuthorizationCode(**{**_fields(code), "used_at": 20, "grant_id": "grt_1"})
    rotated = RefreshToken(b"\x04" * 32, "grt_1", 10, 1000, rotated_at=30)
    with store.transaction() as uow:
        uow.oauth.grants.update(revoked)
        uow.oauth.codes.update(used)
        uow.oauth.refresh_tokens.update(rotated)
        assert uow.oauth.codes.purge(before=100) == 1
    with store.read() as uow:
        assert uow.oauth.grants.get("grt_1") == revoked
        assert [g.id for g in uow.oauth.grants.active_for_app("app_1")] == ["grt_2"]
        assert [g.id for g in uow.oauth.grants.active_for_user("usr_1")] == ["grt_2"]
        assert uow.oauth.grants.active_for_user("usr_9") == []
        assert [g.id for g in uow.oauth.grants.revoked_unexpired(3999)] == ["grt_1"]
        assert uow.oauth.grants.revoked_unexpired(4000) == []
        assert uow.oauth.codes.get(code.digest) == used
        assert uow.oauth.codes.get(b"\x05" * 32) is None
        assert uow.oauth.refresh_tokens.get(refresh.digest) == rotated


def test_oauth_revoked_tokens_sessions_and_secrets(store: Store) -> None:
    token = RevokedToken("jti-1", "grt_1", 900, 100)
    session = BrowserSession(b"\x06" * 32, "usr_1", "acme", 10, 70)
    with store.transaction() as uow:
        assert uow.oauth.revoked_tokens.insert(token)
        assert not uow.oauth.revoked_tokens.insert(RevokedToken("jti-1", "grt_1", 999, 101))
        uow.oauth.revoked_tokens.insert(RevokedToken("jti-2", "grt_1", 50, 10))
        uow.oauth.sessions.insert(session)
        uow.oauth.sessions.insert(BrowserSession(b"\x07" * 32, "usr_1", "acme", 10, 20))
        uow.oauth.server_secrets.insert("csrf", b"\x00\xff" * 16, 10)
    with store.transaction() as uow:
        assert uow.oauth.sessions.purge(before=30) == 1
    with store.read() as uow:
        assert uow.oauth.revoked_tokens.get("jti-1") == token
        assert uow.oauth.revoked_tokens.get("nope") is None
        assert [t.jti for t in uow.oauth.revoked_tokens.unexpired(60)] == ["jti-1"]
        assert uow.oauth.sessions.get(session.digest) == session
        assert uow.oauth.sessions.get(b"\x07" * 32) is None
        assert uow.oauth.server_secrets.get("csrf") == b"\x00\xff" * 16
        assert uow.oauth.server_secrets.get("other") is None
    with store.transaction() as uow:
        uow.oauth.sessions.delete(session.digest)
        uow.oauth.sessions.insert(BrowserSession(b"\x08" * 32, "usr_1", "acme", 10, 90))
        uow.oauth.sessions.insert(BrowserSession(b"\x09" * 32, "usr_2", "acme", 10, 90))
    with store.read() as uow:
        assert uow.oauth.sessions.get(session.digest) is None
    with store.transaction() as uow:
        assert uow.oauth.sessions.delete_for_user("usr_1") == 1
    with store.read() as uow:
        assert uow.oauth.sessions.get(b"\x08" * 32) is None
        assert uow.oauth.sessions.get(b"\x09" * 32) is not None


def test_signing_keys_current_and_published_in_insertion_order(store: Store) -> None:
    def key(kid: str, created: int, **kw: object) -> SigningKey:
        fields: dict[str, object] = {
            "kid": kid,
            "alg": "RS256",
            "private_pem": b"-----BEGIN PRIVATE KEY-----\x00",
            "public_jwk": {"kty": "RSA", "kid": kid, "n": "abc", "e": "AQAB"},
            "created_at": created,
        }
        fields.update(kw)
        return SigningKey(**fields)  # type: ignore[arg-type]

    with store.transaction() as uow:
        assert uow.oauth.signing_keys.current(300) is None
        uow.oauth.signing_keys.insert(key("k1", 100, superseded_at=200, retired_at=300))
        uow.oauth.signing_keys.insert(key("k2", 200, superseded_at=200))
        uow.oauth.signing_keys.insert(key("k3", 200))  # same second as k2: insertion order wins
        uow.oauth.signing_keys.insert(key("k4", 250, activates_at=400))  # ahead of time
    with store.read() as uow:
        assert uow.oauth.signing_keys.current(300) == key("k3", 200)
        assert [k.kid for k in uow.oauth.signing_keys.published()] == ["k4", "k3", "k2"]
        assert [k.kid for k in uow.oauth.signing_keys.pending(300)] == ["k4"]
        assert uow.oauth.signing_keys.current(400) == key("k4", 250, activates_at=400)
        assert uow.oauth.signing_keys.pending(400) == []
        assert [k.kid for k in uow.oauth.signing_keys.all()] == ["k4", "k3", "k2", "k1"]
    with store.transaction() as uow:
        uow.oauth.signing_keys.update(key("k3", 200, superseded_at=250))
    with store.read() as uow:
        assert uow.oauth.signing_keys.current(300) is None


def _fields(obj: object) -> dict[str, object]:
    return {f: getattr(obj, f) for f in obj.__dataclass_fields__}  # type: ignore[attr-defined]


# -- the schemas match --------------------------------------------------------------------------


def test_both_dialects_have_the_same_migrations() -> None:
    sqlite = [v for v, _ in migrations.load("sqlite")]
    postgres = [v for v, _ in migrations.load("postgres")]
    assert sqlite == postgres
    assert sqlite == list(range(1, len(sqlite) + 1))


@pytest.mark.postgres
def test_both_dialects_have_the_same_tables_and_columns(tmp_path: Path, postgres_url: str) -> None:

    SqliteStore(tmp_path / "s.db").close()
    with sqlite3.connect(tmp_path / "s.db") as conn:
        tables = [
            r[0]
            for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
            )
        ]
        lite = {t: {r[1] for r in conn.execute(f"PRAGMA table_info({t})")} for t in tables}
    open_store(postgres_url).close()
    with psycopg.connect(postgres_url) as pg:
        rows = pg.execute(
            "SELECT table_name, column_name FROM information_schema.columns "
            "WHERE table_schema = 'public'"
        ).fetchall()
    pg_tables: dict[str, set[str]] = {}
    for table, column in rows:
        pg_tables.setdefault(table, set()).add(column)
    # PostgreSQL has no rowid: its signing keys keep insertion order in a seq column.
    pg_tables["oauth_signing_keys"].discard("seq")
    assert pg_tables == lite


# -- OAuth use cases over two replicas ------------------------------------------------------------


class _Replica:
    """The OAuth use cases of one control-plane replica over its own store."""

    def __init__(self, store: Store, clock: FakeClock) -> None:

        # Replicas share the key-encryption key, as a deployment must (docs/oauth.md).
        self.server = AuthorizationServer(
            store,
            clock,
            OAuthConfig(issuer="http://127.0.0.1:8080", audience="statuspulse-api"),
            encryption=TEST_KEK,
        )
        self.server.start()


@pytest.fixture
def oauth_pair(
    store: Store, second: Store, clock: FakeClock
) -> tuple[_Replica, _Replica, Callable[[], str], str]:
    """Two replicas, a confidential app, a member, and a function that mints a fresh code."""

    keys = ApiKeyService(store, clock)
    minted = keys.bootstrap_operator_key()
    assert minted is not None
    op = RequestContext(keys.authenticate(minted.secret), "req")
    registered = AppService(store, clock).register(
        op,
        workspace="acme",
        name="Dashboard",
        redirect_uris=["http://127.0.0.1:9/cb"],
        scopes=["dashboard:read"],
        confidential=True,
    )
    member = UserService(store, clock).create(
        op, workspace="acme", email="dev@acme.test", password="correct horse battery staple",
        scopes=["dashboard:read"],
    )  # fmt: skip
    a, b = _Replica(store, clock), _Replica(second, clock)
    verifier = "v" * 50
    client_id = registered.app.id

    def new_code() -> str:

        request = a.server.authorization.validate(
            [
                ("response_type", "code"),
                ("client_id", client_id),
                ("redirect_uri", "http://127.0.0.1:9/cb"),
                ("scope", "dashboard:read"),
                ("state", "s"),
                ("code_challenge", create_s256_code_challenge(verifier)),
                ("code_challenge_method", "S256"),
            ]
        )
        location = a.server.authorization.approve(request, member, "req")
        return parse_qs(urlsplit(location).query)["code"][0]

    basic = base64.b64encode(f"{client_id}:{registered.client_secret}".encode()).decode()
    return a, b, new_code, f"Basic {basic}"


def _redeem(replica: _Replica, code: str, auth: str) -> dict[str, object]:
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": "http://127.0.0.1:9/cb",
        "code_verifier": "v" * 50,
    }
    return replica.server.token.handle(form, auth, "req").body()


def _refresh(replica: _Replica, token: str, auth: str) -> dict[str, object]:
    form = {"grant_type": "refresh_token", "refresh_token": token}
    return replica.server.token.handle(form, auth, "req").body()


def test_oauth_grant_across_replicas(
    oauth_pair: tuple[_Replica, _Replica, Callable[[], str], str],
) -> None:

    a, b, new_code, auth = oauth_pair
    tokens = _redeem(b, new_code(), auth)  # code issued on A, redeemed on B
    rotated = _refresh(a, str(tokens["refresh_token"]), auth)
    assert rotated["refresh_token"] != tokens["refresh_token"]
    # RFC 9700 §4.14.2: reuse of a rotated refresh token revokes the grant, on any replica.
    with pytest.raises(InvalidGrant):
        _refresh(b, str(tokens["refresh_token"]), auth)
    with pytest.raises(InvalidGrant):
        _refresh(a, str(rotated["refresh_token"]), auth)


def test_a_code_redeemed_on_two_replicas_at_once_issues_tokens_once(
    oauth_pair: tuple[_Replica, _Replica, Callable[[], str], str],
) -> None:
    """RFC 6749 §4.1.2: a code is single-use even when two replicas race to redeem it."""
    a, b, new_code, auth = oauth_pair
    for _ in range(5):
        code = new_code()
        assert sorted(_race(a, b, lambda r, code=code: _redeem(r, code, auth))) == [
            "issued",
            "refused",
        ]


def test_a_refresh_token_used_on_two_replicas_at_once_is_rotated_once(
    oauth_pair: tuple[_Replica, _Replica, Callable[[], str], str],
) -> None:
    """RFC 9700 §4.14.2: one use rotates the token; the other is a reuse, refused."""
    a, b, new_code, auth = oauth_pair
    for _ in range(5):
        token = str(_redeem(a, new_code(), auth)["refresh_token"])
        assert sorted(_race(a, b, lambda r, token=token: _refresh(r, token, auth))) == [
            "issued",
            "refused",
        ]


def _race(a: _Replica, b: _Replica, call: Callable[[_Replica], object]) -> list[str]:
    """Run ``call`` on both replicas at the same moment; what each one got."""
    outcomes: list[str] = []
    start = threading.Barrier(2)

    def run(replica: _Replica) -> None:
        start.wait()
        try:
            call(replica)
            outcomes.append("issued")
        except InvalidGrant:
            outcomes.append("refused")

    threads = [threading.Thread(target=run, args=(r,)) for r in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcomes


# -- PostgreSQL faults --------------------------------------------------------------------------


@pytest.fixture
def own_postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL server of this test's own, so it can be killed."""
    with PostgresServer() as server:
        yield server


@pytest.mark.postgres
def test_postgres_down_is_unavailable_and_recovers_without_reopening(
    own_postgres: PostgresServer,
) -> None:

    url = own_postgres.create_database("spauth")
    store = PostgresStore(url, timeout=1.0, reconnect_timeout=1.0)
    try:
        with store.transaction() as uow:
            uow.changes.append(Change("a", "1", {}))
        own_postgres.kill()
        seen: list[int] = []
        store.subscribe(seen.append)
        with pytest.raises(Unavailable) as caught, store.transaction() as uow:
            uow.changes.append(Change("a", "2", {}))
        # Hosts and ports go to the log, not into a message a client may see.
        assert str(own_postgres.port) not in str(caught.value)
        with pytest.raises(Unavailable), store.read() as uow:
            uow.changes.head()
        assert seen == []  # no false success
        own_postgres.start()
        deadline = time.monotonic() + 30
        while True:
            try:
                with store.transaction() as uow:
                    revision = uow.changes.append(Change("a", "3", {}))
                break
            except Unavailable:
                assert time.monotonic() < deadline, "the store did not recover"
                time.sleep(0.1)
        assert seen == [revision]
        with store.read() as uow:
            assert [c.subject for c in uow.changes.since(0, 10)] == ["1", "3"]
    finally:
        store.close()


@pytest.mark.postgres
def test_a_replica_started_before_its_database_waits_for_it() -> None:
    server = PostgresServer()  # initialized, not running yet
    try:
        starter = threading.Timer(1.0, server.start)
        starter.start()
        store = PostgresStore(server.url(), startup_timeout=60)
        starter.join()
        with store.read() as uow:
            assert uow.changes.head() == 0
        store.close()
    finally:
        server.close()


@pytest.mark.postgres
def test_a_dropped_connection_mid_transaction_is_unavailable(postgres_url: str) -> None:
    """A connection killed inside a transaction (failover, admin action) rolls back and says so;
    the next transaction gets a healthy connection."""

    store = PostgresStore(postgres_url, max_size=1)
    try:

        def cut_off_midway() -> None:
            with store.transaction() as uow:
                uow.keys.insert(make_key(1))
                with psycopg.connect(postgres_url, autocommit=True) as admin:
                    admin.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE application_name = 'spauth'"
                    )
                uow.changes.append(Change("credential.upserted", "key_0001", {}))

        with pytest.raises(Unavailable):
            cut_off_midway()
        with store.transaction() as uow:
            assert uow.keys.get("key_0001") is None
            uow.keys.insert(make_key(1))
        with store.read() as uow:
            assert uow.keys.get("key_0001") is not None
    finally:
        store.close()
