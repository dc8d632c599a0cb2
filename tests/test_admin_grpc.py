"""The admin API over a real gRPC server on 127.0.0.1:0: status codes for every refusal."""

from __future__ import annotations

import grpc
import pytest

from sidecar._gen.statuspulse.auth.v1 import api_keys_pb2 as pb
from tests.conftest import RunningControlPlane, bearer

DAY = 86400


@pytest.fixture
def stub(control_plane: RunningControlPlane):  # type: ignore[no-untyped-def]
    with control_plane.channel() as channel:
        yield control_plane.keys_stub(channel)


def create(stub, key: str, **fields):  # type: ignore[no-untyped-def]
    request = pb.CreateApiKeyRequest(
        **{"workspace": "acme", "name": "k", "scopes": ["checks:read"], **fields}
    )
    return stub.CreateApiKey(request, metadata=bearer(key))


def code_of(call) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()  # type: ignore[no-any-return]


def test_create_returns_secret_once_and_get_never_does(
    stub, control_plane: RunningControlPlane
) -> None:
    op = control_plane.operator_key
    resp = create(stub, op, name="nightly-sync-job")
    assert resp.key.startswith("spk_")
    assert resp.api_key.state == pb.API_KEY_STATE_ACTIVE
    got = stub.GetApiKey(pb.GetApiKeyRequest(id=resp.api_key.id), metadata=bearer(op))
    assert resp.key not in str(got)
    assert got.api_key.last_four == resp.key[-4:]


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"scopes": ["nope:read"]}, "scopes"),
        ({"name": ""}, "name"),
        ({"name": "n" * 101}, "name"),
        ({"workspace": "ACME"}, "workspace"),
        ({"expires_in_seconds": 400 * DAY}, "expires_in"),
        ({"expires_in_seconds": -5}, "expires_in"),
    ],
)
def test_invalid_argument_names_the_field(
    stub, control_plane: RunningControlPlane, fields: dict, field: str
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        create(stub, control_plane.operator_key, **fields)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith(field)
    listed = stub.ListApiKeys(pb.ListApiKeysRequest(), metadata=bearer(control_plane.operator_key))
    assert len(listed.api_keys) == 1  # only the operator key: nothing was created


def test_caller_key_problems_are_unauthenticated(stub, control_plane: RunningControlPlane) -> None:
    op = control_plane.operator_key
    k = create(stub, op, scopes=["keys:manage"])
    list_req = pb.ListApiKeysRequest()
    assert code_of(lambda: stub.ListApiKeys(list_req)) == grpc.StatusCode.UNAUTHENTICATED
    bad = op[:-1] + ("A" if op[-1] != "A" else "B")
    assert code_of(lambda: stub.ListApiKeys(list_req, metadata=bearer(bad))) == (
        grpc.StatusCode.UNAUTHENTICATED
    )
    basic = (("authorization", "Basic Zm9vOmJhcg=="),)
    assert code_of(lambda: stub.ListApiKeys(list_req, metadata=basic)) == (
        grpc.StatusCode.UNAUTHENTICATED
    )
    stub.RevokeApiKey(pb.RevokeApiKeyRequest(id=k.api_key.id), metadata=bearer(op))
    assert code_of(lambda: stub.ListApiKeys(list_req, metadata=bearer(k.key))) == (
        grpc.StatusCode.UNAUTHENTICATED
    )
    expiring = create(stub, op, scopes=["keys:manage"], expires_in_seconds=3600)
    control_plane.clock.advance(3600)
    assert code_of(lambda: stub.ListApiKeys(list_req, metadata=bearer(expiring.key))) == (
        grpc.StatusCode.UNAUTHENTICATED
    )


def test_privilege_rules_are_permission_denied(stub, control_plane: RunningControlPlane) -> None:
    op = control_plane.operator_key
    manager = create(stub, op, scopes=["keys:manage", "checks:read"]).key
    assert code_of(lambda: create(stub, manager, scopes=["metrics:write"])) == (
        grpc.StatusCode.PERMISSION_DENIED
    )
    assert code_of(lambda: create(stub, manager, workspace="globex")) == (
        grpc.StatusCode.PERMISSION_DENIED
    )
    other = create(stub, op, workspace="globex")
    # Another workspace's key does not exist for the caller: NOT_FOUND, as a made-up id.
    for key_id in (other.api_key.id, "key_doesnotexist00"):
        assert (
            code_of(
                lambda key_id=key_id: stub.RevokeApiKey(
                    pb.RevokeApiKeyRequest(id=key_id), metadata=bearer(manager)
                )
            )
            == grpc.StatusCode.NOT_FOUND
        )
    reader = create(stub, op).key
    assert code_of(lambda: create(stub, reader)) == grpc.StatusCode.PERMISSION_DENIED


def test_unknown_id_is_not_found(stub, control_plane: RunningControlPlane) -> None:
    op = bearer(control_plane.operator_key)
    for call in (
        lambda: stub.GetApiKey(pb.GetApiKeyRequest(id="key_missing"), metadata=op),
        lambda: stub.RevokeApiKey(pb.RevokeApiKeyRequest(id="key_missing"), metadata=op),
        lambda: stub.CreateReplacementApiKey(
            pb.CreateReplacementApiKeyRequest(id="key_missing"), metadata=op
        ),
    ):
        assert code_of(call) == grpc.StatusCode.NOT_FOUND


def test_replace_with_grace_then_sweeper_revokes(stub, control_plane: RunningControlPlane) -> None:
    op = bearer(control_plane.operator_key)
    old = create(stub, control_plane.operator_key)
    resp = stub.CreateReplacementApiKey(
        pb.CreateReplacementApiKeyRequest(id=old.api_key.id, grace_seconds=3600), metadata=op
    )
    assert resp.replaced.replaced_by == resp.api_key.id
    assert resp.replaced.state == pb.API_KEY_STATE_ACTIVE
    control_plane.clock.advance(3601)
    control_plane.plane.keys.sweep()
    got = stub.GetApiKey(pb.GetApiKeyRequest(id=old.api_key.id), metadata=op)
    assert got.api_key.state == pb.API_KEY_STATE_REVOKED


def test_list_filters_by_state(stub, control_plane: RunningControlPlane) -> None:
    op = bearer(control_plane.operator_key)
    a = create(stub, control_plane.operator_key, name="a")
    create(stub, control_plane.operator_key, name="b")
    stub.RevokeApiKey(pb.RevokeApiKeyRequest(id=a.api_key.id), metadata=op)
    revoked = stub.ListApiKeys(
        pb.ListApiKeysRequest(workspace="acme", state=pb.API_KEY_STATE_REVOKED), metadata=op
    )
    assert [k.name for k in revoked.api_keys] == ["a"]
    active = stub.ListApiKeys(
        pb.ListApiKeysRequest(workspace="acme", state=pb.API_KEY_STATE_ACTIVE), metadata=op
    )
    assert [k.name for k in active.api_keys] == ["b"]


def test_request_id_is_echoed(stub, control_plane: RunningControlPlane) -> None:
    meta = (*bearer(control_plane.operator_key), ("x-request-id", "abc-123"))
    _, call = stub.ListApiKeys.with_call(pb.ListApiKeysRequest(), metadata=meta)
    assert ("x-request-id", "abc-123") in tuple(call.trailing_metadata())
