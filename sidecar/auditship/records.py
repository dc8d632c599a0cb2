"""Decision records as the sidecar builds them on the Check path: ids and names only. The
query string is cut off the path (it is where clients put ``?api_key=``); the writer thread
also redacts anything credential-shaped before the record reaches disk."""

from __future__ import annotations

from sidecar.core.audit import AUTHZ_ALLOW, AUTHZ_DENY, AuditEvent, new_event_id

ANONYMOUS = "anonymous"
MAX_PATH = 512


def request_path(path: str) -> str:
    """The path without query or fragment, bounded in length."""
    cut = len(path)
    for sep in ("?", "#"):
        i = path.find(sep)
        if i != -1:
            cut = min(cut, i)
    return path[: min(cut, MAX_PATH)]


def decision_event(
    *,
    time: float,
    allowed: bool,
    reason: str,
    credential_id: str,
    workspace: str,
    method: str,
    path: str,
    source: str,
    decision_id: str,
    latency_s: float,
    extra: dict[str, str] | None = None,
) -> AuditEvent:
    """One ``authz.allow`` / ``authz.deny`` record. Its id is the decision id (the value sent
    upstream in x-statuspulse-decision-id), so a response and its record are joined by it."""
    return AuditEvent(
        id=decision_id or new_event_id(),
        time=time,
        actor=credential_id or ANONYMOUS,
        action=AUTHZ_ALLOW if allowed else AUTHZ_DENY,
        workspace=workspace,
        target=request_path(path),
        outcome="allow" if allowed else "deny",
        reason=reason,
        request_id=decision_id,
        metadata={
            "method": method,
            "source": source,
            "latency_us": str(round(latency_s * 1e6)),
            **(extra or {}),
        },
    )
