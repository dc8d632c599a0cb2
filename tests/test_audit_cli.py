"""``spauth audit`` as a subprocess against a real ``spauth serve`` that can be restarted."""

from __future__ import annotations

import json
import os
import queue
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.test_cli import wait_for_port

ROOT = Path(__file__).resolve().parent.parent


class Server:
    """``spauth serve`` on fixed ports and data dir, so it can stop and come back."""

    def __init__(self, tmp_path: Path) -> None:
        self.data_dir = tmp_path / "data"
        self.port = free_port()
        self.endpoint = f"127.0.0.1:{self.port}"
        self.log = tmp_path / "serve.log"
        self.proc: subprocess.Popen[str] | None = None
        self.secrets: list[str] = []

    def start(self) -> None:
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "sidecar",
                    "serve",
                    "--data-dir",
                    str(self.data_dir),
                    "--admin-addr",
                    self.endpoint,
                    "--http-addr",
                    f"127.0.0.1:{free_port()}",
                    "--sidecar-addr",
                    f"127.0.0.1:{free_port()}",
                ],
                stdout=subprocess.DEVNULL,  # prints the operator key once, by design
                stderr=log,
                text=True,
            )
        wait_for_port(self.port, self.proc)
        if not self.secrets:
            self.secrets.append(self.operator_key)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(15)
            self.proc = None

    @property
    def operator_key(self) -> str:
        return (self.data_dir / "bootstrap-key").read_text().strip()

    def env(self) -> dict[str, str]:
        env = {**os.environ, "SPAUTH_ENDPOINT": self.endpoint}
        env["STATUSPULSE_API_KEY"] = self.operator_key
        return env

    def spauth(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "sidecar", *args],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=60,
        )

    def json(self, *args: str) -> object:
        out = self.spauth(*args, "--output", "json")
        assert out.returncode == 0, out.stderr
        value = json.loads(out.stdout)
        if isinstance(value, dict) and "key" in value:
            self.secrets.append(value["key"])
        return value

    def create_key(self, workspace: str) -> dict[str, object]:
        created = self.json(
            "keys", "create", "--workspace", workspace, "--name", "job", "--scope", "checks:read"
        )
        assert isinstance(created, dict)
        return created


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    s = Server(tmp_path)
    s.start()
    yield s
    s.stop()


def test_list_filters_and_json(server: Server) -> None:
    a = server.create_key("acme")
    server.create_key("beta")
    server.json("keys", "revoke", str(a["id"]), "--reason", "left the team")
    listed = server.json("audit", "list", "--workspace", "acme")
    assert isinstance(listed, list)
    assert [r["action"] for r in listed] == ["key.revoked", "key.created"]
    assert listed[0]["reason"] == "left the team" and listed[0]["time"].endswith("Z")
    assert set(listed[0]) >= {"id", "actor", "target", "metadata", "cursor", "digest"}
    limited = server.json("audit", "list", "--limit", "2")
    assert isinstance(limited, list) and len(limited) == 2
    revoked = server.json("audit", "list", "--action", "key.revoked", "--since", "1h")
    assert isinstance(revoked, list) and [r["target"] for r in revoked] == [a["id"]]
    assert server.json("audit", "list", "--until", "2000-01-01") == []
    text = server.spauth("audit", "list")
    assert text.returncode == 0 and text.stdout.startswith("TIME")
    bad = server.spauth("audit", "list", "--since", "yesterday")
    assert bad.returncode == 2 and "--since" in bad.stderr


def test_export_writes_json_lines(server: Server, tmp_path: Path) -> None:
    for ws in ("acme", "beta", "acme"):
        server.create_key(ws)
    out = tmp_path / "audit.jsonl"
    with open(out, "w") as fh:
        done = subprocess.run(
            [sys.executable, "-m", "sidecar", "audit", "export", "--since", "2000-01-01"],
            env=server.env(),
            stdout=fh,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["action"] for r in lines].count("key.created") == 4
    assert f"exported {len(lines)} records" in done.stderr
    assert [r["chain_seq"] for r in lines if r["workspace"] == "acme"] == [1, 2]
    resumed = server.spauth("audit", "export", "--cursor", lines[1]["cursor"])
    assert [json.loads(x)["id"] for x in resumed.stdout.splitlines()] == [
        r["id"] for r in lines[2:]
    ]
    check = run_doc_verifier(out, tmp_path)
    assert check.returncode == 0, check.stderr
    assert "acme: ok through chain position 2" in check.stdout
    assert "beta: ok through chain position 1" in check.stdout
    tampered = tmp_path / "tampered.jsonl"
    records = [json.loads(line) for line in out.read_text().splitlines()]
    records[2]["target"] = "key_someone_else"
    tampered.write_text("".join(json.dumps(r) + "\n" for r in records))
    check = run_doc_verifier(tampered, tmp_path)
    assert check.returncode == 1 and records[2]["id"] in check.stderr
    assert_no_secret(server, out.read_bytes())


def run_doc_verifier(export: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """The verification script printed in docs/audit.md, run as an auditor would."""
    doc = (ROOT / "docs" / "audit.md").read_text()
    block = doc.split("<!-- verify-export -->", 1)[1].split("```python\n", 1)[1]
    script = tmp_path / "verify_export.py"
    script.write_text(block.split("```", 1)[0])
    return subprocess.run(
        [sys.executable, str(script), str(export)], capture_output=True, text=True, timeout=60
    )


def test_verify_names_the_edited_row(server: Server) -> None:
    for _ in range(3):
        server.create_key("acme")
    ok = server.spauth("audit", "verify")
    assert ok.returncode == 0 and "BROKEN" not in ok.stdout, ok.stdout
    victim = server.json("audit", "list", "--workspace", "acme")[1]  # type: ignore[index]
    with sqlite3.connect(server.data_dir / "spauth.db") as conn:
        conn.execute("UPDATE audit_events SET target = 'key_other' WHERE id = ?", (victim["id"],))
    broken = server.spauth("audit", "verify", "--workspace", "acme")
    assert broken.returncode == 3
    assert "BROKEN" in broken.stdout and victim["id"] in broken.stdout
    assert "record edited" in broken.stdout
    as_json = server.spauth("audit", "verify", "--output", "json")
    chains = {c["workspace"]: c for c in json.loads(as_json.stdout)}
    assert chains["*"]["ok"] and not chains["acme"]["ok"]
    assert chains["acme"]["first_break"]["record_id"] == victim["id"]
    assert chains["acme"]["first_break"]["problem"] == "digest_mismatch"


class Lines:
    """A subprocess's stdout lines, readable with a timeout."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self._q: queue.Queue[str] = queue.Queue()
        assert proc.stdout is not None
        stdout = proc.stdout
        threading.Thread(target=lambda: [self._q.put(x) for x in stdout], daemon=True).start()

    def next(self, timeout: float = 20) -> dict[str, object]:
        return json.loads(self._q.get(timeout=timeout))  # type: ignore[no-any-return]

    def empty(self) -> bool:
        return self._q.empty()


def test_tail_follows_across_a_control_plane_restart(server: Server) -> None:
    start = server.json("audit", "list", "--limit", "1")[0]["cursor"]  # type: ignore[index]
    tail = subprocess.Popen(
        [
            *(sys.executable, "-m", "sidecar", "audit", "tail", "--output", "json"),
            *("--cursor", start, "--workspace", "acme"),
        ],
        env=server.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        lines = Lines(tail)
        key = server.create_key("acme")
        got = lines.next()
        assert (got["action"], got["target"]) == ("key.created", key["id"])

        server.stop()
        server.start()
        server.json("keys", "revoke", str(key["id"]))
        got = lines.next()
        assert (got["action"], got["target"]) == ("key.revoked", key["id"])
        assert lines.empty()  # nothing twice
    finally:
        tail.terminate()
        out, err = tail.communicate(timeout=15)
    assert "reconnecting" in err and "Traceback" not in err
    assert_no_secret(server, out.encode())


def assert_no_secret(server: Server, *blobs: bytes) -> None:
    server.stop()
    everything = [*blobs, server.log.read_bytes()]
    everything.extend(p.read_bytes() for p in server.data_dir.glob("spauth.db*"))
    assert len(server.secrets) >= 2
    for secret in server.secrets:
        for blob in everything:
            assert secret[4:-6].encode() not in blob


def test_verify_reports_records_deleted_while_the_server_was_down(server: Server) -> None:
    for _ in range(3):
        server.create_key("acme")
    server.stop()  # the control plane signs every chain's head on its way out
    with sqlite3.connect(server.data_dir / "spauth.db") as conn:
        conn.execute(
            "DELETE FROM audit_events WHERE workspace = 'acme' AND chain_seq = "
            "(SELECT MAX(chain_seq) FROM audit_events WHERE workspace = 'acme')"
        )
    server.start()  # and refuses to sign the shortened chain as the new truth
    broken = server.spauth("audit", "verify", "--workspace", "acme")
    assert broken.returncode == 3, broken.stdout
    assert "BROKEN" in broken.stdout and "newest records deleted" in broken.stdout
