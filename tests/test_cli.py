"""The CLI as a subprocess against a real ``spauth serve``."""

from __future__ import annotations

import json
import os
import pty
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import pytest

from tests.conftest import free_port


@dataclass
class Served:
    proc: subprocess.Popen[str]
    endpoint: str
    data_dir: Path
    operator_key: str
    log_path: Path
    secrets: list[str] = field(default_factory=list)

    def spauth(self, *args: str, key: str | None = None) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "SPAUTH_ENDPOINT": self.endpoint}
        env.pop("STATUSPULSE_API_KEY", None)
        if key is not None:
            env["STATUSPULSE_API_KEY"] = key
        return subprocess.run(
            [sys.executable, "-m", "sidecar", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def json(self, *args: str, key: str | None = None) -> object:
        out = self.spauth(*args, "--output", "json", key=key or self.operator_key)
        assert out.returncode == 0, out.stderr
        value = json.loads(out.stdout)
        if isinstance(value, dict) and "key" in value:
            self.secrets.append(value["key"])
        return value


def wait_for_port(port: int, proc: subprocess.Popen[str], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"spauth serve exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"port {port} never opened")


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    data_dir = tmp_path / "data"
    log_path = tmp_path / "serve.log"
    port = free_port()
    addrs = {
        "--admin-addr": f"127.0.0.1:{port}",
        "--http-addr": f"127.0.0.1:{free_port()}",
        "--sidecar-addr": f"127.0.0.1:{free_port()}",
    }
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "sidecar",
                "serve",
                "--data-dir",
                str(data_dir),
                *[x for kv in addrs.items() for x in kv],
            ],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
    try:
        wait_for_port(port, proc)
        key = (data_dir / "bootstrap-key").read_text().strip()
        yield Served(proc, f"127.0.0.1:{port}", data_dir, key, log_path, [key])
    finally:
        proc.terminate()
        proc.communicate(timeout=15)


def test_bootstrap_key_file_is_private_and_kept_out_of_redirected_output(served: Served) -> None:
    # The fixture's stdout is a pipe, as `spauth serve > serve.log` is a file: not a terminal.
    path = served.data_dir / "bootstrap-key"
    assert path.stat().st_mode & 0o777 == 0o600
    served.proc.terminate()
    out, _ = served.proc.communicate(timeout=15)
    assert served.operator_key not in out and served.operator_key not in served.log_path.read_text()
    assert str(path) in out and "not printed" in out
    assert served.proc.returncode == 0


def test_bootstrap_key_is_shown_once_on_a_terminal(tmp_path: Path) -> None:
    primary, secondary = pty.openpty()
    addrs = [f"127.0.0.1:{free_port()}" for _ in range(3)]
    flags = ["--admin-addr", addrs[0], "--http-addr", addrs[1], "--sidecar-addr", addrs[2]]
    proc = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "serve", "--data-dir", str(tmp_path / "data"), *flags],
        stdout=secondary,
        stderr=subprocess.DEVNULL,
    )
    os.close(secondary)
    try:
        wait_for_port(int(addrs[0].rsplit(":", 1)[1]), proc)  # type: ignore[arg-type]
        key = (tmp_path / "data" / "bootstrap-key").read_text().strip()
        shown = _read_terminal(primary, until=b"(mode 0600)")
    finally:
        proc.terminate()
        proc.wait(timeout=15)
        os.close(primary)
    assert shown.count(key) == 1


def _read_terminal(fd: int, until: bytes) -> str:
    data = b""
    while until not in data:
        ready, _, _ = select.select([fd], [], [], 30)
        assert ready, f"no {until!r} on the terminal: {data!r}"
        data += os.read(fd, 4096)
    return data.decode()


def test_lifecycle_create_use_replace_revoke(served: Served) -> None:
    created = served.json(
        "keys",
        "create",
        "--workspace",
        "acme",
        "--name",
        "nightly-sync-job",
        "--scope",
        "checks:read",
        "--scope",
        "keys:manage",
        "--expires-in",
        "90d",
    )
    assert isinstance(created, dict)
    assert set(created) >= {
        "id",
        "key",
        "name",
        "workspace",
        "scopes",
        "state",
        "created_at",
        "expires_at",
        "revoked_at",
        "replaces",
        "replaced_by",
    }
    assert created["state"] == "active" and created["scopes"] == ["checks:read", "keys:manage"]
    assert created["created_at"].endswith("Z") and created["revoked_at"] is None
    old_key = created["key"]
    # Use: the key authenticates and sees its own workspace.
    listed = served.json("keys", "list", key=old_key)
    assert isinstance(listed, list) and [k["id"] for k in listed] == [created["id"]]
    assert all("key" not in k for k in listed)

    replacement = served.json("keys", "replace", created["id"])
    assert isinstance(replacement, dict)
    assert replacement["replaces"] == created["id"]
    new_key = replacement["key"]
    # Both work until the old one is revoked.
    assert served.spauth("keys", "show", created["id"], key=old_key).returncode == 0
    assert served.spauth("keys", "show", created["id"], key=new_key).returncode == 0
    shown = served.json("keys", "show", created["id"])
    assert isinstance(shown, dict) and shown["replaced_by"] == replacement["id"]

    revoked = served.json("keys", "revoke", created["id"], "--reason", "rotated")
    assert isinstance(revoked, dict) and revoked["state"] == "revoked" and revoked["revoked_at"]
    refused = served.spauth("keys", "list", key=old_key)
    assert refused.returncode == 1
    assert "UNAUTHENTICATED" in refused.stderr and "Traceback" not in refused.stderr
    assert served.spauth("keys", "list", key=new_key).returncode == 0

    states = {k["id"]: k["state"] for k in served.json("keys", "list", "--workspace", "acme")}  # type: ignore[union-attr]
    assert states == {created["id"]: "revoked", replacement["id"]: "active"}
    only_revoked = served.json("keys", "list", "--state", "revoked")
    assert [k["id"] for k in only_revoked] == [created["id"]]  # type: ignore[union-attr]

    assert_no_secret_leaks(served)


def assert_no_secret_leaks(served: Served) -> None:
    """No minted secret in the database files, the logs or the audit rows."""
    served.proc.terminate()
    served.proc.wait(15)
    blobs = [p.read_bytes() for p in served.data_dir.glob("spauth.db*")]
    blobs.append(served.log_path.read_bytes())
    import sqlite3

    with sqlite3.connect(served.data_dir / "spauth.db") as conn:
        rows = conn.execute("SELECT * FROM audit_events").fetchall()
        assert len(rows) >= 4  # bootstrap, create, replace, revoke
    blobs.append(repr(rows).encode())
    assert len(served.secrets) >= 3
    for secret in served.secrets:
        for blob in blobs:
            assert secret.encode() not in blob
            assert secret[4:-6].encode() not in blob  # not even the random part


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["keys", "create", "--workspace", "acme", "--name", "x", "--scope", "bogus"], "valid:"),
        (["keys", "create", "--workspace", "acme", "--name", "", "--scope", "checks:read"], "name"),
        (
            ["keys", "create", "--workspace", "Bad_WS", "--name", "x", "--scope", "checks:read"],
            "workspace",
        ),
        (
            [
                "keys",
                "create",
                "--workspace",
                "acme",
                "--name",
                "x",
                "--scope",
                "checks:read",
                "--expires-in",
                "400d",
            ],
            "expires_in",
        ),
        (
            [
                "keys",
                "create",
                "--workspace",
                "acme",
                "--name",
                "x",
                "--scope",
                "checks:read",
                "--expires-in",
                "soon",
            ],
            "--expires-in",
        ),
        (["keys", "show", "key_nope"], "NOT_FOUND"),
    ],
)
def test_bad_input_prints_one_line_and_exits_non_zero(
    served: Served, args: list[str], needle: str
) -> None:
    out = served.spauth(*args, key=served.operator_key)
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], out.stderr
    assert out.stdout == ""


def test_missing_and_bad_caller_keys(served: Served) -> None:
    missing = served.spauth("keys", "list")
    assert missing.returncode == 2 and "STATUSPULSE_API_KEY" in missing.stderr
    bad = served.spauth("keys", "list", key="spk_" + "A" * 38)
    assert bad.returncode == 1 and "UNAUTHENTICATED" in bad.stderr


@pytest.mark.parametrize(
    "endpoint",
    ["127.0.0.1:{port}", "nosuch-host.invalid:50051"],
    ids=["refused", "unresolvable"],
)
def test_unreachable_endpoint_names_the_address(served: Served, endpoint: str) -> None:
    endpoint = endpoint.format(port=free_port())
    out = served.spauth("keys", "list", "--endpoint", endpoint, key=served.operator_key)
    assert out.returncode == 69, out.stderr
    assert endpoint in out.stderr and "Traceback" not in out.stderr


def test_version_names_the_installed_package(served: Served) -> None:
    out = served.spauth("--version")
    assert (
        out.returncode == 0
        and out.stdout.strip() == f"spauth {metadata.version('statuspulse-auth')}"
    )


def test_keys_show_table_has_every_field_of_the_json(served: Served) -> None:
    created = served.json(
        "keys", "create", "--workspace", "acme", "--name", "t", "--scope", "checks:read"
    )
    assert isinstance(created, dict)
    replacement = served.json("keys", "replace", created["id"], "--grace", "1h")
    assert isinstance(replacement, dict)
    shown = served.json("keys", "show", created["id"])
    assert isinstance(shown, dict)
    out = served.spauth("keys", "show", created["id"], key=served.operator_key)
    assert out.returncode == 0, out.stderr
    rows = dict(line.split(None, 1) for line in out.stdout.splitlines()[1:])
    assert list(rows) == list(shown)
    assert (
        rows["replaced_by"] == replacement["id"]
        and rows["grace_deadline"] == shown["grace_deadline"]
    )
    assert rows["revoked_at"] == "-" and rows["replaces"] == "-"


def test_keys_list_help_names_the_default_state(served: Served) -> None:
    out = served.spauth("keys", "list", "--help")
    assert "(default: all)" in out.stdout


def test_permission_denied_for_scope_beyond_caller(served: Served) -> None:
    manager = served.json(
        "keys", "create", "--workspace", "acme", "--name", "ci", "--scope", "keys:manage"
    )
    assert isinstance(manager, dict)
    out = served.spauth(
        "keys",
        "create",
        "--workspace",
        "acme",
        "--name",
        "x",
        "--scope",
        "admin:full",
        key=manager["key"],
    )
    assert out.returncode == 1 and "PERMISSION_DENIED" in out.stderr
