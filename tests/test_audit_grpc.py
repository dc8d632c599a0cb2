"""AuditService over a real gRPC server on 127.0.0.1:0 and a real SQLite file."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from sidecar._gen.statuspulse.auth.v1 import api_keys_pb2 as kpb
from sidecar._gen.statuspulse.auth.v1 import audit_pb2 as pb
from sidecar._gen.statuspulse.auth.v1 import audit_pb2_grpc as pb_grpc
from sidecar.auditship.codec import encode
from sidecar.config import load_settings
from sidecar.controlplane import AUDIT_PRUNE_INTERVAL, ControlPlane
from sidecar.core.audit import AuditEvent, event
from sidecar.core.clock import FakeClock
from tests.conftest import LoopThread, RunningControlPlane, bearer, wait_until
from tests.support.sync import TEST_SYNC_TOKEN


class Client:
    """Stubs on one channel, with the keys and secrets minted by the test."""

    def __init__(self, plane: RunningControlPlane) -> None:
        self.plane = plane
        self.channel = plane.channel()
        self.keys = plane.keys_stub(self.channel)
        self.audit = pb_grpc.AuditServiceStub(self.channel)
        self.secrets = [plane.operator_key]

    def create_key(self, workspace: str, *scopes: str, key: str = "") -> kpb.CreateApiKeyResponse:
        resp = self.keys.CreateApiKey(
            kpb.CreateApiKeyRequest(workspace=workspace, name="job", scopes=list(scopes)),
            metadata=bearer(key or self.plane.operator_key),
        )
        self.secrets.append(resp.key)
        return resp

    def revoke(self, key_id: str) -> None:
        self.keys.RevokeApiKey(
            kpb.RevokeApiKeyRequest(id=key_id, reason="test"),
            metadata=bearer(self.plane.operator_key),
        )

    def list(self, key: str = "", page_size: int = 0, **filters: object) -> list[pb.AuditRecord]:
        out: list[pb.AuditRecord] = []
        token = ""
        while True:
            resp = self.audit.ListAuditRecords(
                pb.ListAuditRecordsRequest(
                    filter=pb.AuditFilter(**filters),  # type: ignore[arg-type]
                    page_size=page_size,
                    page_token=token,
                ),
                metadata=bearer(key or self.plane.operator_key),
            )
            out.extend(resp.records)
            token = resp.next_page_token
            if not token:
                return out


@pytest.fixture
def client(control_plane: RunningControlPlane) -> Iterator[Client]:
    c = Client(control_plane)
    yield c
    c.channel.close()


def code_of(fn: object, *args: object, **kwargs: object) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        fn(*args, **kwargs)  # type: ignore[operator]
    return info.value.code()  # type: ignore[no-any-return,attr-defined]


def test_key_events_are_listed_newest_first_with_filters_and_paging(client: Client) -> None:
    a = client.create_key("acme", "checks:read")
    client.plane.clock.advance(10)
    b = client.create_key("beta", "checks:read")
    client.plane.clock.advance(10)
    client.revoke(a.api_key.id)
    # (The OAuth service also records its signing key; this test is about key events.)
    records = [r for r in client.list(page_size=2) if r.action.startswith("key.")]
    assert [r.action for r in records] == [
        "key.revoked",
        "key.created",
        "key.created",
        "key.created",
    ]
    assert [r.target for r in records[:3]] == [a.api_key.id, b.api_key.id, a.api_key.id]
    assert records[0].reason == "test" and records[0].request_id.startswith("req_")
    assert records[-1].workspace == "*"  # the bootstrap operator key
    assert [r.target for r in client.list(workspace="acme")] == [a.api_key.id] * 2
    assert [r.action for r in client.list(action="key.revoked")] == ["key.revoked"]
    since = Timestamp(seconds=int(client.plane.clock.now()) - 15)
    until = Timestamp(seconds=int(client.plane.clock.now()) - 5)
    assert [r.target for r in client.list(since=since, until=until)] == [b.api_key.id]
    assert client.list(actor="key_nobody") == []
    assert {r.digest for r in records} and all(len(r.prev_digest) == 64 for r in records)


def test_access_needs_admin_full_in_the_workspace_or_the_operator_key(client: Client) -> None:
    admin = client.create_key("acme", "admin:full").key
    manager = client.create_key("acme", "keys:manage").key
    client.create_key("beta", "checks:read")
    assert {r.workspace for r in client.list(key=admin)} == {"acme"}
    denied = grpc.StatusCode.PERMISSION_DENIED
    assert code_of(client.list, key=admin, workspace="beta") is denied
    assert code_of(client.list, key=manager) is denied
    request = pb.VerifyAuditChainRequest(workspace="beta")
    assert code_of(client.audit.VerifyAuditChain, request, metadata=bearer(admin)) is denied
    assert (
        code_of(client.audit.ListAuditRecords, pb.ListAuditRecordsRequest())
        is grpc.StatusCode.UNAUTHENTICATED
    )
    tail = client.audit.TailAuditRecords(pb.TailAuditRecordsRequest(), metadata=bearer(manager))
    assert code_of(next, tail) is denied


def test_a_filtered_tail_sends_heartbeats_that_move_its_cursor(client: Client) -> None:
    stream = client.audit.TailAuditRecords(
        pb.TailAuditRecordsRequest(filter=pb.AuditFilter(workspace="beta")),
        metadata=bearer(client.plane.operator_key),
    )
    start = next(stream)
    client.create_key("acme", "checks:read")
    beat = next(stream)
    stream.cancel()
    assert not beat.HasField("record") and int(beat.cursor) == int(start.cursor) + 1


def test_tail_shows_a_revocation_made_by_another_client_within_a_second(
    client: Client, control_plane: RunningControlPlane
) -> None:
    victim = client.create_key("acme", "checks:read")
    seen: list[tuple[pb.AuditRecord, float]] = []
    stream = client.audit.TailAuditRecords(
        pb.TailAuditRecordsRequest(filter=pb.AuditFilter(workspace="acme")),
        metadata=bearer(client.plane.operator_key),
    )
    started = threading.Event()

    def follow() -> None:
        started.set()
        for resp in stream:
            if resp.HasField("record"):
                seen.append((resp.record, time.monotonic()))
                return

    reader = threading.Thread(target=follow)
    reader.start()
    started.wait()
    time.sleep(0.3)  # let the tail reach its idle wait, so the revocation must wake it
    other = Client(control_plane)  # another terminal: its own channel
    revoked_at = time.monotonic()
    other.revoke(victim.api_key.id)
    reader.join(5)
    stream.cancel()
    other.channel.close()
    assert seen, "the tail never showed the revocation"
    record, arrived = seen[0]
    assert (record.action, record.target) == ("key.revoked", victim.api_key.id)
    assert arrived - revoked_at < 1.0


def test_tail_resumes_from_a_cursor_without_gaps(client: Client) -> None:
    first = client.create_key("acme", "checks:read")
    cursor = client.list(workspace="acme")[0].cursor
    client.create_key("acme", "checks:read")
    client.revoke(first.api_key.id)
    stream = client.audit.TailAuditRecords(
        pb.TailAuditRecordsRequest(cursor=cursor), metadata=bearer(client.plane.operator_key)
    )
    first_response = next(stream)
    assert not first_response.HasField("record") and first_response.cursor == cursor
    got = [next(stream).record.action, next(stream).record.action]
    stream.cancel()
    assert got == ["key.created", "key.revoked"]


def test_export_streams_every_record_in_storage_order(client: Client) -> None:
    for _ in range(3):
        client.create_key("acme", "checks:read")
    exported = [
        r.record
        for r in client.audit.ExportAuditRecords(
            pb.ExportAuditRecordsRequest(), metadata=bearer(client.plane.operator_key)
        )
    ]
    assert [r.action for r in exported].count("key.created") == 4
    cursors = [int(r.cursor) for r in exported]
    assert cursors == sorted(cursors)
    later = client.audit.ExportAuditRecords(
        pb.ExportAuditRecordsRequest(cursor=exported[1].cursor),
        metadata=bearer(client.plane.operator_key),
    )
    assert [r.record.id for r in later] == [r.id for r in exported[2:]]


def test_verify_names_the_edited_row(client: Client, control_plane: RunningControlPlane) -> None:
    for _ in range(4):
        client.create_key("acme", "checks:read")
    victim = client.list(workspace="acme")[2]
    ok = client.audit.VerifyAuditChain(
        pb.VerifyAuditChainRequest(), metadata=bearer(client.plane.operator_key)
    )
    assert [c.workspace for c in ok.chains] == ["*", "acme"] and all(c.ok for c in ok.chains)
    with sqlite3.connect(control_plane.data_dir / "spauth.db") as conn:
        conn.execute("UPDATE audit_events SET actor = 'key_innocent' WHERE id = ?", (victim.id,))
    resp = client.audit.VerifyAuditChain(
        pb.VerifyAuditChainRequest(workspace="acme"), metadata=bearer(client.plane.operator_key)
    )
    (chain,) = resp.chains
    assert not chain.ok
    assert chain.first_break.record_id == victim.id
    assert chain.first_break.problem == pb.AUDIT_CHAIN_PROBLEM_DIGEST_MISMATCH
    assert victim.id in chain.first_break.detail


def ingest(
    client: Client, *batches: list[pb.AuditRecord], key: str = ""
) -> pb.IngestAuditRecordsResponse:
    requests = iter([pb.IngestAuditRecordsRequest(records=b) for b in batches])
    return client.audit.IngestAuditRecords(  # type: ignore[no-any-return]
        requests, metadata=bearer(key or TEST_SYNC_TOKEN)
    )


def event_record(ev: AuditEvent) -> pb.AuditRecord:
    return pb.AuditRecord.FromString(encode(ev))


def decision(allowed: bool, target: str = "/v1/checks") -> pb.AuditRecord:
    action = "authz.allow" if allowed else "authz.deny"
    outcome = "allow" if allowed else "deny"
    # Before the control plane's (fake) clock: ingest refuses records from the future.
    return event_record(
        event(1_700_000_000, "key_x", action, "acme", target, outcome=outcome, request_id="dec_1")
    )


def test_ingest_stores_each_event_id_once(client: Client) -> None:
    first, second = decision(True), decision(False)
    resp = ingest(client, [first, second], [first])
    assert list(resp.acknowledged_ids) == [first.id, second.id, first.id]
    assert resp.stored == 2 and int(resp.cursor) > 0
    again = ingest(client, [second, first])
    assert again.stored == 0 and list(again.acknowledged_ids) == [second.id, first.id]
    stored = client.list(workspace="acme")
    assert sorted(r.id for r in stored) == sorted([first.id, second.id])
    verify = client.audit.VerifyAuditChain(
        pb.VerifyAuditChainRequest(workspace="acme"), metadata=bearer(client.plane.operator_key)
    )
    assert verify.chains[0].ok and verify.chains[0].records_checked == 2


def test_ingest_refuses_admin_actions_and_foreign_workspaces(client: Client) -> None:
    forged = event_record(event(time.time(), "key_x", "key.revoked", "acme", "key_y"))
    assert code_of(ingest, client, [forged]) is grpc.StatusCode.INVALID_ARGUMENT
    # API keys never ingest decision records, even an admin's for its own workspace.
    beta_admin = client.create_key("beta", "admin:full").key
    assert code_of(ingest, client, [decision(True)], key=beta_admin) is (
        grpc.StatusCode.UNAUTHENTICATED
    )
    acme_admin = client.create_key("acme", "admin:full").key
    assert code_of(ingest, client, [decision(True)], key=acme_admin) is (
        grpc.StatusCode.UNAUTHENTICATED
    )
    assert code_of(ingest, client, [decision(True)], key=client.plane.operator_key) is (
        grpc.StatusCode.UNAUTHENTICATED
    )
    # Only the admin key's creation is in acme's trail; no decision record got in.
    assert [r.action for r in client.list(workspace="acme")] == ["key.created"]


def test_no_secret_anywhere_in_the_trail(
    client: Client, control_plane: RunningControlPlane
) -> None:
    a = client.create_key("acme", "checks:read", "keys:manage")
    replacement = client.plane.keys_stub(client.channel).CreateReplacementApiKey(
        kpb.CreateReplacementApiKeyRequest(id=a.api_key.id),
        metadata=bearer(client.plane.operator_key),
    )
    client.secrets.append(replacement.key)
    client.revoke(a.api_key.id)
    # A careless sidecar ships a path and a reason that carry the secret.
    sloppy = decision(False, f"/v1/checks?api_key={a.key}")
    sloppy.reason = f"bad key {replacement.key}"
    sloppy.metadata["authorization"] = f"Bearer {a.key}"
    ingest(client, [sloppy])
    exported = list(
        client.audit.ExportAuditRecords(
            pb.ExportAuditRecordsRequest(), metadata=bearer(client.plane.operator_key)
        )
    )
    assert len(exported) >= 5
    blobs = [b"".join(r.SerializeToString() for r in exported), str(exported).encode()]
    blobs.extend(p.read_bytes() for p in control_plane.data_dir.glob("spauth.db*"))
    for secret in client.secrets:
        for blob in blobs:
            assert secret.encode() not in blob
            assert secret[4:-6].encode() not in blob


def test_retention_prunes_behind_a_checkpoint_and_verify_still_passes(
    tmp_path: Path, loop_thread: LoopThread
) -> None:
    clock = FakeClock()
    settings = load_settings(
        {
            "data_dir": str(tmp_path),
            "admin_addr": "127.0.0.1:0",
            "http_addr": "127.0.0.1:0",  # never the fixed 8080
            "sweep_interval": "0.05",
            "audit_retention": "1d",
            "sync_token": TEST_SYNC_TOKEN,
        },
        environ={},
    )
    plane = ControlPlane(settings, clock=clock)
    operator = plane.bootstrap()
    assert operator is not None
    loop_thread.run(plane.start())
    try:
        running = RunningControlPlane(
            plane, f"127.0.0.1:{plane.admin_port}", operator.secret, clock, tmp_path
        )
        client = Client(running)
        client.create_key("acme", "checks:read")
        clock.advance(2 * 86400 + AUDIT_PRUNE_INTERVAL)
        recent = client.create_key("acme", "checks:read")
        wait_until(lambda: len(client.list()) == 1)
        assert client.list()[0].target == recent.api_key.id
        resp = client.audit.VerifyAuditChain(
            pb.VerifyAuditChainRequest(), metadata=bearer(operator.secret)
        )
        chains = {c.workspace: c for c in resp.chains}
        assert all(c.ok for c in resp.chains)
        assert chains["acme"].checkpoint_chain_seq == 1 and chains["acme"].records_checked == 1
        assert chains["*"].checkpoint_chain_seq >= 1 and chains["*"].records_checked == 0
        client.channel.close()
    finally:
        loop_thread.run(plane.aclose(grace=1))
