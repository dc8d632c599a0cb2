"""Webhook secrets at rest under the key-encryption keys (the #17 leftover: the webhook key could
not be rotated): sealed bound to the webhook's id, re-sealed at start-up after a KEK rotation,
secrets sealed by the pre-KEK webhook key opened and moved under the KEK, and a sealed secret
copied onto another tenant's webhook row refused. Real SQLite/PostgreSQL stores, a real control
plane, a real HTTP receiver; the deliveries' signatures are verified with the secret shown at
creation."""

from __future__ import annotations

import logging
import os
import secrets
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sidecar.config import load_settings
from sidecar.controlplane import ControlPlane
from sidecar.core.clock import FakeClock
from sidecar.core.kek import KEK_BYTES, KekError, KeyEncryption, generate, parse
from sidecar.core.models import Principal, RequestContext
from sidecar.core.storage import Store
from sidecar.core.webhooks import KEY_REVOKED, WebhookService, sealing_context
from sidecar.webhooks.delivery import Deliverer
from sidecar.webhooks.sealing import LEGACY_FILE, WebhookSealer, legacy_keys
from sidecar.webhooks.signing import SIGNATURE_HEADER, verify
from tests.conftest import LoopThread
from tests.support.sync import TEST_SYNC_TOKEN
from tests.test_webhooks import Receiver

ACME = RequestContext(Principal("key_a", "acme", frozenset({"keys:manage"})), "req_1")
GLOBEX = RequestContext(Principal("key_g", "globex", frozenset({"keys:manage"})), "req_2")
OLD, NEW = secrets.token_bytes(KEK_BYTES), secrets.token_bytes(KEK_BYTES)


def _deliverer(store: Store, clock: FakeClock, sealer: WebhookSealer) -> Deliverer:
    return Deliverer(store, clock, sealer, allow_private=True, rand=lambda: 0.5)


def _stored(store: Store, hook_id: str) -> bytes:
    with store.read() as uow:
        hook = uow.webhooks.get(hook_id)
    assert hook is not None
    return hook.sealed_secret


def _test_delivery(store: Store, clock: FakeClock, sealer: WebhookSealer, hook_id: str) -> str:
    """Queue a test delivery and attempt it once; '' when delivered, else its last error."""
    hooks = WebhookService(store, clock, sealer)
    delivery = hooks.test(ACME, hook_id)
    _deliverer(store, clock, sealer).run_once()
    with store.read() as uow:
        (done,) = [d for d in uow.webhooks.recent_deliveries(hook_id, 20) if d.id == delivery.id]
    return done.last_error


def test_a_secret_is_sealed_under_the_kek_and_bound_to_its_webhook() -> None:
    sealer = WebhookSealer(KeyEncryption([NEW]))
    sealed = sealer.seal(b"whsec_secret", sealing_context("whk_1"))
    assert b"whsec_secret" not in sealed and sealer.is_current(sealed)
    assert sealer.open(sealed, sealing_context("whk_1")) == b"whsec_secret"
    with pytest.raises(KekError, match="webhook secret webhook:whk_2 does not decrypt"):
        sealer.open(sealed, sealing_context("whk_2"))
    with pytest.raises(KekError, match="not configured"):
        WebhookSealer(KeyEncryption([OLD])).open(sealed, sealing_context("whk_1"))


def test_a_kek_rotation_reseals_every_secret_and_deliveries_keep_their_signature(
    store: Store,
) -> None:
    clock = FakeClock()
    before = WebhookSealer(KeyEncryption([OLD]))
    receiver = Receiver([])
    try:
        hook, secret = WebhookService(store, clock, before).add(
            ACME, workspace="acme", url=receiver.url, events=[KEY_REVOKED]
        )
        other, _ = WebhookService(store, clock, before).add(
            GLOBEX, workspace="globex", url=receiver.url, events=[KEY_REVOKED]
        )
        WebhookService(store, clock, before).remove(GLOBEX, other.id)  # deleted rows too
        # Step 1 of the rotation: NEW first, OLD still listed (every replica restarts so).
        both = WebhookSealer(KeyEncryption([NEW, OLD]))
        service = WebhookService(store, clock, both)
        assert service.rewrap() == (2, 0)
        assert service.rewrap() == (0, 0)  # idempotent: a second replica starting changes nothing
        only_new = WebhookSealer(KeyEncryption([NEW]))
        assert only_new.is_current(_stored(store, hook.id))
        assert only_new.is_current(_stored(store, other.id))
        # Step 2: OLD dropped. Deliveries still carry the secret shown at creation.
        assert _test_delivery(store, clock, only_new, hook.id) == ""
        # A control plane still on OLD alone can no longer open it, and says so without the secret.
        error = _test_delivery(store, clock, before, hook.id)
        assert "not configured" in error and secret not in error
    finally:
        receiver.close()
    headers, body = receiver.requests[0]
    assert verify(secret.encode(), headers[SIGNATURE_HEADER.lower()], body, clock.now())
    assert len(receiver.requests) == 1


def _legacy_seal(key: bytes, plaintext: bytes) -> bytes:
    """A secret as the per-file webhook key sealed it before the KEK (nonce ‖ ciphertext)."""
    nonce = os.urandom(12)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, b"spauth-webhook-secret-v1")


def test_secrets_sealed_by_the_old_webhook_key_move_under_the_kek(
    store: Store, tmp_path: Path
) -> None:
    clock = FakeClock()
    legacy = secrets.token_bytes(32)
    (tmp_path / LEGACY_FILE).write_text(legacy.hex() + "\n")
    kek = KeyEncryption([NEW])
    receiver = Receiver([])
    try:
        hook, _ = WebhookService(store, clock, WebhookSealer(kek)).add(
            ACME, workspace="acme", url=receiver.url, events=[KEY_REVOKED]
        )
        # The row as an older release left it: sealed with the webhook-key file.
        with store.transaction() as uow:
            uow.webhooks.update(replace(hook, sealed_secret=_legacy_seal(legacy, b"whsec_old")))
        # Without the old key the secret does not open: counted, and deliveries say why.
        blind = WebhookService(store, clock, WebhookSealer(kek))
        assert blind.rewrap() == (0, 1)
        assert "webhook_key" in _test_delivery(store, clock, WebhookSealer(kek), hook.id)
        # With it (the file in data_dir, as before the upgrade): re-sealed under the KEK.
        upgraded = WebhookSealer(kek, legacy_keys("", tmp_path))
        service = WebhookService(store, clock, upgraded)
        assert service.rewrap() == (1, 0)
        assert upgraded.is_current(_stored(store, hook.id))
        # From now on the KEK alone opens it: the old key file can go.
        assert _test_delivery(store, clock, WebhookSealer(kek), hook.id) == ""
    finally:
        receiver.close()
    headers, body = receiver.requests[0]
    assert verify(b"whsec_old", headers[SIGNATURE_HEADER.lower()], body, clock.now())


def test_the_legacy_key_comes_from_the_setting_or_an_existing_file(tmp_path: Path) -> None:
    assert legacy_keys("", tmp_path) == []  # no file: none, and none is created
    assert not (tmp_path / LEGACY_FILE).exists()
    assert legacy_keys("ab" * 32, tmp_path) == [bytes.fromhex("ab" * 32)]
    (tmp_path / LEGACY_FILE).write_text("not hex\n")
    with pytest.raises(KekError, match="not a 64-hex-digit key"):
        legacy_keys("", tmp_path)


def test_a_sealed_secret_copied_onto_another_tenants_webhook_does_not_sign(
    store: Store,
) -> None:
    """An attacker who can write the database copies globex's sealed secret onto acme's webhook
    (or the other way round): the copy does not open under acme's webhook id, so no delivery is
    signed with another tenant's secret."""
    clock = FakeClock()
    sealer = WebhookSealer(KeyEncryption([NEW]))
    receiver = Receiver([])
    try:
        mine, _ = WebhookService(store, clock, sealer).add(
            ACME, workspace="acme", url=receiver.url, events=[KEY_REVOKED]
        )
        theirs, _ = WebhookService(store, clock, sealer).add(
            GLOBEX, workspace="globex", url=receiver.url, events=[KEY_REVOKED]
        )
        with store.transaction() as uow:
            uow.webhooks.update(replace(mine, sealed_secret=theirs.sealed_secret))
        error = _test_delivery(store, clock, sealer, mine.id)
    finally:
        receiver.close()
    assert f"webhook secret webhook:{mine.id} does not decrypt" in error
    assert receiver.requests == []


def test_the_control_plane_reseals_at_start_after_a_kek_rotation(
    tmp_path: Path, loop_thread: LoopThread, caplog: pytest.LogCaptureFixture
) -> None:
    """The operator's procedure (docs/rotation.md): restart with NEW,OLD, then with NEW."""
    old, new = generate(), generate()

    def plane(keks: str) -> ControlPlane:
        settings = load_settings(
            {
                "data_dir": str(tmp_path),
                "admin_addr": "127.0.0.1:0",
                "http_addr": "127.0.0.1:0",
                "sync_token": TEST_SYNC_TOKEN,
                "key_encryption_key": keks,
            },
            environ={},
        )
        return ControlPlane(settings, clock=FakeClock())

    first = plane(old)
    first.bootstrap()
    hook, _ = first.webhooks.add(
        ACME, workspace="acme", url="https://hooks.example/x", events=[KEY_REVOKED]
    )
    first.store.close()
    second = plane(f"{new},{old}")
    with caplog.at_level(logging.INFO, logger="sidecar.controlplane"):
        loop_thread.run(second.start())
        try:
            sealed = _stored(second.store, hook.id)
        finally:
            loop_thread.run(second.aclose(grace=1))
    assert any("re-sealed" in r.getMessage() for r in caplog.records)
    assert WebhookSealer(KeyEncryption(parse(new, "new"))).is_current(sealed)
