"""A hostile tenant against the audit trail: erase or forge another tenant's decision records,
date records into the future, hide behind the operator key or a revoked credential, or read the
replication stream without the sync token. Real control plane, real sidecar, real gRPC."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import stat
import time
from collections.abc import Callable, Iterator
from itertools import pairwise
from pathlib import Path

import grpc
import pytest

from sidecar._gen.statuspulse.auth.v1 import replication_pb2 as rpb
from sidecar._gen.statuspulse.auth.v1 import replication_pb2_grpc as rpb_grpc
from sidecar.auditship import GrpcTransport, Shipper, Spool, TransportError
from sidecar.auditship.codec import decode, encode
from sidecar.auditship.records import decision_event
from sidecar.auditship.shipper import DEAD_LETTER_FILE
from sidecar.auditship.spool import parse_frames
from sidecar.authz.decision import DecisionIds, Identity, Reason
from sidecar.config import load_settings
from sidecar.controlplane import ControlPlane
from sidecar.core.audit import AuditEvent
from sidecar.core.audit_chain import sign_heads
from sidecar.core.audit_trail import SIDECAR, AuditTrail
from sidecar.core.clock import FakeClock
from sidecar.core.errors import FailedPrecondition
from sidecar.core.models import Principal, RequestContext
from sidecar.dataplane.process import Sidecar
from sidecar.store import open_store
from sidecar.store.sql.sqlite import SqliteStore
from tests.conftest import LoopThread, RunningControlPlane, bearer, free_port, wait_until
from tests.support.ops import call_check, check_request, create_key
from tests.support.sync import TEST_SYNC_TOKEN

CHECKS = "/v1/workspaces/acme/checks"


def record(did: str, workspace: str, when: float, *, actor: str = "key_x") -> AuditEvent:
    return decision_event(
        time=when,
        allowed=False,
        reason="insufficient_scope",
        credential_id=actor,
        workspace=workspace,
        method="GET",
        path=f"/v1/workspaces/{workspace}/checks",
        source="10.0.0.1",
        decision_id=did,
        latency_s=0.0001,
    )


def stored(plane: ControlPlane, event_id: str) -> AuditEvent | None:
    with plane.store.read() as uow:
        return uow.audit.get(event_id)


def decisions_of(plane: ControlPlane, workspace: str) -> list[AuditEvent]:
    with plane.store.read() as uow:
        return [e for e in uow.audit.recent(1000) if e.workspace == workspace]


def conflicts(plane: ControlPlane) -> float:
    value = plane.metrics.registry.get_sample_value("spauth_audit_ingest_conflicts_total")
    return value or 0.0


# -- decision ids ---------------------------------------------------------------------------


def _compiled_ids() -> Callable[[], str] | None:
    from sidecar.dataplane.fastcheck import unavailable

    if unavailable():
        return None
    from sidecar.dataplane import _fastcheck

    return _fastcheck.decision_id  # the compiled Check path's ids from the system's sources


@pytest.mark.parametrize("path", ["python", "compiled"])
def test_decision_ids_are_96_random_bits_without_a_counter(path: str) -> None:
    """An id is ``dec_``, 12 hex digits of the sidecar's clock in milliseconds (public: the
    Date header says as much) and 96 random bits; nothing of one id predicts another. Fails if
    the random part shrinks, a counter or a per-process constant appears in it."""
    asked: list[int] = []

    def fixed(n: int) -> bytes:
        asked.append(n)
        return bytes(range(n))

    clock = FakeClock(1_800_000_000.0)
    assert DecisionIds(fixed, clock).next() == "dec_" + "01a3185c5000" + bytes(range(12)).hex()
    assert asked == [12]
    make = DecisionIds(os.urandom, clock).next if path == "python" else _compiled_ids()
    if make is None:
        pytest.skip("the compiled Check path is not built here")
    ids = [make() for _ in range(2000)]
    assert all(re.fullmatch(r"dec_[0-9a-f]{36}", i) for i in ids)
    randoms = [int(i[16:], 16) for i in ids]
    assert len(set(randoms)) == 2000
    # No counter: consecutive ids are far apart (96 random bits: < 2**64 apart has odds 2**-31).
    assert all(abs(b - a) >= 1 << 64 for a, b in pairwise(randoms))
    # No constant: each of the 96 bits is 0 in some ids and 1 in others.
    assert all(0 < sum(r >> bit & 1 for r in randoms) < 2000 for bit in range(96))


# -- who may write decision records ---------------------------------------------------------


def test_a_tenant_admin_cannot_write_decision_records(
    control_plane: RunningControlPlane, sidecar_factory: Callable[..., Sidecar]
) -> None:
    """The report's attack: acme's admin reads a decision id from a 401 body and ingests
    records under the ids that follow, so the sidecar's real records (any workspace) would be
    dropped as duplicates."""
    sc = sidecar_factory()
    admin, _ = create_key(control_plane.address, control_plane.operator_key, ["admin:full"])
    globex, _ = create_key(control_plane.address, control_plane.operator_key, ["checks:read"],
                           workspace="globex")  # fmt: skip
    wait_until(lambda: len(sc.replica.by_digest) >= 3)
    seen = call_check(sc.port, check_request(CHECKS, {}))
    leaked_id = json.loads(seen.denied_response.body)["decision_id"]
    now = control_plane.clock.now()
    claims = [encode(record(leaked_id, "acme", now))]
    for token in (admin, control_plane.operator_key, ""):
        transport = GrpcTransport(control_plane.address, token, timeout=5)
        with pytest.raises(TransportError, match="UNAUTHENTICATED") as info:
            transport.send(claims)
        assert not info.value.rejected
        transport.close()
    # globex's real decisions are all recorded, under ids nobody could have claimed.
    ids = []
    for _ in range(5):
        resp = call_check(sc.port, check_request("/v1/workspaces/globex/checks", bearer(globex)))
        assert resp.status.code == 0
        ids.append(resp.dynamic_metadata.fields["decision_id"].string_value)
    assert sc.audit is not None
    sc.audit.flush(sync=True)
    wait_until(lambda: all(stored(control_plane.plane, i) is not None for i in ids), 30)
    assert all(stored(control_plane.plane, i).workspace == "globex" for i in ids)  # type: ignore[union-attr]


def test_a_differing_duplicate_is_refused_counted_and_dead_lettered(
    control_plane: RunningControlPlane, tmp_path: Path
) -> None:
    """Even a holder of the sync token (a compromised sidecar) cannot replace or pre-claim a
    record: a stored id with other content is refused, counted and kept aside, never
    acknowledged as stored."""
    plane = control_plane.plane
    now = control_plane.clock.now()
    real = record("dec_" + "ab" * 12, "globex", now - 5, actor="key_globex")
    forged = record(real.id, "acme", now - 5, actor="key_acme")
    insider = GrpcTransport(control_plane.address, TEST_SYNC_TOKEN, timeout=5)
    assert insider.send([encode(forged)]) == 1  # it claimed the id first
    before = conflicts(plane)
    spool = Spool(tmp_path / "spool")
    spool.append([encode(real), encode(record("dec_" + "cd" * 12, "globex", now - 4))])
    dead = tmp_path / "spool" / DEAD_LETTER_FILE
    shipper = Shipper(spool, insider, dead_letter=dead)
    assert shipper.drain(time.monotonic() + 30)
    assert shipper.stats().rejected == 1 and spool.pending_bytes == 0
    assert conflicts(plane) > before  # counted per refusal (the batch, then the record alone)
    frames, _ = parse_frames(dead.read_bytes())
    assert [decode(f).id for f in frames] == [real.id]
    assert stat.S_IMODE(dead.stat().st_mode) == 0o600
    # The re-send of an identical record is a duplicate, acknowledged and not stored twice.
    assert insider.send([encode(forged)]) == 1
    again = stored(plane, real.id)
    assert again is not None and again.workspace == "acme"  # the first writer's, not replaced
    assert stored(plane, "dec_" + "cd" * 12) is not None
    insider.close()
    spool.close()


def test_records_from_the_future_are_refused(control_plane: RunningControlPlane) -> None:
    now = control_plane.clock.now()
    transport = GrpcTransport(control_plane.address, TEST_SYNC_TOKEN, timeout=5)
    with pytest.raises(TransportError, match="future") as info:
        transport.send([encode(record("dec_" + "01" * 12, "acme", now + 365 * 86400))])
    assert info.value.rejected  # the shipper dead-letters it rather than retrying forever
    assert transport.send([encode(record("dec_" + "02" * 12, "acme", now + 60))]) == 1
    transport.close()


def test_an_id_shaped_like_a_credential_is_refused_and_never_stored(
    control_plane: RunningControlPlane,
) -> None:
    """Ids are stored as sent (they name the record), so one that is a credential would put the
    secret in the trail, its exports and every answer that names the record. Both forms a
    record id's characters allow are refused as malformed ids, answered redacted."""
    plane, now = control_plane.plane, control_plane.clock.now()
    api_key = "spk_" + "A1b2" * 8
    jwt_like = "eyJhbGciOi.eyJzdWIiOi.c2lnbmF0dXJl"
    transport = GrpcTransport(control_plane.address, TEST_SYNC_TOKEN, timeout=5)
    for secret in (api_key, jwt_like):
        with pytest.raises(TransportError) as info:
            transport.send([encode(record(secret, "acme", now - 1))])
        assert info.value.rejected
        assert secret not in str(info.value)
        assert stored(plane, secret) is None
    # A sidecar's own ids still go in.
    assert transport.send([encode(record("dec_" + "5a" * 12, "acme", now - 1))]) == 1
    transport.close()


# -- every decision recorded, attributed ----------------------------------------------------


def test_operator_and_revoked_key_decisions_are_recorded_where_their_owner_sees_them(
    control_plane: RunningControlPlane, sidecar_factory: Callable[..., Sidecar]
) -> None:
    sc = sidecar_factory()
    key, key_id = create_key(control_plane.address, control_plane.operator_key, ["checks:read"])
    wait_until(lambda: len(sc.replica.by_digest) >= 2)
    operator = call_check(sc.port, check_request(CHECKS, bearer(control_plane.operator_key)))
    assert json.loads(operator.denied_response.body)["reason"] == "operator_not_allowed"
    op_id = operator.dynamic_metadata.fields["decision_id"].string_value
    with control_plane.channel() as ch:
        from sidecar._gen.statuspulse.auth.v1 import api_keys_pb2 as kpb

        control_plane.keys_stub(ch).RevokeApiKey(
            kpb.RevokeApiKeyRequest(id=key_id), metadata=bearer(control_plane.operator_key)
        )
    wait_until(lambda: any(c.revoked for c in sc.replica.by_digest.values()))
    revoked = call_check(sc.port, check_request(CHECKS, bearer(key)))
    assert json.loads(revoked.denied_response.body)["reason"] == "revoked_credential"
    rev_id = revoked.dynamic_metadata.fields["decision_id"].string_value
    assert sc.audit is not None
    sc.audit.flush(sync=True)
    plane = control_plane.plane
    wait_until(lambda: None not in (stored(plane, op_id), stored(plane, rev_id)), 30)
    op, rev = stored(plane, op_id), stored(plane, rev_id)
    assert op is not None and rev is not None
    assert (op.workspace, op.reason) == ("*", "operator_not_allowed")  # the operator chain
    assert (rev.workspace, rev.actor, rev.reason) == ("acme", key_id, "revoked_credential")
    assert all(r.ok for r in plane.audit.verify(_operator_ctx(control_plane)))


def _operator_ctx(cp: RunningControlPlane) -> object:
    from sidecar.core.models import RequestContext

    return RequestContext(cp.plane.keys.authenticate(cp.operator_key), "req-test")


def test_a_verified_tokens_refused_use_is_attributed() -> None:
    from sidecar.auditship.records import PendingDecision
    from sidecar.authz.engine import CheckInput, Engine, TokenDenied
    from sidecar.authz.policy_source import load_policy
    from sidecar.authz.replica import Replica
    from sidecar.core.clock import FakeClock as Clock

    who = Identity("access_token", "jti_9", "acme", frozenset(), 0.0, "usr_1", "app_1", "g_1")

    def expired(token: str, replica: Replica, now: float) -> Identity:
        raise TokenDenied(Reason.TOKEN_EXPIRED, identity=who)

    replica = Replica()
    replica.loaded = True
    clock = Clock()
    replica.last_contact = clock.now()
    engine = Engine(replica, load_policy(None), clock, token_verifier=expired)
    view = CheckInput("GET", CHECKS, "api", {"authorization": "Bearer a.b.c"}, {})
    decision = engine.check(view)
    assert decision.reason is Reason.TOKEN_EXPIRED and decision.identity is who
    ev = PendingDecision(decision, "GET", CHECKS, "10.0.0.1", 0.0, clock.now()).event()
    assert (ev.workspace, ev.actor, ev.metadata["client_id"]) == ("acme", "usr_1", "app_1")


# -- never anonymous ------------------------------------------------------------------------


def test_replication_and_ingest_are_never_anonymous(
    tmp_path: Path, loop_thread: LoopThread
) -> None:
    data = tmp_path / "data"
    settings = load_settings(
        {"data_dir": str(data), "admin_addr": "127.0.0.1:0", "http_addr": "127.0.0.1:0"},
        environ={},
    )
    plane = ControlPlane(settings, clock=FakeClock())
    token_path = data / "sync-token"
    assert token_path.read_text().strip() == plane.sync_token and len(plane.sync_token) >= 64
    assert stat.S_IMODE(token_path.stat().st_mode) == 0o600
    loop_thread.run(plane.start())
    address = f"127.0.0.1:{plane.admin_port}"
    try:
        with grpc.insecure_channel(address) as ch:
            stub = rpb_grpc.ReplicationServiceStub(ch)
            for md in ((), bearer("wrong"), bearer(plane.sync_token[:-1])):
                with pytest.raises(grpc.RpcError) as info:
                    next(iter(stub.Subscribe(rpb.SubscribeRequest(), metadata=md, timeout=5)))
                assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
            first = next(iter(stub.Subscribe(rpb.SubscribeRequest(), metadata=bearer(
                plane.sync_token), timeout=5)))  # fmt: skip
            assert first.HasField("snapshot")
        anonymous = GrpcTransport(address, "", timeout=5)
        with pytest.raises(TransportError, match="UNAUTHENTICATED"):
            anonymous.send([encode(record("dec_" + "03" * 12, "acme", 1.7e9))])
        anonymous.close()
    finally:
        loop_thread.run(plane.aclose(grace=0))
    # The same token on the next start: sidecars keep working across restarts.
    again = ControlPlane(settings, clock=FakeClock())
    assert again.sync_token == plane.sync_token
    again.store.close()


def test_decisions_ship_to_whichever_control_plane_is_up(
    control_plane: RunningControlPlane,
) -> None:
    dead = f"127.0.0.1:{free_port()}"
    transport = GrpcTransport(f"{dead},{control_plane.address}", TEST_SYNC_TOKEN, timeout=3)
    now = control_plane.clock.now()
    assert transport.send([encode(record("dec_" + "04" * 12, "acme", now))]) == 1
    assert transport.send([encode(record("dec_" + "05" * 12, "acme", now))]) == 1
    transport.close()
    assert stored(control_plane.plane, "dec_" + "05" * 12) is not None


# -- tail and whole-chain tampering ----------------------------------------------------------

SIGNING_KEY = b"s" * 32


@pytest.fixture
def db(tmp_path: Path) -> Iterator[SqliteStore]:
    """A real SQLite file that the attacker (these tests) also edits with plain SQL."""
    store = SqliteStore(tmp_path / "trail.db")
    yield store
    store.close()


def _trail_with(db: SqliteStore, clock: FakeClock, key: bytes = SIGNING_KEY) -> AuditTrail:
    return AuditTrail(db, clock, key)


def _fill(trail: AuditTrail, clock: FakeClock, workspace: str, n: int, tag: str = "") -> None:
    ctx = RequestContext(SIDECAR, "req-shipper")
    trail.ingest(ctx, [record(f"dec_{workspace}{tag}_{i}", workspace, clock.now() - 100 + i)
                       for i in range(n)])  # fmt: skip


def _problems(trail: AuditTrail) -> dict[str, str]:
    op = RequestContext(Principal("key_op", "*", frozenset({"admin:full"})), "req-op")
    return {
        r.workspace: (r.first_break.problem.value if r.first_break else "ok")
        for r in trail.verify(op)
    }


def _sql(db: SqliteStore, statement: str, *args: object) -> None:
    with sqlite3.connect(db.path) as conn:
        conn.execute(statement, args)


def test_deleting_the_newest_records_is_reported(db: SqliteStore, clock: FakeClock) -> None:
    trail = _trail_with(db, clock)
    _fill(trail, clock, "acme", 5)
    assert trail.sign_heads()
    _sql(db, "DELETE FROM audit_events WHERE workspace = 'acme' AND chain_seq > 3")
    assert _problems(trail) == {"acme": "truncated"}
    # The control plane will not sign the shortened chain as the new truth.
    with pytest.raises(FailedPrecondition, match="shorter"):
        trail.sign_heads()


def test_rewriting_the_tail_with_recomputed_hashes_is_reported(
    db: SqliteStore, clock: FakeClock
) -> None:
    trail = _trail_with(db, clock)
    _fill(trail, clock, "acme", 5)
    assert trail.sign_heads()
    # The attacker knows the chain format: delete the last record, append another in its
    # place with a correct digest and link. The chain walk alone finds nothing wrong...
    _sql(db, "DELETE FROM audit_events WHERE workspace = 'acme' AND chain_seq = 5")
    with db.transaction() as uow:
        uow.audit.append(record("dec_forged", "acme", clock.now(), actor="key_innocent"))
    # ...but the record at the signed head's position is not the one that was signed.
    assert _problems(trail) == {"acme": "head_mismatch"}
    with pytest.raises(FailedPrecondition, match="rewritten"):
        trail.sign_heads()


def test_deleting_a_whole_chain_is_reported(db: SqliteStore, clock: FakeClock) -> None:
    trail = _trail_with(db, clock)
    _fill(trail, clock, "acme", 3)
    _fill(trail, clock, "globex", 3)
    assert trail.sign_heads()
    _sql(db, "DELETE FROM audit_events WHERE workspace = 'globex'")
    assert _problems(trail) == {"acme": "ok", "globex": "chain_missing"}


def test_signed_heads_cannot_be_forged_without_the_key(db: SqliteStore, clock: FakeClock) -> None:
    trail = _trail_with(db, clock)
    _fill(trail, clock, "acme", 5)
    assert trail.sign_heads()
    _sql(db, "DELETE FROM audit_events WHERE workspace = 'acme' AND chain_seq > 3")
    # Re-sign the shortened chain with a key of the attacker's own: not the signing key.
    with db.read() as uow:
        heads = {"acme": uow.audit.head("acme")}
    forged = sign_heads(b"attacker-key-0123456789abcdef!!", heads, clock.now())  # type: ignore[arg-type]
    _sql(db, "INSERT INTO audit_signed_heads (body, signature) VALUES (?, ?)", forged.body,
         forged.signature)  # fmt: skip
    assert _problems(trail) == {"acme": "heads_invalid"}


def test_replicas_sharing_the_signing_key_verify_each_others_heads(
    db: SqliteStore, clock: FakeClock
) -> None:
    """The key comes from a file or secret given to every replica (audit_signing_key_file),
    not from each data dir: a replica verifies what another signed."""
    one, two = _trail_with(db, clock), _trail_with(db, clock)
    _fill(one, clock, "acme", 3)
    assert one.sign_heads()
    _fill(two, clock, "acme", 2, tag="b")
    assert two.sign_heads()
    assert _problems(one) == _problems(two) == {"acme": "ok"}
    assert not one.sign_heads()  # nothing moved: nothing new to sign
    other_key = _trail_with(db, clock, b"k" * 32)
    assert _problems(other_key) == {"acme": "heads_invalid"}


def test_a_control_plane_with_the_signing_key_file_signs_and_verifies(
    tmp_path: Path, loop_thread: LoopThread
) -> None:
    key_file = tmp_path / "audit-signing-key"
    key_file.write_text("ab" * 32 + "\n")
    settings = load_settings(
        {
            "data_dir": str(tmp_path / "data"),
            "admin_addr": "127.0.0.1:0",
            "http_addr": "127.0.0.1:0",
            "audit_signing_key_file": str(key_file),
        },
        environ={},
    )
    plane = ControlPlane(settings, clock=FakeClock())
    minted = plane.bootstrap()
    assert minted is not None
    loop_thread.run(plane.start())
    try:
        wait_until(lambda: plane.audit.sign_heads() is False)  # signed at start (or now)
    finally:
        loop_thread.run(plane.aclose(grace=0))
    assert not (tmp_path / "data" / "audit-hmac-key").exists()  # the file's key, not a new one
    shared = AuditTrail(open_store(settings.store_url), FakeClock(), bytes.fromhex("ab" * 32))
    op = RequestContext(plane.keys.authenticate(minted.secret), "req")
    assert all(r.ok for r in shared.verify(op))


def test_verifying_a_workspace_without_chain_or_signed_head_is_an_empty_chain(
    db: SqliteStore, clock: FakeClock
) -> None:
    """Found by schemathesis: a workspace with neither records nor a signed head raised
    KeyError (a 500) once signed heads existed for others."""
    trail = _trail_with(db, clock)
    _fill(trail, clock, "acme", 2)
    assert trail.sign_heads()
    op = RequestContext(Principal("key_op", "*", frozenset({"admin:full"})), "req-op")
    (report,) = trail.verify(op, "nobody")
    assert report.workspace == "nobody" and report.ok and report.first_break is None


def test_a_direct_caller_cannot_keep_its_decisions_out_of_the_trail(
    control_plane: RunningControlPlane, sidecar_factory: Callable[..., Sidecar]
) -> None:
    """A caller of Check controls the method, path and source a decision record names. Ingest
    refuses a record holding U+0000 or a field over 512 characters, so such requests used to
    leave no trace in the trail (only in the sidecar's dead-letter file, which grew with every
    one, an error line and an fsync each). The sidecar now writes what ingest accepts: U+0000 as
    U+FFFD, each request field cut to 512 characters after redaction (which can lengthen a
    value: 'Bearer x' becomes '[redacted]')."""
    sc = sidecar_factory()
    key, _ = create_key(control_plane.address, control_plane.operator_key, ["checks:read"])
    wait_until(lambda: len(sc.replica.by_digest) >= 2)
    hostile = [
        check_request(CHECKS + "\x00/x", bearer(key)),
        check_request(CHECKS, bearer(key), method="G\x00T"),
        check_request(CHECKS, bearer(key), method="P" * 700),
        check_request(CHECKS, bearer(key)),
        check_request("/v1/workspaces/acme/" + "Bearer x " * 70, bearer(key)),
        check_request(CHECKS, bearer(key)),  # an allow: the compiled path records those
    ]
    hostile[3].attributes.source.address.socket_address.address = "10.0.0.1\x00" + "9" * 600
    hostile[5].attributes.source.address.socket_address.address = "10.0.0.1\x00"
    ids = []
    for request in hostile:
        answer = call_check(sc.port, request)
        ids.append(answer.dynamic_metadata.fields["decision_id"].string_value)
    assert all(ids)
    assert sc.audit is not None
    sc.audit.flush(sync=True)
    plane = control_plane.plane
    wait_until(lambda: all(stored(plane, did) is not None for did in ids), 30)
    found = [stored(plane, did) for did in ids]
    records = [r for r in found if r is not None]
    assert len(records) == len(ids) and all(r.workspace == "acme" for r in records)
    assert not any("\x00" in f"{r.target}{r.metadata}" for r in records)
    assert "\ufffd" in records[0].target and records[1].metadata["method"] == "G\ufffdT"
    assert records[2].metadata["method"] == "P" * 512
    assert len(records[3].metadata["source"]) == 512
    assert "[redacted]" in records[4].target and "Bearer" not in records[4].target
    assert len(records[4].target) == 512  # redaction lengthened it; cut again
    assert records[5].metadata["source"] == "10.0.0.1\ufffd"
    assert sc.audit.shipper is not None and sc.audit.shipper.stats().rejected == 0
    assert all(r.ok for r in plane.audit.verify(_operator_ctx(control_plane)))


def test_a_record_without_a_decision_id_is_fitted_the_same_way() -> None:
    """The other way a queued decision becomes a record (no decision id: the event, scrubbed):
    the same rules, so ingest accepts it too."""
    from sidecar.auditship.records import PendingDecision
    from sidecar.authz.decision import Decision
    from sidecar.core.audit_batch import MAX_FIELD

    denied = Decision(Reason.UNKNOWN_KEY, "", None, "")
    pending = PendingDecision(
        denied, "G\x00T" * 200, "/v1/" + "Bearer x " * 70, "10.0.0.1\x00", 0.0, 1_800_000_000.0
    )
    ev = decode(pending.payload())
    assert ev.metadata["method"] == ("G\ufffdT" * 200)[:MAX_FIELD]
    assert ev.metadata["source"] == "10.0.0.1\ufffd"
    assert len(ev.target) == MAX_FIELD and "[redacted]" in ev.target and "Bearer" not in ev.target
