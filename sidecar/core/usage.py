"""Credential usage: when an API key or an OAuth grant was last used and how often per day.

Sidecars count uses off the Check path and report them (``sidecar.usage``); this module is the
control plane's side: validating and storing reports (idempotent by report id), and answering
"when was this key last used?" for the admin API."""

from __future__ import annotations

import datetime
import enum
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sidecar.core import permissions
from sidecar.core.clock import Clock
from sidecar.core.errors import InvalidArgument
from sidecar.core.models import RequestContext

if TYPE_CHECKING:  # the store's Protocols name CredentialUse: import only for typing
    from sidecar.core.storage import Store

DAY = 86400
MAX_REPORT_ENTRIES = 10_000
MAX_USES = 1 << 40  # far above any sidecar's count in a report interval
DAILY_WINDOW_DAYS = 30
# Report ids are kept this long: a sidecar resends an unacknowledged report within minutes, so
# two days is ample, and the table stays at one row per report and sidecar for that long.
REPORT_ID_RETENTION = 2 * DAY
_REPORT_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_CREDENTIAL_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")


class UseKind(enum.StrEnum):
    """What a use counts: an API key (by key id) or an OAuth grant (by grant id)."""

    API_KEY = "api_key"
    OAUTH_GRANT = "oauth_grant"


@dataclass(frozen=True, slots=True)
class CredentialUse:
    """``uses`` requests authenticated by one credential on the UTC day of ``last_used_at``."""

    credential_id: str
    kind: UseKind
    uses: int
    last_used_at: int

    @property
    def day(self) -> int:
        return self.last_used_at // DAY


@dataclass(frozen=True, slots=True)
class UsageReport:
    """One sidecar report; ``id`` makes a resend harmless."""

    id: str
    uses: tuple[CredentialUse, ...]


@dataclass(frozen=True, slots=True)
class KeyUsage:
    """What the admin API shows of one credential's use."""

    last_used_at: int | None
    daily: list[tuple[int, int]]  # (epoch day, uses), oldest first


class UsageService:
    """Stores reports and answers usage questions. Only a sidecar principal (or the operator)
    may report: a workspace's key could otherwise make another workspace's key look used."""

    def __init__(self, store: Store, clock: Clock, *, retention_days: int = 90) -> None:
        self._store = store
        self._clock = clock
        self.retention_days = retention_days

    def report(self, ctx: RequestContext, report: UsageReport) -> bool:
        """Store ``report`` once; False when its id was stored before (a resend)."""
        permissions.require_operator_or_sidecar(ctx.principal, "report usage")
        checked = validate(report, self._clock.now())
        with self._store.transaction() as uow:
            return uow.usage.record(checked.id, checked.uses, int(self._clock.now()))

    def of(self, credential_id: str) -> KeyUsage:
        """Last use and daily counts over the last DAILY_WINDOW_DAYS of one credential. The
        caller has been allowed to see the credential already."""
        since = int(self._clock.now()) // DAY - DAILY_WINDOW_DAYS + 1
        with self._store.read() as uow:
            last = uow.usage.last_used([credential_id]).get(credential_id)
            daily = uow.usage.daily(credential_id, since)
        return KeyUsage(last, daily)

    def prune(self) -> int:
        """Drop daily counts older than the retention and report ids older than
        REPORT_ID_RETENTION; returns rows deleted."""
        now = int(self._clock.now())
        with self._store.transaction() as uow:
            return uow.usage.prune(now // DAY - self.retention_days, now - REPORT_ID_RETENTION)


def validate(report: UsageReport, now: float) -> UsageReport:
    """A report as the store may take it: well-formed ids, positive counts, times not in the
    future (a minute of clock skew allowed), and one entry per credential and day."""
    if not _REPORT_ID.fullmatch(report.id):
        raise InvalidArgument("report_id", "must be 1 to 64 of [A-Za-z0-9_-]")
    if len(report.uses) > MAX_REPORT_ENTRIES:
        raise InvalidArgument("uses", f"at most {MAX_REPORT_ENTRIES} entries per report")
    merged: dict[tuple[str, int], CredentialUse] = {}
    for use in report.uses:
        _check(use, now)
        key = (use.credential_id, use.day)
        seen = merged.get(key)
        merged[key] = use if seen is None else merge(seen, use)
    return UsageReport(report.id, tuple(merged.values()))


def merge(a: CredentialUse, b: CredentialUse) -> CredentialUse:
    """Two counts of one credential and day as one."""
    return CredentialUse(
        a.credential_id, a.kind, a.uses + b.uses, max(a.last_used_at, b.last_used_at)
    )


def _check(use: CredentialUse, now: float) -> None:
    if not _CREDENTIAL_ID.fullmatch(use.credential_id):
        raise InvalidArgument("uses.credential_id", "must be 1 to 128 of [A-Za-z0-9_-]")
    if not isinstance(use.kind, UseKind):
        raise InvalidArgument("uses.kind", "must be an API key or an OAuth grant")
    if not 1 <= use.uses <= MAX_USES:
        raise InvalidArgument("uses.uses", "must be positive")
    if not 0 < use.last_used_at <= now + 60:
        raise InvalidArgument("uses.last_use_time", "must be set and not in the future")


def format_day(day: int) -> str:
    """An epoch day as YYYY-MM-DD (UTC)."""
    return (datetime.date(1970, 1, 1) + datetime.timedelta(days=day)).isoformat()
