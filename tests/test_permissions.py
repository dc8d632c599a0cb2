"""The one admin permission rule (sidecar/core/permissions.py), and that it stays the only one."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from sidecar.core import permissions
from sidecar.core.errors import PermissionDenied
from sidecar.core.models import OPERATOR_WORKSPACE, Principal
from sidecar.core.scopes import ADMIN_FULL, KEYS_MANAGE

ROOT = Path(__file__).resolve().parent.parent
ADMIN = Principal("key_a", "acme", frozenset({ADMIN_FULL}))
KEYS = Principal("key_k", "acme", frozenset({KEYS_MANAGE}))
OPERATOR = Principal("key_o", OPERATOR_WORKSPACE, frozenset({ADMIN_FULL}))


@pytest.mark.parametrize(
    ("principal", "workspace", "scope", "allowed"),
    [
        (ADMIN, "acme", ADMIN_FULL, True),
        (ADMIN, "acme", KEYS_MANAGE, True),  # admin:full satisfies every scope
        (ADMIN, "globex", ADMIN_FULL, False),  # another tenant's workspace
        (KEYS, "acme", KEYS_MANAGE, True),
        (KEYS, "acme", ADMIN_FULL, False),
        (KEYS, "globex", KEYS_MANAGE, False),
        (OPERATOR, "globex", ADMIN_FULL, True),
        (OPERATOR, OPERATOR_WORKSPACE, KEYS_MANAGE, True),
    ],
)
def test_the_admin_permission_rule(
    principal: Principal, workspace: str, scope: str, allowed: bool
) -> None:
    if allowed:
        permissions.require(principal, workspace, scope)
    else:
        with pytest.raises(PermissionDenied):
            permissions.require(principal, workspace, scope)


def test_no_grant_beyond_the_callers_scopes() -> None:
    permissions.require_grantable(KEYS, {KEYS_MANAGE})
    with pytest.raises(PermissionDenied, match="checks:read"):
        permissions.require_grantable(KEYS, {KEYS_MANAGE, "checks:read"})


def test_permission_denied_is_raised_only_by_the_rule() -> None:
    """Keys, apps, members and audit call permissions.require; none re-types the rule."""
    raisers = []
    for path in sorted((ROOT / "sidecar" / "core").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Raise)
                and isinstance(node.exc, ast.Call)
                and isinstance(node.exc.func, ast.Name)
                and node.exc.func.id == "PermissionDenied"
            ):
                raisers.append(path.name)
    assert set(raisers) == {"permissions.py"}
