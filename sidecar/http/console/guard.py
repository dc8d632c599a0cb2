"""The seam every signed-in console page goes through: open the session (idle and absolute
expiry), check the CSRF token of a POST, build the member's request context, run the page, and
map domain errors to an error page once (``errors.console_error``)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from sidecar.core.errors import InvalidArgument, SpauthError
from sidecar.core.models import RequestContext
from sidecar.http.client_address import Network, client_address
from sidecar.http.console import render
from sidecar.http.console.errors import console_error
from sidecar.http.console.sessions import COOKIE_NAME, ConsoleSessions
from sidecar.http.console.visit import Form, Visit
from sidecar.http.errors import request_id
from sidecar.http.forms import read_pairs
from sidecar.oauth.errors import OAuth2Error

log = logging.getLogger("sidecar.console")
SIGN_IN_PATH = "/console/signin"
COOKIE_PATH = "/console"

Page = Callable[[Visit], Awaitable[Response]]


@dataclass(frozen=True, slots=True)
class Cookies:
    """How console cookies are set: HttpOnly, SameSite=Strict, Secure when served over HTTPS."""

    secure: bool
    idle: int

    def set(self, response: Response, name: str, value: str, max_age: int | None) -> None:
        response.set_cookie(
            name,
            value,
            max_age=max_age,
            path=COOKIE_PATH,
            httponly=True,
            samesite="strict",
            secure=self.secure,
        )

    def clear(self, response: Response, name: str) -> None:
        response.delete_cookie(
            name, path=COOKIE_PATH, httponly=True, samesite="strict", secure=self.secure
        )


def error_page(exc: SpauthError, rid: str, common: dict[str, Any] | None = None) -> Response:
    err = console_error(exc, rid)
    log.info("console request refused", extra={"code": err.code, "request_id": rid})
    return render.page("error.html", err.status, error=err, **(common or {}))


class Guard:
    """Wraps page functions into Starlette endpoints."""

    def __init__(
        self,
        sessions: ConsoleSessions,
        cookies: Cookies,
        trusted_proxies: Sequence[Network] = (),
    ) -> None:
        self.sessions = sessions
        self.cookies = cookies
        self._trusted = trusted_proxies

    def __call__(self, page: Page) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            rid = request_id(request)
            cookie = request.cookies.get(COOKIE_NAME, "")
            signed = await asyncio.to_thread(self.sessions.open, cookie) if cookie else None
            if signed is None:
                response = self._signed_out(request, rid)
                if cookie:
                    self.cookies.clear(response, COOKIE_NAME)
                return response
            visit = Visit(
                request=request,
                member=signed.member,
                ctx=RequestContext(
                    signed.member.principal(), rid, client_address(request, self._trusted)
                ),
                csrf=await asyncio.to_thread(self.sessions.csrf_token, signed.session_id),
            )
            response = await self._run(page, visit, signed.session_id)
            self.cookies.set(response, COOKIE_NAME, signed.cookie, self.cookies.idle)
            return response

        return endpoint

    async def _run(self, page: Page, visit: Visit, session_id: str) -> Response:
        rid = visit.ctx.request_id
        try:
            if visit.request.method == "POST":
                form = await read_form(visit.request)
                ok = await asyncio.to_thread(
                    self.sessions.check_csrf, session_id, form.get("csrf_token")
                )
                if not ok:
                    return render.page("error.html", 403, error=CSRF_REFUSED, **visit.common())
                visit = Visit(visit.request, visit.member, visit.ctx, visit.csrf, form)
            return await page(visit)
        except SpauthError as exc:
            return error_page(exc, rid, visit.common())
        except Exception:
            log.exception("console page failed", extra={"request_id": rid})
            return error_page(SpauthError("internal"), rid, visit.common())

    def _signed_out(self, request: Request, rid: str) -> Response:
        if request.method == "GET":
            return RedirectResponse(SIGN_IN_PATH, 303, headers=render.PAGE_HEADERS)
        return render.page("error.html", 401, error=SESSION_ENDED)


async def read_form(request: Request) -> Form:
    """The POST body as a Form; a malformed body is an InvalidArgument."""
    try:
        return Form(await read_pairs(request))
    except OAuth2Error as exc:
        raise InvalidArgument("form", exc.description or "malformed form body") from None


@dataclass(frozen=True, slots=True)
class _Notice:
    status: int
    code: str
    message: str


CSRF_REFUSED = _Notice(403, "csrf", "The form did not come from this console page. Reload it.")
SESSION_ENDED = _Notice(401, "session_ended", "Your session ended. Sign in again.")
