"""Rendering console pages: Jinja2 templates with autoescaping on, and the headers every page
carries (no caching — pages can show a secret once —, no framing, a CSP without inline
script or style)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.responses import HTMLResponse

from sidecar.core.scopes import SCOPES

# 'self' only: the one script (the copy button) and the stylesheet are static files; no inline
# script or style is allowed, and forms may post back only to this origin.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "Pragma": "no-cache",
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}

# One line per scope on what it allows (the Generate New Key and Register pages).
SCOPE_HELP = {
    "checks:read": "Read checks and their results.",
    "checks:write": "Create, change and delete checks.",
    "metrics:read": "Read metrics.",
    "metrics:write": "Submit metrics.",
    "dashboard:read": "Read dashboards.",
    "alerts:manage": "Create, change and silence alerts.",
    "keys:manage": "Create, replace and revoke API keys of the workspace.",
    "admin:full": "Everything in the workspace: every scope above, apps, members and the audit "
    "log. Give it only to keys that administer the workspace.",
}


def when(timestamp: float | None) -> str:
    """A time for people, in UTC (``2026-12-07 01:32 UTC``), or an empty string."""
    if not timestamp:
        return ""
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M UTC")


_env = Environment(
    loader=PackageLoader("sidecar.http.console", "templates"),
    autoescape=select_autoescape(default=True, default_for_string=True),
    trim_blocks=True,
    lstrip_blocks=True,
)
_env.globals.update(scopes_catalogue=SCOPES, scope_help=SCOPE_HELP)
_env.filters["when"] = when


def page(
    template: str,
    status: int = 200,
    headers: dict[str, str] | None = None,
    **context: Any,
) -> HTMLResponse:
    """A rendered page with the console's headers."""
    content = _env.get_template(template).render(**context)
    return HTMLResponse(content, status_code=status, headers={**PAGE_HEADERS, **(headers or {})})
