"""Settings > OAuth Applications: register, rotate the client secret, list and revoke an app's
sessions (grants), delete. The same AppService use cases as the admin API."""

from __future__ import annotations

import asyncio

from starlette.responses import RedirectResponse, Response

from sidecar.core.apps import AppService
from sidecar.core.errors import InvalidArgument
from sidecar.core.permissions import require as require_admin
from sidecar.http.console import render
from sidecar.http.console.keys import choice
from sidecar.http.console.visit import Visit

APPS_PATH = "/console/apps"
OVERLAP_CHOICES = {"0": 0, "1h": 3600, "24h": 86400, "7d": 7 * 86400}
CLIENT_TYPES = {"confidential": True, "public": False}


class AppPages:
    """The OAuth application pages of the member's workspace."""

    def __init__(self, apps: AppService) -> None:
        self._apps = apps

    async def list(self, visit: Visit) -> Response:
        apps = await asyncio.to_thread(self._apps.list, visit.ctx, workspace=visit.workspace)
        return visit.render("apps.html", apps=apps)

    async def new(self, visit: Visit) -> Response:
        require_admin(visit.ctx.principal, visit.workspace)
        return visit.render("app_new.html")

    async def register(self, visit: Visit) -> Response:
        form = visit.form
        kind = form.get("client_type")
        if kind not in CLIENT_TYPES:
            raise InvalidArgument("client_type", "choose confidential or public")
        registered = await asyncio.to_thread(
            self._apps.register,
            visit.ctx,
            workspace=visit.workspace,
            name=form.get("name"),
            redirect_uris=form.get("redirect_uris").split(),
            scopes=form.getall("scopes"),
            confidential=CLIENT_TYPES[kind],
        )
        return visit.render("app_secret.html", registered=registered, rotated=False)

    async def show(self, visit: Visit) -> Response:
        app_id = visit.path_param("app_id")
        app = await asyncio.to_thread(self._apps.get, visit.ctx, app_id)
        sessions = await asyncio.to_thread(self._apps.sessions, visit.ctx, app_id)
        return visit.render(
            "app_detail.html", app=app, sessions=sessions, overlap_choices=list(OVERLAP_CHOICES)
        )

    async def rotate(self, visit: Visit) -> Response:
        registered = await asyncio.to_thread(
            self._apps.rotate_secret,
            visit.ctx,
            visit.path_param("app_id"),
            overlap=choice(OVERLAP_CHOICES, visit.form.get("overlap", "0"), "overlap"),
        )
        return visit.render("app_secret.html", registered=registered, rotated=True)

    async def revoke_session(self, visit: Visit) -> Response:
        app_id = visit.path_param("app_id")
        # The app is loaded first so a grant id can only be revoked through its own app's page.
        app = await asyncio.to_thread(self._apps.get, visit.ctx, app_id)
        grant_id = visit.path_param("grant_id")
        sessions = await asyncio.to_thread(self._apps.sessions, visit.ctx, app.id)
        if grant_id not in {s.grant.id for s in sessions}:
            raise InvalidArgument("grant_id", "not an active session of this application")
        await asyncio.to_thread(self._apps.revoke_session, visit.ctx, grant_id)
        return RedirectResponse(f"{APPS_PATH}/{app.id}", 303, headers=render.PAGE_HEADERS)

    async def delete_form(self, visit: Visit) -> Response:
        app = await asyncio.to_thread(self._apps.get, visit.ctx, visit.path_param("app_id"))
        return visit.render("app_delete.html", app=app)

    async def delete(self, visit: Visit) -> Response:
        if visit.form.get("confirm") != "yes":
            raise InvalidArgument("confirm", "tick the box to confirm the deletion")
        await asyncio.to_thread(self._apps.delete, visit.ctx, visit.path_param("app_id"))
        return RedirectResponse(APPS_PATH, 303, headers=render.PAGE_HEADERS)
