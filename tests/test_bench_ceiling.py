"""The do-nothing server answers its one-header allow, or, given ``--response-file``, the
sidecar's own allow (``bench.envoy_targets:envoy_ceiling_full``: what a real answer costs
Envoy, at no authz cost). A real gRPC server on port 0 and a real client."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from google.protobuf.message import DecodeError

from bench.ceiling import DoNothingAuthorization, allow_response, response_from_file
from bench.envoy_targets import sidecar_allow_response

Answer = Callable[[external_auth_pb2.CheckResponse | None], bytes]


@pytest.fixture
def answer() -> Iterator[Answer]:
    servers: list[grpc.Server] = []

    def check(response: external_auth_pb2.CheckResponse | None) -> bytes:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
        external_auth_pb2_grpc.add_AuthorizationServicer_to_server(
            DoNothingAuthorization(response), server
        )
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            check = channel.unary_unary(
                "/envoy.service.auth.v3.Authorization/Check",
                request_serializer=external_auth_pb2.CheckRequest.SerializeToString,
                response_deserializer=None,
            )
            return bytes(check(external_auth_pb2.CheckRequest(), timeout=10))

    yield check
    for server in servers:
        server.stop(None)


def test_the_ceiling_answers_one_header_or_the_sidecars_own_allow(
    answer: Answer, tmp_path: Path
) -> None:
    assert answer(None) == allow_response().SerializeToString()
    sidecar = sidecar_allow_response()
    path = tmp_path / "allow.bin"
    path.write_bytes(sidecar)
    served = answer(response_from_file(str(path)))
    parsed = external_auth_pb2.CheckResponse.FromString(served)
    assert parsed == external_auth_pb2.CheckResponse.FromString(sidecar)
    assert parsed.status.code == 0
    keys = [h.header.key for h in parsed.ok_response.headers]
    assert keys[0] == "x-statuspulse-decision-id" and "x-statuspulse-workspace" in keys
    assert "authorization" in parsed.ok_response.headers_to_remove
    assert parsed.dynamic_metadata.fields["decision_id"].string_value.startswith("dec_")


def test_a_response_file_that_is_not_a_check_response_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "junk.bin"
    path.write_bytes(b"\xff\xff\xff")
    with pytest.raises(DecodeError):
        response_from_file(str(path))
