"""Every denial can be found in the logs by its decision id, with reason, workspace and key id,
never a secret; under a flood of random keys the lines are rate-limited and the suppressed ones
counted."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from sidecar.authz.decision import Decision, Identity, Reason
from sidecar.authz.engine import CheckInput
from sidecar.core.keyformat import mint_key
from sidecar.ops.denial_log import DenialLog, TokenBucket, safe_path
from tests.conftest import RunningControlPlane
from tests.support.ops import bearer, call_check, check_request, create_key, wait_until
from tests.support.ports import free_ports
from tests.support.sync import token_file

CHECKS = "/v1/workspaces/acme/checks/1"


def _json_lines(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_denials_are_logged_by_decision_id_without_secrets(
    control_plane: RunningControlPlane, tmp_path: Path
) -> None:
    secret, key_id = create_key(control_plane.address, control_plane.operator_key, ["checks:read"])
    port, metrics = free_ports(2)
    log_path = tmp_path / "sidecar.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sidecar", "sidecar", "--listen", f"127.0.0.1:{port}",
             "--control-plane", control_plane.address, "--state-dir", str(tmp_path / "sc"),
             "--metrics-addr", f"127.0.0.1:{metrics}",
             "--sync-token-file", str(token_file(tmp_path))],
            stdout=subprocess.DEVNULL, stderr=log, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
    try:
        allowed = check_request(CHECKS, bearer(secret))
        wait_until(lambda: _ok(port, allowed), what="sidecar serving")
        forbidden = call_check(
            port, check_request(CHECKS + "?api_key=" + secret, bearer(secret), method="DELETE")
        )
        bogus = mint_key()
        unknown = call_check(port, check_request(CHECKS, {"x-api-key": bogus}))
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    text = log_path.read_text()
    lines = {str(line.get("decision_id")): line for line in _json_lines(text)}

    denied = lines[forbidden.dynamic_metadata.fields["decision_id"].string_value]
    assert denied["msg"] == "request denied"
    assert denied["reason"] == "insufficient_scope" and denied["outcome"] == "deny"
    assert denied["workspace"] == "acme" and denied["key_id"] == key_id
    assert denied["http_status"] == 403 and denied["method"] == "DELETE"
    assert denied["path"] == CHECKS  # the query string (which can carry keys) is dropped
    anonymous = lines[unknown.dynamic_metadata.fields["decision_id"].string_value]
    assert anonymous["reason"] == "unknown_credential" and "key_id" not in anonymous
    # Allowed checks are not logged one by one; secrets never are.
    assert allowed_ids(text) == set()
    for value in (secret, secret[4:-6], bogus, bogus[4:-6]):
        assert value not in text


def _ok(port: int, request: object) -> bool:
    try:
        return call_check(port, request).status.code == 0  # type: ignore[arg-type]
    except Exception:
        return False


def allowed_ids(text: str) -> set[str]:
    return {str(x["decision_id"]) for x in _json_lines(text) if x.get("reason") == "ok"}


class Ticks:
    """A monotonic clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


REQUEST = CheckInput("GET", CHECKS, "h", {}, {})
KNOWN = Identity("api_key", "key_known", "acme", frozenset(), 2e9)


def _decision(reason: Reason, ident: Identity | None = None, n: int = 0) -> Decision:
    return Decision(reason, f"dec_test_{n}", ident)


def test_flood_of_random_keys_is_rate_limited_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ticks = Ticks()
    denials = DenialLog(rate=10, summary_interval=5, clock=ticks)
    caplog.set_level(logging.INFO, logger="sidecar.decisions")
    for n in range(1000):
        denials(_decision(Reason.UNKNOWN_CREDENTIAL, n=n), REQUEST, "peer", 0.0)
    # Denials of a real key are still logged while the anonymous bucket is empty.
    denials(_decision(Reason.INSUFFICIENT_SCOPE, KNOWN, n=5000), REQUEST, "peer", 0.0)
    logged = [r for r in caplog.records if r.getMessage() == "request denied"]
    assert len(logged) == 11  # a burst of 10 anonymous, then the known key's
    assert logged[-1].__dict__["key_id"] == "key_known"

    assert denials.flush() == 0  # not yet: at most one summary per interval
    ticks.now += 5
    assert denials.flush() == 990
    (summary,) = [r for r in caplog.records if r.levelname == "WARNING"]
    assert summary.__dict__["by_reason"] == {"unknown_credential": 990}
    # The bucket refilled: lines flow again.
    denials(_decision(Reason.UNKNOWN_CREDENTIAL, n=6000), REQUEST, "peer", 0.0)
    assert caplog.records[-1].__dict__["decision_id"] == "dec_test_6000"


def test_rate_zero_logs_every_denial(caplog: pytest.LogCaptureFixture) -> None:
    denials = DenialLog(rate=0, clock=Ticks())
    caplog.set_level(logging.INFO, logger="sidecar.decisions")
    for n in range(500):
        denials(_decision(Reason.UNKNOWN_CREDENTIAL, n=n), REQUEST, "peer", 0.0)
    denials(_decision(Reason.OK, KNOWN), REQUEST, "peer", 0.0)
    assert len(caplog.records) == 500


def test_token_bucket_refills_at_its_rate() -> None:
    ticks = Ticks()
    bucket = TokenBucket(2, burst=2, clock=ticks)
    assert [bucket.take() for _ in range(3)] == [True, True, False]
    ticks.now += 0.5
    assert [bucket.take() for _ in range(2)] == [True, False]


@pytest.mark.parametrize(
    ("path", "logged"),
    [
        ("/v1/x?api_key=spk_abc", "/v1/x"),
        ("/v1/keys/spk_0123456789abcdefABCDEF/x", "/v1/keys/spk_<redacted>/x"),
        ("/" + "a" * 1000, "/" + "a" * 255),
    ],
)
def test_logged_paths_carry_no_secrets(path: str, logged: str) -> None:
    assert safe_path(path) == logged
