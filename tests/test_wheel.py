"""The wheel is the product: built from this checkout, installed (not editable) into a fresh
virtual environment with the pinned versions, its ``spauth serve`` answers Envoy's Check.

Editable installs read files from the checkout, so a file missing from the wheel (the default
policy once was) only shows here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2 as ext
from envoy.service.auth.v3 import external_auth_pb2_grpc as ext_grpc

from tests.conftest import wait_until
from tests.support.ports import free_ports, wait_for_port
from tests.support.wheel import build_wheel, missing_extensions

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
CHECKS = "/v1/workspaces/acme/checks"
KEY_FLAGS = ("--name", "wheel", "--scope", "checks:read", "-o", "json")
PINNED = ("--disable-pip-version-check", "-c", str(ROOT / "constraints.txt"))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_wheel(ROOT, tmp_path_factory.mktemp("dist"))


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new venv holding the wheel and its dependencies at the pinned versions; its bin/.

    This interpreter's pip installs into it (``--python``), so the venv needs no pip of its own,
    and ``--no-compile`` skips byte-compiling thousands of generated modules up front: together
    a minute less, the same files."""
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    into = ("--python", str(venv / "bin" / "python"))
    subprocess.run(
        [sys.executable, "-m", "pip", *into, "install", "-q", "--no-compile", *PINNED, str(wheel)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    return venv / "bin"


def test_the_wheel_holds_every_data_file_of_the_package(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    data = [
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / "sidecar").rglob("*")
        if p.is_file() and p.suffix not in (".py", ".pyc", ".c") and "__pycache__" not in p.parts
    ]
    assert "sidecar/authz/default_policy.toml" in data
    assert sorted(set(data) - names) == []
    # Every C extension setup.py names is built into the wheel where a compiler exists: here,
    # since `make test` installs one.
    assert missing_extensions(wheel) == []


def _env(bin_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SPAUTH_", "PYTHON"))}
    return {**env, "PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", **extra}


@pytest.fixture
def served(installed: Path, tmp_path: Path) -> Iterator[tuple[Path, dict[str, str], int]]:
    """`spauth serve` of the installed wheel on free ports, run from an empty directory (the
    checkout is not importable from there)."""
    admin, http, sidecar = free_ports(3)
    env = _env(installed, SPAUTH_ENDPOINT=f"127.0.0.1:{admin}")
    flags = ["--admin-addr", f"127.0.0.1:{admin}", "--http-addr", f"127.0.0.1:{http}"]
    with open(tmp_path / "serve.log", "w") as log:
        proc = subprocess.Popen(
            [str(installed / "spauth"), "serve", *flags, "--sidecar-addr", f"127.0.0.1:{sidecar}"],
            cwd=tmp_path,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for_port("127.0.0.1", sidecar, timeout=60)
        env["STATUSPULSE_API_KEY"] = (tmp_path / ".spauth" / "bootstrap-key").read_text().strip()
        yield tmp_path, env, sidecar
    finally:
        proc.terminate()
        assert proc.wait(timeout=20) == 0, (tmp_path / "serve.log").read_text()


def test_spauth_serve_from_the_installed_wheel_allows_and_denies(
    installed: Path, served: tuple[Path, dict[str, str], int]
) -> None:
    cwd, env, sidecar_port = served
    where = subprocess.run(
        [str(installed / "python"), "-c", "import sidecar; print(sidecar.__file__)"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert Path(where.stdout.strip()).is_relative_to(installed.parent)  # not the checkout
    version = subprocess.run(
        [str(installed / "spauth"), "--version"], env=env, capture_output=True, text=True
    )
    assert version.stdout.strip() == "spauth 0.1.0"
    created = subprocess.run(
        [str(installed / "spauth"), "keys", "create", "--workspace", "acme", *KEY_FLAGS],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert created.returncode == 0, created.stderr
    key = json.loads(created.stdout)["key"]
    with grpc.insecure_channel(f"127.0.0.1:{sidecar_port}") as channel:
        check = ext_grpc.AuthorizationStub(channel).Check
        # The key reaches the sidecar's replica a moment after it was created.
        wait_until(lambda: check(_request(key), timeout=5).status.code == 0, timeout=30)
        denied = check(_request(None), timeout=5)
    assert denied.status.code == grpc.StatusCode.UNAUTHENTICATED.value[0]
    assert json.loads(denied.denied_response.body)["reason"] == "missing_credential"


def _request(key: str | None) -> ext.CheckRequest:
    req = ext.CheckRequest()
    http = req.attributes.request.http
    http.method, http.path, http.host = "GET", CHECKS, "api.statuspulse.test"
    if key is not None:
        http.headers["authorization"] = f"Bearer {key}"
    return req
