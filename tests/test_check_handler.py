"""The Check handler over a real gRPC server: checks that end in a gRPC error instead of a
decision are counted (the spauth_decisions_total{outcome="error"} series) and never answered
with an allow."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2 as ext
from envoy.service.auth.v3 import external_auth_pb2_grpc as ext_grpc

from bench.overhead import PATH, _engine
from sidecar.authz.decision import Decision
from sidecar.authz.engine import CheckInput
from sidecar.core import keyformat
from sidecar.dataplane.envoy_check import SERVICE, CheckHandler, Observer, check_method
from sidecar.ops.metrics import BAD_CHECK_REQUEST, INTERNAL_ERROR


def _failing_observer(decision: Decision, view: CheckInput, source: str, t: float) -> None:
    raise RuntimeError("observer bug")


@pytest.fixture
def serve() -> Iterator[object]:
    servers: list[grpc.Server] = []

    def start(observers: list[Observer], errors: list[str]) -> tuple[str, str]:
        secret = keyformat.mint_key()
        handler = CheckHandler(_engine(secret), observers, lambda reason, _t: errors.append(reason))
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, {"Check": check_method(handler)}),)
        )
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return f"127.0.0.1:{port}", secret

    yield start
    for server in servers:
        server.stop(None)


def _request(secret: str) -> ext.CheckRequest:
    req = ext.CheckRequest()
    http = req.attributes.request.http
    http.method, http.path, http.host = "GET", PATH, "api"
    http.headers["authorization"] = f"Bearer {secret}"
    return req


def test_an_observer_failure_is_counted_and_answered_with_an_error(serve: object) -> None:
    errors: list[str] = []
    address, secret = serve([_failing_observer], errors)  # type: ignore[operator]
    with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError) as info:
        ext_grpc.AuthorizationStub(channel).Check(_request(secret), timeout=5)
    assert info.value.code() is grpc.StatusCode.UNKNOWN  # an error: Envoy denies (403)
    assert errors == [INTERNAL_ERROR]


def test_garbage_is_invalid_argument_and_counted(serve: object) -> None:
    errors: list[str] = []
    address, secret = serve([], errors)  # type: ignore[operator]
    with grpc.insecure_channel(address) as channel:
        assert (
            ext_grpc.AuthorizationStub(channel).Check(_request(secret), timeout=5).status.code == 0
        )
        garbage = channel.unary_unary("/envoy.service.auth.v3.Authorization/Check")
        with pytest.raises(grpc.RpcError) as info:
            garbage(b"\xff\xff\xff", timeout=5)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert errors == [BAD_CHECK_REQUEST]
