"""The compiled Check path (``check_path = "compiled"``): Envoy's Check decided in C straight from
the CheckRequest bytes when it can be decided exactly as the pure-Python path would, and by the
pure-Python path (``CheckHandler``, the reference) otherwise.

``_fastcheck.FastCheck`` (sidecar/dataplane/_fastcheck.c) walks the protobuf wire format to the
method, path, host, headers, context extensions and source address, checks the path is
canonical, matches the route from the policy compiled here, reads the credential from the
policy's credential headers, hashes it (SHA-256) and looks it up: an API key with
``replica.credential(digest)``, a bearer access token (two dots) with
``engine.cached_token(digest, now)`` — the identity of a token verified before, only while its
cached verification holds (not expired, its signing key still published, its grant and jti not
revoked) — and a token not cached is verified from here by ``engine.fresh_token`` (the engine's
own rule: verify, cache, revocation; a refusal is left to the pure-Python path). It answers from
the ResponseEncoder's templates with a new decision id spliced in, and a token verified for
this check with one build (``ResponseEncoder.build``), keeping nothing per identity. It
decides non-canonical paths, public routes, usable API keys or verified tokens without a per-key
rate or client networks (allow, no_route, operator_not_allowed,
workspace_mismatch, insufficient_scope), unknown API keys (well-formed, not in the replica:
unknown_credential) and keys it holds but refuses (revoked, suspended, expired — a replaced key
past its grace deadline), each counted by the failure limiter's own
``WindowRateLimiter.failed`` (against the source, and a refused key's id), called from C
exactly where ``Engine._failed`` calls it (``count_failures``), and the 429 of a source that
limiter blocked (before its credential is read, as ``Engine._decide`` answers it); all else —
a refused token, every other credential failure, a blocked key id, a replica
not ready, raw ``header_map``, anything outside printable ASCII, bytes protobuf might read
differently — goes to the pure-Python path. tests/test_fastcheck_differential.py runs both on
captured, generated and fuzzed requests (API keys and tokens) and requires byte-identical
answers and equal decisions and observer inputs (tests/test_fastcheck_unknown.py: unknown keys
up to the block they trip and after it; tests/test_fastcheck_refused.py: refused keys up to
their key id's block). With the sidecar's own observers (``observe_in_c``) every decision
it takes is observed in C too — its allows (API keys and tokens), a route's denials (no_route,
operator_not_allowed, workspace_mismatch, insufficient_scope), non-canonical paths, unknown and
refused keys, blocked sources: metrics tally, the decision record's spool payload, usage count,
the denial log line (``DenialLog.deny``), with the same results as the Python observers (same
spool bytes, /metrics text, usage reports, log lines; the usage tally then counts in the C
path's store, one bound).

The extension is optional: a wheel built without a compiler has none, and this module then
reports why (``unavailable()``) and the sidecar runs the pure-Python path."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from typing import Any

import grpc

from sidecar.auditship.observer import DecisionRecorder
from sidecar.auditship.records import fixed_part
from sidecar.authz.decision import Decision, Identity, Reason
from sidecar.authz.engine import CheckInput, Engine
from sidecar.authz.policy import Policy
from sidecar.core.clock import SystemClock
from sidecar.core.native import optional_module
from sidecar.dataplane.envoy_check import CheckHandler, parse_check_request
from sidecar.ops.denial_log import DenialLog
from sidecar.ops.metrics import INTERNAL_ERROR, DecisionMetrics
from sidecar.ratelimit import WindowRateLimiter
from sidecar.usage.tally import USED, UsageTally

log = logging.getLogger("sidecar.check")

_native, _IMPORT_ERROR = optional_module("sidecar.dataplane._fastcheck")

# The reasons the C path can decide, in the order of its D_* constants.
_REASONS = (
    Reason.OK,
    Reason.PUBLIC_ROUTE,
    Reason.NON_CANONICAL_PATH,
    Reason.NO_ROUTE,
    Reason.OPERATOR_NOT_ALLOWED,
    Reason.WORKSPACE_MISMATCH,
    Reason.INSUFFICIENT_SCOPE,
    Reason.UNKNOWN_CREDENTIAL,
    Reason.RATE_LIMITED,  # a blocked source
    Reason.REVOKED_CREDENTIAL,
    Reason.SUSPENDED_CREDENTIAL,
    Reason.EXPIRED_CREDENTIAL,
)
_REST = "(?:/.*)?"
_ONE = "/[^/]+"
_WORKSPACE = "/(?P<workspace>[^/]+)"
_perf_counter = time.perf_counter


def unavailable() -> str:
    """Why the compiled path cannot run here ('' when it can)."""
    return _IMPORT_ERROR


def path_tokens(pattern: re.Pattern[str]) -> tuple[tuple[int, bytes], ...] | None:
    """A route's compiled path regex (``policy.compile_path``) as the C matcher's tokens, or
    None if it is not exactly a regex compile_path makes (checked by rebuilding it)."""
    if _native is None or pattern.flags != re.UNICODE:
        return None
    text, i = pattern.pattern, 0
    tokens: list[tuple[int, bytes]] = []
    while i < len(text):
        for prefix, kind in ((_REST, _native.T_REST), (_WORKSPACE, _native.T_WORKSPACE)):
            if text.startswith(prefix, i):
                tokens.append((kind, b""))
                i += len(prefix)
                break
        else:
            if text.startswith(_ONE, i):
                tokens.append((_native.T_ONE, b""))
                i += len(_ONE)
                continue
            if text[i] != "/":
                return None
            literal, i = _literal(text, i + 1)
            tokens.append((_native.T_LIT, ("/" + literal).encode()))
    if _regex(tokens) != text or any(k == _native.T_REST for k, _ in tokens[:-1]):
        return None
    return tuple(tokens)


def _literal(text: str, i: int) -> tuple[str, int]:
    """A re.escape'd segment from ``text[i:]`` up to the next unescaped '/' or group."""
    out = []
    while i < len(text) and text[i] not in "/([":
        if text[i] == "\\" and i + 1 < len(text):
            i += 1
        out.append(text[i])
        i += 1
    return "".join(out), i


def _regex(tokens: list[tuple[int, bytes]]) -> str:
    parts = {_native.T_REST: _REST, _native.T_ONE: _ONE, _native.T_WORKSPACE: _WORKSPACE}
    return "".join(
        "/" + re.escape(lit.decode()[1:]) if kind == _native.T_LIT else parts[kind]
        for kind, lit in tokens
    )


def compile_policy(policy: Policy) -> tuple[Any, ...] | None:
    """``FastCheck.set_policy``'s arguments for ``policy``; None if a route's path is not one
    the C matcher reproduces exactly (every check then takes the pure-Python path)."""
    routes = []
    for route in policy.routes:
        tokens = path_tokens(route.pattern)
        if tokens is None:
            return None
        routes.append(
            (
                None if route.methods is None else tuple(m.encode() for m in route.methods),
                None if route.hosts is None else tuple(h.encode() for h in route.hosts),
                tuple((k.encode(), v.encode()) for k, v in route.context),
                tokens,
                route.public,
                route.binds_workspace,
                bool(route.workspace_header),
                route.scopes,
                " ".join(route.scopes),
            )
        )
    strip = policy.credential_headers if policy.strip_credentials else ()
    names = tuple(h.encode() for h in policy.credential_headers)
    return (policy, names, policy.allow_operator_key, tuple(routes), strip)


class FastCheckHandler:
    """Envoy's Check from the request's bytes: the C path's answer when it decides, else
    ``handler``'s (the pure-Python path). Its decisions reach the same observers with the same
    arguments as ``handler``'s. ``counts()`` says how many each path answered."""

    def __init__(self, handler: CheckHandler) -> None:
        if _native is None:
            raise RuntimeError(f"compiled check path unavailable: {_IMPORT_ERROR}")
        self.handler = handler
        engine = handler.engine
        limiter = engine.limiter
        if limiter is not None and not isinstance(limiter, WindowRateLimiter):
            raise RuntimeError("compiled check path: only with the built-in rate limiter")
        # Read, not called, on every check: a check from a blocked source is answered 429 in C
        # (count_failures below), one with a blocked key by the Python path.
        blocked = limiter.blocked_tables() if limiter is not None else ({}, {})
        encoder = handler.encoder

        def template(decision: Decision, strip: tuple[str, ...]) -> list[bytes] | bytes:
            pieces = encoder._template(decision, strip)
            return pieces if pieces is not None else encoder.build(decision, strip)

        self._native = _native.FastCheck(
            engine,
            engine.replica,
            engine.clock,
            *blocked,
            Decision,
            CheckInput,
            template,
            _REASONS,
            type(engine.clock) is SystemClock,
            engine.ids.uses_system_sources(),
            float(engine.max_staleness),
        )
        if _perf_counter is not time.perf_counter:  # a test's timer: both paths read it
            self._native.set_timer(_perf_counter)
        # An unknown key is decided in C and counted by the limiter's own method, the one
        # Engine._failed calls (one limiting rule, one set of counters).
        self._native.count_failures(limiter.failed if limiter is not None else None)
        # A token the cache does not hold is verified from here by the engine's rule and its
        # allow answered here (one build, no template, observed here): the Python path would
        # parse the request again, build its view and observe in Python (≈ 25 µs of a ≈ 130
        # µs cold check). A refusal is still the Python path's answer.
        self._native.verify_tokens(_fresh_tokens(engine), encoder.build)
        self._compiled_for: Policy | None = None
        self._compile()
        self.observed_in_c = observe_in_c(self._native, handler)

    def _compile(self) -> None:
        policy = self.handler.engine.policy
        compiled = compile_policy(policy)
        if compiled is not None:
            self._native.set_policy(*compiled)
        elif self._compiled_for is not policy:
            log.warning("policy not compiled for the C check path: checks take the Python path")
        self._compiled_for = policy

    def counts(self) -> tuple[int, int]:
        """(answered by the C path, fell back to the Python path) since start."""
        decided, fell_back = self._native.counts()
        return int(decided), int(fell_back)

    def observed(self) -> int:
        """How many of the checks the C path decided were also observed in C (0 unless
        ``observed_in_c``)."""
        return int(self._native.observed())

    def __call__(self, data: bytes, context: grpc.ServicerContext) -> bytes:
        handler = self.handler
        try:
            out = self._native(data)
        except Exception:
            log.exception("check failed")
            if handler.on_error is not None:
                handler.on_error(INTERNAL_ERROR, 0.0)
            context.abort(grpc.StatusCode.INTERNAL, "internal error")
        if out is None:
            if handler.engine.policy is not self._compiled_for:
                self._compile()
            return handler(parse_check_request(data), context)
        if out.__class__ is bytes:  # decided and observed in C
            return out
        response, decision, view, elapsed = out
        # As CheckHandler.__call__ tells its observers (kept inline: this runs on every check).
        try:
            for observe in handler.observers:
                observe(decision, view, view.source, elapsed)
        except Exception:
            if handler.on_error is not None:
                handler.on_error(INTERNAL_ERROR, 0.0)
            raise
        return response  # type: ignore[no-any-return]


# Digests of tokens ``Engine.fresh_token`` refused (or found cached but no longer usable),
# at most this many: their next checks go straight to the Python path.
_REFUSED_MAX = 4096


def _fresh_tokens(engine: Engine) -> Callable[[str, bytes, float], Identity | None]:
    """``engine.fresh_token`` for the C path, remembering the tokens it refused: a refusal is
    the Python path's answer, which verifies the token once more, so a refused token sent again
    (a replayed expired or revoked one) skips the first verification. Only digests are kept,
    and only which path answers depends on them, never what it answers; bounded (cleared when
    full)."""
    fresh_token = engine.fresh_token
    refused: set[bytes] = set()

    def verify(token: str, digest: bytes, now: float) -> Identity | None:
        if digest in refused:
            return None
        found = fresh_token(token, digest, now)
        if found is None:
            if len(refused) >= _REFUSED_MAX:
                refused.clear()
            refused.add(digest)
        return found

    return verify


# The observers the C path can stand in for, one of each at most. It observes every decision
# it takes: DenialLog.deny writes a denial's line; UsageTally counts a use for the reasons in
# its USED (an authenticated identity, its route refused or not), passed to C as one flag per
# reason.
_KNOWN = (DecisionMetrics, DenialLog, DecisionRecorder, UsageTally)


def observe_in_c(native: Any, handler: CheckHandler) -> bool:
    """Have the C path observe the decisions it takes — metrics tally, decision record, usage
    count, a denial's log line, in C — when ``handler.observers`` is exactly a set of the known
    ones: their counts and records join the Python path's (``CheckTally.add_source``,
    ``AuditQueue.use_store``, ``UsageTally.use_store``: the usage tally then counts the Python
    observer's uses in the same C store, under one bound). Any other observer (tracing, a
    test's) keeps every check's observers in Python, and so does a change to the list later
    (the C path compares it on every check). True when set up."""
    observers = tuple(handler.observers)
    kinds = [type(observer) for observer in observers]
    if any(kind not in _KNOWN for kind in kinds) or len(set(kinds)) != len(kinds):
        return False
    metrics = audit = usage = counting = denials = None
    for observer in observers:
        if isinstance(observer, DecisionMetrics):
            tally = observer.tally
            slots = tuple(observer.slot(r) for r in _REASONS)
            metrics = (slots, tally.bounds, tally.width)
        elif isinstance(observer, DenialLog):
            denials = observer
        elif isinstance(observer, DecisionRecorder):
            queue = observer.queue
            buffer = queue.store  # a second handler on this queue shares the first's buffer
            if not isinstance(buffer, _native.AuditBuffer):
                if queue.stats().accepted:
                    return False  # records queued already: they stay in the Python store
                buffer = _native.AuditBuffer(queue.capacity, queue.deny_limit)
            clock = observer.clock
            sample_all = queue.allow_sample_rate >= 1.0
            audit = (buffer, queue, sample_all, clock, type(clock) is SystemClock)
        elif isinstance(observer, UsageTally):
            counting, usage = observer, observer.store  # a second handler shares the first's
            if not isinstance(usage, _native.UsageCounts):
                if usage is not None:
                    return False
                usage = _native.UsageCounts(observer.max_entries)
    uses = None if usage is None else (usage, tuple(r in USED for r in _REASONS))
    native.observe_in_c(handler, observers, _observed, metrics, audit, uses, denials)
    if audit is not None and queue.store is not audit[0]:
        queue.use_store(audit[0])
    if counting is not None and usage is not None and counting.store is not usage:
        counting.use_store(usage)  # the Python observer's counts join the C path's, one bound
    for observer in observers:
        if isinstance(observer, DecisionMetrics):
            observer.tally.add_source(native.tally)
    return True


def _observed(decision: Decision) -> tuple[bytes, str] | None:
    """What the C path caches per reason and identity to observe its decisions (an API key's
    or a cached access token's): the record's fixed part and the usage key (UsageTally's: a
    token counts for its grant); None hands the identity's checks to the Python observers."""
    identity = decision.identity
    if identity is None:
        return fixed_part(decision), ""
    return fixed_part(decision), identity.grant_id or identity.id


CheckPathFn = Callable[[bytes, grpc.ServicerContext], bytes]


def check_path(handler: CheckHandler, wanted: str) -> tuple[str, CheckPathFn | None]:
    """The check path to run for the ``check_path`` setting: ("compiled", a raw-bytes handler)
    or ("python", None), logged once at start-up with the reason when compiled was asked for
    and cannot run."""
    if wanted == "compiled":
        if _native is None:
            log.warning(
                "check path: python (compiled path unavailable)", extra={"error": _IMPORT_ERROR}
            )
            return "python", None
        log.info("check path: compiled", extra={"check_path": "compiled"})
        return "compiled", FastCheckHandler(handler)
    log.info("check path: python", extra={"check_path": "python"})
    return "python", None
