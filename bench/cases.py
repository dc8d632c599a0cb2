"""Request cases: what the load generator sends and what a real call must answer.

A *case* is one named request plus the outcome the target must give it. Two kinds exist:

* :class:`GrpcCase` — a serialized ``envoy.service.auth.v3.CheckRequest`` posted straight to an
  ext_authz server (``/envoy.service.auth.v3.Authorization/Check``), gRPC-framed for h2load.
* :class:`HttpCase` — a plain HTTP request sent to an Envoy listener (for the Envoy rows).

Both verify themselves with one real call before any load is applied, because h2load only sees
HTTP status 200 and ignores ``grpc-status``.
"""

from __future__ import annotations

import http.client
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import grpc
from envoy.service.auth.v3 import external_auth_pb2

CHECK_METHOD = "/envoy.service.auth.v3.Authorization/Check"
GRPC_HEADERS = (("content-type", "application/grpc"), ("te", "trailers"))

Expect = Literal["allow", "deny"]
# An extra assertion on a verified response; returns an error message or None when fine.
ResponseCheck = Callable[[external_auth_pb2.CheckResponse], "str | None"]


def grpc_frame(message: bytes) -> bytes:
    """Wrap ``message`` in a gRPC frame: flag byte 0 (uncompressed), 4-byte big-endian length."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


def check_request(
    headers: Mapping[str, str],
    *,
    method: str = "GET",
    path: str = "/api/v1/checks",
    host: str = "api.statuspulse.test",
    context_extensions: Mapping[str, str] | None = None,
    source: str = "10.0.0.7",
) -> bytes:
    """Serialize a CheckRequest shaped like the ones Envoy sends.

    Envoy lower-cases header names and includes the pseudo-headers in the map, so we do too.
    """
    req = external_auth_pb2.CheckRequest()
    http_req = req.attributes.request.http
    http_req.id = "9f0c3a57-3d8e-4f4e-9a51-5b8f2c1e7d11"
    http_req.method = method
    http_req.path = path
    http_req.host = host
    http_req.scheme = "http"
    http_req.protocol = "HTTP/1.1"
    all_headers = {":authority": host, ":path": path, ":method": method, ":scheme": "http"}
    all_headers.update({k.lower(): v for k, v in headers.items()})
    http_req.headers.update(all_headers)
    req.attributes.source.address.socket_address.address = source
    req.attributes.source.address.socket_address.port_value = 40312
    req.attributes.destination.address.socket_address.address = "10.0.0.2"
    req.attributes.destination.address.socket_address.port_value = 10000
    if context_extensions:
        req.attributes.context_extensions.update(context_extensions)
    data: bytes = req.SerializeToString()
    return data


def typical_headers(**extra: str) -> dict[str, str]:
    """Headers of an ordinary API call (user-agent, request id…), plus ``extra``.

    Keyword names use ``_`` for ``-`` (``x_api_key=...`` becomes ``x-api-key``).
    """
    headers = {
        "user-agent": "statuspulse-cli/2.4.1 (linux; amd64)",
        "accept": "application/json",
        "x-request-id": "9f0c3a57-3d8e-4f4e-9a51-5b8f2c1e7d11",
        "x-forwarded-for": "203.0.113.45",
        "x-forwarded-proto": "https",
        "x-envoy-expected-rq-timeout-ms": "15000",
    }
    headers.update({k.replace("_", "-"): v for k, v in extra.items()})
    return headers


@dataclass(frozen=True)
class GrpcCase:
    """A serialized CheckRequest sent directly to an ext_authz gRPC server.

    ``expect`` is checked against ``CheckResponse.status.code`` (0 = allow, anything else =
    deny); ``expect_code`` pins the exact deny code; ``check`` adds any further assertion.
    A gRPC *error* fails the case either way: a deny must be a response, not an error.
    """

    name: str
    request: bytes
    expect: Expect = "allow"
    expect_code: int | None = None
    check: ResponseCheck | None = field(default=None, compare=False)

    kind: Literal["grpc"] = "grpc"

    def body(self) -> bytes:
        """The bytes h2load posts: the request in one gRPC frame."""
        return grpc_frame(self.request)

    def verify(self, address: str, timeout: float = 5.0) -> str | None:
        """Make one real call to ``address`` (host:port); return an error message or None."""
        with grpc.insecure_channel(address) as channel:
            call = channel.unary_unary(
                CHECK_METHOD,
                request_serializer=None,  # the request is already serialized bytes
                response_deserializer=external_auth_pb2.CheckResponse.FromString,
            )
            try:
                response = call(self.request, timeout=timeout)
            except grpc.RpcError as exc:
                return f"gRPC error instead of a CheckResponse: {exc.code()} {exc.details()}"
        return _judge(self, response)


def _judge(case: GrpcCase, response: external_auth_pb2.CheckResponse) -> str | None:
    code = response.status.code
    allowed = code == 0
    if allowed != (case.expect == "allow"):
        return f"expected {case.expect}, got status.code={code} ({response.status.message!r})"
    if case.expect_code is not None and code != case.expect_code:
        return f"expected status.code={case.expect_code}, got {code}"
    return case.check(response) if case.check else None


def grpc_case(
    name: str,
    headers: Mapping[str, str],
    expect: Expect = "allow",
    *,
    expect_code: int | None = None,
    check: ResponseCheck | None = None,
    method: str = "GET",
    path: str = "/api/v1/checks",
    host: str = "api.statuspulse.test",
    context_extensions: Mapping[str, str] | None = None,
    source: str = "10.0.0.7",
) -> GrpcCase:
    """Build a :class:`GrpcCase` from request headers, shaped as in :func:`check_request`."""
    request = check_request(
        headers,
        method=method,
        path=path,
        host=host,
        context_extensions=context_extensions,
        source=source,
    )
    return GrpcCase(name, request, expect, expect_code, check)


@dataclass(frozen=True)
class HttpCase:
    """A plain HTTP request through Envoy; ``expect_status`` is the HTTP status it must get.

    A GET, or a POST of ``body`` when given (h2load can send nothing else). h2load speaks
    HTTP/2 prior knowledge (h2c) unless ``http1`` is set; Envoy's ``codec_type: AUTO`` accepts
    both, an HTTP/1-only listener needs ``http1=True``.
    """

    name: str
    headers: Mapping[str, str]
    expect_status: int = 200
    path: str = "/"
    body: bytes | None = None
    http1: bool = False

    kind: Literal["http"] = "http"

    @property
    def expect(self) -> Expect:
        """Allow when Envoy lets the request through (2xx), deny otherwise."""
        return "allow" if 200 <= self.expect_status < 300 else "deny"

    def verify(self, base_url: str, timeout: float = 5.0) -> str | None:
        """Send the request once to ``base_url`` and compare the status code."""
        parts = urllib.parse.urlsplit(base_url)
        conn = http.client.HTTPConnection(
            parts.hostname or "127.0.0.1", parts.port, timeout=timeout
        )
        try:
            method = "GET" if self.body is None else "POST"
            conn.request(method, self.path, body=self.body, headers=dict(self.headers))
            status = conn.getresponse().status
        except OSError as exc:
            return f"HTTP request failed: {exc}"
        finally:
            conn.close()
        if status != self.expect_status:
            return f"expected HTTP {self.expect_status}, got {status}"
        return None


Case = GrpcCase | HttpCase
