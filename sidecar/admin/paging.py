"""Cursor pagination for admin lists the use cases return whole (apps, members, sessions: at most
1000 each, newest first). The cursor is the (created_at, id) of the last item sent, so a page
starts right after it even when items were added or deleted in between."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Sequence
from typing import TypeVar

from sidecar.core.errors import InvalidArgument

T = TypeVar("T")
Key = tuple[float, str]
MAX_PAGE = 1000


def page(
    items: Sequence[T], key: Callable[[T], Key], page_size: int, page_token: str
) -> tuple[list[T], str]:
    """The page of ``items`` (newest first by ``key``) after ``page_token``, and the token
    of the next page ('' when this is the last). ``page_size`` 0 means every remaining item."""
    if not 0 <= page_size <= MAX_PAGE:
        raise InvalidArgument("page_size", f"must be between 0 (all) and {MAX_PAGE}")
    # Sorted here, not trusted from the store: its collation may order equal times' ids
    # differently from the comparison below.
    remaining = sorted(items, key=key, reverse=True)
    if page_token:
        after = _decode(page_token)
        remaining = [item for item in remaining if key(item) < after]
    size = page_size or len(remaining)
    chunk = remaining[:size]
    more = len(remaining) > size and bool(chunk)
    return chunk, _encode(key(chunk[-1])) if more else ""


def _encode(key: Key) -> str:
    raw = json.dumps([key[0], key[1]], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode(token: str) -> Key:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        created, ident = json.loads(raw)
    except (binascii.Error, ValueError, TypeError):
        raise InvalidArgument("page_token", "malformed page token") from None
    if not isinstance(created, int | float) or not isinstance(ident, str):
        raise InvalidArgument("page_token", "malformed page token")
    return float(created), ident
