"""The sidecar over real gRPC, fed by a real control plane: Check, in-cluster API, health,
replication (revocation, resume, persisted snapshot, staleness) and bad input."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2 as ext
from envoy.service.auth.v3 import external_auth_pb2_grpc as ext_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from sidecar._gen.statuspulse.auth.v1 import api_keys_pb2 as keys_pb
from sidecar._gen.statuspulse.auth.v1 import authorization_pb2 as authz_pb
from sidecar._gen.statuspulse.auth.v1 import authorization_pb2_grpc as authz_grpc
from sidecar.config import load_settings
from sidecar.controlplane import ControlPlane
from sidecar.core import changes, keyformat
from sidecar.dataplane.process import Sidecar
from tests.conftest import LoopThread, RunningControlPlane, bearer, free_port, wait_until
from tests.support.sync import TEST_SYNC_TOKEN

StartSidecar = Callable[..., Sidecar]
CHECKS = "/v1/workspaces/acme/checks"


def check_request(path: str = CHECKS, method: str = "GET", **headers: str) -> ext.CheckRequest:
    req = ext.CheckRequest()
    http = req.attributes.request.http
    http.method, http.path, http.host = method, path, "api.statuspulse.test"
    for name, value in headers.items():
        http.headers[name.replace("_", "-")] = value
    return req


class Client:
    def __init__(self, port: int) -> None:
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.check_stub = ext_grpc.AuthorizationStub(self.channel)
        self.authz = authz_grpc.AuthorizationServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def check(self, req: ext.CheckRequest) -> ext.CheckResponse:
        return self.check_stub.Check(req, timeout=5)

    def status(self, service: str = "") -> int:
        return self.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def mint(cp: RunningControlPlane, scopes: list[str], workspace: str = "acme") -> tuple[str, str]:
    with cp.channel() as ch:
        resp = cp.keys_stub(ch).CreateApiKey(
            keys_pb.CreateApiKeyRequest(workspace=workspace, name="t", scopes=scopes),
            metadata=bearer(cp.operator_key),
        )
    return resp.key, resp.api_key.id


def admin(cp: RunningControlPlane, method: str, request: object) -> object:
    with cp.channel() as ch:
        return getattr(cp.keys_stub(ch), method)(request, metadata=bearer(cp.operator_key))


def headers_of(resp: ext.CheckResponse) -> dict[str, str]:
    return {h.header.key: h.header.value for h in resp.ok_response.headers}


def test_allow_carries_identity_and_strips_the_secret(
    control_plane: RunningControlPlane, sidecar_factory: StartSidecar
) -> None:
    key, key_id = mint(control_plane, ["checks:read"])
    client = Client(sidecar_factory().port)
    resp = client.check(check_request(authorization=f"Bearer {key}"))
    assert resp.status.code == 0
    h = headers_of(resp)
    assert h["x-statuspulse-workspace"] == "acme"
    assert h["x-statuspulse-key-id"] == key_id
    assert h["x-statuspulse-scopes"] == "checks:read"
    assert h["x-statuspulse-decision-id"].startswith("dec_")
    assert {"authorization", "x-api-key"} <= set(resp.ok_response.headers_to_remove)
    assert all(o.append_action == o.OVERWRITE_IF_EXISTS_OR_ADD for o in resp.ok_response.headers)
    assert key not in str(resp)
    assert (
        resp.dynamic_metadata.fields["decision_id"].string_value == h["x-statuspulse-decision-id"]
    )


def test_denials_are_responses_with_status_and_body(
    control_plane: RunningControlPlane, sidecar_factory: StartSidecar
) -> None:
    key, _ = mint(control_plane, ["checks:read"])
    client = Client(sidecar_factory().port)
    cases = [
        (check_request(), 16, 401, "missing_credential"),
        (check_request(authorization="Bearer spk_nope"), 16, 401, "malformed_credential"),
        (
            check_request(authorization=f"Bearer {keyformat.mint_key()}"),
            16,
            401,
            "unknown_credential",
        ),
        (
            check_request("/v1/workspaces/acme/metrics", authorization=f"Bearer {key}"),
            7,
            403,
            "insufficient_scope",
        ),
        (
            check_request("/v1/workspaces/globex/checks", authorization=f"Bearer {key}"),
            7,
            403,
            "workspace_mismatch",
        ),
    ]
    for req, code, http_status, reason in cases:
        resp = client.check(req)
        assert resp.status.code == code, reason
        assert resp.denied_response.status.code == http_status
        body = json.loads(resp.denied_response.body)
        assert body["reason"] == reason
        assert body["decision_id"].startswith("dec_")
        h = {o.header.key: o.header.value for o in resp.denied_response.headers}
        if http_status == 401 and reason != "missing_credential":
            assert h["www-authenticate"].endswith(
                f'error="invalid_token", error_description="{reason}"'
            )
        if reason == "insufficient_scope":
            assert 'error="insufficient_scope", scope="metrics:read"' in h["www-authenticate"]


def test_revocation_reaches_the_sidecar_within_a_second(
    control_plane: RunningControlPlane, sidecar_factory: StartSidecar
) -> None:
    old, old_id = mint(control_plane, ["checks:read"])
    client = Client(sidecar_factory().port)
    assert client.check(check_request(authorization=f"Bearer {old}")).status.code == 0
    replaced = admin(
        control_plane, "CreateReplacementApiKey", keys_pb.CreateReplacementApiKeyRequest(id=old_id)
    )
    new = replaced.key  # type: ignore[attr-defined]
    wait_until(
        lambda: client.check(check_request(authorization=f"Bearer {new}")).status.code == 0, 1.0
    )
    assert client.check(check_request(authorization=f"Bearer {old}")).status.code == 0
    started = time.monotonic()
    admin(control_plane, "RevokeApiKey", keys_pb.RevokeApiKeyRequest(id=old_id))
    wait_until(
        lambda: client.check(check_request(authorization=f"Bearer {old}")).status.code == 16, 1.0
    )
    assert time.monotonic() - started < 1.0
    resp = client.check(check_request(authorization=f"Bearer {old}"))
    assert json.loads(resp.denied_response.body)["reason"] == "revoked_credential"
    assert client.check(check_request(authorization=f"Bearer {new}")).status.code == 0


def test_expiry_is_checked_at_every_call(
    control_plane: RunningControlPlane, sidecar_factory: StartSidecar
) -> None:
    with control_plane.channel() as ch:
        resp = control_plane.keys_stub(ch).CreateApiKey(
            keys_pb.CreateApiKeyRequest(
                workspace="acme", name="t", scopes=["checks:read"], expires_in_seconds=120
            ),
            metadata=bearer(control_plane.operator_key),
        )
    client = Client(sidecar_factory().port)
    assert client.check(check_request(authorization=f"Bearer {resp.key}")).status.code == 0
    control_plane.clock.advance(121)
    denied = client.check(check_request(authorization=f"Bearer {resp.key}"))
    assert json.loads(denied.denied_response.body)["reason"] == "expired_credential"


def test_health_is_not_serving_until_the_replica_loads(
    control_plane: RunningControlPlane, sidecar_factory: StartSidecar
) -> None:
    dead = f"127.0.0.1:{free_port()}"
    sc = sidecar_factory(wait=False, control_plane=dead)
    client = Client(sc.port)
    assert client.status() == health_pb2.HealthCheckResponse.NOT_SERVING
    resp = client.check(check_request(authorization=f"Bearer {keyformat.mint_key()}"))
    assert resp.status.code == 14
    assert resp.denied_response.status.code == 503
    assert json.loads(resp.denied_response.body)["reason"] == "replica_not_ready"
    live = sidecar_factory()
    wait_until(lambda: Client(live.port).status() == health_pb2.HealthCheckResponse.SERVING, 2)


def test_resume_from_revision_and_serve_from_disk_while_control_plane_is_down(
    tmp_path: Path, control_plane: RunningControlPlane, sidecar_factory: StartSidecar
) -> None:
    key, key_id = mint(control_plane, ["checks:read"])
    state = tmp_path / "state"
    first = sidecar_factory(state_dir=state)
    first.stop(grace=0.1)
    snapshots = control_plane.plane.replication.snapshots_sent
    # While it was away: a revocation and a new key.
    admin(control_plane, "RevokeApiKey", keys_pb.RevokeApiKeyRequest(id=key_id))
    key2, _ = mint(control_plane, ["checks:read"])
    second = sidecar_factory(state_dir=state)
    client = Client(second.port)
    wait_until(
        lambda: client.check(check_request(authorization=f"Bearer {key2}")).status.code == 0, 2
    )
    assert client.check(check_request(authorization=f"Bearer {key}")).status.code == 16
    assert control_plane.plane.replication.snapshots_sent == snapshots  # resumed, no snapshot
    second.stop(grace=0.1)

    # Control plane unreachable: the persisted replica serves, health says degraded.
    offline = sidecar_factory(
        wait=False, state_dir=state, control_plane=f"127.0.0.1:{free_port()}", max_staleness=600
    )
    client = Client(offline.port)
    assert client.check(check_request(authorization=f"Bearer {key2}")).status.code == 0
    assert client.check(check_request(authorization=f"Bearer {key}")).status.code == 16
    wait_until(lambda: client.status() == health_pb2.HealthCheckResponse.SERVING, 2)
    assert (
        client.status("statuspulse.auth.v1.ReplicaSync")
        == health_pb2.HealthCheckResponse.NOT_SERVING
    )


def test_fails_closed_after_max_staleness(
    control_plane: RunningControlPlane, sidecar_factory: StartSidecar
) -> None:
    key, _ = mint(control_plane, ["checks:read"])
    sc = sidecar_factory(max_staleness=30)
    client = Client(sc.port)
    assert client.check(check_request(authorization=f"Bearer {key}")).status.code == 0
    # Stop the stream so nothing refreshes last_contact, then let time pass.
    sc.sync.stop()
    control_plane.clock.advance(31)
    resp = client.check(check_request(authorization=f"Bearer {key}"))
    assert resp.status.code == 14
    assert json.loads(resp.denied_response.body)["reason"] == "replica_stale"
    wait_until(lambda: client.status() == health_pb2.HealthCheckResponse.NOT_SERVING, 2)


def test_bad_input_gets_a_denial_or_invalid_argument_and_the_sidecar_keeps_serving(
    control_plane: RunningControlPlane, sidecar_factory: StartSidecar
) -> None:
    key, _ = mint(control_plane, ["checks:read"])
    sc = sidecar_factory()
    client = Client(sc.port)
    raw = client.channel.unary_unary(
        "/envoy.service.auth.v3.Authorization/Check",
        request_serializer=lambda b: b,
        response_deserializer=ext.CheckResponse.FromString,
    )
    for garbage in (b"\xff\xff\xff\xff", b"\x0a\x05abc", bytes(range(256))):
        with pytest.raises(grpc.RpcError) as info:
            raw(garbage, timeout=5)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # An empty request has no path, so no canonical one: refused (400) before anything else.
    assert raw(b"", timeout=5).status.code == 3

    def reason(req: ext.CheckRequest) -> str:
        resp = client.check(req)
        assert resp.status.code != 0
        return str(json.loads(resp.denied_response.body)["reason"])

    assert reason(check_request(authorization="Bearer ")) == "malformed_credential"
    assert reason(check_request(authorization="Bearer " + "A" * 10_000)) == "malformed_credential"
    assert (
        reason(check_request(authorization=f"Bearer {key},Bearer {key}")) == "malformed_credential"
    )
    assert (
        reason(check_request(authorization="Bearer " + key[:-1] + "\ufffd"))
        == "malformed_credential"
    )
    assert reason(check_request(x_api_key="x" * 100_000)) == "malformed_credential"
    assert reason(check_request(authorization="Bearer a.b.c")) == "malformed_token"

    # encode_raw_headers: the headers map is empty and values come as raw bytes.
    req = check_request()
    entry = req.attributes.request.http.header_map.headers.add()
    entry.key, entry.raw_value = "authorization", f"Bearer {key}".encode()
    assert client.check(req).status.code == 0
    bad = check_request()
    entry = bad.attributes.request.http.header_map.headers.add()
    entry.key, entry.raw_value = "authorization", b"Bearer spk_\xff\xfe" + b"A" * 36
    assert reason(bad) == "malformed_credential"
    # Still serving.
    assert client.check(check_request(authorization=f"Bearer {key}")).status.code == 0


def test_in_cluster_authorize_and_introspect(
    control_plane: RunningControlPlane, sidecar_factory: StartSidecar
) -> None:
    key, key_id = mint(control_plane, ["checks:read", "metrics:read"])
    client = Client(sidecar_factory().port)
    allow = client.authz.Authorize(
        authz_pb.AuthorizeRequest(credential=key, required_scopes=["checks:read"], workspace="acme")
    )
    assert allow.allowed
    assert allow.reason == "ok"
    assert allow.key_id == key_id
    assert allow.http_status == 200
    deny = client.authz.Authorize(
        authz_pb.AuthorizeRequest(credential=key, required_scopes=["alerts:manage"])
    )
    assert (deny.allowed, deny.reason, deny.http_status) == (False, "insufficient_scope", 403)
    by_route = client.authz.Authorize(
        authz_pb.AuthorizeRequest(
            credential=key, method="get", path="/v1/workspaces/acme/metrics/cpu"
        )
    )
    assert by_route.allowed
    other = client.authz.Authorize(
        authz_pb.AuthorizeRequest(credential=key, method="GET", path=CHECKS, workspace="globex")
    )
    assert other.reason == "workspace_mismatch"
    with pytest.raises(grpc.RpcError) as info:
        client.authz.Authorize(authz_pb.AuthorizeRequest(credential=key, required_scopes=["nope"]))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as info:
        client.authz.Authorize(authz_pb.AuthorizeRequest(credential=key))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    info_resp = client.authz.Introspect(authz_pb.IntrospectRequest(credential=key))
    assert info_resp.active
    assert (info_resp.kind, info_resp.key_id, info_resp.workspace) == ("api_key", key_id, "acme")
    assert list(info_resp.scopes) == ["checks:read", "metrics:read"]
    assert info_resp.expire_time.seconds > control_plane.clock.now()
    inactive = client.authz.Introspect(authz_pb.IntrospectRequest(credential=keyformat.mint_key()))
    assert not inactive.active
    assert inactive.reason == "unknown_credential"
    assert inactive.workspace == ""


def test_reflection_lists_the_services(sidecar_factory: StartSidecar) -> None:
    client = Client(sidecar_factory().port)
    stub = reflection_pb2_grpc.ServerReflectionStub(client.channel)
    responses = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    names = {s.name for r in responses for s in r.list_services_response.service}
    assert {
        "envoy.service.auth.v3.Authorization",
        "statuspulse.auth.v1.AuthorizationService",
        "grpc.health.v1.Health",
    } <= names


def test_snapshot_in_chunks_with_many_keys(
    control_plane: RunningControlPlane, sidecar_factory: StartSidecar
) -> None:
    from sidecar.core.models import ApiKey

    now = int(control_plane.clock.now())
    secrets = [keyformat.mint_key() for _ in range(12_000)]
    with control_plane.plane.store.transaction() as uow:
        for i, secret in enumerate(secrets):
            key = ApiKey(
                f"key_bulk{i:08d}",
                keyformat.digest(secret),
                secret[-4:],
                "bulk",
                "acme",
                frozenset({"checks:read"}),
                now,
                now + 3600,
                "test",
            )
            uow.keys.insert(key)
            # Every key that exists is in the change log (as ApiKeyService writes it): the
            # control plane's snapshot, built at its start, is served with the changes since.
            uow.changes.append(changes.credential_upserted(key))
    sc = sidecar_factory()
    assert len(sc.replica.by_digest) >= 12_000
    client = Client(sc.port)
    assert client.check(check_request(authorization=f"Bearer {secrets[-1]}")).status.code == 0


def test_policy_reload_and_invalid_policy_keeps_the_old_one(
    tmp_path: Path, control_plane: RunningControlPlane, sidecar_factory: StartSidecar
) -> None:
    key, _ = mint(control_plane, ["checks:read"])
    policy = tmp_path / "policy.toml"
    policy.write_text('[[routes]]\npath = "/x"\nscopes = ["checks:read"]\n')
    sc = sidecar_factory(policy_file=policy, policy_poll_interval=0.25)
    client = Client(sc.port)
    assert client.check(check_request("/x", authorization=f"Bearer {key}")).status.code == 0
    policy.write_text('[[routes]]\npath = "/x"\nscopes = ["metrics:read"]\n')
    wait_until(
        lambda: client.check(check_request("/x", authorization=f"Bearer {key}")).status.code == 7, 3
    )
    policy.write_text('[[routes]]\npath = "/x"\nscopes = ["bogus:scope"]\n# longer\n')
    wait_until(lambda: bool(sc.policy_watcher.last_error), 3)
    assert "line 1" in sc.policy_watcher.last_error
    assert "bogus:scope" in sc.policy_watcher.last_error
    assert client.check(check_request("/x", authorization=f"Bearer {key}")).status.code == 7


def test_a_replica_from_another_change_log_is_replaced_not_resumed(
    tmp_path: Path,
    control_plane: RunningControlPlane,
    sidecar_factory: StartSidecar,
    loop_thread: LoopThread,
) -> None:
    """Revisions count within one change log. A sidecar whose persisted replica came from
    another database (re-created, or the state dir moved to another control plane) must get a
    snapshot, not that log's later changes spliced onto the foreign state — which would keep
    honouring keys that do not exist there."""
    old_key, _ = mint(control_plane, ["checks:read"])
    state = tmp_path / "moved-state"
    sidecar_factory(state_dir=state).stop(grace=0.1)

    data_dir = tmp_path / "other-data"
    data_dir.mkdir()
    settings = load_settings(
        {
            "data_dir": str(data_dir),
            "admin_addr": "127.0.0.1:0",
            "http_addr": "127.0.0.1:0",
            "sync_token": TEST_SYNC_TOKEN,
        },
        environ={},
    )
    other = ControlPlane(settings, clock=control_plane.clock)
    minted = other.bootstrap()
    assert minted is not None
    loop_thread.run(other.start())
    try:
        other_cp = RunningControlPlane(
            other, f"127.0.0.1:{other.admin_port}", minted.secret, control_plane.clock, data_dir
        )
        new_keys = [mint(other_cp, ["checks:read"])[0] for _ in range(4)]  # its head is past ours
        sidecar = sidecar_factory(wait=False, state_dir=state, control_plane=other_cp.address)
        client = Client(sidecar.port)
        wait_until(
            lambda: (
                client.check(check_request(authorization=f"Bearer {new_keys[0]}")).status.code == 0
            ),
            5,
        )
        assert other.replication.snapshots_sent == 1
        assert sidecar.replica.log_id == other.replication.log_id()
        assert sidecar.replica.log_id != control_plane.plane.replication.log_id()
        assert client.check(check_request(authorization=f"Bearer {old_key}")).status.code == 16
        for key in new_keys:
            assert client.check(check_request(authorization=f"Bearer {key}")).status.code == 0
    finally:
        loop_thread.run(other.aclose(grace=1))
