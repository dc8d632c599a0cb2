"""The do-nothing ext_authz server: the ceiling every other row is compared with.

It uses the server model the sidecar uses — grpcio's *sync* server on a 4-thread pool, one
process, no SO_REUSEPORT — and answers every Check with the same pre-built allow response
(status code 0 plus one header), so whatever it costs is framework cost, not ours.

Run: ``python -m bench.ceiling --listen 127.0.0.1:PORT``. With ``--processes N`` it starts N
such servers on the same port with SO_REUSEPORT (the do-nothing counterpart of
``spauth sidecar --workers N``, for the workers rows).
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import threading
from concurrent import futures
from types import FrameType

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

# The gRPC server settings shared with the sidecar; keep them in step with sidecar's server.
MAX_WORKERS = 4
SERVER_OPTIONS: tuple[tuple[str, int], ...] = (
    # One process per port: with SO_REUSEPORT the kernel balances connections, not requests,
    # and a stale process could silently keep half the traffic.
    ("grpc.so_reuseport", 0),
    ("grpc.max_concurrent_streams", 100),
)


def allow_response() -> external_auth_pb2.CheckResponse:
    """An explicit allow: status code 0 and one header, as a real allow would carry."""
    response = external_auth_pb2.CheckResponse()
    response.status.code = 0
    header = response.ok_response.headers.add()
    header.header.key = "x-statuspulse-decision-id"
    header.header.value = "00000000-0000-0000-0000-000000000000"
    header.append_action = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
    return response


class DoNothingAuthorization(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    """Answers every Check with one response built at start-up."""

    def __init__(self, response: external_auth_pb2.CheckResponse | None = None) -> None:
        self._response = allow_response() if response is None else response

    def Check(  # name fixed by the proto
        self, request: external_auth_pb2.CheckRequest, context: grpc.ServicerContext
    ) -> external_auth_pb2.CheckResponse:
        return self._response


def serve(
    listen: str,
    *,
    reuseport: bool = False,
    response: external_auth_pb2.CheckResponse | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT, then stop with a short grace period."""
    options = dict(SERVER_OPTIONS) | ({"grpc.so_reuseport": 1} if reuseport else {})
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=MAX_WORKERS), options=list(options.items())
    )
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(
        DoNothingAuthorization(response), server
    )
    if server.add_insecure_port(listen) == 0:
        raise SystemExit(f"cannot listen on {listen}")
    server.start()
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    stop.wait()
    server.stop(grace=1).wait()


def serve_processes(listen: str, processes: int) -> None:
    """``processes`` servers sharing ``listen`` (SO_REUSEPORT); SIGTERM/SIGINT are forwarded."""
    argv = [sys.executable, "-m", "bench.ceiling", "--listen", listen, "--reuseport"]
    children: list[subprocess.Popen[bytes]] = []

    def forward(signum: int, frame: FrameType | None) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    children += [subprocess.Popen(argv) for _ in range(processes)]
    for child in children:
        child.wait()


def response_from_file(path: str) -> external_auth_pb2.CheckResponse:
    """A serialized CheckResponse (``--response-file``); DecodeError if it is not one."""
    with open(path, "rb") as fh:
        return external_auth_pb2.CheckResponse.FromString(fh.read())


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:9191", help="host:port to serve on")
    parser.add_argument("--processes", type=int, default=1, help="servers on the port (1)")
    parser.add_argument("--reuseport", action="store_true", help="bind with SO_REUSEPORT")
    parser.add_argument(
        "--response-file",
        help="answer with this serialized CheckResponse instead (e.g. the sidecar's own allow, "
        "written by bench.envoy_targets: what Envoy does with a real answer, at no authz cost)",
    )
    args = parser.parse_args(argv)
    if args.processes > 1:
        serve_processes(args.listen, args.processes)
    else:
        response = response_from_file(args.response_file) if args.response_file else None
        serve(args.listen, reuseport=args.reuseport, response=response)


if __name__ == "__main__":
    main()
