"""Schemathesis against a live control plane, over every operation of the served OpenAPI
document: bounded examples (valid and invalid input) per operation, every response checked
against the document, no 5xx; and every operation refuses a missing or a wrong key."""

from __future__ import annotations

import re
from collections.abc import Mapping

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

from tests.conftest import RunningControlPlane

EXAMPLES = 8  # per operation and mode: bounded, so the run stays short on two shared cores

# Headers that frame the message: a generated one (an empty Content-Length, say) makes the request
# malformed HTTP, which the HTTP server (uvicorn's h11) answers with its own plain-text 400 before
# any route or document applies. A generated header name that is not an RFC 9110 token does too.
_FRAMING = frozenset({"content-length", "transfer-encoding", "host", "connection"})
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def _malformed_http(headers: Mapping[str, str] | None) -> bool:
    """Whether these generated headers make the request malformed HTTP."""
    return any(name.lower() in _FRAMING or not _TOKEN.fullmatch(name) for name in (headers or {}))


WRONG_KEY = "spk_" + "A" * 38


@pytest.fixture
def live(control_plane: RunningControlPlane) -> tuple[str, schemathesis.BaseSchema]:
    base = f"http://127.0.0.1:{control_plane.plane.http_port}"
    schema = schemathesis.openapi.from_url(base + "/openapi.json")
    return base, schema


def _operations(schema: schemathesis.BaseSchema) -> list:  # type: ignore[type-arg]
    return [result.ok() for result in schema.get_all_operations()]


@pytest.mark.slow
def test_every_operation_conforms_and_never_fails_with_5xx(
    live: tuple[str, schemathesis.BaseSchema], control_plane: RunningControlPlane
) -> None:
    base, schema = live
    headers = {"authorization": f"Bearer {control_plane.operator_key}"}
    operations = _operations(schema)
    assert len(operations) >= 20
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @settings(
                max_examples=EXAMPLES,
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            @given(case=operation.as_strategy(generation_mode=mode))
            def run(case: schemathesis.Case) -> None:
                response = case.call(base_url=base, headers=headers)
                assert response.status_code < 500, (case.method, case.path, response.text)
                if _malformed_http(case.headers):
                    assert response.status_code == 400, (case.headers, response.text)
                    return
                # The document states types, not the domain's rules (a name must not be empty,
                # a scope must exist): a schema-valid request may still get a precise 400.
                case.validate_response(
                    response, headers=headers, excluded_checks=[positive_data_acceptance]
                )

            run()


def test_every_operation_refuses_a_missing_or_wrong_key(
    live: tuple[str, schemathesis.BaseSchema],
) -> None:
    base, schema = live
    with httpx.Client(base_url=base) as client:
        for operation in _operations(schema):
            path = operation.path.replace("{", "").replace("}", "")  # any value: auth is first
            for headers in ({}, {"authorization": f"Bearer {WRONG_KEY}"}):
                r = client.request(operation.method.upper(), path, headers=headers)
                assert r.status_code == 401, (operation.method, operation.path, r.text)
                assert r.json()["code"] == "unauthenticated"
