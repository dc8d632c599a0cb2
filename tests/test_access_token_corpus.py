"""The access-token verifier holds to a recorded corpus: issued tokens and hostile mutations (alg
none, HS256 keyed with the public key, wrong kid and typ, expired, nbf ahead, leeway boundaries,
bad base64, duplicate JSON members, huge headers, non-UTF-8, another issuer, another key's
signature…) with the verdict the verifier gave each before its lean rewrite (issue #19):
the same accept or deny, the same reason code, the same identity, and the same claims handed
back for attribution. tests/support/token_corpus.py records the file; nothing here re-signs."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from sidecar.authz.engine import TokenDenied
from sidecar.authz.replica import Replica
from sidecar.authz.token_verifier import ReplicaTokenVerifier
from sidecar.core.changes import SigningKeyUpserted
from tests.support.token_corpus import (
    AUDIENCE,
    ISSUER,
    LEEWAY,
    MAX_LIFETIME,
    load_keys,
    verdict,
)

CORPUS = json.loads((Path(__file__).parent / "fixtures" / "access_token_corpus.json").read_text())
KEYS = load_keys(CORPUS["keys"])
CASES = CORPUS["cases"]


def _same(a: Any, b: Any) -> bool:
    """Equality that holds NaN equal to NaN (a refused exp of NaN is handed back as is)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def test_the_corpus_covers_accepts_and_every_reason() -> None:
    reasons = {case["verdict"].get("reason", "ok") for case in CASES}
    assert reasons == {
        "ok", "malformed_token", "unknown_key", "bad_signature", "alg_not_allowed",
        "wrong_type", "wrong_issuer", "wrong_audience", "token_expired",
        "token_not_yet_valid", "insufficient_claims", "lifetime_too_long", "invalid_workspace",
    }  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[case["name"] for case in CASES])
def test_verify_access_token_gives_the_recorded_verdict(case: dict[str, Any]) -> None:
    assert _same(verdict(case["token"], KEYS, case["now"]), case["verdict"])


def _replica() -> Replica:
    replica = Replica()
    changes = [SigningKeyUpserted(k["kid"], k["alg"], k["jwk"]).change() for k in CORPUS["keys"]]
    replica.load_snapshot(1, changes)
    return replica


@pytest.mark.parametrize("case", CASES, ids=[case["name"] for case in CASES])
def test_the_sidecar_verifier_gives_the_recorded_verdict(case: dict[str, Any]) -> None:
    """Through ReplicaTokenVerifier (the Check path's): the same reason, the identity of an
    accepted token, and a refused token attributed to the workspace its verified claims name."""
    verifier = ReplicaTokenVerifier(ISSUER, AUDIENCE, leeway=LEEWAY, max_lifetime=MAX_LIFETIME)
    expected = case["verdict"]
    if "reason" in expected:
        with pytest.raises(TokenDenied) as denied:
            verifier(case["token"], _replica(), case["now"])
        assert denied.value.reason.value == expected["reason"]
        claims = expected["claims"]
        workspace = claims.get("workspace")
        if isinstance(workspace, str) and workspace:
            jti = claims.get("jti")
            assert denied.value.identity is not None
            assert denied.value.identity.workspace == workspace[:256]
            assert denied.value.identity.id == (jti[:256] if isinstance(jti, str) else "")
        else:
            assert denied.value.identity is None
        return
    identity = verifier(case["token"], _replica(), case["now"])
    found = expected["identity"]
    assert identity.kind == "access_token"
    assert (identity.id, identity.workspace, identity.subject) == (
        found["jti"], found["workspace"], found["subject"]
    )  # fmt: skip
    assert (identity.client_id, identity.grant_id, identity.key_id) == (
        found["client_id"], found["grant_id"], found["key_id"]
    )  # fmt: skip
    assert sorted(identity.scopes) == found["scopes"]
    assert identity.expires_at == found["expires_at"]
