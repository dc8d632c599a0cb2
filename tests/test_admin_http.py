"""The admin API over HTTP/JSON on a real control plane (port 0), with a real HTTP client:
routes derived from the protos' annotations, the same rules and codes as gRPC, RFC 9457
problems, cursor pagination, x-request-id, whoami, and the OpenAPI document."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import httpx
import pytest
from google.protobuf.descriptor import Descriptor
from openapi_spec_validator import validate

from sidecar._gen.statuspulse.auth.v1 import api_keys_pb2 as keys_pb
from sidecar.admin import http_rules, openapi
from sidecar.admin.problems import HTTP_STATUS, status_of
from sidecar.config import load_settings
from sidecar.controlplane import ControlPlane
from sidecar.core.clock import FakeClock
from sidecar.core.errors import ALL_ERRORS, InvalidArgument, RateLimited, SpauthError
from tests.conftest import LoopThread, RunningControlPlane, bearer, wait_until

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def http(control_plane: RunningControlPlane) -> Iterator[httpx.Client]:
    base = f"http://127.0.0.1:{control_plane.plane.http_port}"
    with httpx.Client(base_url=base, timeout=10) as client:
        yield client


def auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def create_key(http: httpx.Client, key: str, workspace: str = "acme", **body: object) -> dict:  # type: ignore[type-arg]
    payload = {"name": "ci", "scopes": ["checks:read"], **body}
    r = http.post(f"/v1/workspaces/{workspace}/keys", json=payload, headers=auth(key))
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def test_key_lifecycle_with_cli_field_names(
    http: httpx.Client, control_plane: RunningControlPlane
) -> None:
    op = control_plane.operator_key
    created = create_key(http, op, expires_in_seconds=3600)
    key = created["api_key"]
    assert created["key"].startswith("spk_")
    assert key["workspace"] == "acme" and key["state"] == "API_KEY_STATE_ACTIVE"
    assert {"created_at", "expires_at", "last_four", "replaced_by"} <= key.keys()
    got = http.get(f"/v1/keys/{key['id']}", headers=auth(op)).json()
    assert created["key"] not in json.dumps(got)
    replaced = http.post(f"/v1/keys/{key['id']}:replace", json={}, headers=auth(op)).json()
    assert replaced["api_key"]["replaces"] == key["id"]
    revoked = http.delete(
        f"/v1/keys/{key['id']}", params={"reason": "rotated"}, headers=auth(op)
    ).json()
    assert revoked["api_key"]["state"] == "API_KEY_STATE_REVOKED"
    assert revoked["api_key"]["revoke_reason"] == "rotated"


def test_cursor_pagination_visits_every_key_once(
    http: httpx.Client, control_plane: RunningControlPlane
) -> None:
    op = control_plane.operator_key
    made = {create_key(http, op, name=f"k{i}")["api_key"]["id"] for i in range(5)}
    seen: list[str] = []
    token = ""
    while True:
        page = http.get(
            "/v1/workspaces/acme/keys",
            params={"page_size": 2, "page_token": token},
            headers=auth(op),
        ).json()
        assert len(page["api_keys"]) <= 2
        seen += [k["id"] for k in page["api_keys"]]
        token = page["next_page_token"]
        if not token:
            break
    assert sorted(seen) == sorted(made)


def test_members_apps_and_sessions_page_by_cursor(
    http: httpx.Client, control_plane: RunningControlPlane, clock: FakeClock
) -> None:
    op = auth(control_plane.operator_key)
    emails = set()
    for i in range(5):
        email = f"m{i}@acme.example"
        body = {"email": email, "password": "correct horse battery staple"}
        r = http.post("/v1/workspaces/acme/members", json=body, headers=op)
        assert r.status_code == 200, r.text
        emails.add(email)
        if i % 2:
            clock.advance(1)  # some share a created_at second: the id breaks the tie
    seen: list[str] = []
    token = ""
    while True:
        params = {"page_size": 2, "page_token": token}
        got = http.get("/v1/workspaces/acme/members", params=params, headers=op).json()
        assert len(got["users"]) <= 2
        seen += [u["email"] for u in got["users"]]
        token = got["next_page_token"]
        if not token:
            break
    assert sorted(seen) == sorted(emails)
    everyone = http.get("/v1/workspaces/acme/members", headers=op).json()
    assert len(everyone["users"]) == 5 and everyone["next_page_token"] == ""
    bad = http.get("/v1/members", params={"page_token": "%%%"}, headers=op)
    assert (bad.status_code, bad.json()["field"]) == (400, "page_token")
    apps = http.get("/v1/apps", params={"workspace": "acme", "page_size": 1}, headers=op)
    assert apps.json() == {"apps": [], "next_page_token": ""}


def test_problems_carry_the_stable_code_and_the_grpc_status(
    http: httpx.Client, control_plane: RunningControlPlane
) -> None:
    r = http.post(
        "/v1/workspaces/acme/keys",
        json={"name": "x", "scopes": ["nope:read"]},
        headers={**auth(control_plane.operator_key), "x-request-id": "trace-42"},
    )
    assert r.status_code == 400
    assert r.headers["content-type"] == "application/problem+json"
    assert r.headers["x-request-id"] == "trace-42"
    body = r.json()
    assert body["code"] == "invalid_argument" and body["field"] == "scopes"
    assert body["grpc_status"] == "INVALID_ARGUMENT" and body["request_id"] == "trace-42"
    missing = http.get("/v1/keys/key_doesnotexist000", headers=auth(control_plane.operator_key))
    assert (missing.status_code, missing.json()["code"]) == (404, "not_found")
    # Counted as admin calls, like the gRPC ones.
    metrics = http.get("/metrics").text
    assert 'spauth_admin_calls_total{code="NOT_FOUND",method="ApiKeyService/GetApiKey"} 1.0' in (
        metrics
    )
    assert 'code="INVALID_ARGUMENT",method="ApiKeyService/CreateApiKey"} 1.0' in metrics


@pytest.mark.parametrize(
    ("headers", "detail"),
    [
        ({}, "missing API key"),
        ({"authorization": "Basic Zm9vOmJhcg=="}, "Bearer"),
        ({"authorization": "Bearer spk_nope"}, "malformed"),
    ],
)
def test_missing_or_wrong_key_is_401_with_a_challenge(
    http: httpx.Client, headers: dict[str, str], detail: str
) -> None:
    r = http.get("/v1/keys", headers=headers)
    assert r.status_code == 401
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert detail in r.json()["detail"]


def test_another_workspaces_key_reads_and_changes_nothing(
    http: httpx.Client, control_plane: RunningControlPlane
) -> None:
    op = control_plane.operator_key
    globex = create_key(http, op, "globex")["api_key"]["id"]
    attacker = create_key(http, op, "acme", scopes=["keys:manage", "checks:read"])["key"]
    # Another workspace's key answers exactly as a key that does not exist (id aside).
    made_up = "key_doesnotexist00"
    for method in ("GET", "DELETE"):
        theirs = http.request(method, f"/v1/keys/{globex}", headers=auth(attacker))
        missing = http.request(method, f"/v1/keys/{made_up}", headers=auth(attacker))
        assert theirs.status_code == missing.status_code == 404, method
        assert {k: v for k, v in theirs.json().items() if k not in ("detail", "request_id")} == {
            k: v for k, v in missing.json().items() if k not in ("detail", "request_id")
        }
        assert theirs.json()["detail"].replace(globex, made_up) == missing.json()["detail"]
    r = http.post(
        "/v1/workspaces/globex/keys",
        json={"name": "x", "scopes": ["checks:read"]},
        headers=auth(attacker),
    )
    assert r.status_code == 403
    listed = http.get("/v1/keys", params={"workspace": "globex"}, headers=auth(attacker))
    assert listed.status_code == 403
    # The body cannot move a request into another workspace: the path wins.
    r = http.post(
        "/v1/workspaces/acme/keys",
        json={"workspace": "globex", "name": "x", "scopes": ["checks:read"]},
        headers=auth(attacker),
    )
    assert r.status_code == 200 and r.json()["api_key"]["workspace"] == "acme"


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "code"),
    [
        ("POST", "/v1/workspaces/acme/keys", {"content": b"{not json"}, 400, "invalid_argument"),
        ("POST", "/v1/workspaces/acme/keys", {"content": b"[1]"}, 400, "invalid_argument"),
        ("POST", "/v1/workspaces/acme/keys", {"json": {"bogus": 1}}, 400, "invalid_argument"),
        ("POST", "/v1/workspaces/acme/keys", {"json": {"name": 5}}, 400, "invalid_argument"),
        ("GET", "/v1/keys", {"params": {"page_size": "x"}}, 400, "invalid_argument"),
        ("GET", "/v1/keys", {"params": {"nope": "1"}}, 400, "invalid_argument"),
        ("GET", "/v1/keys", {"params": {"state": "LOST"}}, 400, "invalid_argument"),
        ("GET", "/v1/keys", {"content": b"{}"}, 400, "invalid_argument"),
        ("POST", "/v1/workspaces/acme/keys", {"content": b"{" * 70000}, 400, "invalid_argument"),
        ("GET", "/v1/nowhere", {}, 404, "not_found"),
        ("PUT", "/v1/keys/key_x", {}, 405, "method_not_allowed"),
    ],
)
def test_bad_input_gets_a_precise_problem(
    http: httpx.Client,
    control_plane: RunningControlPlane,
    method: str,
    path: str,
    kwargs: dict,  # type: ignore[type-arg]
    status: int,
    code: str,
) -> None:
    r = http.request(method, path, headers=auth(control_plane.operator_key), **kwargs)
    assert (r.status_code, r.json()["code"]) == (status, code), r.text


def test_a_parse_error_does_not_echo_a_long_value(
    http: httpx.Client, control_plane: RunningControlPlane
) -> None:
    body = {"name": "x", "scopes": ["checks:read"], "expires_in_seconds": "9" * 5000}
    r = http.post("/v1/workspaces/acme/keys", json=body, headers=auth(control_plane.operator_key))
    assert r.status_code == 400 and len(r.json()["detail"]) < 400


def test_whoami_describes_the_key_and_the_policys_decision(
    http: httpx.Client, control_plane: RunningControlPlane
) -> None:
    key = create_key(http, control_plane.operator_key, scopes=["checks:read"])["key"]
    me = http.get("/v1/whoami", headers=auth(key)).json()
    assert me["api_key"]["scopes"] == ["checks:read"] and "decision" not in me
    allowed = http.get(
        "/v1/whoami",
        params={"method": "GET", "path": "/v1/workspaces/acme/checks"},
        headers=auth(key),
    ).json()["decision"]
    assert (allowed["allowed"], allowed["reason"], allowed["http_status"]) == (True, "ok", 200)
    denied = http.get(
        "/v1/whoami",
        params={"method": "POST", "path": "/v1/workspaces/acme/checks"},
        headers=auth(key),
    ).json()["decision"]
    assert (denied["reason"], denied["http_status"]) == ("insufficient_scope", 403)
    assert denied["required_scopes"] == ["checks:write"]
    other = http.get(
        "/v1/whoami",
        params={"method": "GET", "path": "/v1/workspaces/globex/checks"},
        headers=auth(key),
    ).json()["decision"]
    assert other["reason"] == "workspace_mismatch"
    bad = http.get("/v1/whoami", params={"method": "FETCH", "path": "/x"}, headers=auth(key))
    assert (bad.status_code, bad.json()["field"]) == (400, "method")


def test_every_domain_error_has_an_http_status() -> None:
    args: dict[type[SpauthError], tuple[object, ...]] = {InvalidArgument: ("f", "m")}
    args[RateLimited] = ("m", 1)
    for cls in ALL_ERRORS:
        error = cls(*args.get(cls, ("m",)))  # type: ignore[arg-type]
        assert status_of(error) in HTTP_STATUS.values()
    assert status_of(RateLimited("m", 1)) == 429
    assert status_of(SpauthError("x")) == 500


def test_openapi_is_valid_served_and_committed_fresh(http: httpx.Client) -> None:
    served = http.get("/openapi.json").json()
    validate(served)
    committed = (ROOT / "docs" / "openapi.json").read_text()
    assert committed == openapi.render(), (
        "docs/openapi.json is stale (an RPC or its google.api.http annotation changed): "
        "run `make openapi` and commit it"
    )
    assert served == json.loads(committed)
    assert "(docs/openapi.json)" in (ROOT / "README.md").read_text()  # the downloadable spec


def test_every_annotated_rpc_is_documented_and_routed() -> None:
    """A new annotated RPC needs nothing else: it is in the document and has a route."""
    spec = openapi.document()
    operations = {op["operationId"] for path in spec["paths"].values() for op in path.values()}
    for binding in http_rules.bindings():
        assert binding.operation_id in operations
    unary = [
        m.full_name
        for name in http_rules.ADMIN_SERVICES
        for m in http_rules.service(name).methods
        if not (m.client_streaming or m.server_streaming)
        and m.name != "IngestAuditRecords"  # sidecar-to-control-plane, sync token only
    ]
    bound = {b.method.full_name for b in http_rules.bindings()}
    assert set(unary) <= bound, f"unary admin RPCs without google.api.http: {set(unary) - bound}"


# buf on PATH, else where `make lint` installs it: into this virtual environment (Makefile BUF).
BUF = shutil.which("buf") or str(Path(sys.prefix) / "buf" / "node_modules" / ".bin" / "buf")


@pytest.mark.skipif(
    not Path(BUF).is_file(), reason="buf is not installed (`make lint` installs it into the venv)"
)
def test_buf_lint_passes_on_the_annotated_protos(tmp_path: Path) -> None:
    image = tmp_path / "image.binpb"
    genproto = [sys.executable, str(ROOT / "scripts" / "genproto.py")]
    subprocess.run([*genproto, "--descriptor-set", str(image), "--source-info"], check=True)
    done = subprocess.run(
        [BUF, "lint", f"{image}#format=binpb", "--path", "statuspulse/auth/v1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr


@contextmanager
def plane_with(
    tmp_path: Path, clock: FakeClock, loop: LoopThread, **settings: str
) -> Iterator[RunningControlPlane]:
    """A control plane on port 0 with extra settings."""
    data = tmp_path / "plane"
    data.mkdir()
    values = {"data_dir": str(data), "admin_addr": "127.0.0.1:0", "http_addr": "127.0.0.1:0"}
    plane = ControlPlane(load_settings({**values, **settings}, environ={}), clock=clock)
    minted = plane.bootstrap()
    assert minted is not None
    loop.run(plane.start())
    try:
        yield RunningControlPlane(
            plane, f"127.0.0.1:{plane.admin_port}", minted.secret, clock, data
        )
    finally:
        loop.run(plane.aclose(grace=0))


@pytest.fixture
def strict_plane(
    tmp_path: Path, clock: FakeClock, loop_thread: LoopThread
) -> Iterator[RunningControlPlane]:
    """A control plane that refuses an address after 3 refused keys per 60 s."""
    limits = {"admin_failure_limit": "3", "admin_failure_window": "60"}
    with plane_with(tmp_path, clock, loop_thread, **limits) as plane:
        yield plane


def test_whoami_follows_a_changed_policy_file(
    tmp_path: Path, clock: FakeClock, loop_thread: LoopThread
) -> None:
    policy = tmp_path / "policy.toml"
    original = (ROOT / "deploy" / "policy" / "statuspulse-api.toml").read_text()
    policy.write_text(original)
    settings = {"policy_file": str(policy), "sweep_interval": "0.05"}
    with plane_with(tmp_path, clock, loop_thread, **settings) as plane:
        base = f"http://127.0.0.1:{plane.plane.http_port}"
        with httpx.Client(base_url=base) as http:
            key = create_key(http, plane.operator_key, scopes=["checks:read"])["key"]
            question = {"method": "GET", "path": "/v1/workspaces/acme/checks"}

            def reason() -> str:
                me = http.get("/v1/whoami", params=question, headers=auth(key)).json()
                return str(me["decision"]["reason"])

            assert reason() == "ok"
            needs_write = original.replace(
                'path = "/v1/workspaces/{workspace}/checks/**"\nscopes = ["checks:read"]',
                'path = "/v1/workspaces/{workspace}/checks/**"\nscopes = ["checks:write"]',
            )
            assert needs_write != original
            policy.write_text(needs_write)
            wait_until(lambda: reason() == "insufficient_scope")


def test_refused_keys_from_one_address_get_429_with_retry_after_on_both_transports(
    strict_plane: RunningControlPlane, clock: FakeClock
) -> None:
    op = auth(strict_plane.operator_key)
    wrong = auth("spk_" + "A" * 38)
    base = f"http://127.0.0.1:{strict_plane.plane.http_port}"
    with httpx.Client(base_url=base) as http:
        assert http.get("/v1/keys").status_code == 401  # no key at all: not an attempt
        assert [http.get("/v1/keys", headers=wrong).status_code for _ in range(3)] == [401] * 3
        limited = http.get("/v1/keys", headers=op)  # the address is refused, whatever it sends
        assert limited.status_code == 429
        assert limited.headers["retry-after"] == "60"
        assert limited.json()["code"] == "rate_limited"
        with strict_plane.channel() as channel:
            stub = strict_plane.keys_stub(channel)
            with pytest.raises(grpc.RpcError) as info:
                stub.ListApiKeys(
                    keys_pb.ListApiKeysRequest(), metadata=bearer(strict_plane.operator_key)
                )
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        clock.advance(61)
        assert http.get("/v1/keys", headers=op).status_code == 200


@pytest.mark.parametrize(
    ("template", "path", "values"),
    [
        ("/v1/keys/{id}", "/v1/keys/key_1", ["key_1"]),
        ("/v1/keys/{id}:replace", "/v1/keys/key_1:replace", ["key_1"]),
        ("/v1/workspaces/{workspace}/keys", "/v1/workspaces/acme/keys", ["acme"]),
    ],
)
def test_templates_match_one_segment_per_variable(
    template: str, path: str, values: list[str]
) -> None:
    pattern, _names = http_rules.compile_template(template)
    found = pattern.fullmatch(path)
    assert found is not None and list(found.groups()) == values
    assert pattern.fullmatch(path + "/x") is None
    assert pattern.fullmatch(path.replace("1", "1/2")) is None or "1" not in path


@pytest.mark.parametrize(
    "template", ["v1/keys", "/v1/{filter.workspace}/x", "/v1/{name=**}", "/v1/a b", "/v1/x:a/b"]
)
def test_unsupported_templates_are_refused_at_start_up(template: str) -> None:
    with pytest.raises(http_rules.RuleError):
        http_rules.compile_template(template)


def _messages(message: Descriptor, seen: set[str]) -> Iterator[Descriptor]:
    if message.full_name in seen or message.full_name.startswith("google.protobuf."):
        return
    seen.add(message.full_name)
    yield message
    for field in message.fields:
        if field.message_type is not None and not field.message_type.GetOptions().map_entry:
            yield from _messages(field.message_type, seen)


# The CLI's names for time fields (`spauth keys list -o json`); a new one is added here.
TIME_NAMES = {
    "create_time": "created_at",
    "expire_time": "expires_at",
    "revoke_time": "revoked_at",
    "last_use_time": "last_used_at",
    "delete_time": "deleted_at",
    "previous_secret_expire_time": "previous_secret_expires_at",
    "suspend_time": "suspended_at",
    "rotation_due_time": "rotation_due_at",
    "next_attempt_time": "next_attempt_at",
    "deliver_time": "delivered_at",
    "last_sign_in_time": "last_sign_in_at",
    "disable_time": "disabled_at",
    "activate_time": "activates_at",
    "supersede_time": "superseded_at",
}


def test_json_names_are_the_clis_snake_case() -> None:
    """As `spauth -o json`: the field's snake_case name, `*_time` fields as `*_at`."""
    seen: set[str] = set()
    for binding in http_rules.bindings():
        for message in [*_messages(binding.input, seen), *_messages(binding.output, seen)]:
            for field in message.fields:
                expected = TIME_NAMES.get(field.name, field.name)
                assert field.json_name == expected, f"{message.full_name}.{field.name}"


def test_another_workspaces_records_by_id_answer_exactly_as_missing_ones(
    http: httpx.Client, control_plane: RunningControlPlane
) -> None:
    """A hostile tenant (acme's admin:full key) probing ids of globex's key, app, member and
    webhook gets the answer a made-up id gets: 404 with the same problem type, never a 403 that
    would confirm the id exists elsewhere (permissions.visible)."""
    op = control_plane.operator_key

    def made(path: str, body: dict[str, object], field: str, id_field: str) -> str:
        r = http.post(f"/v1/workspaces/globex/{path}", json=body, headers=auth(op))
        assert r.status_code == 200, r.text
        return str(r.json()[field][id_field])

    key = create_key(http, op, "globex")["api_key"]["id"]
    app = made(
        "apps",
        {
            "name": "g",
            "redirect_uris": ["https://app.globex.example/cb"],
            "scopes": ["checks:read"],
        },
        "app",
        "client_id",
    )
    member = made("members", {"email": "ops@globex.example", "password": "p" * 20}, "user", "id")
    hook = made(
        "webhooks",
        {"url": "https://hooks.globex.example/spauth", "events": ["key.revoked"]},
        "webhook",
        "id",
    )
    attacker = create_key(http, op, "acme", scopes=["admin:full"])["key"]
    probes = [
        ("GET", "/v1/keys/{}", key, "key_doesnotexist00"),
        ("DELETE", "/v1/keys/{}", key, "key_doesnotexist00"),
        ("PATCH", "/v1/keys/{}", key, "key_doesnotexist00"),
        ("POST", "/v1/keys/{}:suspend", key, "key_doesnotexist00"),
        ("POST", "/v1/keys/{}:replace", key, "key_doesnotexist00"),
        ("GET", "/v1/apps/{}", app, "app_doesnotexist00"),
        ("DELETE", "/v1/apps/{}", app, "app_doesnotexist00"),
        ("POST", "/v1/apps/{}:rotateSecret", app, "app_doesnotexist00"),
        ("GET", "/v1/apps/{}/sessions", app, "app_doesnotexist00"),
        ("POST", "/v1/members/{}:disable", member, "usr_doesnotexist00"),
        ("DELETE", "/v1/members/{}", member, "usr_doesnotexist00"),
        ("DELETE", "/v1/webhooks/{}", hook, "whk_doesnotexist00"),
        ("POST", "/v1/webhooks/{}:test", hook, "whk_doesnotexist00"),
    ]
    for method, template, theirs, made_up in probes:
        body = {"name": "x"} if method == "PATCH" else {} if method == "POST" else None
        real = http.request(method, template.format(theirs), json=body, headers=auth(attacker))
        fake = http.request(method, template.format(made_up), json=body, headers=auth(attacker))
        where = f"{method} {template}"
        assert real.status_code == fake.status_code == 404, (where, real.text, fake.text)
        same = ("type", "title", "status", "code")
        assert {k: real.json().get(k) for k in same} == {k: fake.json().get(k) for k in same}
        assert real.json()["detail"].replace(theirs, made_up) == fake.json()["detail"], where
    # And nothing of globex's changed.
    got = http.get(f"/v1/keys/{key}", headers=auth(op)).json()["api_key"]
    assert (got["state"], got["name"]) == ("API_KEY_STATE_ACTIVE", "ci")
    apps = http.get("/v1/apps", params={"workspace": "globex"}, headers=auth(op)).json()
    assert [a["client_id"] for a in apps["apps"]] == [app]
