"""A tiny HTTP/1.1 upstream that echoes what it received, as JSON.

It stands in for the StatusPulse API behind Envoy, so an end-to-end test or a benchmark can see
exactly which headers reached the upstream (identity headers added by the sidecar, credential
headers removed). Every request gets ``200`` and ``{"method", "path", "headers"}`` where header
names are lower-cased and repeated headers are joined with ``", "`` (RFC 9110 §5.3).

Run it:  ``python -m sidecar.devtools.echo_upstream --listen 127.0.0.1:8081``
Embed it: ``with EchoUpstream() as echo: ... echo.port ...`` (binds 127.0.0.1:0 by default).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import threading
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType

__all__ = ["EchoHandler", "EchoUpstream", "main", "parse_listen"]


class EchoHandler(BaseHTTPRequestHandler):
    """Answers any method with 200 and a JSON description of the request."""

    # HTTP/1.1 so Envoy's connection pool can keep connections alive (every reply has a length).
    protocol_version = "HTTP/1.1"
    server_version = "statuspulse-echo/1"
    quiet = True

    def _echo(self) -> None:
        self._drain_body()
        headers: dict[str, str] = {}
        for name, value in self.headers.items():
            key = name.lower()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        body = json.dumps(
            {"method": self.command, "path": self.path, "headers": headers}, sort_keys=True
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _drain_body(self) -> None:
        """Read the request body so the next request on a kept-alive connection parses cleanly."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    # Trailer section ends with an empty line (RFC 9112 §7.1).
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return
                self.rfile.read(size + 2)  # chunk data + CRLF
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)

    def log_message(self, format: str, *args: object) -> None:
        if not self.quiet:
            super().log_message(format, *args)

    # http.server dispatches on do_<METHOD>; every method gets the same echo.
    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = _echo


class _VerboseEchoHandler(EchoHandler):
    quiet = False


class EchoUpstream:
    """An echo server running in a daemon thread; a context manager for tests."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._server = ThreadingHTTPServer((host, port), EchoHandler)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},  # shutdown() waits up to one poll interval
            name="echo-upstream",
            daemon=True,
        )

    @property
    def host(self) -> str:
        """The bound address."""
        return str(self._server.server_address[0])

    @property
    def port(self) -> int:
        """The bound port (the real one when constructed with port 0)."""
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:8081``."""
        return f"http://{self.host}:{self.port}"

    def start(self) -> EchoUpstream:
        """Start serving in the background thread."""
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving and close the listening socket."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join()
        self._server.server_close()

    def __enter__(self) -> EchoUpstream:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def parse_listen(value: str) -> tuple[str, int]:
    """Parse ``HOST:PORT`` (``[::1]:PORT`` for IPv6) for ``--listen``."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"--listen wants HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point: serve in the foreground until interrupted."""
    parser = argparse.ArgumentParser(prog="python -m sidecar.devtools.echo_upstream")
    parser.add_argument("--listen", type=parse_listen, default=("127.0.0.1", 8081))
    parser.add_argument("--verbose", action="store_true", help="log each request to stderr")
    args = parser.parse_args(argv)
    handler = _VerboseEchoHandler if args.verbose else EchoHandler
    host, port = args.listen
    with ThreadingHTTPServer((host, port), handler) as server:
        print(f"echo upstream listening on http://{host}:{server.server_address[1]}", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            server.serve_forever()


if __name__ == "__main__":
    main()
