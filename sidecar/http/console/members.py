"""Members: list, add, disable, enable and reset a password (the UserService use cases of the
admin API; disabling or resetting ends the member's grants and browser sessions)."""

from __future__ import annotations

import asyncio

from starlette.responses import RedirectResponse, Response

from sidecar.core.errors import NotFound
from sidecar.core.oauth_models import Member
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

    async def disable(self, visit: Visit) -> Response:
        await asyncio.to_thread(self._users.disable, visit.ctx, visit.path_param("user_id"))
        return RedirectResponse(MEMBERS_PATH, 303, headers=render.PAGE_HEADERS)

    async def enable(self, visit: Visit) -> Response:
        await asyncio.to_thread(self._users.enable, visit.ctx, visit.path_param("user_id"))
        return RedirectResponse(MEMBERS_PATH, 303, headers=render.PAGE_HEADERS)

    async def reset_form(self, visit: Visit) -> Response:
        member = await self._member(visit)
        return visit.render("member_reset.html", target=member)

    async def reset(self, visit: Visit) -> Response:
        await asyncio.to_thread(
            self._users.reset_password,
            visit.ctx,
            visit.path_param("user_id"),
            visit.form.get("password"),
        )
        return RedirectResponse(MEMBERS_PATH, 303, headers=render.PAGE_HEADERS)

    async def _member(self, visit: Visit) -> Member:
        """The member named in the path, among those the caller may list (its workspace)."""
        user_id = visit.path_param("user_id")
        members = await asyncio.to_thread(self._users.list, visit.ctx, workspace=visit.workspace)
        for member in members:
            if member.id == user_id:
                return member
        raise NotFound(f"no member with id {user_id[:64]!r}")
