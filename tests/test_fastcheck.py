"""The compiled Check path in the sidecar: chosen by ``check_path``, answering over a real gRPC
server, its decisions counted in the same metrics; the Python path when the extension cannot
be imported (logged once); route patterns compiled only when the C matcher reproduces them.
Byte-for-byte equality with the Python path is tests/test_fastcheck_differential.py."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import grpc
import pytest
from prometheus_client import generate_latest

from sidecar.authz.policy import compile_path
from sidecar.authz.policy_source import load_policy
from sidecar.config import ConfigError, load_sidecar_settings
from sidecar.dataplane.fastcheck import compile_policy, path_tokens, unavailable
from tests.conftest import RunningControlPlane, wait_until
from tests.support.ops import bearer, call_check, check_request, create_key

ROOT = Path(__file__).resolve().parents[1]
CHECKS = "/v1/workspaces/acme/checks"
built = pytest.mark.skipif(bool(unavailable()), reason=f"not built: {unavailable()}")


@built
def test_the_compiled_path_answers_over_grpc_and_counts_its_decisions(
    control_plane: RunningControlPlane, sidecar_factory: object
) -> None:
    sc = sidecar_factory(check_path="compiled")  # type: ignore[operator]
    assert sc.check_path == "compiled"
    secret, _ = create_key(control_plane.address, control_plane.operator_key, ["checks:read"])
    wait_until(lambda: call_check(sc.port, check_request(CHECKS, bearer(secret))).status.code == 0)
    denied = call_check(sc.port, check_request("/v1/workspaces/acme/keys", bearer(secret)))
    assert denied.status.code == 7 and denied.denied_response.status.code == 403
    unknown = call_check(sc.port, check_request(CHECKS, bearer("spk_nope")))
    assert unknown.denied_response.status.code == 401  # answered by the Python path
    with grpc.insecure_channel(f"127.0.0.1:{sc.port}") as channel:
        garbage = channel.unary_unary("/envoy.service.auth.v3.Authorization/Check")
        with pytest.raises(grpc.RpcError) as info:
            garbage(b"\xff\xff\xff", timeout=5)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    decided, fell_back = sc.fast_check.counts()
    assert decided >= 2 and fell_back >= 2
    text = generate_latest(sc.metrics.registry).decode()
    assert re.search(r'spauth_decisions_total\{outcome="allow",reason="ok"\} [1-9]', text)
    assert re.search(r'reason="insufficient_scope"\} 1\.0', text)


def test_the_compiled_path_is_the_default_and_python_can_be_chosen(
    sidecar_factory: object,
) -> None:
    sc = sidecar_factory(wait=False)  # type: ignore[operator]
    assert sc.check_path == "compiled" and sc.fast_check is not None
    sc = sidecar_factory(wait=False, check_path="python")  # type: ignore[operator]
    assert sc.check_path == "python" and sc.fast_check is None


def test_check_path_is_validated() -> None:
    with pytest.raises(ConfigError, match="check_path"):
        load_sidecar_settings({"check_path": "fast"}, environ={})


def test_an_extension_that_cannot_be_imported_leaves_the_python_path() -> None:
    # A real ImportError (the module blocked in sys.modules), in a fresh interpreter.
    code = textwrap.dedent(
        """
        import logging, sys
        sys.modules["sidecar.dataplane._fastcheck"] = None
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
        from bench.overhead import _engine
        from sidecar.core import keyformat
        from sidecar.dataplane.envoy_check import CheckHandler
        from sidecar.dataplane.fastcheck import check_path, unavailable
        assert "_fastcheck" in unavailable()
        print(check_path(CheckHandler(_engine(keyformat.mint_key())), "compiled"))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "('python', None)"
    assert done.stderr.count("check path: python (compiled path unavailable)") == 1


@built
def test_route_patterns_compile_only_when_reproduced_exactly() -> None:
    for pattern in ("/", "/a/", "/v1/{workspace}/x/*/{id}/**", "/a b/c+d (e)/[f]/**", "/a//b"):
        regex, _ = compile_path(pattern)
        assert path_tokens(regex) is not None, pattern
    assert path_tokens(re.compile("/a.*")) is None
    assert path_tokens(re.compile("/a", re.IGNORECASE)) is None
    assert path_tokens(re.compile("/x(?:/.*)?/y")) is None
    assert compile_policy(load_policy(None)) is not None
