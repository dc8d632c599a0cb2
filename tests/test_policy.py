"""Route policy: parsing, errors that name the line, matching and workspace binding."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.authz.policy import PolicyError, compile_path, parse_policy
from sidecar.authz.policy_source import default_policy_text

ROOT = Path(__file__).resolve().parent.parent


def test_shipped_example_is_the_packaged_default_and_valid() -> None:
    deploy = (ROOT / "deploy" / "policy" / "statuspulse-api.toml").read_text()
    assert deploy == default_policy_text()
    policy = parse_policy(deploy)
    names = {r.name for r in policy.routes}
    assert {
        "read checks",
        "write metrics",
        "read dashboards",
        "alerts",
        "workspace administration",
    } <= names


@pytest.mark.parametrize(
    ("method", "path", "route", "workspace"),
    [
        ("GET", "/healthz", "health", None),
        ("GET", "/v1/workspaces/acme/checks", "read checks", "acme"),
        ("GET", "/v1/workspaces/acme/checks/42/results", "read checks", "acme"),
        ("POST", "/v1/workspaces/acme/checks", "write checks", "acme"),
        ("DELETE", "/v1/workspaces/acme/alerts/7", "alerts", "acme"),
        ("GET", "/v1/workspaces/acme/admin/users", "workspace administration", "acme"),
        ("GET", "/v1/workspaces/acme", None, None),
        ("GET", "/v1/workspaces/acme/checksum", None, None),
        ("TRACE", "/v1/workspaces/acme/checks", None, None),
        ("GET", "/", None, None),
        ("GET", "", None, None),
    ],
)
def test_default_policy_matches(
    method: str, path: str, route: str | None, workspace: str | None
) -> None:
    match = parse_policy(default_policy_text()).match(method, path)
    if route is None:
        assert match is None
    else:
        assert match is not None
        assert match.route.name == route
        assert match.workspace == workspace


def test_workspace_from_header() -> None:
    policy = parse_policy(default_policy_text())
    match = policy.match(
        "POST", "/v1/ingest/metrics", headers={"x-statuspulse-workspace-id": "acme"}
    )
    assert match is not None
    assert match.workspace == "acme"
    missing = policy.match("POST", "/v1/ingest/metrics", headers={})
    assert missing is not None
    assert missing.workspace == ""


def test_hosts_and_context_extensions() -> None:
    policy = parse_policy(
        """
[[routes]]
path = "/a"
hosts = ["api.example.com"]
context = { service = "api" }
scopes = ["checks:read"]
"""
    )
    assert policy.match("GET", "/a", "api.example.com:443", {"service": "api"}) is not None
    assert policy.match("GET", "/a", "other.example.com", {"service": "api"}) is None
    assert policy.match("GET", "/a", "api.example.com", {}) is None


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[[routes]\npath='/a'", "line 1"),
        (
            "[[routes]]\npath = '/a'\nscopes = ['checks:reed']\n",
            "line 1 (route #1): unknown scope(s) checks:reed",
        ),
        (
            "[[routes]]\npath = '/a'\nscopes = ['checks:read']\n\n"
            "[[routes]]\npath = 'b'\npublic = true\n",
            "line 5 (route #2): path 'b' must start with '/'",
        ),
        ("[[routes]]\npath = '/a'\n", "needs 'scopes' or 'public = true'"),
        (
            "[[routes]]\npath = '/a'\nmethods = ['FETCH']\npublic = true\n",
            "unknown method(s) FETCH",
        ),
        ("[[routes]]\npath = '/a/**/b'\npublic = true\n", "'**' may only be the last"),
        ("[[routes]]\npath = '/a'\npublic = true\nsurprise = 1\n", "unknown key(s) surprise"),
        ("", "no [[routes]]"),
        ("[credentials]\nstrip = 'yes'\n[[routes]]\npath='/a'\npublic=true\n", "'strip'"),
    ],
)
def test_invalid_policies_name_line_and_problem(text: str, needle: str) -> None:
    with pytest.raises(PolicyError) as info:
        parse_policy(text, "p.toml")
    assert needle in str(info.value)
    assert str(info.value).startswith("p.toml")


def test_path_patterns() -> None:
    pattern, binds = compile_path("/v1/{workspace}/*/x/**")
    assert binds
    assert pattern.fullmatch("/v1/acme/anything/x")
    assert pattern.fullmatch("/v1/acme/anything/x/y/z")
    assert not pattern.fullmatch("/v1/acme/x")
    assert not pattern.fullmatch("/v1/acme/a/b/x")


def test_match_cache_is_bounded_and_correct() -> None:
    policy = parse_policy(default_policy_text())
    for i in range(10_000):
        match = policy.match("GET", f"/v1/workspaces/w{i}/checks")
        assert match is not None
        assert match.workspace == f"w{i}"
    assert len(policy._cache) <= 8192
