"""Members: list and add (the UserService use cases of the admin API)."""

from __future__ import annotations

import asyncio

from starlette.responses import RedirectResponse, Response

from sidecar.core.users import DEFAULT_MEMBER_SCOPES, UserService
from sidecar.http.console import render
from sidecar.http.console.visit import Visit

MEMBERS_PATH = "/console/members"


class MemberPages:
    """The member pages of the member's workspace."""

    def __init__(self, users: UserService) -> None:
        self._users = users

    async def list(self, visit: Visit) -> Response:
        members = await asyncio.to_thread(self._users.list, visit.ctx, workspace=visit.workspace)
        return visit.render("members.html", members=members, default_scopes=DEFAULT_MEMBER_SCOPES)

    async def add(self, visit: Visit) -> Response:
        form = visit.form
        await asyncio.to_thread(
            self._users.create,
            visit.ctx,
            workspace=visit.workspace,
            email=form.get("email"),
            password=form.get("password"),
            scopes=form.getall("scopes") or None,
        )
        return RedirectResponse(MEMBERS_PATH, 303, headers=render.PAGE_HEADERS)
