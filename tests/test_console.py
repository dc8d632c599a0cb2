"""The web console over real HTTP against a real control plane (SQLite file, uvicorn on port 0):
sessions and their cookies, CSRF, the CSP, permissions enforced by the use cases, a hostile
tenant, audit records naming the member, and the error pages. The browser flow is in
test_console_browser.py."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from sidecar.config import ConfigError, load_settings
from sidecar.core import errors
from sidecar.core.models import KeyState
from sidecar.core.usage import format_day
from sidecar.dataplane.process import Sidecar
from sidecar.http.console.errors import console_error
from sidecar.http.console.render import CSP, when
from sidecar.http.console.sessions import COOKIE_NAME, SessionPolicy
from tests.conftest import LoopThread, RunningControlPlane
from tests.support.console import (
    OPERATOR,
    ConsoleClient,
    add_member,
    csrf_of,
    secret_of,
)
from tests.support.docblocks import shell_blocks
from tests.support.ops import bearer, call_check, check_request, plane_on, wait_until

DOCS = Path(__file__).resolve().parent.parent / "docs"
IDLE = SessionPolicy().idle
ABSOLUTE = SessionPolicy().absolute


def base(control_plane: RunningControlPlane) -> str:
    return f"http://127.0.0.1:{control_plane.plane.http_port}"


@pytest.fixture
def admin(control_plane: RunningControlPlane) -> ConsoleClient:
    """A signed-in member of ``acme`` holding admin:full."""
    add_member(control_plane.plane, "owner@acme.test", ["admin:full"])
    client = ConsoleClient(base(control_plane))
    assert client.sign_in("owner@acme.test").status_code == 303
    return client


def set_cookie_headers(response: object) -> list[str]:
    return response.raw.headers.getlist("set-cookie")  # type: ignore[attr-defined]


def audit_rows(data_dir: Path, action: str) -> list[tuple[str, str]]:
    with sqlite3.connect(data_dir / "spauth.db") as conn:
        rows = conn.execute(
            "SELECT actor, target FROM audit_events WHERE action = ? AND workspace = 'acme' "
            "ORDER BY seq",
            (action,),
        ).fetchall()
    return [(str(a), str(t)) for a, t in rows]


def generate(client: ConsoleClient, name: str, scopes: list[str]) -> str:
    fields = [("name", name), *(("scopes", s) for s in scopes), ("expires_days", "90")]
    page = client.submit("/console/keys/new", "/console/keys/new", fields)
    assert page.status_code == 200, page.text
    return secret_of(page.text)


def last_used_cell(listing: str, key_id: str) -> str:
    """The Last used cell of one key's row on the Key Manager list."""
    row = re.search(rf'<tr id="{key_id}">(.*?)</tr>', listing, re.S)
    assert row, f"no row for {key_id}"
    cell = re.search(r'<td class="last-used nowrap">([^<]*)</td>', row.group(1))
    assert cell, "the row has no last-used cell"
    return cell.group(1)


def last_used_line(page: str) -> str:
    """The "Last used: ..." line of a key's replace or revoke page."""
    found = re.search(r'<p id="last-used">Last used: <strong>([^<]*)</strong>', page)
    assert found, "the page shows no last use"
    return found.group(1)


def test_pages_carry_the_csp_and_no_inline_script(admin: ConsoleClient) -> None:
    for path in ("/console", "/console/keys", "/console/keys/new", "/console/apps",
                 "/console/members", "/console/audit"):  # fmt: skip
        page = admin.get(path)
        assert page.status_code == 200, (path, page.text)
        assert page.headers["content-security-policy"] == CSP
        assert "'unsafe-inline'" not in CSP and "script-src 'self'" in CSP
        assert page.headers["cache-control"] == "no-store"
        assert page.headers["x-frame-options"] == "DENY"
        # Scripts only by src= from this origin; no inline handler attributes.
        assert "<script>" not in page.text and " onclick=" not in page.text
    script = admin.get("/console/static/console.js")
    assert script.status_code == 200 and script.headers["content-type"].startswith(
        "text/javascript"
    )
    assert admin.get("/console/static/..%2Fkeys.py").status_code == 404


def test_session_cookie_flags_and_sign_out(control_plane: RunningControlPlane) -> None:
    add_member(control_plane.plane, "owner@acme.test", ["admin:full"])
    client = ConsoleClient(base(control_plane))
    signed_in = client.sign_in("owner@acme.test")
    assert signed_in.status_code == 303 and signed_in.headers["location"] == "/console"
    cookie = next(c for c in set_cookie_headers(signed_in) if c.startswith(COOKIE_NAME + "="))
    flags = {part.strip().split("=")[0].lower() for part in cookie.split(";")}
    assert {"httponly", "path", "max-age"} <= flags
    assert "samesite=strict" in cookie.lower() and "path=/console" in cookie.lower()
    assert "secure" not in flags  # plain HTTP on loopback here; see the HTTPS test below
    assert client.get("/console").status_code == 200
    token = csrf_of(client.get("/console").text)
    out = client.post("/console/signout", [("csrf_token", token)])
    assert out.status_code == 303 and out.headers["location"] == "/console/signin"
    member = control_plane.plane.users.list(OPERATOR, workspace="acme")[0]
    assert audit_rows(control_plane.data_dir, "signout") == [(member.id, member.id)]
    # The session is gone server-side, not only the cookie: replaying the old cookie fails.
    replay = ConsoleClient(client.base)
    replay.http.cookies.set(COOKIE_NAME, signed_in.cookies[COOKIE_NAME], path="/console")
    again = replay.get("/console", allow_redirects=False)
    assert again.status_code == 303 and again.headers["location"] == "/console/signin"


def test_cookies_are_secure_when_the_issuer_is_https(
    tmp_path: Path, loop_thread: LoopThread, control_plane: RunningControlPlane
) -> None:
    with plane_on(
        "127.0.0.1:0",
        tmp_path / "https",
        control_plane.clock,
        loop_thread,
        oauth_issuer="https://auth.statuspulse.test",
    ) as (plane, _):
        add_member(plane, "owner@acme.test", ["admin:full"])
        client = ConsoleClient(f"http://127.0.0.1:{plane.http_port}")
        page = client.get("/console/signin")
        assert "secure" in page.headers["set-cookie"].lower()
        # requests does not send Secure cookies over http; the sign-in form token is checked
        # against the cookie, so sign in with the cookie sent by hand.
        pre = page.headers["set-cookie"].split(";")[0].split("=", 1)[1]
        resp = client.http.post(
            client.base + "/console/signin",
            data={
                "csrf_token": csrf_of(page.text),
                "workspace": "acme",
                "email": "owner@acme.test",
                "password": "correct horse battery staple",
            },
            headers={"cookie": f"spauth_console_pre={pre}"},
            allow_redirects=False,
            timeout=10,
        )
        assert resp.status_code == 303
        session_cookie = next(
            c for c in set_cookie_headers(resp) if c.startswith(COOKIE_NAME + "=")
        )
        assert "; secure" in session_cookie.lower()


def test_forms_without_the_csrf_token_are_refused(
    admin: ConsoleClient, control_plane: RunningControlPlane
) -> None:
    fields = [("name", "ci"), ("scopes", "checks:read"), ("expires_days", "90")]
    for token in ([], [("csrf_token", "")], [("csrf_token", "0" * 64)]):
        resp = admin.post("/console/keys/new", [*token, *fields])
        assert resp.status_code == 403
        assert "did not come from this console page" in resp.text
    # A token of another session does not pass either.
    other = ConsoleClient(admin.base)
    add_member(control_plane.plane, "second@acme.test", ["admin:full"])
    other.sign_in("second@acme.test")
    foreign = csrf_of(other.get("/console/keys/new").text)
    assert admin.post("/console/keys/new", [("csrf_token", foreign), *fields]).status_code == 403
    keys = control_plane.plane.keys.list(OPERATOR, workspace="acme")
    assert keys.items == []
    # Sign-in itself needs the token bound to the browser's pre-sign-in cookie (login CSRF).
    fresh = ConsoleClient(admin.base)
    resp = fresh.http.post(
        fresh.base + "/console/signin",
        data={"workspace": "acme", "email": "owner@acme.test", "password": "x" * 20},
        allow_redirects=False,
        timeout=10,
    )
    assert resp.status_code == 403


def test_idle_and_absolute_expiry(admin: ConsoleClient, control_plane: RunningControlPlane) -> None:
    clock = control_plane.clock
    # Activity within the idle window keeps the session alive, past one idle period in total.
    for _ in range(3):
        clock.advance(IDLE - 60)
        assert admin.get("/console", allow_redirects=False).status_code == 200
    clock.advance(IDLE)
    idle = admin.get("/console", allow_redirects=False)
    assert idle.status_code == 303 and idle.headers["location"] == "/console/signin"
    # An idle-expired session is ended: the cookie does not come back after a sign-in elsewhere.
    assert admin.get("/console", allow_redirects=False).status_code == 303
    # Absolute: however active, the session ends after its absolute lifetime.
    assert admin.sign_in("owner@acme.test").status_code == 303
    elapsed = 0
    while elapsed + IDLE // 2 < ABSOLUTE:
        clock.advance(IDLE // 2)
        elapsed += IDLE // 2
        assert admin.get("/console", allow_redirects=False).status_code == 200
    clock.advance(IDLE // 2)
    assert admin.get("/console", allow_redirects=False).status_code == 303


def test_a_forged_or_extended_cookie_is_refused(admin: ConsoleClient) -> None:
    value = admin.http.cookies[COOKIE_NAME]
    session_id, seen, mac = value.split(".")
    for forged in (
        f"{session_id}.{int(seen) + 3600}.{mac}",  # pushing "last seen" forward
        f"{session_id}.{seen}.{'0' * len(mac)}",
        session_id,
        "",
    ):
        client = ConsoleClient(admin.base)
        client.http.cookies.set(COOKIE_NAME, forged, path="/console")
        assert client.get("/console", allow_redirects=False).status_code == 303


def test_a_member_without_keys_manage_cannot_reach_the_key_manager(
    control_plane: RunningControlPlane,
) -> None:
    add_member(control_plane.plane, "viewer@acme.test", ["checks:read", "dashboard:read"])
    client = ConsoleClient(base(control_plane))
    assert client.sign_in("viewer@acme.test").status_code == 303
    home = client.get("/console")
    assert "/console/keys" not in home.text and "no console permissions" in home.text
    for path in ("/console/keys", "/console/keys/new", "/console/apps", "/console/apps/new",
                 "/console/members", "/console/audit", "/console/audit/export"):  # fmt: skip
        page = client.get(path)
        assert page.status_code == 403, path
        assert "permission_denied" in page.text
    token = csrf_of(home.text)
    fields = [("csrf_token", token), ("name", "x"), ("scopes", "checks:read")]
    assert client.post("/console/keys/new", fields).status_code == 403
    assert control_plane.plane.keys.list(OPERATOR, workspace="acme").items == []


def test_keys_manage_holder_cannot_grant_more_than_it_holds(
    control_plane: RunningControlPlane,
) -> None:
    add_member(control_plane.plane, "ops@acme.test", ["keys:manage", "checks:read"])
    client = ConsoleClient(base(control_plane))
    client.sign_in("ops@acme.test")
    assert "/console/apps" not in client.get("/console").text
    fields = [("name", "too much"), ("scopes", "admin:full"), ("expires_days", "90")]
    resp = client.submit("/console/keys/new", "/console/keys/new", fields)
    assert resp.status_code == 403 and "cannot grant scopes" in resp.text
    assert generate(client, "reader", ["checks:read"]).startswith("spk_")


def test_another_workspace_cannot_see_or_change_our_keys(
    admin: ConsoleClient, control_plane: RunningControlPlane
) -> None:
    generate(admin, "acme ci", ["checks:read"])
    (key,) = control_plane.plane.keys.list(OPERATOR, workspace="acme").items
    add_member(control_plane.plane, "mallory@evil.test", ["admin:full"], workspace="evil")
    mallory = ConsoleClient(admin.base)
    assert mallory.sign_in("mallory@evil.test", workspace="evil").status_code == 303
    assert key.id not in mallory.get("/console/keys").text
    # Another workspace's key is "not found", as a made-up id: its existence is not confirmed.
    assert mallory.get(f"/console/keys/{key.id}/revoke").status_code == 404
    assert mallory.get("/console/keys/key_doesnotexist00/revoke").status_code == 404
    token = csrf_of(mallory.get("/console/keys").text)
    for action, fields in (
        (f"/console/keys/{key.id}/revoke", [("confirm", "yes"), ("reason", "x")]),
        (f"/console/keys/{key.id}/replace", [("grace", "0")]),
    ):
        resp = mallory.post(action, [("csrf_token", token), *fields])
        assert resp.status_code == 404, action
        assert "spk_" not in resp.text
    assert control_plane.plane.keys.get(OPERATOR, key.id).state(0) is KeyState.ACTIVE
    # Its sign-in does not open acme either: the workspace comes from the member, not a field.
    assert "acme ci" not in mallory.get("/console/keys?workspace=acme").text


def test_key_lifecycle_secret_only_on_the_post_response_and_audited_by_member(
    admin: ConsoleClient, control_plane: RunningControlPlane
) -> None:
    fields = [("name", "ci"), ("scopes", "checks:read"), ("expires_days", "30")]
    token = csrf_of(admin.get("/console/keys/new").text)
    created = admin.post("/console/keys/new", [("csrf_token", token), *fields])
    assert created.status_code == 200 and not created.is_redirect
    secret = secret_of(created.text)
    assert f"export STATUSPULSE_API_KEY={secret}" in created.text
    assert created.headers["cache-control"] == "no-store"
    # Once only: the list and the key's pages never show it again.
    (key,) = control_plane.plane.keys.list(OPERATOR, workspace="acme").items
    for path in ("/console/keys", f"/console/keys/{key.id}/replace"):
        page = admin.get(path)
        assert secret not in page.text and key.last_four in page.text
    replaced = admin.submit(
        f"/console/keys/{key.id}/replace", f"/console/keys/{key.id}/replace", [("grace", "1h")]
    )
    assert replaced.status_code == 200
    new_secret = secret_of(replaced.text)
    assert new_secret != secret and key.id in replaced.text
    listing = admin.get("/console/keys").text
    assert "replaced by" in listing and "replaces" in listing
    no_confirm = admin.submit(
        f"/console/keys/{key.id}/revoke", f"/console/keys/{key.id}/revoke", [("reason", "r")]
    )
    assert no_confirm.status_code == 400 and "confirm" in no_confirm.text
    revoked = admin.submit(
        f"/console/keys/{key.id}/revoke",
        f"/console/keys/{key.id}/revoke",
        [("confirm", "yes"), ("reason", "rotated")],
    )
    assert revoked.status_code == 303 and revoked.headers["location"] == "/console/keys"
    assert "secret" not in revoked.headers["location"]
    member_id = control_plane.plane.users.list(OPERATOR, workspace="acme")[0].id
    for action in ("key.created", "key.replaced", "key.revoked"):
        actors = [actor for actor, _ in audit_rows(control_plane.data_dir, action)]
        assert actors == [member_id], action
    revoked_page = admin.get("/console/keys?state=revoked").text
    assert "rotated" in revoked_page and key.id in revoked_page
    assert admin.get("/console/keys?state=bogus").status_code == 400


def test_apps_sessions_and_members_pages(
    admin: ConsoleClient, control_plane: RunningControlPlane
) -> None:
    fields = [
        ("name", "Dashboard"),
        ("redirect_uris", "https://dash.example/cb\nhttp://127.0.0.1:8080/cb"),
        ("scopes", "dashboard:read"),
        ("client_type", "confidential"),
    ]
    page = admin.submit("/console/apps/new", "/console/apps/new", fields)
    assert page.status_code == 200 and 'id="client-secret"' in page.text
    (app,) = control_plane.plane.apps.list(OPERATOR, workspace="acme")
    assert app.redirect_uris == ("https://dash.example/cb", "http://127.0.0.1:8080/cb")
    bad = admin.submit("/console/apps/new", "/console/apps/new", [*fields[:1],
                       ("redirect_uris", "http://evil.example/cb"), *fields[2:]])  # fmt: skip
    assert bad.status_code == 400 and "redirect_uris" in bad.text
    rotated = admin.submit(f"/console/apps/{app.id}", f"/console/apps/{app.id}/rotate",
                           [("overlap", "1h")])  # fmt: skip
    assert rotated.status_code == 200 and "New client secret" in rotated.text
    added = admin.submit("/console/members", "/console/members", [
        ("email", "new@acme.test"), ("password", "a long enough password"),
        ("scopes", "checks:read")])  # fmt: skip
    assert added.status_code == 303
    assert "new@acme.test" in admin.get("/console/members").text
    deleted = admin.submit(f"/console/apps/{app.id}/delete", f"/console/apps/{app.id}/delete",
                           [("confirm", "yes")])  # fmt: skip
    assert deleted.status_code == 303
    assert control_plane.plane.apps.list(OPERATOR, workspace="acme") == []
    gone = admin.get(f"/console/apps/{app.id}")
    assert gone.status_code == 404 and "not_found" in gone.text


def test_audit_log_filters_and_exports_json_lines(
    admin: ConsoleClient, control_plane: RunningControlPlane
) -> None:
    generate(admin, "one", ["checks:read"])
    control_plane.clock.advance(5)
    generate(admin, "two", ["metrics:read"])
    page = admin.get("/console/audit?action=key.created")
    assert page.status_code == 200
    keys = control_plane.plane.keys.list(OPERATOR, workspace="acme").items
    newest, oldest = (k.id for k in keys)
    assert page.text.index(newest) < page.text.index(oldest)  # newest first
    export = admin.get("/console/audit/export?action=key.created")
    assert export.status_code == 200
    assert export.headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in export.text.splitlines()]
    assert [r["action"] for r in lines] == ["key.created", "key.created"]
    assert {r["workspace"] for r in lines} == {"acme"}
    assert all("spk_" not in json.dumps(r) for r in lines)
    signins = admin.get("/console/audit/export?action=signin.succeeded").text.splitlines()
    assert len(signins) == 1
    assert admin.get("/console/audit?since=yesterday").status_code == 400
    future = admin.get("/console/audit/export?since=2100-01-01T00:00").text
    assert future == ""


def test_session_lifetimes_are_settings_checked_at_start_up() -> None:
    settings = load_settings(
        {"console_idle_timeout": "15m", "console_session_lifetime": "12h"}, environ={}
    )
    assert (settings.console_idle_timeout, settings.console_session_lifetime) == (900, 43200)
    with pytest.raises(ConfigError) as caught:
        load_settings({"console_idle_timeout": "2h", "console_session_lifetime": "1h"}, environ={})
    assert "console_session_lifetime" in str(caught.value)
    with pytest.raises(ConfigError, match="console_idle_timeout"):
        load_settings({"console_idle_timeout": "10s"}, environ={})


def test_error_pages_show_safe_messages_and_hide_internal_detail() -> None:
    denied = console_error(errors.PermissionDenied("this call needs scope 'keys:manage'"), "r1")
    assert (denied.status, denied.code) == (403, "permission_denied")
    assert "keys:manage" in denied.message
    assert console_error(errors.InvalidArgument("name", "must not be empty"), "r1").status == 400
    assert console_error(errors.AlreadyExists("x"), "r1").status == 409
    down = console_error(errors.Unavailable("postgres at 10.0.0.5 refused"), "req_42")
    assert down.status == 503 and "10.0.0.5" not in down.message and "req_42" in down.message
    internal = console_error(errors.SpauthError("stack detail"), "req_43")
    assert internal.status == 500 and "stack detail" not in internal.message


def test_names_typed_by_members_are_escaped(admin: ConsoleClient) -> None:
    planted = '<script src="//evil.example/x.js"></script><img src=x onerror=alert(1)>'
    generate(admin, planted, ["checks:read"])
    for path in ("/console/keys", "/console/audit"):
        page = admin.get(path).text
        assert '<script src="//evil' not in page and "<img src=x" not in page
    assert "&lt;script src=&#34;//evil.example/x.js&#34;&gt;" in admin.get("/console/keys").text


def test_member_lifecycle_disable_enable_reset(
    admin: ConsoleClient, control_plane: RunningControlPlane
) -> None:
    plane = control_plane.plane
    owner = plane.users.list(OPERATOR, workspace="acme")[0]
    dev = add_member(plane, "dev@acme.test", ["keys:manage", "checks:read"])
    dev_client = ConsoleClient(admin.base)
    assert dev_client.sign_in("dev@acme.test").status_code == 303
    assert dev_client.get("/console/keys").status_code == 200
    token = csrf_of(admin.get("/console/members").text)
    disabled = admin.post(f"/console/members/{dev.id}/disable", [("csrf_token", token)])
    assert disabled.status_code == 303
    # The disabled member's session ends at its next request; signing in again is refused.
    assert dev_client.get("/console/keys", allow_redirects=False).status_code == 303
    assert ConsoleClient(admin.base).sign_in("dev@acme.test").status_code == 401
    assert "disabled" in admin.get("/console/members").text
    enabled = admin.post(f"/console/members/{dev.id}/enable", [("csrf_token", token)])
    assert enabled.status_code == 303
    assert ConsoleClient(admin.base).sign_in("dev@acme.test").status_code == 303
    new_password = "a brand new passphrase"
    reset = admin.submit(
        f"/console/members/{dev.id}/reset",
        f"/console/members/{dev.id}/reset",
        [("password", new_password)],
    )
    assert reset.status_code == 303
    assert ConsoleClient(admin.base).sign_in("dev@acme.test").status_code == 401
    assert (
        ConsoleClient(admin.base).sign_in("dev@acme.test", password=new_password).status_code == 303
    )
    for action in ("user.disabled", "user.enabled", "user.password_reset"):
        assert audit_rows(control_plane.data_dir, action) == [(owner.id, dev.id)], action
    # Another workspace's admin can neither see nor change the member.
    add_member(plane, "mallory@evil.test", ["admin:full"], workspace="evil")
    mallory = ConsoleClient(admin.base)
    mallory.sign_in("mallory@evil.test", workspace="evil")
    assert mallory.get(f"/console/members/{dev.id}/reset").status_code == 404
    evil_token = csrf_of(mallory.get("/console/members").text)
    for verb in ("disable", "enable"):
        resp = mallory.post(f"/console/members/{dev.id}/{verb}", [("csrf_token", evil_token)])
        assert resp.status_code == 404, verb
    resp = mallory.post(
        f"/console/members/{dev.id}/reset", [("csrf_token", evil_token), ("password", "x" * 20)]
    )
    assert resp.status_code == 404
    assert (
        ConsoleClient(admin.base).sign_in("dev@acme.test", password=new_password).status_code == 303
    )


def test_the_docs_block_creates_a_member_who_can_sign_in(
    control_plane: RunningControlPlane, tmp_path: Path
) -> None:
    """docs/console.md's shell block, as pasted, in a directory laid out like `spauth serve`'s."""
    (block,) = [b for b in shell_blocks(DOCS / "console.md") if not b.skipped]
    (tmp_path / ".spauth").mkdir()
    (tmp_path / ".spauth" / "bootstrap-key").write_text(control_plane.operator_key)
    env = {
        **os.environ,
        "SPAUTH_ENDPOINT": control_plane.address,
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
    }
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block.text],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    client = ConsoleClient(base(control_plane))
    assert client.sign_in("owner@acme.example").status_code == 303
    assert "OAuth Applications" in client.get("/console").text  # admin:full


def test_key_manager_shows_last_use_reported_by_a_real_sidecar(
    admin: ConsoleClient,
    control_plane: RunningControlPlane,
    sidecar_factory: Callable[..., Sidecar],
) -> None:
    used = generate(admin, "ci", ["checks:read"])
    generate(admin, "idle", ["checks:read"])
    keys = {k.name: k.id for k in control_plane.plane.keys.list(OPERATOR, workspace="acme").items}
    sidecar = sidecar_factory(usage_report_interval=0.05)
    request = check_request("/v1/workspaces/acme/checks/web", bearer(used))
    # The first allow waits for the key to replicate; the sidecar then reports the use.
    wait_until(lambda: call_check(sidecar.port, request).status.code == 0, what="key allowed")
    usage = control_plane.plane.usage
    wait_until(lambda: usage.of(keys["ci"]).last_used_at is not None, what="usage reported")
    used_at = when(control_plane.clock.now())  # the sidecar runs on the test's clock
    listing = admin.get("/console/keys").text
    assert last_used_cell(listing, keys["ci"]) == used_at
    assert last_used_cell(listing, keys["idle"]) == "never"
    assert last_used_line(admin.get(f"/console/keys/{keys['idle']}/revoke").text) == "never"
    # After a replacement the old key still says when it was last used ("is CI still on the
    # old key?"), on the list and on its revoke page; the replacement was never used.
    old = keys["ci"]
    assert last_used_line(admin.get(f"/console/keys/{old}/replace").text) == used_at
    replaced = admin.submit(
        f"/console/keys/{old}/replace", f"/console/keys/{old}/replace", [("grace", "0")]
    )
    new = re.search(r'<code id="new-key-id">([^<]+)</code>', replaced.text)
    assert replaced.status_code == 200 and new
    listing = admin.get("/console/keys").text
    assert last_used_cell(listing, old) == used_at
    assert last_used_cell(listing, new.group(1)) == "never"
    revoke_page = admin.get(f"/console/keys/{old}/revoke").text
    assert last_used_line(revoke_page) == used_at and "something still uses this key" in revoke_page
    # The key's own page: its fields, last use and uses per day, counted by the real sidecar.
    page = admin.get(f"/console/keys/{old}")
    assert page.status_code == 200
    assert (
        re.search(r'<td id="last-used" class="nowrap">([^<]*)</td>', page.text).group(1) == used_at
    )  # type: ignore[union-attr]
    rows = re.findall(
        r'<tr><td class="nowrap">([0-9-]+)</td><td class="uses">([0-9]+)</td>', page.text
    )
    assert rows == [
        (format_day(int(control_plane.clock.now()) // 86400), str(usage.of(old).daily[-1][1]))
    ]
    assert int(rows[0][1]) >= 1
    assert f'href="/console/keys/{new.group(1)}"' in page.text  # replaced by, linked
    idle = admin.get(f"/console/keys/{keys['idle']}").text
    assert "No use reported in the last 30 days." in idle
    assert f'href="/console/keys/{keys["idle"]}"' in admin.get("/console/keys").text
