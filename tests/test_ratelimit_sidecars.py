"""Limits on real sidecars over real gRPC Check calls: a per-key limit shared by two sidecars
through a real Redis, failures from one source address, and Redis killed under them (limits fall
back to local, decisions never change because of Redis)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2 as ext
from envoy.service.auth.v3 import external_auth_pb2_grpc as ext_grpc

from sidecar._gen.statuspulse.auth.v1 import api_keys_pb2 as pb
from sidecar.core import keyformat
from sidecar.dataplane.process import Sidecar
from tests.conftest import RunningControlPlane, bearer, wait_until
from tests.support.redis import RedisServer

pytestmark = pytest.mark.redis
CHECKS = "/v1/workspaces/acme/checks"
StartSidecar = Callable[..., Sidecar]


def mint(cp: RunningControlPlane, rate: pb.RateLimit | None = None) -> tuple[str, str]:
    with cp.channel() as ch:
        resp = cp.keys_stub(ch).CreateApiKey(
            pb.CreateApiKeyRequest(
                workspace="acme", name="t", scopes=["checks:read"], rate_limit=rate
            ),
            metadata=bearer(cp.operator_key),
        )
    return resp.key, resp.api_key.id


def revoke(cp: RunningControlPlane, key_id: str) -> None:
    with cp.channel() as ch:
        cp.keys_stub(ch).RevokeApiKey(
            pb.RevokeApiKeyRequest(id=key_id), metadata=bearer(cp.operator_key)
        )


def check(sidecar: Sidecar, key: str, source: str = "198.51.100.9") -> tuple[int, str]:
    """(HTTP status Envoy would answer, reason) for a real Check call."""
    req = ext.CheckRequest()
    req.attributes.source.address.socket_address.address = source
    http = req.attributes.request.http
    http.method, http.path, http.host = "GET", CHECKS, "api"
    http.headers["authorization"] = f"Bearer {key}"
    with grpc.insecure_channel(f"127.0.0.1:{sidecar.port}") as channel:
        resp = ext_grpc.AuthorizationStub(channel).Check(req, timeout=5)
    if resp.status.code == 0:
        return 200, "ok"
    return resp.denied_response.status.code, json.loads(resp.denied_response.body)["reason"]


def replicated(sidecars: tuple[Sidecar, ...], *keys: str) -> None:
    """Wait until every sidecar's replica holds ``keys``. Polling with Check instead would count:
    each unknown-key 401 is a failure of the source (50 block it, shared through Redis) and
    each allow spends the key's rate limit, so a slow replication changed what the test saw."""
    digests = [keyformat.digest(k) for k in keys]
    wait_until(lambda: all(sc.replica.credential(d) for sc in sidecars for d in digests))


def synced(*sidecars: Sidecar) -> None:
    """Wait until every sidecar has finished two more syncs (a push and a read-back after it)."""
    marks = [(s, s.limit_sync.syncs) for s in sidecars if s.limit_sync is not None]
    wait_until(lambda: all(s.limit_sync.syncs >= n + 2 for s, n in marks))  # type: ignore[union-attr]


def test_a_per_key_limit_is_shared_by_two_sidecars(
    control_plane: RunningControlPlane, sidecar_factory: StartSidecar, redis_url: str
) -> None:
    one = sidecar_factory(redis_url=redis_url, ratelimit_sync_interval=0.02)
    two = sidecar_factory(redis_url=redis_url, ratelimit_sync_interval=0.02)
    key, _ = mint(control_plane, pb.RateLimit(requests=10, period_seconds=60))
    replicated((one, two), key)
    assert check(one, key)[0] == 200 and check(two, key)[0] == 200
    synced(one, two)
    answers = []
    for i in range(16):
        answers.append(check((one, two)[i % 2], key))
        synced(one, two)
    # Two were spent above; with a sync between requests the limit holds exactly across both.
    assert [a[0] for a in answers] == [200] * 8 + [429] * 8
    assert answers[-1][1] == "rate_limited"


def test_429_after_n_failures_from_one_source_and_another_source_is_unaffected(
    control_plane: RunningControlPlane, sidecar_factory: StartSidecar
) -> None:
    sidecar = sidecar_factory(failure_limit_source=4)
    good, _ = mint(control_plane)
    replicated((sidecar,), good)
    statuses = [check(sidecar, keyformat.mint_key(), "203.0.113.5")[0] for _ in range(6)]
    assert statuses == [401] * 4 + [429] * 2
    assert check(sidecar, good, "203.0.113.5") == (429, "rate_limited")
    assert check(sidecar, good, "203.0.113.6") == (200, "ok")
    assert check(sidecar, keyformat.mint_key(), "203.0.113.6")[0] == 401


def test_a_source_blocked_through_one_sidecar_is_refused_by_the_other(
    control_plane: RunningControlPlane, sidecar_factory: StartSidecar, redis_url: str
) -> None:
    settings = {"redis_url": redis_url, "ratelimit_sync_interval": 0.02, "failure_limit_source": 4}
    one, two = sidecar_factory(**settings), sidecar_factory(**settings)
    good, _ = mint(control_plane)
    replicated((one, two), good)
    for _ in range(4):
        assert check(one, keyformat.mint_key(), "203.0.113.5")[0] == 401
    synced(one, two)
    synced(one, two)
    assert check(two, good, "203.0.113.5") == (429, "rate_limited")
    assert check(two, good, "203.0.113.6") == (200, "ok")


def test_redis_down_limits_go_local_and_decisions_do_not_change(
    control_plane: RunningControlPlane, sidecar_factory: StartSidecar, tmp_path: Path
) -> None:
    with RedisServer() as server:
        settings = {"redis_url": server.url, "ratelimit_sync_interval": 0.02}
        one, two = sidecar_factory(**settings), sidecar_factory(**settings)
        good, _ = mint(control_plane)
        doomed, doomed_id = mint(control_plane)
        limited, _ = mint(control_plane, pb.RateLimit(requests=6, period_seconds=60))
        replicated((one, two), good, doomed, limited)
        for sc in (one, two):
            assert check(sc, limited)[0] == 200  # one request each
        synced(one, two)
        server.stop()
        wait_until(lambda: not one.limit_sync.connected and not two.limit_sync.connected)  # type: ignore[union-attr]
        control_plane.clock.advance(5)  # past the freshness of the shared views
        revoke(control_plane, doomed_id)
        for sc in (one, two):
            # The revoked key is tried from a source of its own: its failures count against
            # that source, and this part is about Redis, not the per-source limit (tested above).
            wait_until(lambda sc=sc: check(sc, doomed, "198.51.100.77")[0] == 401)
            for _ in range(20):
                assert check(sc, good) == (200, "ok")  # never refused because of Redis
                # Never allowed (after 20 tries the key id's failure limit answers 429).
                reason = check(sc, doomed, "198.51.100.77")[1]
                assert reason in ("revoked_credential", "rate_limited")
        # Each sidecar now enforces the key's limit alone: 5 more each, not 4 between them.
        assert [check(one, limited)[0] for _ in range(6)] == [200] * 5 + [429]
        assert [check(two, limited)[0] for _ in range(6)] == [200] * 5 + [429]
        server.start()
        wait_until(lambda: one.limit_sync.connected and two.limit_sync.connected)  # type: ignore[union-attr]
        synced(one, two)
        assert check(one, good) == (200, "ok")
        assert check(one, limited) == (429, "rate_limited")
