"""The compiled ingest step (sidecar/core/_auditchain.c) against the Python path, its reference:
on generated messages (credential-shaped and non-ASCII text, duplicates, future and missing
times, oversized fields and metadata), on crafted and fuzzed wire bytes, and through each real
backend and the gRPC ingest, where the chains it links must verify. Where the compiled step
answers, its refusals, contents and rows (hashes included) equal the Python path's; where it
declines (None), the Python path decides, so a declined message is only ever slower."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar._gen.statuspulse.auth.v1 import audit_pb2 as pb
from sidecar.admin.audit_convert import event, ingest_batch
from sidecar.auditship.codec import REPORT_REFUSED, encode
from sidecar.auditship.records import decision_event
from sidecar.auditship.transport import GrpcTransport
from sidecar.core import audit_native
from sidecar.core.audit import AuditEvent, redact
from sidecar.core.audit_batch import EventBatch, PreparedBatch
from sidecar.core.audit_chain import GENESIS, Link, canonical_reference
from sidecar.core.audit_trail import SIDECAR, AuditTrail
from sidecar.core.clock import FakeClock
from sidecar.core.errors import InvalidArgument
from sidecar.core.models import Principal, RequestContext
from sidecar.core.storage import Store
from sidecar.protowire import ld, uint
from sidecar.store.sql.sqlite import SqliteStore
from tests.conftest import RunningControlPlane
from tests.support.rawsql import raw
from tests.support.sync import TEST_SYNC_TOKEN

_native: Any = pytest.importorskip("sidecar.core._auditchain")

NOW = 1_800_000_000.0  # FakeClock's start
LATEST = NOW + 300
KEY = b"checkpoint-key-for-tests-32bytes"
SHIPPER = RequestContext(SIDECAR, "req_sidecar")
OPERATOR = RequestContext(Principal("key_op", "*", frozenset({"admin:full"})), "req_op")

# Pieces that make credential shapes, near misses, word boundaries and Unicode classes.
_PIECES = st.sampled_from(
    ["sp", "spk_", "spab_", "spabc_", "spabcd_", "A1b2C3d4E5f6G7h8I9j0K1l2", "abcd", "_", "a",
     "Z", "0", "eyJ", "eyJhbGci", ".", "..", "-", " ", "\n", "\t", "\u00a0", "\u2003", "\x1c",
     "/", "Bearer ", "bEaReR", "BEARER\t", "bearer", "é", "İ", "ß", "٣", "²", "\u0301", "😀",
     "\x00", "\x7f", '"', "\\", "workspaces", "key_0123456789abcdef"]
)  # fmt: skip
_TEXT = st.lists(_PIECES | st.text(max_size=4), max_size=12).map("".join)
# Mostly well-formed, so most records reach scrubbing, the canonical form and the chain.
_GOOD_IDS = st.sampled_from(["dec_1", "dec_2", "evt.a:b-c_d", "eyJabcd.efgh.ij", "spk_" + "a" * 24])
_GOOD_IDS |= st.from_regex(r"[A-Za-z0-9._:-]{1,64}", fullmatch=True)
_WORKSPACES = st.sampled_from(
    ["", "acme", "globex", "acme", "globex", "-", "*", "Acme", "a-", "a" * 64, "x y"]
)
_OUTCOMES = st.sampled_from(["allow", "deny"] * 4 + ["é" * 512, "spk_" + "b" * 30, "é" * 513])
_ACTIONS = st.sampled_from(["authz.allow"] * 4 + ["authz.deny"] * 4 + ["key.revoked", ""])


@st.composite
def _records(draw: st.DrawFn, *, huge: bool = False) -> pb.AuditRecord:
    rare = st.integers(0, 9).map(lambda n: n == 0)  # one time in ten
    msg = pb.AuditRecord(
        id=draw(_TEXT) if draw(rare) else draw(_GOOD_IDS),
        actor=draw(_TEXT),
        action=draw(_ACTIONS),
        workspace=draw(_WORKSPACES),
        target="x" * 513 if draw(rare) else draw(_TEXT),
        outcome=draw(_OUTCOMES),
        reason=draw(_TEXT),
        request_id=draw(_TEXT),
    )
    when = draw(
        st.sampled_from([NOW - 10, NOW, LATEST, LATEST + 1e-6, NOW + 3600, 0.0, 1e-6, 1.5])
        | st.floats(min_value=1.0, max_value=LATEST + 10)
        | st.floats(min_value=NOW - 86400, max_value=LATEST)
        | st.floats(min_value=NOW - 86400, max_value=LATEST)
    )
    us = round(when * 1_000_000)
    msg.time.seconds, msg.time.nanos = us // 1_000_000, us % 1_000_000 * 1000
    most = 40 if huge else 6
    for k, v in draw(st.dictionaries(_TEXT, _TEXT, max_size=most)).items():
        msg.metadata[k] = v
    if draw(rare):
        msg.metadata["k" * 65] = "v"
    return msg


def _message(records: list[pb.AuditRecord], report: bool) -> bytes:
    data = b"".join(ld(1, r.SerializeToString()) for r in records)
    return data + REPORT_REFUSED if report else data


def _python(data: bytes) -> EventBatch:
    message = pb.IngestAuditRecordsRequest.FromString(data)
    events = [event(r) for r in message.records]
    return EventBatch(events, LATEST, report_refused=message.report_refused)


def _heads(batch: PreparedBatch, seed: int) -> dict[str, Any]:
    """Heads for the batch's workspaces: some chains empty, some at a stored position."""
    rnd = random.Random(seed)
    heads: dict[str, Any] = {}
    for index, _ in batch.accepted:
        ws = batch.workspace(index)
        if ws not in heads:
            digest = hashlib.sha256(ws.encode()).hexdigest()
            heads[ws] = rnd.choice([None, Link(rnd.randint(1, 10**6), "", digest)])
    return heads


def assert_same(native: PreparedBatch, python: PreparedBatch, seed: int = 0) -> None:
    assert native.size == python.size
    assert native.report_refused == python.report_refused
    assert native.refused == python.refused
    assert native.accepted == python.accepted
    for index, _ in python.accepted:
        assert native.content(index) == python.content(index)
        assert native.workspace(index) == python.workspace(index)
    indices = [index for index, _ in python.accepted]
    assert native.workspaces(indices) == python.workspaces(indices)
    heads = _heads(python, seed)
    rows = python.rows(indices, dict(heads))
    assert native.rows(indices, dict(heads)) == rows
    # The hash is over the canonical form's definition (json.dumps), not only the fast writer.
    for row in rows:
        ev = event_of(row)
        assert hashlib.sha256(canonical_reference(ev, row[10], row[11])).hexdigest() == row[12]


def holds_nul(records: list[pb.AuditRecord]) -> bool:
    """Whether a string field or metadata entry of any record holds U+0000."""
    return any(
        "\x00" in "".join((r.id, r.actor, r.action, r.workspace, r.target, r.outcome))
        or "\x00" in r.reason + r.request_id
        or any("\x00" in k + v for k, v in r.metadata.items())
        for r in records
    )


def event_of(row: tuple[Any, ...]) -> AuditEvent:
    eid, time, actor, action, ws, target, outcome, reason, rid, meta = row[:10]
    return AuditEvent(eid, time, actor, action, ws, target, outcome, reason, rid, json.loads(meta))


@settings(deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    records=st.lists(_records(), max_size=8),
    copies=st.lists(st.tuples(st.integers(0, 7), st.booleans()), max_size=3),
    report=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_generated_messages_give_the_same_batch(
    records: list[pb.AuditRecord], copies: list[tuple[int, bool]], report: bool, seed: int
) -> None:
    records = list(records)
    for at, changed in copies:  # re-sends within the message, same content or not
        if records:
            copy = pb.AuditRecord()
            copy.CopyFrom(records[at % len(records)])
            if changed:
                copy.target += "!"
            records.append(copy)
    data = _message(records, report)
    native = audit_native.parse(data, LATEST)
    python = _python(data)
    # Declines only where documented: metadata keys that collide once redacted, and NUL
    # (the Python path refuses that record with nul_character).
    collide = any(len({redact(k) for k in r.metadata}) < len(r.metadata) for r in records)
    if native is None:
        assert collide or holds_nul(records)
        return
    assert_same(native, python, seed)


@settings(deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow])
@given(records=st.lists(_records(huge=True), min_size=1, max_size=3))
def test_huge_metadata_is_refused_the_same_or_left_to_python(
    records: list[pb.AuditRecord],
) -> None:
    data = _message(records, True)
    native = audit_native.parse(data, LATEST)
    if native is None:  # more than 32 entries: the Python path counts them
        assert (
            any(len(r.metadata) > 32 for r in records)
            or any(len({redact(k) for k in r.metadata}) < len(r.metadata) for r in records)
            or holds_nul(records)
        )
        return
    assert_same(native, _python(data))


@settings(deadline=None, max_examples=1000)
@given(st.lists(_PIECES | st.text(max_size=3), max_size=40).map("".join))
def test_the_compiled_redaction_is_the_regex(text: str) -> None:
    assert _native.redact(text) == redact(text)


def test_each_credential_kind_is_redacted_alike() -> None:
    for text in (
        "x spk_" + "a" * 24 + " y", "eyJabcd.efgh.ij", "bEaReR tok", "a\u00a0Bearer\u2003t",
        "éspk_" + "a" * 24, "_eyJabcd.efgh.", "spabcd_" + "a" * 30, "Bearer", "Bearer  ",
    ):  # fmt: skip
        assert _native.redact(text) == redact(text)


def _valid_message(n: int = 20) -> bytes:
    records = []
    for i in range(n):
        r = pb.AuditRecord(
            id=f"dec_{i}", action="authz.allow", workspace=("acme", "", "globex")[i % 3],
            actor=f"key_{i:016x}", target=f"GET /v1/workspaces/acme/x/{i}", outcome="allow",
            reason="ok", request_id=f"req_{i}",
        )  # fmt: skip
        r.time.seconds, r.time.nanos = int(NOW) - i, 123456789
        r.metadata["source"] = f"10.0.0.{i}:443"
        r.metadata["latency_us"] = str(40 + i)
        records.append(r)
    return _message(records, True)


def _decide(data: bytes) -> tuple[Any, Any]:
    """(the compiled step's batch or None, the Python path's batch or the DecodeError text)."""
    native = audit_native.parse(data, LATEST)
    try:
        python: Any = _python(data)
    except Exception as exc:  # protobuf's DecodeError: not a message
        python = type(exc).__name__
    return native, python


def _check(data: bytes) -> bool:
    native, python = _decide(data)
    if native is None:
        return False
    assert not isinstance(python, str), f"compiled step accepted what protobuf refuses: {python}"
    assert_same(native, python)
    return True


def test_fuzzed_bytes_are_answered_the_same_or_left_to_python() -> None:
    rnd = random.Random(19)
    base = _valid_message()
    assert _check(base)
    answered = 0
    for _ in range(3000):
        data = bytearray(base)
        for _ in range(rnd.randint(1, 4)):
            op = rnd.randrange(4)
            at = rnd.randrange(len(data))
            if op == 0:
                data[at] = rnd.randrange(256)
            elif op == 1:
                data[at] ^= 1 << rnd.randrange(8)
            elif op == 2:
                del data[at : at + rnd.randint(1, 8)]
            else:
                data[at:at] = rnd.randbytes(rnd.randint(1, 4))
        answered += _check(bytes(data))
    for _ in range(500):
        _check(rnd.randbytes(rnd.randint(0, 64)))
    assert answered > 100  # mutations inside strings stay answerable by the compiled step


class _Wire:
    """Messages built field by field with the liberties the wire format allows: fields in any
    order, tags and lengths padded with continuation bytes, unknown fields of every wire type,
    repeated map keys, out-of-range nanos."""

    def __init__(self, seed: int) -> None:
        self.rnd = random.Random(seed)

    def varint(self, value: int) -> bytes:
        out = bytearray()
        while True:
            out.append(value & 0x7F | (0x80 if value > 0x7F else 0))
            value >>= 7
            if not value:
                break
        pad = self.rnd.choice([0] * 60 + [1, 3, 4, 5, 8])
        if pad:
            out = bytearray(b | 0x80 for b in out) + b"\x80" * (pad - 1) + b"\x00"
        return bytes(out)

    def tag(self, field: int, wire_type: int) -> bytes:
        return self.varint(field << 3 | wire_type)

    def ld(self, field: int, payload: bytes) -> bytes:
        return self.tag(field, 2) + self.varint(len(payload)) + payload

    def record(self) -> bytes:
        rnd = self.rnd
        parts = [
            self.ld(4, rnd.choice([b"authz.allow", b"authz.deny"])),
            self.ld(1, b"dec_%d" % rnd.randrange(5)),
            self.ld(5, rnd.choice([b"acme", b"", b"globex"])),
            self.ld(3, rnd.choice([b"key_a", "é".encode(), b"Bearer x"])),
        ]
        ts = b""
        if rnd.random() < 0.9:
            ts += self.tag(1, 0) + self.varint(int(NOW) - rnd.randrange(100))
        if rnd.random() < 0.5:
            ts += self.tag(2, 0) + self.varint(rnd.choice([0, 5, 999_999_999, 10**9, 2**32 + 5]))
        parts.append(self.ld(2, ts))
        for _ in range(rnd.randrange(3)):
            parts.append(self.ld(10, self.ld(1, rnd.choice([b"k", b"m", b""])) + self.ld(2, b"v")))
        if rnd.random() < 0.2:
            parts.append(
                rnd.choice(
                    [
                        self.ld(11, b"x"),
                        self.tag(12, 0) + self.varint(7),
                        self.tag(15, 5) + b"abcd",
                        self.tag(16, 1) + b"12345678",
                        self.tag(3, 0) + self.varint(1),
                        self.tag(17, 3) + self.tag(17, 4),
                    ]
                )
            )
        rnd.shuffle(parts)
        return b"".join(parts)

    def message(self) -> bytes:
        data = b"".join(self.ld(1, self.record()) for _ in range(self.rnd.randrange(1, 4)))
        if self.rnd.random() < 0.3:
            data += self.tag(2, 0) + self.varint(self.rnd.choice([0, 1, 2**63]))
        return data


def test_wire_liberties_are_answered_the_same_or_left_to_python() -> None:
    wire = _Wire(7)
    answered = sum(_check(wire.message()) for _ in range(4000))
    assert answered > 300  # padded and reordered fields stay answerable


@pytest.mark.parametrize(
    "record",
    [
        ld(4, b"authz.allow") + ld(1, b"a") + ld(1, b"b"),  # repeated id
        ld(4, b"authz.allow") + ld(11, b"cursor"),  # a field ingest ignores
        ld(4, b"authz.allow") + uint(12, 5),  # chain_seq, a varint
        ld(4, b"authz.allow") + ld(3, b"\xed\xa0\x80"),  # an encoded surrogate
        ld(4, b"authz.allow") + ld(3, b"\xc0\xaf"),  # overlong
        ld(4, b"authz.allow") + ld(3, b"\xf4\x90\x80\x80"),  # past U+10FFFF
        ld(1, b"d") + ld(4, b"authz.deny") + ld(2, uint(1, 5) + uint(2, 10**9)),
        ld(1, b"d") + ld(4, b"authz.deny") + ld(2, uint(1, 2**64 - 5)),  # < 0
        ld(1, b"d") + ld(4, b"authz.deny") + ld(2, uint(1, 5) + uint(1, 6)),
        ld(1, b"d") + ld(10, ld(1, b"k") + ld(2, b"v") + ld(2, b"w")),
        ld(1, b"d") + ld(10, ld(1, b"k")) + ld(10, ld(1, b"k")),
        ld(1, b"d") + ld(10, b""),  # an empty entry: key "" and value ""
        ld(1, b"d") + uint(4, 1),  # a string field as a varint
        b"",  # every field at its default
        b"\xa2\x80\x80\x80\x80\x00\x0bauthz.allow",  # a tag padded to 6 bytes: protobuf refuses
        b"\xa2\x80\x80\x80\x00\x0bauthz.allow",  # to 5 bytes: protobuf reads it
        b"\x22\x8b\x80\x80\x80\x80\x00authz.allow",  # a length padded to 6 bytes
        b"\x22\x8b\x80\x00authz.allow",  # to 3 bytes
    ],
)
def test_crafted_records_are_answered_the_same_or_left_to_python(record: bytes) -> None:
    _check(ld(1, record))
    _check(b"\x8a\x80\x80\x80\x80\x00" + ld(1, record)[1:])  # the record's own tag padded
    _check(ld(1, record) + b"\x10\x01\x10\x00")  # report_refused twice: the last wins


def test_a_message_that_is_not_one_is_invalid_argument() -> None:
    with pytest.raises(InvalidArgument, match="not a well-formed IngestAuditRecordsRequest"):
        ingest_batch(b"\x0a\x05ab", LATEST)


def test_the_compiled_step_answers_what_sidecars_send() -> None:
    """Not a differential test that passes by always declining."""
    assert isinstance(ingest_batch(_valid_message(), LATEST), audit_native.NativeBatch)


# -- through the store (both backends) and the gRPC ingest ----------------------------------


def _stored_rows(store: Store) -> list[tuple[Any, ...]]:
    with raw(store) as conn:
        rows = conn.execute(
            "SELECT id, time, actor, action, workspace, target, outcome, reason, request_id, "
            "metadata, chain_seq, prev_digest, digest FROM audit_events ORDER BY seq"
        ).fetchall()
    return [tuple(r) for r in rows]


def test_the_compiled_path_stores_what_the_python_path_stores(
    store: Store, clock: FakeClock, tmp_path: Path
) -> None:
    reference = SqliteStore(tmp_path / "reference.db")
    messages = [_valid_message(30), _valid_message(40)]  # the second re-sends the first's 30
    native_trail, python_trail = AuditTrail(store, clock, KEY), AuditTrail(reference, clock, KEY)
    for data in messages:
        batch = audit_native.parse(data, native_trail.latest_record_time())
        assert batch is not None
        a, b = (
            native_trail.ingest_batch(SHIPPER, batch),
            python_trail.ingest_batch(SHIPPER, _python(data)),
        )
        assert (a.acknowledged, a.stored, a.refused) == (b.acknowledged, b.stored, b.refused)
    assert _stored_rows(store) == _stored_rows(reference)
    reports = native_trail.verify(OPERATOR)
    assert reports and all(r.ok for r in reports)
    assert sum(r.records_checked for r in reports) == 40
    reference.close()


def test_over_grpc_the_compiled_path_links_chains_that_verify(
    control_plane: RunningControlPlane,
) -> None:
    plane = control_plane.plane
    before = sum(r.records_checked for r in plane.audit.verify(OPERATOR))
    transport = GrpcTransport(control_plane.address, TEST_SYNC_TOKEN, timeout=10)
    records = [pb.AuditRecord.FromString(encode(ev)) for ev in _events(600)]
    payloads = [r.SerializeToString() for r in records]
    assert transport.send(payloads) == 600
    assert transport.send(payloads[:50]) == 50  # re-sends: acknowledged, stored once
    reports = plane.audit.verify(OPERATOR)
    assert all(r.ok for r in reports)
    assert sum(r.records_checked for r in reports) == before + 600
    transport.close()


def _events(n: int) -> list[AuditEvent]:
    events = []
    for i in range(n):
        events.append(
            decision_event(
                time=NOW - 5 + i * 1e-3,
                allowed=i % 4 != 0,
                reason="ok" if i % 4 else "rate_limited",
                credential_id=f"key_{i % 9:016x}",
                workspace=("acme", "globex", "")[i % 3],
                method="GET",
                path=f"/v1/workspaces/acme/x/{i}?q=é",
                source=f"10.0.0.{i % 250}:443",
                decision_id=f"dec_{i:024x}",
                latency_s=1e-4,
            )
        )
    return events


def test_genesis_links_the_first_record() -> None:
    batch = audit_native.parse(_valid_message(1), LATEST)
    assert batch is not None
    (row,) = batch.rows([0], {"acme": None})
    assert row[10:12] == (1, GENESIS)


@pytest.mark.parametrize("size", [1, 2, 25, 250])
def test_insert_parameters_are_the_rows_values_in_order(
    monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    """``flat`` (the multi-row INSERTs' parameters) holds each row's values in order, ``size``
    rows to a tuple, the same compiled and in Python; it refuses what it cannot lay out."""
    batch = audit_native.parse(_valid_message(250), LATEST)
    assert batch is not None
    rows = batch.rows([i for i, _ in batch.accepted], {})
    compiled = audit_native.flat(rows, size)
    assert [len(p) for p in compiled] == [size * 13] * (250 // size)
    assert [v for p in compiled for v in p] == [v for row in rows for v in row]
    monkeypatch.setattr(audit_native, "_native", None)
    assert audit_native.flat(rows, size) == compiled
    for bad, error in [
        ((rows, 3), ValueError),
        ((rows, 0), ValueError),
        (([*rows[:2], rows[0][:5]], 1), TypeError),
        (([*rows[:1], [1]], 1), TypeError),
        ((tuple(rows), 1), TypeError),
    ]:
        with pytest.raises(error):
            _native.flat(*bad)


def test_without_the_extension_the_python_path_runs_and_says_so_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(audit_native, "_native", None)
    monkeypatch.setattr(audit_native, "_logged", False)
    with caplog.at_level("WARNING", logger="sidecar.audit"):
        first = ingest_batch(_valid_message(), LATEST)
        second = ingest_batch(_valid_message(), LATEST)
    assert isinstance(first, EventBatch) and isinstance(second, EventBatch)
    assert [r.message for r in caplog.records] == [
        "audit ingest: compiled step unavailable, using the Python path"
    ]
    assert audit_native.copy_text([("a", 1.0, 1)]) is None  # PostgreSQL: write_row per row


def test_awkward_text_is_stored_as_sent(store: Store) -> None:
    """The COPY payload the compiled step formats for PostgreSQL (tabs, newlines, backslashes,
    non-ASCII) reads back as the row it came from."""
    records = []
    for i, text in enumerate(["a\tb", "c\nd\re", "back\\slash \\N", "\b\f\v", "é😀\u2028", ""]):
        r = pb.AuditRecord(
            id=f"dec_awk_{i}", action="authz.deny", workspace="acme", actor=text, target=text,
            outcome=text, reason=text, request_id=text,
        )  # fmt: skip
        r.time.seconds, r.time.nanos = int(NOW) - 1, 987654321
        r.metadata[text or "k"] = text
        records.append(r)
    batch = audit_native.parse(_message(records, False), LATEST)
    assert batch is not None
    indices = [i for i, _ in batch.accepted]
    rows = batch.rows(indices, {"acme": None})
    with store.transaction() as uow:
        uow.audit.append_batch(batch, indices)
    assert _stored_rows(store) == rows


def test_a_nul_is_left_to_psycopg() -> None:
    """PostgreSQL text cannot hold NUL: the compiled COPY declines, psycopg refuses it."""
    assert audit_native.copy_text([("a\x00b", 1.5, 2)]) is None
    assert audit_native.copy_text([("a\tb\\", 1.5, 2)]) == b"a\\tb\\\\\t1.5\t2\n"


def test_the_largest_record_redacted_everywhere_is_answered_the_same() -> None:
    """Every field at its limit and full of the shortest credential shape ("bearer x" becomes
    the longer "[redacted]"): the most text a record can make the compiled step write."""
    text = ("bearer x " * 60)[:512]
    r = pb.AuditRecord(
        id="d" * 64, action="authz.allow", workspace="acme", actor=text, target=text,
        outcome="é" * 512, reason=text, request_id=text,
    )  # fmt: skip
    r.time.seconds = int(NOW)
    for i in range(32):
        r.metadata[f"{i:02d} " + ("bearer x " * 8)[:61]] = text
    assert _check(ld(1, r.SerializeToString()))


def test_over_grpc_bytes_that_are_not_a_message_are_invalid_argument(
    control_plane: RunningControlPlane,
) -> None:
    """The method takes raw bytes; what protobuf cannot parse is refused by the one error
    mapping, with a stable code, not failed in the framework."""
    with grpc.insecure_channel(control_plane.address) as channel:
        ingest = channel.stream_unary(
            "/statuspulse.auth.v1.AuditService/IngestAuditRecords",
            request_serializer=None,
            response_deserializer=pb.IngestAuditRecordsResponse.FromString,
        )
        with pytest.raises(grpc.RpcError) as info:
            ingest(
                iter([b"\x0a\x05ab"]),
                metadata=(("authorization", f"Bearer {TEST_SYNC_TOKEN}"),),
                timeout=10,
            )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a well-formed IngestAuditRecordsRequest" in (info.value.details() or "")
