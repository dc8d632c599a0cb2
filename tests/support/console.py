"""Helpers for the console tests: members seeded through the core use cases (as the operator),
and a plain HTTP client that signs in and posts forms with their CSRF token the way a browser
does."""

from __future__ import annotations

import re

import requests

from sidecar.controlplane import ControlPlane
from sidecar.core.models import OPERATOR_WORKSPACE, Principal, RequestContext
from sidecar.core.oauth_models import Member
from sidecar.core.scopes import ADMIN_FULL

PASSWORD = "correct horse battery staple"
OPERATOR = RequestContext(
    Principal("key_operator", OPERATOR_WORKSPACE, frozenset({ADMIN_FULL})), "req_seed"
)
_CSRF = re.compile(r'name="csrf_token" value="([^"]*)"')
_SECRET = re.compile(r'<p class="secret" id="new-key">([^<]+)</p>')


def add_member(
    plane: ControlPlane, email: str, scopes: list[str], workspace: str = "acme"
) -> Member:
    return plane.users.create(
        OPERATOR, workspace=workspace, email=email, password=PASSWORD, scopes=scopes
    )


def csrf_of(html: str) -> str:
    found = _CSRF.search(html)
    assert found, "the page has no CSRF token"
    return found.group(1)


def secret_of(html: str) -> str:
    found = _SECRET.search(html)
    assert found, "the page shows no new key"
    return found.group(1)


class ConsoleClient:
    """One browser-like session against ``base`` (``http://127.0.0.1:PORT``)."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.http = requests.Session()

    def get(self, path: str, **kwargs: object) -> requests.Response:
        return self.http.get(self.base + path, timeout=10, **kwargs)  # type: ignore[arg-type]

    def sign_in(
        self, email: str, workspace: str = "acme", password: str = PASSWORD
    ) -> requests.Response:
        page = self.get("/console/signin")
        data = {
            "csrf_token": csrf_of(page.text),
            "workspace": workspace,
            "email": email,
            "password": password,
        }
        return self.http.post(
            self.base + "/console/signin", data=data, allow_redirects=False, timeout=10
        )

    def submit(
        self, form_page: str, action: str, fields: list[tuple[str, str]]
    ) -> requests.Response:
        """GET ``form_page`` for its CSRF token, then POST ``fields`` to ``action``."""
        token = csrf_of(self.get(form_page).text)
        return self.post(action, [("csrf_token", token), *fields])

    def post(self, action: str, fields: list[tuple[str, str]]) -> requests.Response:
        return self.http.post(self.base + action, data=fields, allow_redirects=False, timeout=10)
