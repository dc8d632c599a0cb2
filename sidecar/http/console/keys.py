"""Settings > Security > API Access: the Key Manager. Every page calls the same ApiKeyService
(and, for a key's use, UsageService) use cases as the admin API, with the signed-in member as
the caller."""

from __future__ import annotations

import asyncio

from starlette.responses import RedirectResponse, Response

from sidecar.core.apikeys import DAY, ApiKeyService
from sidecar.core.clock import Clock
from sidecar.core.errors import InvalidArgument
from sidecar.core.models import ApiKey, KeyState
from sidecar.core.usage import DAILY_WINDOW_DAYS, KeyUsage, UsageService, format_day
from sidecar.http.console import render
from sidecar.http.console.visit import Visit

KEYS_PATH = "/console/keys"
# Choices offered on the forms, in seconds (the use cases enforce the policy's bounds).
EXPIRY_CHOICES = {"30": 30 * DAY, "90": 90 * DAY, "180": 180 * DAY, "365": 365 * DAY}
GRACE_CHOICES = {"0": 0, "1h": 3600, "24h": DAY, "7d": 7 * DAY}
STATES = {state.value: state for state in KeyState}


def choice(options: dict[str, int], value: str, field: str) -> int:
    if value not in options:
        raise InvalidArgument(field, f"choose one of {', '.join(options)}")
    return options[value]


class KeyPages:
    """List, generate, replace and revoke keys of the member's workspace."""

    def __init__(self, keys: ApiKeyService, usage: UsageService, clock: Clock) -> None:
        self._keys = keys
        self._usage = usage
        self._clock = clock

    def _key_and_usage(self, visit: Visit) -> tuple[ApiKey, KeyUsage]:
        """The key of the path and its use (last use, daily counts), as GetApiKey answers them."""
        key = self._keys.get(visit.ctx, visit.path_param("key_id"))
        return key, self._usage.of(key.id)

    def _key_and_last_use(self, visit: Visit) -> tuple[ApiKey, int | None]:
        """The key of the path and when it was last used, as GetApiKey answers them: the key
        use case checks the member may see the key before its usage is read."""
        key = self._keys.get(visit.ctx, visit.path_param("key_id"))
        return key, self._usage.of(key.id).last_used_at

    async def list(self, visit: Visit) -> Response:
        wanted = visit.query("state")
        if wanted and wanted not in STATES:
            raise InvalidArgument("state", f"choose one of {', '.join(STATES)}")
        page = await asyncio.to_thread(
            self._keys.list,
            visit.ctx,
            workspace=visit.workspace,
            state=STATES.get(wanted),
            page_token=visit.query("page_token"),
        )
        now = self._clock.now()
        # The listing use case reads each key's last use with the page (ListApiKeys shows it too).
        rows = [(key, key.state(now).value, page.last_used.get(key.id)) for key in page.items]
        return visit.render(
            "keys.html", rows=rows, state=wanted, states=list(STATES), next_token=page.next_token
        )

    async def detail(self, visit: Visit) -> Response:
        """One key: every field GetApiKey shows, and its uses per day over the usage window."""
        key, usage = await asyncio.to_thread(self._key_and_usage, visit)
        days = [(format_day(day), uses) for day, uses in reversed(usage.daily)]
        return visit.render(
            "key.html",
            key=key,
            key_state=key.state(self._clock.now()).value,
            last_used=usage.last_used_at,
            days=days,
            most=max((uses for _, uses in days), default=0),
            total=sum(uses for _, uses in days),
            window=DAILY_WINDOW_DAYS,
        )

    async def new(self, visit: Visit) -> Response:
        self._keys.require_manager(visit.ctx, visit.workspace)
        return visit.render("key_new.html", expiry_choices=list(EXPIRY_CHOICES))

    async def create(self, visit: Visit) -> Response:
        form = visit.form
        minted = await asyncio.to_thread(
            self._keys.create,
            visit.ctx,
            workspace=visit.workspace,
            name=form.get("name"),
            scopes=form.getall("scopes"),
            expires_in=choice(EXPIRY_CHOICES, form.get("expires_days", "90"), "expires_days"),
        )
        return visit.render("key_secret.html", minted=minted)

    async def replace_form(self, visit: Visit) -> Response:
        key, last_used = await asyncio.to_thread(self._key_and_last_use, visit)
        return visit.render(
            "key_replace.html", key=key, last_used=last_used, grace_choices=list(GRACE_CHOICES)
        )

    async def replace(self, visit: Visit) -> Response:
        minted = await asyncio.to_thread(
            self._keys.replace,
            visit.ctx,
            visit.path_param("key_id"),
            grace=choice(GRACE_CHOICES, visit.form.get("grace", "0"), "grace"),
        )
        return visit.render("key_secret.html", minted=minted)

    async def revoke_form(self, visit: Visit) -> Response:
        key, last_used = await asyncio.to_thread(self._key_and_last_use, visit)
        return visit.render("key_revoke.html", key=key, last_used=last_used)

    async def revoke(self, visit: Visit) -> Response:
        if visit.form.get("confirm") != "yes":
            raise InvalidArgument("confirm", "tick the box to confirm the revocation")
        await asyncio.to_thread(
            self._keys.revoke,
            visit.ctx,
            visit.path_param("key_id"),
            reason=visit.form.get("reason"),
        )
        # Post/redirect/get: the list is safe to reload (no secret on it).
        return RedirectResponse(KEYS_PATH, 303, headers=render.PAGE_HEADERS)
