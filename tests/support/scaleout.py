"""A scale-out deployment on loopback, made of real processes: PostgreSQL, control-plane replicas
and sidecars (``python -m …`` subprocesses), for the fault tests. Each process logs to its own
file, can be killed (SIGKILL) or stopped (SIGTERM) and started again on the same ports and state,
and reports its CPU time from /proc.

    with ScaleOut(tmp_path, postgres) as s:
        a, b = s.control_plane(), s.control_plane()
        sc = s.sidecar([a, b])
        key, key_id = s.admin(a).create()
        assert s.allowed(sc, key)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType

import grpc
from envoy.service.auth.v3 import external_auth_pb2 as ext
from envoy.service.auth.v3 import external_auth_pb2_grpc as ext_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from sidecar._gen.statuspulse.auth.v1 import api_keys_pb2 as keys_pb
from sidecar._gen.statuspulse.auth.v1 import api_keys_pb2_grpc as keys_grpc
from sidecar.core import kek
from tests.support.ports import free_port, wait_for_port
from tests.support.postgres import PostgresServer
from tests.support.sync import TEST_SYNC_TOKEN

REPO = Path(__file__).resolve().parents[2]
CHECK_PATH = "/v1/workspaces/acme/checks"
_TICKS = os.sysconf("SC_CLK_TCK")


class Process:
    """One child process with a log file; start() again after kill() reuses its arguments."""

    def __init__(self, name: str, argv: Sequence[str], log: Path, env: dict[str, str]) -> None:
        self.name = name
        self.argv = list(argv)
        self.log = log
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as sink:
            self.proc = subprocess.Popen(
                self.argv, stdout=sink, stderr=subprocess.STDOUT, env=self.env, cwd=REPO
            )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no drain, no goodbye (a crashed pod)."""
        if self.alive():
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait(10)

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds."""
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.kill()

    def cpu_seconds(self) -> float:
        """User + system CPU time so far (from /proc/<pid>/stat)."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICKS

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


class ControlPlaneProcess(Process):
    """A control-plane replica on fixed loopback ports, sharing the database."""

    def __init__(self, name: str, base: Path, database_url: str, env: dict[str, str]) -> None:
        self.admin_port, self.http_port = free_port(), free_port()
        self.data_dir = base / name
        argv = [
            sys.executable,
            "-m",
            "sidecar",
            "control-plane",
            "--admin-addr",
            f"127.0.0.1:{self.admin_port}",
            "--http-addr",
            f"127.0.0.1:{self.http_port}",
            "--data-dir",
            str(self.data_dir),
            "--database-url",
            database_url,
        ]
        super().__init__(name, argv, base / f"{name}.log", env)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.admin_port}"

    @property
    def issuer(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self) -> None:
        super().start()
        wait_for_port("127.0.0.1", self.admin_port, timeout=30)
        wait_for_port("127.0.0.1", self.http_port, timeout=30)


class SidecarProcess(Process):
    """A sidecar with its own port and state directory, following ``targets`` in order."""

    def __init__(self, name: str, base: Path, targets: Sequence[str], env: dict[str, str]) -> None:
        self.port, self.metrics_port = free_port(), free_port()
        self.state_dir = base / name
        self.targets = list(targets)
        argv = [
            sys.executable,
            "-m",
            "sidecar",
            "sidecar",
            "--listen",
            f"127.0.0.1:{self.port}",
            "--control-plane",
            ",".join(targets),
            "--state-dir",
            str(self.state_dir),
            "--metrics-addr",
            f"127.0.0.1:{self.metrics_port}",
        ]
        super().__init__(name, argv, base / f"{name}.log", env)
        self._channel: grpc.Channel | None = None

    def start(self) -> None:
        super().start()
        wait_for_port("127.0.0.1", self.port, timeout=30)

    def channel(self) -> grpc.Channel:
        if self._channel is None:
            self._channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        return self._channel

    def check(self, key: str) -> ext.CheckResponse:
        req = ext.CheckRequest()
        http = req.attributes.request.http
        http.method, http.path, http.host = "GET", CHECK_PATH, "api.statuspulse.test"
        http.headers["authorization"] = f"Bearer {key}"
        return ext_grpc.AuthorizationStub(self.channel()).Check(req, timeout=5)

    def allowed(self, key: str) -> bool:
        return bool(self.check(key).status.code == 0)

    def serving(self) -> bool:
        """Health "" SERVING: deciding from a loaded replica."""
        try:
            resp = health_pb2_grpc.HealthStub(self.channel()).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=2
            )
        except grpc.RpcError:
            return False
        return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)

    def close_channel(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None


def scrape(port: int, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """The samples of counter ``name`` (without ``_total``) on ``/metrics`` at ``port``, by
    label set."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        if family.name == name:
            for s in family.samples:
                if s.name == f"{name}_total":
                    samples[tuple(sorted(s.labels.items()))] = s.value
    return samples


class Admin:
    """The admin API of one control-plane replica, as the operator."""

    def __init__(self, address: str, operator_key: str) -> None:
        self.channel = grpc.insecure_channel(address)
        self.stub = keys_grpc.ApiKeyServiceStub(self.channel)
        self.metadata = (("authorization", f"Bearer {operator_key}"),)

    def create(self, scopes: Sequence[str] = ("checks:read",)) -> tuple[str, str]:
        resp = self.stub.CreateApiKey(
            keys_pb.CreateApiKeyRequest(workspace="acme", name="t", scopes=list(scopes)),
            metadata=self.metadata,
            timeout=10,
        )
        return str(resp.key), str(resp.api_key.id)

    def revoke(self, key_id: str) -> None:
        request = keys_pb.RevokeApiKeyRequest(id=key_id, reason="test")
        self.stub.RevokeApiKey(request, metadata=self.metadata, timeout=10)

    def close(self) -> None:
        self.channel.close()


class ScaleOut:
    """Owns every process it starts and stops them all on exit (logs are kept in ``base``)."""

    def __init__(self, base: Path, postgres: PostgresServer, database: str = "spauth") -> None:
        self.base = base
        self.postgres = postgres
        self.database_url = postgres.create_database(database)
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("SPAUTH_")},
            "PYTHONPATH": str(REPO),
            "PYTHONUNBUFFERED": "1",
            # Every replica and sidecar shares one sync token, as deploy/k8s does with a Secret.
            "SPAUTH_SYNC_TOKEN": TEST_SYNC_TOKEN,
            "SPAUTH_SIDECAR_SYNC_TOKEN": TEST_SYNC_TOKEN,
            # Every control-plane replica of one store shares the key-encryption key.
            "SPAUTH_KEY_ENCRYPTION_KEY": kek.generate(),
        }
        self.control_planes: list[ControlPlaneProcess] = []
        self.sidecars: list[SidecarProcess] = []
        self._admins: list[Admin] = []
        self.operator_key = ""

    def control_plane(self) -> ControlPlaneProcess:
        cp = ControlPlaneProcess(
            f"cp{len(self.control_planes)}", self.base, self.database_url, self.env
        )
        self.control_planes.append(cp)
        cp.start()
        key_file = cp.data_dir / "bootstrap-key"
        if not self.operator_key and key_file.exists():
            self.operator_key = key_file.read_text().strip()
        return cp

    def sidecar(self, planes: Sequence[ControlPlaneProcess]) -> SidecarProcess:
        return self.start_sidecars([planes])[0]

    def start_sidecars(
        self, plans: Sequence[Sequence[ControlPlaneProcess]]
    ) -> list[SidecarProcess]:
        """One sidecar per entry, each following its list of replicas in order; started
        together, returned once each serves."""
        started = []
        for planes in plans:
            sc = SidecarProcess(
                f"sidecar{len(self.sidecars)}", self.base, [p.address for p in planes], self.env
            )
            self.sidecars.append(sc)
            sc.start()
            started.append(sc)
        for sc in started:
            wait(sc.serving, 30, f"{sc.name} never served:\n{sc.log_text()[-3000:]}")
        return started

    def admin(self, plane: ControlPlaneProcess) -> Admin:
        admin = Admin(plane.address, self.operator_key)
        self._admins.append(admin)
        return admin

    def logs(self) -> str:
        parts = [f"--- {p.name} ---\n{p.log_text()[-3000:]}" for p in self._processes()]
        return "\n".join(parts)

    def _processes(self) -> list[Process]:
        return [*self.control_planes, *self.sidecars]

    def __enter__(self) -> ScaleOut:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None:
            exc.add_note(self.logs())
        for admin in self._admins:
            admin.close()
        for sc in self.sidecars:
            sc.close_channel()
        for p in self._processes():
            p.stop(grace=2)


def wait(predicate: Callable[[], bool], timeout: float, message: str = "") -> float:
    """Poll ``predicate`` until true; the seconds it took. AssertionError after ``timeout``."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(message or f"condition not met within {timeout}s")
        time.sleep(0.005)
    return time.monotonic() - start
