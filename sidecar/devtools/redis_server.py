"""Run a real ``redis-server`` on 127.0.0.1 for tests and the bench (no persistence, a free port).

    with RedisServer() as server:
        client = redis.Redis.from_url(server.url)
        server.stop()      # a Redis outage, mid-test
        server.start()     # back, on the same port

It needs no test framework, so ``python -m bench`` can use it with only the ``bench`` extra; the
pytest fixtures (``redis_server``, ``redis_url``) live in ``tests/support/redis.py``.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import redis

from sidecar.devtools.ports import free_port, port_accepts

__all__ = ["RedisNotInstalled", "RedisServer"]


class RedisNotInstalled(RuntimeError):
    """No ``redis-server`` on PATH (``make system-deps`` installs it)."""


class RedisServer:
    """One redis-server process; ``stop()`` and ``start()`` simulate an outage and a return."""

    def __init__(self, port: int = 0) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RedisNotInstalled("redis-server is not installed (make system-deps installs it)")
        self.binary = binary
        self.port = port or free_port()
        self._dir = Path(tempfile.mkdtemp(prefix="spauth-redis-"))
        self._log = self._dir / "redis.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 10.0) -> None:
        """Start (or restart) the server on this port and wait until it answers PING."""
        args = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self._dir),
            "--logfile", str(self._log),
        ]  # fmt: skip
        self._proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not self._answers():
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not start: {self.log_text()[-2000:]}")
            time.sleep(0.02)

    def _answers(self) -> bool:
        if not port_accepts("127.0.0.1", self.port, timeout=0.2):
            return False
        try:
            with redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=0.5) as client:
                return bool(client.ping())
        except redis.RedisError:
            return False

    def stop(self) -> None:
        """Kill the server (SIGKILL: an outage, not a shutdown) and wait for it to go."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGCONT)  # a paused process still dies, but be explicit
            proc.kill()
            proc.wait(10)

    def pause(self) -> None:
        """SIGSTOP: connections stay open but nothing answers (a hung or partitioned Redis)."""
        if self._proc is not None:
            self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self._proc is not None:
            self._proc.send_signal(signal.SIGCONT)

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2)

    def flush(self) -> None:
        with self.client() as client:
            client.flushall()

    def log_text(self) -> str:
        try:
            return self._log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)
