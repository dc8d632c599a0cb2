"""The sidecar's metrics and health port (``metrics_addr``, default 127.0.0.1:9192): ``/metrics``
(Prometheus text), ``/healthz`` (liveness: the process answers) and ``/readyz`` (readiness: 200
while serving or degraded, 503 while loading, stale or draining).

A small threaded stdlib HTTP server: nothing here touches the Check hot path, and scrapes and
probes never wait on a gRPC worker thread."""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from sidecar.ops.health import Health

LIVE_BODY = b'{"status": "ok"}'


def split_addr(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host.strip("[]"), int(port)


class StatusServer:
    """Serves ``registry`` and ``health()`` over HTTP on a daemon thread."""

    def __init__(
        self, addr: str, registry: CollectorRegistry, health: Callable[[], Health]
    ) -> None:
        self.addr = addr
        self._registry = registry
        self._health = health
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    def start(self) -> None:
        """Bind (OSError naming the address when taken) and serve in the background."""
        host, port = split_addr(self.addr)
        try:
            server = ThreadingHTTPServer((host, port), self._handler_class())
        except OSError as exc:
            raise OSError(f"metrics_addr: cannot listen on {self.addr} ({exc.strerror})") from None
        server.daemon_threads = True
        self._server = server
        self.port = int(server.server_address[1])
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="spauth-status",
            daemon=True,
        )  # fmt: skip
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        registry, health = self._registry, self._health

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            server_version = "spauth-status"

            def do_GET(self) -> None:
                path = self.path.partition("?")[0]
                if path == "/metrics":
                    self._send(200, CONTENT_TYPE_LATEST, generate_latest(registry))
                elif path == "/healthz":
                    self._send(200, "application/json", LIVE_BODY)
                elif path == "/readyz":
                    report = health()
                    self._send(200 if report.ready else 503, "application/json", report.body())
                else:
                    self._send(404, "text/plain", b"not found\n")

            def _send(self, status: int, content_type: str, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass  # probes every few seconds would flood the JSON log

        return Handler
