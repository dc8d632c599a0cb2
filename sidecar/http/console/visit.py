"""One signed-in request to the console: who (the member, as the use cases' principal), the
request's form (POST), and rendering with the session's CSRF token."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import HTMLResponse

from sidecar.core.errors import InvalidArgument
from sidecar.core.models import RequestContext
from sidecar.core.oauth_models import Member
from sidecar.core.scopes import ADMIN_FULL, KEYS_MANAGE, satisfies
from sidecar.http.console import render


@dataclass(frozen=True, slots=True)
class Form:
    """A form body's fields; checkbox groups repeat a name, every other field must not."""

    pairs: Sequence[tuple[str, str]] = ()

    def get(self, name: str, default: str = "") -> str:
        values = self.getall(name)
        if len(values) > 1:
            raise InvalidArgument(name, "given more than once")
        return values[0] if values else default

    def getall(self, name: str) -> list[str]:
        return [v for k, v in self.pairs if k == name]


@dataclass(frozen=True, slots=True)
class Visit:
    """A signed-in request: the member, its request context and (for POST) its form."""

    request: Request
    member: Member
    ctx: RequestContext
    csrf: str
    form: Form = field(default_factory=Form)

    @property
    def workspace(self) -> str:
        return self.member.workspace

    def path_param(self, name: str) -> str:
        return str(self.request.path_params.get(name, ""))

    def query(self, name: str) -> str:
        """A query parameter (the first one; bounded, since it is echoed into the page)."""
        return self.request.query_params.get(name, "")[:200]

    def render(self, template: str, status: int = 200, **context: Any) -> HTMLResponse:
        return render.page(template, status, **self.common(), **context)

    def common(self) -> dict[str, Any]:
        """What the layout needs: the member, the CSRF token and which sections to show (the
        use cases decide what is allowed; this only hides links that would be refused)."""
        return {
            "member": self.member,
            "csrf": self.csrf,
            "can_keys": satisfies(self.member.scopes, KEYS_MANAGE),
            "can_admin": satisfies(self.member.scopes, ADMIN_FULL),
        }
