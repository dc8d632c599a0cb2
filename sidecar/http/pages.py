"""Server-rendered pages of the authorization endpoint. Every value is HTML-escaped here; the
templates (``templates/*.html``) contain only markup and ``$placeholders``."""

from __future__ import annotations

import functools
import html
from importlib import resources
from string import Template
from urllib.parse import urlsplit

from starlette.responses import HTMLResponse

from sidecar.core.scopes import sort_scopes

# Pages must not be framed (clickjacking the consent button), cached or leak the URL.
PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "Pragma": "no-cache",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
    "frame-ancestors 'none'; base-uri 'none'",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}

SCOPE_TEXT = {
    "checks:read": "Read your checks",
    "checks:write": "Create, change and delete checks",
    "metrics:read": "Read metrics",
    "metrics:write": "Submit metrics",
    "dashboard:read": "Read dashboards",
    "alerts:manage": "Manage alerts",
    "keys:manage": "Manage API keys",
    "admin:full": "Full administrative access",
}


@functools.cache
def _template(name: str) -> Template:
    text = resources.files("sidecar.http").joinpath("templates", name).read_text("utf-8")
    return Template(text)


def _e(value: str) -> str:
    return html.escape(value, quote=True)


def hidden_fields(params: list[tuple[str, str]], csrf: str) -> str:
    fields = [("csrf_token", csrf), *params]
    return "\n".join(f'<input type="hidden" name="{_e(k)}" value="{_e(v)}">' for k, v in fields)


def _page(
    title: str, body: str, status: int, headers: dict[str, str] | None = None
) -> HTMLResponse:
    content = _template("page.html").substitute(title=_e(title), body=body)
    return HTMLResponse(content, status_code=status, headers={**PAGE_HEADERS, **(headers or {})})


def error_page(message: str, status: int = 400) -> HTMLResponse:
    body = (
        f'<p class="error">{_e(message)}</p><p class="muted">Return to the application and '
        "try again.</p>"
    )
    return _page("Cannot continue", body, status)


def sign_in_page(
    *,
    action: str,
    app_name: str,
    workspace: str,
    params: list[tuple[str, str]],
    csrf: str,
    email: str = "",
    error: str = "",
    status: int = 200,
    headers: dict[str, str] | None = None,
) -> HTMLResponse:
    body = _template("signin.html").substitute(
        action=_e(action),
        app_name=_e(app_name),
        workspace=_e(workspace),
        email=_e(email),
        error=f'<p class="error" role="alert">{_e(error)}</p>' if error else "",
        hidden=hidden_fields(params, csrf),
    )
    return _page("Sign in", body, status, headers)


def consent_page(
    *,
    action: str,
    app_name: str,
    workspace: str,
    email: str,
    scopes: frozenset[str],
    missing: list[str],
    redirect_uri: str,
    params: list[tuple[str, str]],
    csrf: str,
) -> HTMLResponse:
    items = "\n".join(
        f"<li>{_e(SCOPE_TEXT.get(s, s))} (<code>{_e(s)}</code>)</li>" for s in sort_scopes(scopes)
    )
    warning = ""
    if missing:
        warning = (
            '<p class="error">You do not hold '
            + ", ".join(f"<code>{_e(s)}</code>" for s in missing)
            + ": approving will fail.</p>"
        )
    body = _template("consent.html").substitute(
        action=_e(action),
        app_name=_e(app_name),
        workspace=_e(workspace),
        email=_e(email),
        scopes=items,
        warning=warning,
        redirect_host=_e(urlsplit(redirect_uri).netloc or redirect_uri),
        hidden=hidden_fields(params, csrf),
    )
    return _page(f"Authorize {app_name}", body, 200)
