"""GET and POST /oauth/authorize: the sign-in and consent pages (RFC 6749 §4.1.1-§4.1.2).

GET validates the request and shows the sign-in page, or the consent page when the browser's
session is signed in to the app's workspace. The forms POST back with the request's parameters
(re-validated every time), a CSRF token bound to the session cookie, and ``action`` =
``signin`` | ``approve`` | ``deny``."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from sidecar.core.errors import SpauthError
from sidecar.core.oauth_models import Member
from sidecar.http import pages
from sidecar.http.client_address import client_address
from sidecar.http.errors import request_id
from sidecar.http.forms import read_pairs
from sidecar.oauth.authorization import (
    REQUEST_PARAMS,
    AuthorizationRequest,
    PageError,
    RedirectError,
    SignInRefused,
)
from sidecar.oauth.errors import OAuth2Error
from sidecar.oauth.rfc8414 import AUTHORIZE_PATH
from sidecar.oauth.server import AuthorizationServer
from sidecar.oauth.sessions import COOKIE_NAME, new_session_id

log = logging.getLogger("sidecar.http")


class AuthorizePages:
    """The browser-facing half of the authorization endpoint."""

    def __init__(self, server: AuthorizationServer) -> None:
        self.server = server

    async def get(self, request: Request) -> Response:
        session_id = request.cookies.get(COOKIE_NAME, "")
        fresh = not session_id
        if fresh:
            session_id = new_session_id()
        params = list(request.query_params.multi_items())
        response = await self._guarded(self._show, request, params, session_id)
        if fresh:
            self._set_cookie(response, session_id, max_age=None)
        return response

    async def post(self, request: Request) -> Response:
        try:
            pairs = await read_pairs(request)
        except OAuth2Error:
            return pages.error_page("The form could not be read.")
        form = dict(pairs)
        session_id = request.cookies.get(COOKIE_NAME, "")
        csrf_ok = await asyncio.to_thread(
            self.server.sessions.check_csrf, session_id, form.get("csrf_token", "")
        )
        if not csrf_ok:
            # No redirect: without a valid CSRF token the request may come from another site.
            return pages.error_page(
                "Your session expired or the form did not come from this page.", 403
            )
        params = [(k, v) for k, v in pairs if k in REQUEST_PARAMS]
        action = form.get("action", "")
        if action == "signin":
            return await self._guarded(self._sign_in, request, params, session_id, form)
        if action in ("approve", "deny"):
            return await self._guarded(self._decide, request, params, session_id, action)
        return pages.error_page("Unknown action.")

    # -- steps ---------------------------------------------------------------------------------

    async def _show(
        self, request: Request, params: list[tuple[str, str]], session_id: str
    ) -> Response:
        auth = await asyncio.to_thread(self.server.authorization.validate, params)
        member = await self._member(session_id, auth)
        if member is None:
            return await self._sign_in_page(auth, session_id)
        missing = self.server.authorization.missing_scopes(auth, member)
        return pages.consent_page(
            action=AUTHORIZE_PATH,
            app_name=auth.app.name,
            workspace=auth.app.workspace,
            email=member.email,
            scopes=auth.scopes,
            missing=missing,
            redirect_uri=auth.redirect_uri,
            params=auth.form_params(),
            csrf=await asyncio.to_thread(self.server.sessions.csrf_token, session_id),
        )

    async def _sign_in(
        self,
        request: Request,
        params: list[tuple[str, str]],
        session_id: str,
        form: dict[str, str],
    ) -> Response:
        auth = await asyncio.to_thread(self.server.authorization.validate, params)
        email = form.get("email", "")
        try:
            member = await asyncio.to_thread(
                self.server.authorization.sign_in,
                auth.app.workspace,
                email,
                form.get("password", ""),
                source=client_address(request, self.server.config.trusted_proxies),
                request_id=request_id(request),
            )
        except SignInRefused as exc:
            headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else None
            return await self._sign_in_page(
                auth,
                session_id,
                email=email,
                error=exc.message,
                status=429 if exc.retry_after else 401,
                headers=headers,
            )
        # A new session id at sign-in, so a planted cookie never becomes a signed-in one.
        new_id = await asyncio.to_thread(self.server.sessions.start, member)
        await asyncio.to_thread(self.server.sessions.end, session_id)
        # 303: the browser fetches the consent page with GET.
        response = RedirectResponse(f"{AUTHORIZE_PATH}?{urlencode(auth.form_params())}", 303)
        self._set_cookie(response, new_id, max_age=self.server.config.session_ttl)
        return response

    async def _decide(
        self, request: Request, params: list[tuple[str, str]], session_id: str, action: str
    ) -> Response:
        auth = await asyncio.to_thread(self.server.authorization.validate, params)
        member = await self._member(session_id, auth)
        if member is None:
            return await self._sign_in_page(auth, session_id, error="Please sign in again.")
        endpoint = self.server.authorization
        decide = endpoint.approve if action == "approve" else endpoint.deny
        location = await asyncio.to_thread(decide, auth, member, request_id(request))
        return RedirectResponse(location, 303, headers=pages.PAGE_HEADERS)

    # -- helpers -------------------------------------------------------------------------------

    async def _guarded(
        self, step: Callable[..., Awaitable[Response]], request: Request, *args: object
    ) -> Response:
        """Run one step, turning its failures into a page or a redirect to the client."""
        try:
            return await step(request, *args)
        except PageError as exc:
            return pages.error_page(exc.message)
        except RedirectError as exc:
            # §4.1.2.1: errors go back to the verified redirect URI, with state unchanged.
            return RedirectResponse(exc.location, 303 if request.method == "POST" else 302)
        except SpauthError as exc:
            log.warning("authorize failed", extra={"code": exc.code})
            status = 503 if exc.code == "unavailable" else 500
            return pages.error_page("The service is temporarily unavailable.", status)

    async def _member(self, session_id: str, auth: AuthorizationRequest) -> Member | None:
        member = await asyncio.to_thread(self.server.sessions.member, session_id)
        if member is None or member.workspace != auth.app.workspace:
            return None
        return member

    async def _sign_in_page(
        self,
        auth: AuthorizationRequest,
        session_id: str,
        *,
        email: str = "",
        error: str = "",
        status: int = 200,
        headers: dict[str, str] | None = None,
    ) -> Response:
        return pages.sign_in_page(
            action=AUTHORIZE_PATH,
            app_name=auth.app.name,
            workspace=auth.app.workspace,
            params=auth.form_params(),
            csrf=await asyncio.to_thread(self.server.sessions.csrf_token, session_id),
            email=email,
            error=error,
            status=status,
            headers=headers,
        )

    def _set_cookie(self, response: Response, session_id: str, *, max_age: int | None) -> None:
        response.set_cookie(
            COOKIE_NAME,
            session_id,
            max_age=max_age,
            path="/oauth",
            httponly=True,
            samesite="lax",
            secure=self.server.config.secure_cookies,
        )
