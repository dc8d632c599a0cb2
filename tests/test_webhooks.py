"""Webhooks (issue 17): signed deliveries from the durable outbox to a real local HTTP receiver,
retried with capped, jittered backoff, at least once; secrets sealed at rest; tenants confined
to their workspace; a control plane that refuses to call private addresses by default."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import pytest

from sidecar._gen.statuspulse.auth.v1 import webhooks_pb2 as pb
from sidecar._gen.statuspulse.auth.v1 import webhooks_pb2_grpc as pb_grpc
from sidecar.cli.main import main
from sidecar.core.apikeys import ApiKeyService
from sidecar.core.clock import FakeClock
from sidecar.core.errors import InvalidArgument, NotFound, PermissionDenied
from sidecar.core.models import Principal, RequestContext
from sidecar.core.storage import Store
from sidecar.core.webhooks import KEY_EXPIRING, KEY_REVOKED, WebhookService
from sidecar.webhooks.delivery import Deliverer, RetryPolicy
from sidecar.webhooks.sealing import WebhookSealer
from sidecar.webhooks.signing import SIGNATURE_HEADER, signature, verify
from tests.conftest import RunningControlPlane, bearer, wait_until
from tests.support.signing import TEST_KEK

DAY = 86400
OPERATOR = RequestContext(Principal("key_op", "*", frozenset({"admin:full"})), "req_1")
ACME = RequestContext(
    Principal("key_a", "acme", frozenset({"keys:manage", "checks:read"})), "req_2"
)
GLOBEX = RequestContext(Principal("key_g", "globex", frozenset({"admin:full"})), "req_3")


class Receiver:
    """A real HTTP server that answers ``statuses`` in turn (then 204) and keeps requests."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = list(statuses)
        self.requests: list[tuple[dict[str, str], bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                receiver.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
                status = receiver.statuses.pop(0) if receiver.statuses else 204
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks/spauth"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver([])
    yield r
    r.close()


class Parts:
    def __init__(self, store: Store, tmp_path: Path) -> None:
        self.clock = FakeClock()
        self.sealer = WebhookSealer(TEST_KEK)
        self.keys = ApiKeyService(store, self.clock)
        self.hooks = WebhookService(store, self.clock, self.sealer)
        self.deliverer = Deliverer(
            store,
            self.clock,
            self.sealer,
            allow_private=True,
            policy=RetryPolicy(base=5, cap=60, max_attempts=4),
            rand=lambda: 0.5,  # jitter factor 0.75
        )
        self.store = store


@pytest.fixture
def parts(store: Store, tmp_path: Path) -> Parts:
    return Parts(store, tmp_path)


# -- signing and sealing ------------------------------------------------------------------------


def test_signature_verifies_and_refuses_tampering_and_replays() -> None:
    body = b'{"id":"whd_1"}'
    header = signature(b"whsec_x", 1_800_000_000, body)
    assert verify(b"whsec_x", header, body, now=1_800_000_100)
    assert not verify(b"whsec_x", header, body + b" ", now=1_800_000_100)
    assert not verify(b"whsec_y", header, body, now=1_800_000_100)
    assert not verify(b"whsec_x", header, body, now=1_800_000_000 + 301)  # outside the window
    assert not verify(b"whsec_x", "v1=" + header.split("v1=")[1], body, now=1_800_000_000)


# -- the outbox, on both backends, to a real receiver -------------------------------------------


def test_revocation_is_delivered_signed_after_retries(parts: Parts, tmp_path: Path) -> None:
    receiver = Receiver([500, 503])
    try:
        hook, secret = parts.hooks.add(
            ACME, workspace="acme", url=receiver.url, events=[KEY_REVOKED]
        )
        with parts.store.read() as uow:
            (stored,) = uow.webhooks.of_workspace("acme")
        assert secret.encode() not in stored.sealed_secret  # sealed at rest
        key = parts.keys.create(ACME, workspace="acme", name="ci", scopes=["checks:read"]).key
        other = parts.keys.create(GLOBEX, workspace="globex", name="x", scopes=["checks:read"]).key
        parts.keys.revoke(GLOBEX, other.id)  # another workspace: not acme's webhook's business
        parts.keys.revoke(ACME, key.id, reason="leaked")
        assert parts.deliverer.run_once() == 0  # 500
        with parts.store.read() as uow:
            (pending,) = uow.webhooks.recent_deliveries(hook.id, 10)
        assert pending.attempts == 1 and pending.last_error == "HTTP 500"
        # Backoff: 5 s * 2^0 * 0.75 (jitter) → due in 3 s; nothing is sent before.
        assert pending.next_attempt_at == int(parts.clock.now()) + 3
        parts.clock.advance(2)
        assert parts.deliverer.run_once() == 0 and len(receiver.requests) == 1
        parts.clock.advance(1)
        assert parts.deliverer.run_once() == 0  # 503; next in 5 * 2 * 0.75 = 7 s
        parts.clock.advance(7)
        assert parts.deliverer.run_once() == 1
        assert parts.deliverer.run_once() == 0  # delivered once, not again
    finally:
        receiver.close()
    assert len(receiver.requests) == 3
    headers, body = receiver.requests[-1]
    assert verify(secret.encode(), headers[SIGNATURE_HEADER.lower()], body, parts.clock.now())
    event = json.loads(body)
    assert event["type"] == KEY_REVOKED and event["workspace"] == "acme"
    assert event["data"]["key_id"] == key.id and event["data"]["reason"] == "leaked"
    assert headers["x-spauth-delivery"] == event["id"]
    assert {json.loads(b)["id"] for _, b in receiver.requests} == {event["id"]}  # same delivery


def test_deliveries_give_up_after_the_last_attempt(parts: Parts, receiver: Receiver) -> None:
    receiver.statuses = [500] * 10
    hook, _ = parts.hooks.add(OPERATOR, workspace="acme", url=receiver.url, events=[KEY_REVOKED])
    parts.hooks.test(ACME, hook.id)
    for _ in range(6):
        parts.deliverer.run_once()
        parts.clock.advance(120)
    with parts.store.read() as uow:
        (gave_up,) = uow.webhooks.recent_deliveries(hook.id, 10)
    assert (gave_up.status, gave_up.attempts) == ("failed", 4)
    assert len(receiver.requests) == 4


def test_expiry_warning_reaches_the_webhook(parts: Parts, receiver: Receiver) -> None:
    parts.hooks.add(ACME, workspace="acme", url=receiver.url, events=[KEY_EXPIRING])
    key = parts.keys.create(
        ACME, workspace="acme", name="ci", scopes=["checks:read"], expires_in=20 * DAY
    ).key
    parts.clock.advance(7 * DAY)
    parts.keys.sweep()
    parts.keys.sweep()
    assert parts.deliverer.run_once() == 1
    (request,) = receiver.requests
    event = json.loads(request[1])
    assert event["type"] == KEY_EXPIRING and event["data"]["key_id"] == key.id


def test_a_deleted_webhook_gets_nothing_more(parts: Parts, receiver: Receiver) -> None:
    hook, _ = parts.hooks.add(ACME, workspace="acme", url=receiver.url, events=[KEY_REVOKED])
    parts.hooks.test(ACME, hook.id)
    parts.hooks.remove(ACME, hook.id)
    assert parts.deliverer.run_once() == 0
    assert receiver.requests == []
    assert parts.hooks.in_workspace(ACME, "acme") == []


def test_tenants_are_confined_to_their_workspace(parts: Parts, receiver: Receiver) -> None:
    hook, _ = parts.hooks.add(ACME, workspace="acme", url=receiver.url, events=[KEY_REVOKED])
    with pytest.raises(PermissionDenied):
        parts.hooks.add(GLOBEX, workspace="acme", url=receiver.url, events=[KEY_REVOKED])
    with pytest.raises(PermissionDenied):
        parts.hooks.in_workspace(GLOBEX, "acme")
    for call in (parts.hooks.test, parts.hooks.remove, parts.hooks.deliveries):
        with pytest.raises(NotFound):
            call(GLOBEX, hook.id)  # not even told it exists
    reader = RequestContext(Principal("key_r", "acme", frozenset({"checks:read"})), "req_4")
    with pytest.raises(PermissionDenied):
        parts.hooks.in_workspace(reader, "acme")


@pytest.mark.parametrize(
    ("url", "events", "field"),
    [
        ("ftp://example.com/x", [KEY_REVOKED], "url"),
        ("https://user:pw@example.com/x", [KEY_REVOKED], "url"),
        ("/relative", [KEY_REVOKED], "url"),
        ("https://example.com/x", ["key.nope"], "events"),
        ("https://example.com/x", [], "events"),
    ],
)
def test_bad_registrations_name_the_field(
    parts: Parts, url: str, events: list[str], field: str
) -> None:
    with pytest.raises(InvalidArgument) as info:
        parts.hooks.add(ACME, workspace="acme", url=url, events=events)
    assert info.value.field == field


# -- through the control plane (default destination policy: public https only) ----------------


def test_control_plane_refuses_to_call_private_addresses(
    control_plane: RunningControlPlane, receiver: Receiver
) -> None:
    with control_plane.channel() as ch:
        stub = pb_grpc.WebhookServiceStub(ch)
        op = bearer(control_plane.operator_key)
        created = stub.CreateWebhook(
            pb.CreateWebhookRequest(workspace="acme", url=receiver.url, events=[KEY_REVOKED]),
            metadata=op,
        )
        assert created.secret.startswith("whsec_")
        stub.TestWebhook(pb.TestWebhookRequest(id=created.webhook.id), metadata=op)

        def refused() -> bool:
            (hook,) = stub.ListWebhooks(
                pb.ListWebhooksRequest(workspace="acme"), metadata=op
            ).webhooks
            return hook.recent_deliveries[0].last_error == "only https webhook URLs are called"

        wait_until(refused)
        assert receiver.requests == []
        with pytest.raises(grpc.RpcError) as info:
            stub.DeleteWebhook(pb.DeleteWebhookRequest(id="whk_nope"), metadata=op)
        assert info.value.code() is grpc.StatusCode.NOT_FOUND


def test_cli_adds_lists_and_removes(
    control_plane: RunningControlPlane,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("STATUSPULSE_API_KEY", control_plane.operator_key)
    base = ["--endpoint", control_plane.address, "-o", "json"]
    url = "https://hooks.example.com/spauth"
    assert main(["webhooks", "add", "--workspace", "acme", "--url", url, *base]) == 0
    added = json.loads(capsys.readouterr().out)
    assert added["secret"].startswith("whsec_") and len(added["events"]) == 5
    assert main(["webhooks", "list", "--workspace", "acme", *base]) == 0
    (listed,) = json.loads(capsys.readouterr().out)
    assert listed["url"] == url and "secret" not in listed
    assert main(["webhooks", "remove", added["id"], *base]) == 0
    assert main(["webhooks", "list", "--workspace", "acme", *base]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_member_disabled_hook_queues_the_event(parts: Parts, receiver: Receiver) -> None:
    from sidecar.core.oauth_models import Member
    from sidecar.core.webhooks import MEMBER_DISABLED, member_disabled

    parts.hooks.add(ACME, workspace="acme", url=receiver.url, events=[MEMBER_DISABLED])
    member = Member("usr_1", "acme", "dev@acme.example", "", frozenset(), 1, "key_a")
    with parts.store.transaction() as uow:
        assert member_disabled(uow, parts.clock.now(), member) == 1
    assert parts.deliverer.run_once() == 1
    event = json.loads(receiver.requests[0][1])
    assert event["type"] == MEMBER_DISABLED
    assert event["data"] == {"user_id": "usr_1", "email": "dev@acme.example"}


def test_the_shared_webhook_key_is_validated_and_never_printed() -> None:
    from sidecar.config import ConfigError, load_settings
    from sidecar.ops.configfile import effective

    key = "ab" * 32
    settings = load_settings(environ={"SPAUTH_WEBHOOK_KEY": key})
    rows = {name: value for name, value, _ in effective(settings, {}, environ={})}
    assert rows["webhook_key"] == '"<redacted>"'
    with pytest.raises(ConfigError) as info:
        load_settings(environ={"SPAUTH_WEBHOOK_KEY": "short"})
    assert "webhook_key" in str(info.value.errors) and "short" not in str(info.value.errors)


def test_disabling_a_member_sends_member_disabled_once(parts: Parts, receiver: Receiver) -> None:
    from sidecar.core.users import UserService
    from sidecar.core.webhooks import MEMBER_DISABLED

    parts.hooks.add(OPERATOR, workspace="acme", url=receiver.url, events=[MEMBER_DISABLED])
    users = UserService(parts.store, parts.clock)
    member = users.create(
        OPERATOR, workspace="acme", email="dev@acme.example", password="correct horse battery"
    )
    users.disable(OPERATOR, member.id)
    users.disable(OPERATOR, member.id)  # already disabled: no second event
    assert parts.deliverer.run_once() == 1
    (request,) = receiver.requests
    assert json.loads(request[1])["data"] == {"user_id": member.id, "email": "dev@acme.example"}
