"""The one admin permission rule, used by keys, apps, members, webhooks and the audit trail: a
caller acts in its own workspace (the operator key in every workspace) and needs the call's scope
there; another workspace's records, looked up by id, do not exist for it (``visible``)."""

from __future__ import annotations

from collections.abc import Iterable

from sidecar.core.errors import PermissionDenied
from sidecar.core.models import Principal
from sidecar.core.scopes import ADMIN_FULL, satisfies


def acts_in(principal: Principal, workspace: str) -> bool:
    """Whether ``principal`` acts in ``workspace``: its own, or any for the operator."""
    return principal.is_operator or principal.workspace == workspace


def visible(principal: Principal, workspace: str) -> bool:
    """Whether a record of ``workspace`` exists for ``principal`` at all. Looked up by id, another
    workspace's key, app, member or webhook answers "not found", exactly as a missing one does
    (GitHub's rule for private resources): a "permission denied" would confirm to a tenant that
    the id exists elsewhere. Inside its workspace a caller lacking the scope is still told so."""
    return acts_in(principal, workspace)


def require(principal: Principal, workspace: str, scope: str = ADMIN_FULL) -> None:
    """Raise PermissionDenied unless ``principal`` may act in ``workspace`` with ``scope``."""
    if not acts_in(principal, workspace):
        raise PermissionDenied(
            f"key {principal.key_id} acts only in workspace {principal.workspace!r}"
        )
    if not satisfies(principal.scopes, scope):
        raise PermissionDenied(f"this call needs scope {scope!r}")


def require_grantable(principal: Principal, scopes: Iterable[str], verb: str = "grant") -> None:
    """A caller can never mint, replace or revoke a key with a scope it does not hold."""
    missing = sorted(s for s in scopes if not satisfies(principal.scopes, s))
    if missing:
        raise PermissionDenied(
            f"cannot {verb} scopes the caller does not hold: {', '.join(missing)}"
        )


def require_operator(principal: Principal) -> None:
    """Server-wide settings (e.g. the signing keys) are the operator's alone."""
    if not principal.is_operator or not satisfies(principal.scopes, ADMIN_FULL):
        raise PermissionDenied("this call needs the operator key (workspace '*', admin:full)")


def require_operator_or_sidecar(principal: Principal, action: str) -> None:
    """What sidecars report (usage) only they or the operator may write: a workspace's key could
    otherwise make another workspace's key look used."""
    if not principal.is_operator:
        raise PermissionDenied(f"only a sidecar or the operator key may {action}")


def require_sidecar(principal: Principal, sidecar: Principal, what: str) -> None:
    """What only sidecars write (decision records): the sync token's principal, never a key
    (a tenant would write records under decision ids it read)."""
    if principal != sidecar:
        raise PermissionDenied(f"{what} are written by sidecars (the sync token)")
