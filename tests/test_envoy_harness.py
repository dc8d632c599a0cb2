"""The e2e harness itself: real Envoy, running deploy/envoy/front-proxy.yaml, between an echo
upstream and a test-only ext_authz gRPC server.

These tests pin down the Envoy behaviour the sidecar relies on (allow/deny/error channels,
header mutation, what a CheckRequest looks like) independently of the sidecar's own code.
"""

from __future__ import annotations

import http.client
import json
import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.type.v3 import http_status_pb2
from google.rpc import code_pb2, status_pb2

from sidecar.devtools.echo_upstream import EchoUpstream
from tests.support.envoy import (
    AUTHZ_CLUSTER,
    DEFAULT_CONFIG,
    EnvoyProcess,
    render_config,
)
from tests.support.ports import free_port

OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
WORKSPACE = "ws_harness"
DENY_BODY = {"error": "unauthenticated", "detail": "missing or invalid credential"}


def _header(key: str, value: str) -> base_pb2.HeaderValueOption:
    # `append` is deprecated; Envoy wants the action spelled out.
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, value=value), append_action=OVERWRITE
    )


def _deny(code: int, http_status: int, body: dict[str, str]) -> external_auth_pb2.CheckResponse:
    # A denial is a successful RPC carrying a non-OK status, never a gRPC error: errors are
    # Envoy's "sidecar unavailable" channel (503 here).
    return external_auth_pb2.CheckResponse(
        status=status_pb2.Status(code=code),
        denied_response=external_auth_pb2.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=http_status),
            headers=[
                _header("www-authenticate", 'Bearer realm="statuspulse"'),
                _header("content-type", "application/json"),
            ],
            body=json.dumps(body),
        ),
    )


class StubAuthz(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]  # untyped protos
    """Test-only ext_authz server: `Bearer good` is allowed, `Bearer forbidden` is 403,
    anything else 401. Records every CheckRequest it receives."""

    def __init__(self) -> None:
        self.requests: list[external_auth_pb2.CheckRequest] = []
        self._lock = threading.Lock()

    def Check(
        self, request: external_auth_pb2.CheckRequest, context: grpc.ServicerContext
    ) -> external_auth_pb2.CheckResponse:
        with self._lock:
            self.requests.append(request)
        credential = request.attributes.request.http.headers.get("authorization", "")
        if credential == "Bearer good":
            return external_auth_pb2.CheckResponse(
                status=status_pb2.Status(code=code_pb2.OK),
                ok_response=external_auth_pb2.OkHttpResponse(
                    headers=[_header("x-statuspulse-workspace", WORKSPACE)],
                    headers_to_remove=["authorization"],
                ),
            )
        if credential == "Bearer forbidden":
            return _deny(code_pb2.PERMISSION_DENIED, 403, {"error": "forbidden"})
        return _deny(code_pb2.UNAUTHENTICATED, 401, DENY_BODY)

    def take(self) -> list[external_auth_pb2.CheckRequest]:
        """The requests received since the last call."""
        with self._lock:
            taken, self.requests = self.requests, []
        return taken


@dataclass
class AuthzServer:
    stub: StubAuthz
    server: grpc.Server
    port: int


def _start_authz() -> AuthzServer:
    stub = StubAuthz()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(stub, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return AuthzServer(stub, server, port)


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def send(base_url: str, path: str, headers: dict[str, str] | None = None) -> Reply:
    """GET ``path`` verbatim (http.client does not re-encode it, unlike requests)."""
    host, port = base_url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        reply_headers = {name.lower(): value for name, value in response.getheaders()}
        return Reply(response.status, reply_headers, response.read())
    finally:
        conn.close()


@pytest.fixture(scope="module")
def echo() -> Iterator[EchoUpstream]:
    with EchoUpstream() as upstream:
        yield upstream


@pytest.fixture(scope="module")
def authz() -> Iterator[AuthzServer]:
    running = _start_authz()
    yield running
    running.server.stop(None).wait()


@pytest.fixture(scope="module")
def envoy(echo: EchoUpstream, authz: AuthzServer) -> Iterator[EnvoyProcess]:
    with EnvoyProcess(authz=("127.0.0.1", authz.port), upstream=("127.0.0.1", echo.port)) as proc:
        yield proc


@pytest.fixture
def stub(authz: AuthzServer) -> StubAuthz:
    authz.stub.take()  # forget requests made by earlier tests
    return authz.stub


@pytest.mark.envoy
def test_allowed_request_reaches_upstream_with_identity_and_without_credential(
    envoy: EnvoyProcess, stub: StubAuthz
) -> None:
    reply = send(envoy.url, "/v1/checks", {"Authorization": "Bearer good"})

    assert reply.status == 200
    seen = reply.json()["headers"]
    assert seen["x-statuspulse-workspace"] == WORKSPACE
    assert "authorization" not in seen
    assert len(stub.take()) == 1


@pytest.mark.envoy
def test_client_sent_identity_headers_never_reach_the_check_or_upstream(
    envoy: EnvoyProcess, stub: StubAuthz
) -> None:
    spoofed = {"X-Statuspulse-Workspace": "ws_evil", "X-Statuspulse-Subject": "admin"}
    reply = send(envoy.url, "/v1/checks", {"Authorization": "Bearer good", **spoofed})

    assert reply.status == 200
    seen = reply.json()["headers"]
    assert seen["x-statuspulse-workspace"] == WORKSPACE
    assert "x-statuspulse-subject" not in seen
    (check,) = stub.take()
    assert not any(k.startswith("x-statuspulse-") for k in check.attributes.request.http.headers)


@pytest.mark.envoy
def test_header_names_with_underscores_are_rejected(envoy: EnvoyProcess, stub: StubAuthz) -> None:
    # A WSGI upstream would read x_statuspulse_workspace as X-Statuspulse-Workspace.
    reply = send(
        envoy.url, "/v1/checks", {"Authorization": "Bearer good", "x_statuspulse_workspace": "e"}
    )

    assert reply.status == 400
    assert stub.take() == []


@pytest.mark.envoy
def test_missing_credential_is_denied_with_401_challenge_and_json_body(
    envoy: EnvoyProcess, stub: StubAuthz
) -> None:
    reply = send(envoy.url, "/v1/checks")

    assert reply.status == 401
    assert reply.headers["www-authenticate"] == 'Bearer realm="statuspulse"'
    assert reply.headers["content-type"] == "application/json"
    assert reply.json() == DENY_BODY
    assert len(stub.take()) == 1


@pytest.mark.envoy
def test_permission_denied_maps_to_the_http_status_the_server_chose(
    envoy: EnvoyProcess, stub: StubAuthz
) -> None:
    reply = send(envoy.url, "/v1/keys", {"Authorization": "Bearer forbidden"})

    assert reply.status == 403
    assert reply.json() == {"error": "forbidden"}


@pytest.mark.envoy
def test_check_request_has_lowercased_headers_raw_path_and_route_context(
    envoy: EnvoyProcess, stub: StubAuthz
) -> None:
    raw_path = "/v1/checks?name=a%20b&next=%2Fx&flag"
    send(envoy.url, raw_path, {"Authorization": "Bearer good", "X-Mixed-Case": "Keep-Value"})

    (check,) = stub.take()
    http_attrs = check.attributes.request.http
    assert all(name == name.lower() for name in http_attrs.headers)
    assert http_attrs.headers["x-mixed-case"] == "Keep-Value"
    # The query string stays raw and inside `path`; `query` is left empty by Envoy.
    assert http_attrs.path == raw_path
    assert http_attrs.headers[":path"] == raw_path
    assert http_attrs.query == ""
    assert http_attrs.method == "GET"
    assert dict(check.attributes.context_extensions) == {"service": "statuspulse-api"}


@pytest.mark.envoy
def test_healthz_route_skips_ext_authz(envoy: EnvoyProcess, stub: StubAuthz) -> None:
    reply = send(envoy.url, "/healthz?probe=1")

    assert reply.status == 200
    assert reply.json()["path"] == "/healthz?probe=1"
    assert stub.take() == []


@pytest.mark.envoy
def test_stopped_ext_authz_server_fails_closed_with_503(echo: EchoUpstream) -> None:
    authz = _start_authz()
    upstream = ("127.0.0.1", echo.port)
    with EnvoyProcess(authz=("127.0.0.1", authz.port), upstream=upstream) as envoy:
        assert send(envoy.url, "/v1/checks", {"Authorization": "Bearer good"}).status == 200
        authz.server.stop(None).wait()

        statuses = [
            send(envoy.url, "/v1/checks", {"Authorization": "Bearer good"}).status for _ in range(5)
        ]

        assert statuses == [503] * 5
        assert envoy.stats(r"ext_authz\.error$")["http.statuspulse_ingress.ext_authz.error"] >= 5


@pytest.mark.envoy
def test_never_started_ext_authz_server_fails_closed_with_503(echo: EchoUpstream) -> None:
    nothing_listens = ("127.0.0.1", free_port())
    with EnvoyProcess(authz=nothing_listens, upstream=("127.0.0.1", echo.port)) as envoy:
        reply = send(envoy.url, "/v1/checks", {"Authorization": "Bearer good"})

    assert reply.status == 503
    assert reply.body == b""


def test_render_config_rewrites_addresses_and_nothing_else() -> None:
    authz = [("127.0.0.1", 7001), ("127.0.0.2", 7002)]
    rendered = render_config(
        DEFAULT_CONFIG,
        listen=("127.0.0.1", 1),
        admin=("127.0.0.1", 2),
        authz=authz,
        upstream=("127.0.0.1", 3),
    )
    shipped = render_config(
        DEFAULT_CONFIG,
        listen=("127.0.0.1", 10000),
        admin=("127.0.0.1", 9901),
        authz=[("127.0.0.1", 9191)],
        upstream=("127.0.0.1", 8081),
    )

    clusters = rendered["static_resources"]["clusters"]
    cluster = next(c for c in clusters if c["name"] == AUTHZ_CLUSTER)
    endpoints = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    addresses = [e["endpoint"]["address"]["socket_address"] for e in endpoints]
    assert [(a["address"], a["port_value"]) for a in addresses] == authz
    listener = rendered["static_resources"]["listeners"][0]
    assert listener["filter_chains"] == shipped["static_resources"]["listeners"][0]["filter_chains"]


def test_echo_upstream_lowercases_and_joins_repeated_headers() -> None:
    with EchoUpstream() as upstream:
        conn = http.client.HTTPConnection(upstream.host, upstream.port, timeout=10)
        try:
            conn.putrequest("POST", "/p?q=%20", skip_accept_encoding=True)
            conn.putheader("X-Dup", "a")
            conn.putheader("X-Dup", "b")
            conn.putheader("Content-Length", "3")
            conn.endheaders(b"abc")
            first = json.loads(conn.getresponse().read())
            conn.request("GET", "/again")  # same connection: the body was fully consumed
            second = json.loads(conn.getresponse().read())
        finally:
            conn.close()

    assert first["method"] == "POST"
    assert first["path"] == "/p?q=%20"
    assert first["headers"]["x-dup"] == "a, b"
    assert second["path"] == "/again"
