"""Replica: snapshot, ordered changes, idempotent re-delivery, persistence round trip."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.authz.replica import Replica, ReplicaError
from sidecar.core import changes
from sidecar.core.models import Change
from sidecar.replication.client import ReplicaFile
from tests.test_engine import upsert


def test_snapshot_then_changes_and_redelivery() -> None:
    r = Replica()
    assert not r.loaded
    r.load_snapshot(10, [upsert("spk_a", "key_a", "acme", ["checks:read"], 2e9)])
    assert r.loaded
    assert r.revision == 10
    r.apply(
        Change(
            "credential.upserted", "key_b", upsert("spk_b", "key_b", "acme", [], 2e9).payload, 11
        )
    )
    r.apply(Change("credential.revoked", "key_a", {"id": "key_a"}, revision=12))
    # A change delivered twice (at-least-once) is ignored the second time.
    r.apply(Change("credential.revoked", "key_b", {"id": "key_b"}, revision=12))
    creds = {c.id: c.revoked for c in r.by_digest.values()}
    assert creds == {"key_a": True, "key_b": False}
    assert r.revision == 12


def test_bad_payload_is_an_error_not_a_crash() -> None:
    r = Replica()
    with pytest.raises(ReplicaError):
        r.apply(Change("credential.upserted", "x", {"id": "x"}, revision=1))
    assert r.revision == 0


def test_unknown_kinds_are_counted_not_applied_and_advance_the_revision() -> None:
    r = Replica()
    r.load_snapshot(1, [Change("from.the.future", "y", {})])
    assert r.unknown_kinds == {"from.the.future": 1}
    r.apply(Change("something.new", "x", {}, revision=2))
    r.apply(Change("something.new", "z", {}, revision=3))
    assert r.revision == 3
    assert r.unknown_kinds == {"from.the.future": 1, "something.new": 2}
    assert r.entries() == []


def test_every_kind_round_trips_through_its_builder_and_parser() -> None:
    made = [
        changes.CredentialUpserted("key_a", b"\x01" * 32, "acme", frozenset({"checks:read"}), 9),
        changes.CredentialUpserted("key_b", b"\x02" * 32, "acme", frozenset(), 9, 5, 60, True),
        changes.CredentialUpserted(
            "key_c",
            b"\x03" * 32,
            "acme",
            frozenset(),
            9,
            grace_deadline=5,
            suspended=True,
            client_cidrs=("10.0.0.0/8",),
        ),
        changes.CredentialRevoked("key_a"),
        changes.CredentialExpired("key_a"),
        changes.SigningKeyUpserted("k1", "ES256", {"kty": "EC", "crv": "P-256"}),
        changes.SigningKeyRetired("k1"),
        changes.GrantRevoked("grt_1", 2e9),
        changes.TokenRevoked("jti_1", 2e9),
    ]
    assert {m.change().kind for m in made} == set(changes.ChangeKind)
    for message in made:
        assert changes.parse(message.change()) == message
    with pytest.raises(changes.UnknownChangeKind):
        changes.parse(Change("credential.updated_v9", "x", {}))
    with pytest.raises(changes.MalformedChange):
        changes.parse(Change("grant.revoked", "x", {"expires_at": 1}))


def test_persistence_round_trip(tmp_path: Path) -> None:
    r = Replica()
    r.load_snapshot(3, [upsert("spk_a", "key_a", "acme", ["checks:read"], 2e9)], "log-a")
    r.apply(Change("credential.revoked", "key_a", {"id": "key_a"}, revision=4))
    r.apply(
        Change(
            "signing_key.upserted",
            "k1",
            {"kid": "k1", "alg": "ES256", "public_jwk": {"kty": "EC"}},
            revision=5,
        )
    )
    r.apply(Change("grant.revoked", "g1", {"grant_id": "g1", "expires_at": 2e9}, revision=6))
    f = ReplicaFile(tmp_path)
    f.save(r)
    assert (tmp_path / "replica.bin").stat().st_mode & 0o777 == 0o600
    restored = Replica()
    assert f.load(restored)
    assert (restored.revision, restored.log_id) == (6, "log-a")
    assert restored.by_digest == r.by_digest
    assert restored.signing_keys == r.signing_keys
    assert restored.revoked_grants == r.revoked_grants
    (tmp_path / "replica.bin").write_text("{not json")
    assert not f.load(Replica())


def test_prune_forgets_long_expired_entries() -> None:
    r = Replica()
    r.load_snapshot(
        1, [upsert("spk_a", "key_a", "acme", [], 1000), upsert("spk_b", "key_b", "acme", [], 2e9)]
    )
    assert r.prune(now=1000 + 86400 + 1) == 1
    assert [c.id for c in r.by_digest.values()] == ["key_b"]


def test_a_snapshot_of_the_replica_keeps_suspension_and_client_networks() -> None:
    """The persisted replica is built by the same builder, so no field is lost on a restart."""
    r = Replica()
    key = changes.CredentialUpserted(
        "key_a",
        b"\x01" * 32,
        "acme",
        frozenset(),
        int(2e9),
        suspended=True,
        client_cidrs=("10.0.0.0/8",),
    )
    r.load_snapshot(1, [key.change()])
    restored = Replica()
    restored.load_snapshot(1, r.entries())
    assert restored.by_digest == r.by_digest
    cred = restored.by_digest[b"\x01" * 32]
    assert cred.suspended and [str(n) for n in cred.identity.networks] == ["10.0.0.0/8"]
