"""Real OAuth credentials for the bench: a control plane process, an app and a member created
through the admin gRPC API, then authorization codes, access and refresh tokens obtained over
HTTP exactly as a client would (RFC 6749 §4.1 with PKCE S256, RFC 7636), sign-in and consent
forms included. Nothing is minted behind the server's back."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import secrets
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit

import grpc
import requests

from bench.cpu import off_server_prefix, taskset_prefix
from bench.sidecar_target import _admin_up
from bench.targets import TargetEnv, TargetError

_ROOT = Path(__file__).resolve().parent.parent
REDIRECT = "http://127.0.0.1:9/callback"  # loopback http is allowed (RFC 8252 §7.3)
EMAIL = "bench@acme.test"
PASSWORD = "correct horse battery staple"
SCOPE = "checks:read"  # what the policy needs for CHECKS (bench.sidecar_target)
AUTHORIZE = "/oauth/authorize"
TOKEN = "/oauth/token"
INTROSPECT = "/oauth/introspect"
FORM = "application/x-www-form-urlencoded"


@dataclass(frozen=True)
class ControlPlaneProc:
    """A running ``spauth control-plane``: admin gRPC, OAuth HTTP, its pid and the operator key."""

    admin: str
    http: str  # host:port
    issuer: str
    operator_key: str
    pid: int
    data: Path  # its data dir (the generated sync token is data / "sync-token")

    def url(self, path: str) -> str:
        """Absolute URL of an OAuth endpoint."""
        return f"http://{self.http}{path}"


@dataclass(frozen=True)
class Client:
    """A registered confidential app."""

    client_id: str
    secret: str

    def basic(self) -> str:
        """The ``Authorization`` value for client_secret_basic (RFC 6749 §2.3.1)."""
        raw = f"{self.client_id}:{self.secret}".encode()
        return "Basic " + base64.b64encode(raw).decode()


@dataclass(frozen=True)
class PendingCode:
    """An authorization code and the PKCE verifier that redeems it."""

    code: str
    verifier: str


def _http_up(http: str) -> str | None:
    """The issuer from RFC 8414 metadata, or None while the HTTP server is not up."""
    try:
        resp = requests.get(f"http://{http}/.well-known/oauth-authorization-server", timeout=1)
    except requests.RequestException:
        return None
    return str(resp.json()["issuer"]) if resp.ok else None


@contextlib.contextmanager
def control_plane(env: TargetEnv, name: str, *, pin: bool) -> Iterator[ControlPlaneProc]:
    """A control plane on a fresh SQLite file; ``pin`` puts it on the server CPUs (when it is what
    is measured); otherwise it is kept off them, as bench.sidecar_target does."""
    data = env.workdir / f"{name}-data"
    admin = f"127.0.0.1:{env.free_port()}"
    http = f"127.0.0.1:{env.free_port()}"
    argv = [env.python, "-m", "sidecar", "control-plane", "--data-dir", str(data),
            "--admin-addr", admin, "--http-addr", http]  # fmt: skip
    prefix = taskset_prefix(set(env.server_cpus)) if pin else off_server_prefix(env.server_cpus)
    log = (env.workdir / f"{name}.log").open("wb")
    proc = subprocess.Popen(
        [*prefix, *argv], stdout=log, stderr=subprocess.STDOUT, cwd=_ROOT, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 30
        key_file = data / "bootstrap-key"
        issuer = None
        while not key_file.exists() or not _admin_up(admin) or not (issuer := _http_up(http)):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise TargetError(f"control plane did not start; see {name}.log")
            time.sleep(0.1)
        yield ControlPlaneProc(admin, http, issuer, key_file.read_text().strip(), proc.pid, data)
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def register(cp: ControlPlaneProc) -> Client:
    """A confidential app allowed ``SCOPE``, and a member who can grant it."""
    from sidecar._gen.statuspulse.auth.v1 import oauth_pb2 as pb
    from sidecar._gen.statuspulse.auth.v1 import oauth_pb2_grpc as pb_grpc

    auth = (("authorization", f"Bearer {cp.operator_key}"),)
    with grpc.insecure_channel(cp.admin) as channel:
        app = pb_grpc.OAuthAppServiceStub(channel).RegisterOAuthApp(
            pb.RegisterOAuthAppRequest(
                workspace="acme",
                name="bench",
                redirect_uris=[REDIRECT],
                scopes=[SCOPE],
                confidential=True,
            ),
            metadata=auth,
            timeout=10,
        )
        pb_grpc.UserServiceStub(channel).CreateUser(
            pb.CreateUserRequest(workspace="acme", email=EMAIL, password=PASSWORD),
            metadata=auth,
            timeout=10,
        )
    return Client(app.app.client_id, app.client_secret)


class _HiddenFields(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.fields: list[tuple[str, str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "input" and a.get("type") == "hidden" and a.get("name"):
            self.fields.append((a["name"] or "", a.get("value") or ""))


def _hidden(html: str) -> list[tuple[str, str]]:
    parser = _HiddenFields()
    parser.feed(html)
    return parser.fields


def _pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode()).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def _code_from(resp: requests.Response, state: str) -> str:
    if resp.status_code != 303:
        raise TargetError(f"consent answered {resp.status_code}: {resp.text[:300]}")
    query = parse_qs(urlsplit(resp.headers["location"]).query)
    if query.get("state") != [state] or "code" not in query:
        raise TargetError(f"unexpected authorization response: {resp.headers['location']}")
    return query["code"][0]


class Browser:
    """A member's browser session: signs in once (scrypt is slow on purpose), then approves as
    many authorization requests as asked, each with its own PKCE pair and state."""

    def __init__(self, cp: ControlPlaneProc, client: Client) -> None:
        self._cp = cp
        self._client = client
        self._session = requests.Session()
        self._csrf = self._sign_in()

    def _params(self, challenge: str, state: str) -> list[tuple[str, str]]:
        return [
            ("response_type", "code"),
            ("client_id", self._client.client_id),
            ("redirect_uri", REDIRECT),
            ("scope", SCOPE),
            ("state", state),
            ("code_challenge", challenge),
            ("code_challenge_method", "S256"),
        ]

    def _sign_in(self) -> str:
        """Sign in and read the consent form's CSRF token (bound to the session)."""
        _, challenge = _pkce()
        params = self._params(challenge, "signin")
        page = self._session.get(self._cp.url(AUTHORIZE), params=params, allow_redirects=False)
        signin = [*_hidden(page.text), ("email", EMAIL), ("password", PASSWORD)]
        done = self._session.post(self._cp.url(AUTHORIZE), data=signin, allow_redirects=False)
        if done.status_code != 303:
            raise TargetError(f"sign-in answered {done.status_code}: {done.text[:300]}")
        consent = self._session.get(self._cp.url(done.headers["location"]), allow_redirects=False)
        csrf = dict(_hidden(consent.text)).get("csrf_token")
        if consent.status_code != 200 or not csrf:
            raise TargetError(f"no consent page ({consent.status_code}): {consent.text[:300]}")
        return csrf

    def approve(self) -> PendingCode:
        """One authorization request approved on the consent form: a fresh code."""
        verifier, challenge = _pkce()
        state = secrets.token_urlsafe(12)
        form = [*self._params(challenge, state), ("csrf_token", self._csrf), ("action", "approve")]
        resp = self._session.post(self._cp.url(AUTHORIZE), data=form, allow_redirects=False)
        return PendingCode(_code_from(resp, state), verifier)


def mint_codes(cp: ControlPlaneProc, client: Client, count: int, browsers: int = 4) -> list[str]:
    """``count`` codes, approved concurrently by a few signed-in browsers; returned as the
    pre-encoded token-request bodies that redeem them."""
    browsers = max(1, min(browsers, count // 100))  # each sign-in costs ~0.2 s of scrypt

    def batch(n: int) -> list[str]:
        browser = Browser(cp, client)
        return [exchange_body(browser.approve()) for _ in range(n)]

    sizes = [count // browsers + (1 if i < count % browsers else 0) for i in range(browsers)]
    with ThreadPoolExecutor(browsers) as pool:
        return [body for part in pool.map(batch, [s for s in sizes if s]) for body in part]


def exchange_body(code: PendingCode) -> str:
    """The form body of an authorization_code token request (RFC 6749 §4.1.3)."""
    return urlencode(
        {
            "grant_type": "authorization_code",
            "code": code.code,
            "redirect_uri": REDIRECT,
            "code_verifier": code.verifier,
        }
    )


def token_request(cp: ControlPlaneProc, client: Client, body: str) -> dict[str, object]:
    """POST /oauth/token once; the JSON answer, or TargetError."""
    resp = requests.post(
        cp.url(TOKEN),
        data=body,
        headers={
            "authorization": client.basic(),
            "content-type": FORM,
        },
        timeout=10,
    )
    if resp.status_code != 200:
        raise TargetError(f"token endpoint answered {resp.status_code}: {resp.text[:300]}")
    answer: dict[str, object] = resp.json()
    return answer


def access_token(cp: ControlPlaneProc) -> tuple[Client, dict[str, object]]:
    """Register, sign in, consent, exchange: a real token response (access + refresh)."""
    client = register(cp)
    (body,) = mint_codes(cp, client, 1, browsers=1)
    return client, token_request(cp, client, body)


__all__ = [
    "Browser",
    "Client",
    "ControlPlaneProc",
    "PendingCode",
    "access_token",
    "control_plane",
    "exchange_body",
    "mint_codes",
    "register",
    "token_request",
]
