"""Reading ``application/x-www-form-urlencoded`` bodies strictly: bounded size, UTF-8, and no
repeated parameters (RFC 6749 §3.1, §3.2: "Request and response parameters MUST NOT be included
more than once")."""

from __future__ import annotations

from urllib.parse import parse_qsl

from starlette.requests import Request

from sidecar.oauth.errors import InvalidRequest

MAX_BODY = 64 * 1024
MAX_FIELDS = 50
FORM_TYPE = "application/x-www-form-urlencoded"


async def read_pairs(request: Request) -> list[tuple[str, str]]:
    """The body's parameters in order; raises InvalidRequest."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    # §3.2: the endpoints take parameters "using the application/x-www-form-urlencoded format".
    if content_type != FORM_TYPE:
        raise InvalidRequest(f"send the parameters as {FORM_TYPE}")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise InvalidRequest("request body too large")
    try:
        return parse_qsl(
            body.decode("utf-8"),
            keep_blank_values=True,
            strict_parsing=False,
            max_num_fields=MAX_FIELDS,
        )
    except (UnicodeDecodeError, ValueError):
        raise InvalidRequest("malformed form body") from None


def unique(pairs: list[tuple[str, str]]) -> dict[str, str]:
    """The parameters as a dict; a repeated name is an invalid_request."""
    out: dict[str, str] = {}
    for name, value in pairs:
        if name in out:
            raise InvalidRequest(f"repeated parameter {name[:40]}")
        out[name] = value
    return out
