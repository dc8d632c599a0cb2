"""Route policy: which scopes each route needs, which routes are public, and how a request's
workspace is tied to the credential's. Parsed from TOML; everything unmatched is denied.

Example::

    [credentials]
    headers = ["authorization", "x-api-key"]   # where credentials are read, in order
    strip = true                               # never forward them upstream
    allow_operator_key = false                 # the operator key is denied on routes

    [[routes]]
    name = "read checks"
    methods = ["GET"]
    path = "/v1/workspaces/{workspace}/checks/**"
    scopes = ["checks:read"]

Path patterns: literal segments; ``{workspace}`` binds the request's workspace (it must equal the
credential's); ``{name}`` or ``*`` match one segment; a final ``**`` matches any rest (also none).
Optional per route: ``hosts``, ``context`` (Envoy ``context_extensions`` that must be present),
``workspace_header`` (take the workspace from a header instead of the path), ``public = true``.

Paths are matched only when canonical (sidecar.authz.paths: no dot-segments, no encoded ``.``,
``/`` or ``\\``, no backslash, no ``;``); others are refused with ``non_canonical_path`` before
any route is looked at. Hosts are compared in lower case without port or trailing dot.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field

from sidecar.authz.paths import canonical_host
from sidecar.core.scopes import SCOPES

METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE"}
)
_ROUTE_KEYS = frozenset(
    {"name", "methods", "path", "scopes", "hosts", "context", "workspace_header", "public"}
)
_SEGMENT_VAR = re.compile(r"\{([a-z_][a-z0-9_]*)\}")
_CACHE_LIMIT = 8192


class PolicyError(ValueError):
    """The policy file is invalid; the message names the line and the problem."""


@dataclass(frozen=True, slots=True)
class Route:
    """One compiled route."""

    name: str
    methods: frozenset[str] | None
    pattern: re.Pattern[str]
    scopes: tuple[str, ...]
    hosts: frozenset[str] | None = None
    context: tuple[tuple[str, str], ...] = ()
    workspace_header: str = ""
    public: bool = False
    binds_workspace: bool = False


@dataclass(frozen=True, slots=True)
class Match:
    """A route and the workspace the request names (if the route binds one)."""

    route: Route
    workspace: str | None


@dataclass
class Policy:
    """Compiled routes (first match wins) and credential settings."""

    routes: tuple[Route, ...]
    credential_headers: tuple[str, ...] = ("authorization", "x-api-key")
    strip_credentials: bool = True
    # The operator key (workspace ``*``) on a route: denied (operator_not_allowed) unless
    # explicitly allowed; allowed or not, its decisions are recorded in the operator chain.
    allow_operator_key: bool = False
    source: str = ""
    _cache: dict[tuple[str, str, str, tuple[tuple[str, str], ...]], Match | None] = field(
        default_factory=dict, repr=False
    )

    def match(
        self,
        method: str,
        path: str,
        host: str = "",
        context: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Match | None:
        """The first route matching the request, or None. ``path`` excludes the query."""
        ctx = tuple(sorted(context.items())) if context else ()
        key = (method, path, host, ctx)
        try:
            found = self._cache[key]
        except KeyError:
            found = self._match(method, path, canonical_host(host), dict(ctx))
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[key] = found
        if found is not None and found.route.workspace_header:
            value = (headers or {}).get(found.route.workspace_header, "")
            return Match(found.route, value)
        return found

    def _match(self, method: str, path: str, host: str, context: Mapping[str, str]) -> Match | None:
        for route in self.routes:
            if route.methods is not None and method not in route.methods:
                continue
            if route.hosts is not None and host not in route.hosts:
                continue
            if any(context.get(k) != v for k, v in route.context):
                continue
            m = route.pattern.fullmatch(path)
            if m is None:
                continue
            bound = route.binds_workspace and not route.workspace_header
            return Match(route, m.group("workspace") if bound else None)
        return None


def compile_path(pattern: str) -> tuple[re.Pattern[str], bool]:
    """A path pattern as a regex; the flag says whether it binds ``{workspace}``."""
    if not pattern.startswith("/"):
        raise ValueError(f"path {pattern!r} must start with '/'")
    segments = pattern.strip("/").split("/") if pattern != "/" else []
    parts: list[str] = []
    binds = False
    for i, segment in enumerate(segments):
        if segment == "**":
            if i != len(segments) - 1:
                raise ValueError(f"path {pattern!r}: '**' may only be the last segment")
            parts.append("(?:/.*)?")
            continue
        if segment == "*":
            parts.append("/[^/]+")
            continue
        var = _SEGMENT_VAR.fullmatch(segment)
        if var:
            if var.group(1) == "workspace":
                if binds:
                    raise ValueError(f"path {pattern!r}: '{{workspace}}' appears twice")
                binds = True
                parts.append("/(?P<workspace>[^/]+)")
            else:
                parts.append("/[^/]+")
            continue
        if "{" in segment or "}" in segment or "*" in segment:
            raise ValueError(f"path {pattern!r}: bad segment {segment!r}")
        parts.append("/" + re.escape(segment))
    regex = "".join(parts) or "/"
    if pattern.endswith("/") and pattern != "/" and not regex.endswith("?"):
        regex += "/"
    return re.compile(regex), binds


def _route_lines(text: str) -> list[int]:
    return [
        n
        for n, line in enumerate(text.splitlines(), start=1)
        if line.strip().replace(" ", "").startswith("[[routes]]")
    ]


def _strings(value: object, what: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{what} must be a list of strings")
    return value


def _route(raw: object) -> Route:
    if not isinstance(raw, dict):
        raise ValueError("a route must be a table")
    unknown = sorted(set(raw) - _ROUTE_KEYS)
    if unknown:
        raise ValueError(
            f"unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(_ROUTE_KEYS))}"
        )
    if "path" not in raw or not isinstance(raw["path"], str):
        raise ValueError("'path' is required and must be a string")
    name = raw.get("name", raw["path"])
    public = raw.get("public", False)
    if not isinstance(public, bool):
        raise ValueError("'public' must be true or false")
    methods = None
    if "methods" in raw:
        listed = [m.upper() for m in _strings(raw["methods"], "'methods'")]
        bad = sorted(set(listed) - METHODS - {"*"})
        if bad:
            raise ValueError(f"unknown method(s) {', '.join(bad)}")
        methods = None if "*" in listed else frozenset(listed)
    scopes = _strings(raw.get("scopes", []), "'scopes'")
    unknown_scopes = sorted(set(scopes) - set(SCOPES))
    if unknown_scopes:
        raise ValueError(
            f"unknown scope(s) {', '.join(unknown_scopes)}; valid: {', '.join(SCOPES)}"
        )
    if not scopes and not public:
        raise ValueError("a route needs 'scopes' or 'public = true'")
    if scopes and public:
        raise ValueError("a public route cannot require scopes")
    hosts = raw.get("hosts")
    context = raw.get("context", {})
    if not isinstance(context, dict) or not all(isinstance(v, str) for v in context.values()):
        raise ValueError("'context' must be a table of strings")
    workspace_header = raw.get("workspace_header", "")
    if not isinstance(workspace_header, str):
        raise ValueError("'workspace_header' must be a string")
    pattern, binds = compile_path(raw["path"])
    if binds and workspace_header:
        raise ValueError("use either '{workspace}' in the path or 'workspace_header', not both")
    return Route(
        name=str(name),
        methods=methods,
        pattern=pattern,
        scopes=tuple(scopes),
        hosts=frozenset(canonical_host(h) for h in _strings(hosts, "'hosts'")) if hosts else None,
        context=tuple(sorted(context.items())),
        workspace_header=workspace_header.lower(),
        public=public,
        binds_workspace=binds or bool(workspace_header),
    )


def parse_policy(text: str, source: str = "<policy>") -> Policy:
    """Parse and validate policy TOML; raise PolicyError naming the line and the problem."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"{source}: {exc}") from None
    unknown = sorted(set(data) - {"credentials", "routes"})
    if unknown:
        raise PolicyError(f"{source}: unknown top-level key(s) {', '.join(unknown)}")
    creds = data.get("credentials", {})
    try:
        headers = tuple(
            h.lower()
            for h in _strings(creds.get("headers", ["authorization", "x-api-key"]), "'headers'")
        )
        strip = creds.get("strip", True)
        if not isinstance(strip, bool):
            raise ValueError("'strip' must be true or false")
        operator = creds.get("allow_operator_key", False)
        if not isinstance(operator, bool):
            raise ValueError("'allow_operator_key' must be true or false")
        unknown_creds = sorted(set(creds) - {"headers", "strip", "allow_operator_key"})
        if unknown_creds:
            raise ValueError(f"unknown key(s) {', '.join(unknown_creds)}")
    except ValueError as exc:
        raise PolicyError(f"{source}: [credentials]: {exc}") from None
    raw_routes = data.get("routes", [])
    if not isinstance(raw_routes, list) or not raw_routes:
        raise PolicyError(f"{source}: no [[routes]]: every request would be denied")
    lines = _route_lines(text)
    routes = []
    for i, raw in enumerate(raw_routes):
        try:
            routes.append(_route(raw))
        except ValueError as exc:
            where = f"line {lines[i]}" if i < len(lines) else f"route #{i + 1}"
            raise PolicyError(f"{source}: {where} (route #{i + 1}): {exc}") from None
    return Policy(
        routes=tuple(routes),
        credential_headers=headers,
        strip_credentials=strip,
        allow_operator_key=operator,
        source=source,
    )
