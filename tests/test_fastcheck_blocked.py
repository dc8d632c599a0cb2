"""While one source is over its failure limit, the compiled Check path answers that source's
checks 429 itself (as Engine._decide does, before the credential is read); while a key is, it
hands that key's checks to the Python path, which answers them 429. Everyone else's checks stay
in C, and both paths answer every request byte for byte the same (the pair and helpers of
tests/test_fastcheck_differential.py)."""

from __future__ import annotations

from typing import Any

import pytest

from sidecar.core import keyformat
from sidecar.dataplane.fastcheck import unavailable
from tests.test_fastcheck_differential import (
    HOST,
    SECRETS,
    Side,
    _advance,
    _reason,
    _same,
    pair,
    request_bytes,
)

pytestmark = pytest.mark.skipif(bool(unavailable()), reason=f"not built: {unavailable()}")
__all__ = ["pair"]  # the fixture, imported to be used here

ATTACKER, CLIENT = "10.9.9.9", "10.1.1.1"


def request_for(pair: tuple[Side, Side], header: dict[str, str], source: str) -> bytes:
    if "x-key" in pair[0].engine.policy.credential_headers:  # the extra policy's route
        return request_bytes("GET", "/v2/acme/items/7/detail", header, host="api.example",
                             source=source)  # fmt: skip
    return request_bytes("GET", "/v1/workspaces/acme/checks", header, host=HOST, source=source)


def answer_of(pair: tuple[Side, Side], data: bytes) -> tuple[bytes, int, int]:
    """The reason both paths gave, and how many the C path decided and handed over for it."""
    before = pair[1].handler.counts()  # type: ignore[attr-defined]
    reason = _reason(_same(pair, data))
    after = pair[1].handler.counts()  # type: ignore[attr-defined]
    return reason, after[0] - before[0], after[1] - before[1]


def _block(pair: tuple[Side, Side], source: str) -> None:
    """Unknown keys from ``source`` until both engines block it (source_failures=5)."""
    for _ in range(5):
        reason, _, _ = answer_of(
            pair, request_for(pair, {"authorization": f"Bearer {keyformat.mint_key()}"}, source)
        )
        assert reason == b"unknown_credential"
    for side in pair:
        assert side.engine.limiter is not None
        assert side.engine.limiter.source_blocked(source, side.engine.clock.now())


def test_only_the_blocked_source_is_refused(pair: tuple[Side, Side]) -> None:
    reader = {"authorization": f"Bearer {SECRETS['reader']}"}
    _block(pair, ATTACKER)
    # The blocked source: refused before its key is looked at, in C; without a credential the
    # C path reads no further and Python refuses it the same way.
    assert answer_of(pair, request_for(pair, reader, ATTACKER)) == (b"rate_limited", 1, 0)
    assert answer_of(pair, request_for(pair, {}, ATTACKER)) == (b"rate_limited", 0, 1)
    # Everyone else: decided in C as before the block, allows and denials alike.
    assert answer_of(pair, request_for(pair, reader, CLIENT)) == (b"ok", 1, 0)
    other = {"authorization": f"Bearer {SECRETS['globex']}"}
    assert answer_of(pair, request_for(pair, other, CLIENT)) == (b"workspace_mismatch", 1, 0)
    # A request without a source is never blocked; IPv6 and odd sources are looked up as is.
    for source in ("", "::1", "10.9.9.9 ", "10.9.9.90"):
        reason, decided, _ = answer_of(pair, request_for(pair, reader, source))
        assert (reason, decided) == (b"ok", 1), source


def test_a_block_that_ran_out_no_longer_sends_the_source_to_python(
    pair: tuple[Side, Side],
) -> None:
    reader = {"authorization": f"Bearer {SECRETS['reader']}"}
    _block(pair, ATTACKER)
    assert answer_of(pair, request_for(pair, reader, ATTACKER))[0] == b"rate_limited"
    _advance(pair, 61)  # the failure window (60 s) has slid past every counted failure
    limiter: Any = pair[1].engine.limiter
    assert ATTACKER in limiter.blocked_tables()[0]  # expired, not yet swept out
    assert answer_of(pair, request_for(pair, reader, ATTACKER)) == (b"ok", 1, 0)


def test_only_the_blocked_key_falls_back(pair: tuple[Side, Side]) -> None:
    # A key blocked by another sidecar (a shared block read back from Redis) while still valid.
    for side in pair:
        limiter: Any = side.engine.limiter
        now = side.engine.clock.now()
        limiter.absorb([], {"key": {"key_reader": now + 30}}, now, 10)
    reader = {"authorization": f"Bearer {SECRETS['reader']}"}
    writer = {"authorization": f"Bearer {SECRETS['writer']}"}
    assert answer_of(pair, request_for(pair, reader, CLIENT)) == (b"rate_limited", 0, 1)
    assert answer_of(pair, request_for(pair, writer, CLIENT)) == (b"ok", 1, 0)
    _advance(pair, 31)  # the block ran out
    assert answer_of(pair, request_for(pair, reader, CLIENT)) == (b"ok", 1, 0)
