"""The hash chain, pure: links, tamper detection, checkpoints, canonical bytes."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.core.audit import AuditEvent, event, redact, scrub
from sidecar.core.audit_chain import (
    GENESIS,
    ChainedRecord,
    Link,
    Problem,
    canonical,
    next_link,
    sign_checkpoint,
    verify,
)

KEY = b"k" * 32


def chain(n: int, workspace: str = "acme") -> list[ChainedRecord]:
    out: list[ChainedRecord] = []
    head: Link | None = None
    for i in range(n):
        ev = event(1_800_000_000.0 + i, "key_a", "key.created", workspace, f"key_{i}")
        head = next_link(ev, head)
        out.append(ChainedRecord(ev, i + 1, head))
    return out


def test_a_fresh_chain_verifies_and_reports_its_head() -> None:
    records = chain(5)
    report = verify("acme", records)
    assert report.ok and report.records_checked == 5
    assert report.head == records[-1].link
    assert records[0].link.prev_digest == GENESIS
    assert all(b.link.prev_digest == a.link.digest for a, b in itertools.pairwise(records))


def test_canonical_form_is_documented_json() -> None:
    ev = AuditEvent("evt_1", 1.5, "key_a", "key.revoked", "acme", "key_b", metadata={"b": "2"})
    body = canonical(ev, 3, GENESIS)
    assert body == (
        b'{"action":"key.revoked","actor":"key_a","chain_seq":3,"id":"evt_1",'
        b'"metadata":{"b":"2"},"outcome":"success","prev_digest":"' + GENESIS.encode() + b'",'
        b'"reason":"","request_id":"","target":"key_b","time_us":1500000,"v":1,'
        b'"workspace":"acme"}'
    )
    assert next_link(ev, Link(2, "x", GENESIS)).digest == hashlib.sha256(body).hexdigest()


@pytest.mark.parametrize("field", ["actor", "action", "target", "reason", "outcome"])
def test_editing_a_field_names_that_record(field: str) -> None:
    records = chain(6)
    edited = records[3].event._replace(**{field: "tampered"})
    records[3] = dataclasses.replace(records[3], event=edited)
    report = verify("acme", records)
    assert report.first_break is not None
    assert report.first_break.problem is Problem.DIGEST_MISMATCH
    assert report.first_break.record_id == records[3].event.id
    assert report.records_checked == 3


def test_editing_and_rehashing_breaks_the_next_link() -> None:
    records = chain(6)
    edited = records[2].event._replace(target="key_other")
    link = next_link(edited, records[1].link)
    records[2] = ChainedRecord(edited, records[2].seq, link)
    report = verify("acme", records)
    assert report.first_break is not None
    assert report.first_break.problem is Problem.LINK_MISMATCH
    assert report.first_break.record_id == records[3].event.id


def test_a_deleted_record_is_reported_as_missing() -> None:
    records = chain(6)
    del records[2]
    report = verify("acme", records)
    assert report.first_break is not None
    assert report.first_break.problem is Problem.MISSING
    assert report.first_break.record_id == records[2].event.id
    assert "3..3" in report.first_break.detail


def test_a_deleted_first_record_is_reported() -> None:
    records = chain(3)[1:]
    report = verify("acme", records)
    assert report.first_break is not None and report.first_break.problem is Problem.MISSING


def test_a_signed_checkpoint_lets_a_pruned_chain_verify() -> None:
    records = chain(10)
    cp = sign_checkpoint(KEY, "acme", records[3].link, 1_800_000_100.0)
    report = verify("acme", records[4:], cp, KEY)
    assert report.ok and report.checkpoint_chain_seq == 4 and report.records_checked == 6


@pytest.mark.parametrize("change", ["digest", "chain_seq", "signature"])
def test_a_forged_checkpoint_is_refused(change: str) -> None:
    records = chain(10)
    cp = sign_checkpoint(KEY, "acme", records[3].link, 1_800_000_100.0)
    forged = {
        "digest": dataclasses.replace(cp, digest=records[5].link.digest),
        "chain_seq": dataclasses.replace(cp, chain_seq=6),
        "signature": dataclasses.replace(cp, signature="0" * 64),
    }[change]
    report = verify("acme", records[6:], forged, KEY)
    assert report.first_break is not None
    assert report.first_break.problem is Problem.CHECKPOINT_INVALID


def test_a_checkpoint_without_the_key_does_not_verify() -> None:
    records = chain(4)
    cp = sign_checkpoint(KEY, "acme", records[1].link, 1.0)
    assert not verify("acme", records[2:], cp, None).ok
    assert not verify("acme", records[2:], cp, b"other key").ok


def test_a_gap_right_after_the_checkpoint_is_missing() -> None:
    records = chain(10)
    cp = sign_checkpoint(KEY, "acme", records[3].link, 1.0)
    report = verify("acme", records[5:], cp, KEY)
    assert report.first_break is not None and report.first_break.problem is Problem.MISSING


@pytest.mark.parametrize(
    "secret",
    [
        "spk_" + "A1b2C3d4" * 4 + "zZ9yY8",
        "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl",
        "Bearer abc.def-123",
        "spr_" + "q" * 40,
    ],
)
def test_scrub_redacts_credentials_everywhere(secret: str) -> None:
    ev = event(1.0, "key_a", "authz.deny", "acme", f"/v1/checks?token={secret}")
    ev = ev._replace(reason=secret, metadata={"h": f"x {secret} y", secret: "k"})
    clean = scrub(ev)
    assert secret not in json.dumps(clean._asdict())
    assert clean.id == ev.id and clean.action == ev.action


def test_scrub_keeps_ids_and_ordinary_text() -> None:
    ev = event(1.0, "key_0123456789abcdef", "key.revoked", "acme", "key_ABCDEFGHabcdefgh")
    ev = ev._replace(reason="rotated after the incident", request_id="req_0a1b2c3d")
    assert scrub(ev) is ev
    assert redact("evt_" + "0" * 24) == "evt_" + "0" * 24


texts = st.text(alphabet=st.characters(codec="utf-8"), max_size=30)


@given(
    actor=texts,
    target=texts,
    meta=st.dictionaries(texts, texts, max_size=3),
    t=st.floats(0, 4e9, allow_nan=False),
)
def test_any_content_round_trips_through_the_chain(
    actor: str, target: str, meta: dict[str, str], t: float
) -> None:
    ev = AuditEvent("evt_x", t, actor, "key.created", "acme", target, metadata=meta)
    link = next_link(ev, None)
    assert verify("acme", [ChainedRecord(ev, 1, link)]).ok
    assert canonical(ev, 1, GENESIS).isascii()
