"""The console's routes on the control plane's HTTP port, under ``/console``."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import BaseRoute, Route

from sidecar.core.apikeys import ApiKeyService
from sidecar.core.apps import AppService
from sidecar.core.audit_trail import AuditTrail
from sidecar.core.clock import Clock
from sidecar.core.storage import Store
from sidecar.core.usage import UsageService
from sidecar.core.users import UserService
from sidecar.http.console.apps import AppPages
from sidecar.http.console.audit import AuditPages
from sidecar.http.console.guard import Cookies, Guard
from sidecar.http.console.keys import KeyPages
from sidecar.http.console.members import MemberPages
from sidecar.http.console.sessions import ConsoleSessions, SessionPolicy
from sidecar.http.console.signin import SignInPages
from sidecar.http.console.visit import Visit
from sidecar.oauth.server import AuthorizationServer
from sidecar.oauth.sessions import BrowserSessions

# The only files served from static/: nothing else is reachable by path.
STATIC = {"console.css": "text/css", "console.js": "text/javascript"}


@dataclass(frozen=True, slots=True)
class ConsoleServices:
    """The use cases the console calls: the admin API's, shared with its servicers."""

    keys: ApiKeyService
    usage: UsageService
    apps: AppService
    users: UserService
    audit: AuditTrail
    oauth: AuthorizationServer
    store: Store
    clock: Clock


async def _static(request: Request) -> Response:
    name = str(request.path_params["name"])
    if name not in STATIC:
        return PlainTextResponse("not found", 404)
    text = resources.files("sidecar.http.console").joinpath("static", name).read_text("utf-8")
    headers = {"Cache-Control": "max-age=300", "X-Content-Type-Options": "nosniff"}
    return Response(text, media_type=STATIC[name], headers=headers)


async def _home(visit: Visit) -> Response:
    return visit.render("home.html")


def console_routes(
    services: ConsoleServices, *, secure_cookies: bool, policy: SessionPolicy | None = None
) -> list[BaseRoute]:
    """Every console route. ``secure_cookies``: the console is served over HTTPS (the
    issuer is https:// or the HTTP port has TLS), so cookies get ``Secure``."""
    policy = policy or SessionPolicy()
    browser = BrowserSessions(services.store, services.clock, policy.absolute)
    sessions = ConsoleSessions(browser, services.clock, policy)
    cookies = Cookies(secure=secure_cookies, idle=policy.idle)
    trusted = services.oauth.config.trusted_proxies
    guard = Guard(sessions, cookies, trusted)
    signin = SignInPages(services.oauth.authorization, sessions, cookies, trusted)
    keys = KeyPages(services.keys, services.usage, services.clock)
    apps = AppPages(services.apps)
    members = MemberPages(services.users)
    audit = AuditPages(services.audit, services.users)
    get, post = ["GET"], ["POST"]
    return [
        Route("/console", guard(_home), methods=get),
        Route("/console/signin", signin.show, methods=get),
        Route("/console/signin", signin.submit, methods=post),
        Route("/console/signout", signin.sign_out, methods=post),
        Route("/console/static/{name}", _static, methods=get),
        Route("/console/keys", guard(keys.list), methods=get),
        Route("/console/keys/new", guard(keys.new), methods=get),
        Route("/console/keys/new", guard(keys.create), methods=post),
        Route("/console/keys/{key_id}", guard(keys.detail), methods=get),
        Route("/console/keys/{key_id}/replace", guard(keys.replace_form), methods=get),
        Route("/console/keys/{key_id}/replace", guard(keys.replace), methods=post),
        Route("/console/keys/{key_id}/revoke", guard(keys.revoke_form), methods=get),
        Route("/console/keys/{key_id}/revoke", guard(keys.revoke), methods=post),
        Route("/console/apps", guard(apps.list), methods=get),
        Route("/console/apps/new", guard(apps.new), methods=get),
        Route("/console/apps/new", guard(apps.register), methods=post),
        Route("/console/apps/{app_id}", guard(apps.show), methods=get),
        Route("/console/apps/{app_id}/rotate", guard(apps.rotate), methods=post),
        Route("/console/apps/{app_id}/delete", guard(apps.delete_form), methods=get),
        Route("/console/apps/{app_id}/delete", guard(apps.delete), methods=post),
        Route(
            "/console/apps/{app_id}/sessions/{grant_id}/revoke",
            guard(apps.revoke_session),
            methods=post,
        ),
        Route("/console/members", guard(members.list), methods=get),
        Route("/console/members", guard(members.add), methods=post),
        Route("/console/members/{user_id}/disable", guard(members.disable), methods=post),
        Route("/console/members/{user_id}/enable", guard(members.enable), methods=post),
        Route("/console/members/{user_id}/reset", guard(members.reset_form), methods=get),
        Route("/console/members/{user_id}/reset", guard(members.reset), methods=post),
        Route("/console/audit", guard(audit.list), methods=get),
        Route("/console/audit/export", guard(audit.export), methods=get),
    ]
