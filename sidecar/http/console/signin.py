"""Signing in to the console and out of it. The password check, its throttle and its audit
records are the authorization endpoint's (``AuthorizationEndpoint.sign_in``); the console only
adds the workspace field and its own session cookie."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from sidecar.core import validation
from sidecar.core.errors import SpauthError
from sidecar.http.client_address import Network, client_address
from sidecar.http.console import render
from sidecar.http.console.guard import (
    CSRF_REFUSED,
    SIGN_IN_PATH,
    Cookies,
    error_page,
    read_form,
)
from sidecar.http.console.sessions import COOKIE_NAME, PRE_COOKIE_NAME, ConsoleSessions
from sidecar.http.errors import request_id
from sidecar.oauth.authorization import AuthorizationEndpoint, SignInRefused

HOME_PATH = "/console"


class SignInPages:
    """GET/POST /console/signin and POST /console/signout."""

    def __init__(
        self,
        endpoint: AuthorizationEndpoint,
        sessions: ConsoleSessions,
        cookies: Cookies,
        trusted_proxies: Sequence[Network] = (),
    ) -> None:
        self._endpoint = endpoint
        self._trusted = trusted_proxies
        self._sessions = sessions
        self._cookies = cookies

    async def show(self, request: Request) -> Response:
        cookie = request.cookies.get(COOKIE_NAME, "")
        signed = await asyncio.to_thread(self._sessions.open, cookie) if cookie else None
        if signed is not None:
            return RedirectResponse(HOME_PATH, 303, headers=render.PAGE_HEADERS)
        pre = request.cookies.get(PRE_COOKIE_NAME, "")
        fresh = len(pre) < 32
        if fresh:
            pre = self._sessions.new_pre_session()
        response = await self._form(pre)
        if fresh:
            self._cookies.set(response, PRE_COOKIE_NAME, pre, max_age=None)
        return response

    async def submit(self, request: Request) -> Response:
        rid = request_id(request)
        pre = request.cookies.get(PRE_COOKIE_NAME, "")
        try:
            form = await read_form(request)
            if not await asyncio.to_thread(self._sessions.check_csrf, pre, form.get("csrf_token")):
                # Login CSRF: without the token bound to this browser's cookie, refuse (and
                # offer a fresh form, bound to a fresh cookie).
                pre = self._sessions.new_pre_session()
                refused = await self._form(
                    pre, error="The form expired. Sign in again.", status=403
                )
                self._cookies.set(refused, PRE_COOKIE_NAME, pre, max_age=None)
                return refused
            workspace = form.get("workspace").strip().lower()
            email = form.get("email")
            try:
                validation.workspace(workspace)
                member = await asyncio.to_thread(
                    self._endpoint.sign_in,
                    workspace,
                    email,
                    form.get("password"),
                    source=client_address(request, self._trusted),
                    request_id=rid,
                )
            except SignInRefused as exc:
                headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else None
                status = 429 if exc.retry_after else 401
                return await self._form(
                    pre,
                    workspace=workspace,
                    email=email,
                    error=exc.message,
                    status=status,
                    headers=headers,
                )
            cookie = await asyncio.to_thread(self._sessions.start, member)
        except SpauthError as exc:
            return error_page(exc, rid)
        # A fresh session id at sign-in (no fixation); 303 so a reload does not re-post.
        response = RedirectResponse(HOME_PATH, 303, headers=render.PAGE_HEADERS)
        self._cookies.set(response, COOKIE_NAME, cookie, max_age=self._cookies.idle)
        self._cookies.clear(response, PRE_COOKIE_NAME)
        return response

    async def sign_out(self, request: Request) -> Response:
        cookie = request.cookies.get(COOKIE_NAME, "")
        signed = await asyncio.to_thread(self._sessions.open, cookie) if cookie else None
        if signed is not None:
            try:
                form = await read_form(request)
                token = form.get("csrf_token")
            except SpauthError as exc:
                return error_page(exc, request_id(request))
            ok = await asyncio.to_thread(self._sessions.check_csrf, signed.session_id, token)
            if not ok:
                return render.page("error.html", 403, error=CSRF_REFUSED)
            await asyncio.to_thread(self._sessions.sign_out, signed, request_id(request))
        response = RedirectResponse(SIGN_IN_PATH, 303, headers=render.PAGE_HEADERS)
        self._cookies.clear(response, COOKIE_NAME)
        return response

    async def _form(
        self,
        pre: str,
        *,
        workspace: str = "",
        email: str = "",
        error: str = "",
        status: int = 200,
        headers: dict[str, str] | None = None,
    ) -> Response:
        csrf = await asyncio.to_thread(self._sessions.csrf_token, pre)
        return render.page(
            "signin.html",
            status,
            headers,
            csrf=csrf,
            workspace=workspace,
            email=email[:254],
            error=error,
        )
