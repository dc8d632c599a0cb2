"""The console in a real browser: Debian's headless Chromium driven by Selenium through
chromedriver, against a real control plane and a real sidecar (gRPC ext_authz Check). The flow
a workspace owner follows: sign in with the keyboard, generate a key and read it off the page,
use it through the sidecar (the Key Manager then shows when it was last used), create a
replacement, revoke the old key (the sidecar denies it), register an app, revoke a member's
session, add and disable members; and a member without keys:manage cannot reach the Key Manager.

Set CONSOLE_SCREENSHOTS=docs/console to refresh the screenshots that docs/console.md shows."""

from __future__ import annotations

import base64
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from authlib.common.security import generate_token
from authlib.integrations.requests_client import OAuth2Session

from sidecar.dataplane.process import Sidecar
from sidecar.http.console.render import when
from tests.conftest import RunningControlPlane
from tests.support.console import OPERATOR, PASSWORD, ConsoleClient, add_member
from tests.support.ops import bearer, call_check, check_request, wait_until

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
REDIRECT = "http://127.0.0.1:9/callback"
CHECKS = "/v1/workspaces/acme/checks/web"

pytestmark = pytest.mark.skipif(
    not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()),
    reason="Debian's chromium and chromium-driver are not installed",
)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1280,900",
        f"--user-data-dir={tmp_path / 'chromium'}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(CHROMEDRIVER))
    driver.implicitly_wait(5)
    yield driver
    driver.quit()


class Shots:
    """Full-page screenshots: always into tmp_path, and into CONSOLE_SCREENSHOTS when set."""

    def __init__(self, driver: WebDriver, tmp: Path) -> None:
        self.driver = driver
        self.dirs = [tmp]
        if os.environ.get("CONSOLE_SCREENSHOTS"):
            self.dirs.append(Path(os.environ["CONSOLE_SCREENSHOTS"]))

    def __call__(self, name: str) -> None:
        # DevTools' capture beyond the viewport: the whole page, whatever its height.
        size = self.driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
        clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
        shot = self.driver.execute_cdp_cmd(
            "Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "clip": clip}
        )
        data = base64.b64decode(shot["data"])
        for d in self.dirs:
            d.mkdir(parents=True, exist_ok=True)
            (d / f"console-{name}.png").write_bytes(data)


def showing(driver: WebDriver, text: str) -> None:
    """Wait for the page the last click loads to show ``text``."""

    def shown() -> bool:
        try:
            return text in driver.find_element(By.TAG_NAME, "body").text
        except StaleElementReferenceException:
            return False  # the old page's body, replaced while we read it: still loading

    wait_until(shown, what=text)


def check_status(port: int, secret: str) -> int:
    return int(call_check(port, check_request(CHECKS, bearer(secret))).status.code)


def assert_fields_labelled(driver: WebDriver) -> None:
    """Every visible form control has a <label for=...> or an aria-label."""
    unlabelled = driver.execute_script(
        """
        return [...document.querySelectorAll('input, select, textarea')]
          .filter(e => e.type !== 'hidden')
          .filter(e => !(e.id && document.querySelector(`label[for="${e.id}"]`))
                       && !e.getAttribute('aria-label'))
          .map(e => e.name);
        """
    )
    assert unlabelled == [], unlabelled


def sign_in_with_keyboard(driver: WebDriver, base: str, email: str) -> None:
    driver.get(base + "/console/signin")
    field = driver.find_element(By.ID, "workspace")
    field.click()
    field.send_keys("acme", Keys.TAB, email, Keys.TAB, PASSWORD, Keys.ENTER)
    wait_until(lambda: urlsplit(driver.current_url).path == "/console", what="signed in")


def open_grant(base: str, client_id: str, client_secret: str, email: str) -> None:
    """A member signs in at the authorization endpoint and approves; the app redeems the code
    (a real grant: an "active session" of the app)."""
    client = OAuth2Session(
        client_id,
        client_secret,
        scope="dashboard:read",
        redirect_uri=REDIRECT,
        code_challenge_method="S256",
    )
    verifier = generate_token(48)
    url, _ = client.create_authorization_url(base + "/oauth/authorize", code_verifier=verifier)
    http = requests.Session()
    page = http.get(url, timeout=10)
    hidden = re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)">', page.text)
    fields = [(k, v.replace("&amp;", "&")) for k, v in hidden]
    signed = http.post(
        base + "/oauth/authorize",
        data=[*fields, ("email", email), ("password", PASSWORD)],
        allow_redirects=False,
        timeout=10,
    )
    consent = http.get(base + signed.headers["location"], timeout=10)
    hidden = re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)">', consent.text)
    fields = [(k, v.replace("&amp;", "&")) for k, v in hidden]
    done = http.post(
        base + "/oauth/authorize",
        data=[*fields, ("action", "approve")],
        allow_redirects=False,
        timeout=10,
    )
    code = parse_qs(urlsplit(done.headers["location"]).query)["code"][0]
    assert code
    client.fetch_token(
        base + "/oauth/token",
        authorization_response=done.headers["location"],
        code_verifier=verifier,
    )


def test_workspace_owner_flow_in_chromium(
    browser: WebDriver,
    control_plane: RunningControlPlane,
    sidecar_factory: Callable[..., Sidecar],
    tmp_path: Path,
) -> None:
    plane = control_plane.plane
    base = f"http://127.0.0.1:{plane.http_port}"
    owner = add_member(plane, "owner@acme.test", ["admin:full"])
    add_member(plane, "dev@acme.test", ["dashboard:read", "checks:read"])
    add_member(plane, "viewer@acme.test", ["dashboard:read", "checks:read"])
    sidecar = sidecar_factory(usage_report_interval=0.05)  # uses reach "Last used" quickly
    shot = Shots(browser, tmp_path)
    find = browser.find_element

    browser.get(base + "/console/signin")
    assert_fields_labelled(browser)
    shot("signin")
    sign_in_with_keyboard(browser, base, "owner@acme.test")
    shot("home")

    # Generate New Key, read the secret off the page, use it through the sidecar.
    find(By.LINK_TEXT, "API Access").click()
    find(By.LINK_TEXT, "Generate New Key").click()
    assert_fields_labelled(browser)
    assert "Warning:" in find(By.CSS_SELECTOR, ".scope.danger .help").text
    find(By.ID, "name").send_keys("CI pipeline")
    find(By.CSS_SELECTOR, "input[name=scopes][value='checks:read']").click()
    shot("key-new")
    find(By.CSS_SELECTOR, "form[action='/console/keys/new'] button[type=submit]").click()
    secret = find(By.ID, "new-key").text
    assert secret.startswith("spk_")
    assert find(By.ID, "export-line").text == f"export STATUSPULSE_API_KEY={secret}"
    assert find(By.CSS_SELECTOR, "button[data-copy='new-key']").is_displayed()  # script ran
    assert secret not in browser.current_url
    shot("key-secret")
    wait_until(lambda: check_status(sidecar.port, secret) == 0, what="the new key is allowed")
    old_id = find(By.ID, "new-key-id").text
    wait_until(lambda: plane.usage.of(old_id).last_used_at, what="the sidecar reported the use")
    used_at = when(control_plane.clock.now())  # the sidecar runs on the test's clock

    # The list says when the key was last used; Create Replacement repeats it.
    find(By.LINK_TEXT, "Done").click()
    assert find(By.CSS_SELECTOR, f"tr[id='{old_id}'] td.last-used").text == used_at
    find(By.LINK_TEXT, "Create Replacement").click()
    assert used_at in find(By.ID, "last-used").text
    shot("key-replace")
    find(By.CSS_SELECTOR, "form[action$='/replace'] button[type=submit]").click()
    new_secret = find(By.ID, "new-key").text
    assert new_secret.startswith("spk_") and new_secret != secret
    wait_until(lambda: check_status(sidecar.port, new_secret) == 0, what="replacement allowed")
    assert check_status(sidecar.port, secret) == 0

    # Revoke the old key with a reason: the sidecar denies it, the replacement still works.
    find(By.LINK_TEXT, "revoke the old key").click()
    assert used_at in find(By.ID, "last-used").text  # is CI still on the old key?
    assert old_id in find(By.CSS_SELECTOR, "form[action$='/revoke']").get_attribute("action")
    find(By.ID, "reason").send_keys("rotated after the replacement")
    find(By.ID, "confirm").send_keys(Keys.SPACE)  # keyboard: tick the box
    shot("key-revoke")
    find(By.CSS_SELECTOR, "form[action$='/revoke'] button[type=submit]").click()
    wait_until(lambda: check_status(sidecar.port, secret) != 0, what="old key denied")
    assert check_status(sidecar.port, new_secret) == 0
    showing(browser, "rotated after the replacement")
    assert urlsplit(browser.current_url).path == "/console/keys"
    new_id = browser.find_elements(By.CSS_SELECTOR, "tbody tr")[0].get_attribute("id")
    wait_until(lambda: plane.usage.of(new_id).last_used_at, what="replacement's use reported")
    browser.refresh()
    for key_id in (old_id, new_id):
        assert find(By.CSS_SELECTOR, f"tr[id='{key_id}'] td.last-used").text == used_at
    shot("keys")
    # At 1280 px a date stays on one line (the cells used to wrap).
    for cell in browser.find_elements(By.CSS_SELECTOR, "td.nowrap"):
        lines = browser.execute_script(
            "const r = document.createRange(); r.selectNodeContents(arguments[0]);"
            "return new Set(Array.from(r.getClientRects(), (b) => Math.round(b.top))).size;",
            cell,
        )
        assert lines == 1, (cell.text, lines)

    # The key's own page shows its uses per day, as the sidecar reported them.
    find(By.LINK_TEXT, "CI pipeline").click()
    assert used_at in find(By.ID, "last-used").text
    (row,) = browser.find_elements(By.CSS_SELECTOR, "#daily-uses tbody tr")
    assert int(row.find_element(By.CSS_SELECTOR, "td.uses").text) >= 1
    shot("key-detail")
    browser.back()

    # Register an application; its secret is shown once.
    find(By.LINK_TEXT, "OAuth Applications").click()
    find(By.LINK_TEXT, "Register New Application").click()
    assert_fields_labelled(browser)
    find(By.ID, "name").send_keys("Status dashboard")
    find(By.ID, "redirect_uris").send_keys(REDIRECT)
    find(By.CSS_SELECTOR, "input[name=scopes][value='dashboard:read']").click()
    shot("app-new")
    find(By.CSS_SELECTOR, "form[action='/console/apps/new'] button[type=submit]").click()
    client_id = find(By.ID, "client-id").text
    client_secret = find(By.ID, "client-secret").text
    assert client_id.startswith("app_") and client_secret
    shot("app-secret")

    # A member approves the app; the owner sees the session and revokes it.
    open_grant(base, client_id, client_secret, "dev@acme.test")
    find(By.LINK_TEXT, "Done").click()
    showing(browser, "dev@acme.test")
    shot("app-detail")
    find(By.CSS_SELECTOR, "button[aria-label='Revoke session of dev@acme.test']").click()
    showing(browser, "No active sessions.")
    assert plane.apps.sessions(OPERATOR, client_id) == []

    # Members: add one.
    find(By.LINK_TEXT, "Members").click()
    assert_fields_labelled(browser)
    find(By.ID, "email").send_keys("new@acme.test")
    find(By.ID, "password").send_keys("a long enough password")
    find(By.CSS_SELECTOR, "form[action='/console/members'] button[type=submit]").click()
    showing(browser, "new@acme.test")
    # Disable a member: the member's row says so and the member can no longer sign in.
    find(By.CSS_SELECTOR, "button[aria-label='Disable dev@acme.test']").click()
    wait_until(
        lambda: browser.find_elements(By.CSS_SELECTOR, "button[aria-label='Enable dev@acme.test']"),
        what="dev disabled",
    )
    assert ConsoleClient(base).sign_in("dev@acme.test").status_code == 401
    shot("members")

    # Audit log: the owner is the actor of every change.
    find(By.LINK_TEXT, "Audit log").click()
    find(By.ID, "action").send_keys("key.revoked", Keys.ENTER)
    wait_until(lambda: "action=key.revoked" in browser.current_url, what="filtered")
    rows = browser.find_elements(By.CSS_SELECTOR, "tbody tr")
    assert len(rows) == 1 and owner.id in rows[0].text
    find(By.ID, "action").clear()
    find(By.CSS_SELECTOR, ".filters button").click()
    shot("audit")

    # No CSP violation reported while all of that ran.
    logs = browser.get_log("browser")
    assert not [e for e in logs if "Content Security Policy" in e["message"]], logs

    # Sign out; a member without keys:manage cannot reach the Key Manager.
    find(By.CSS_SELECTOR, "header form button").click()
    showing(browser, "Sign in to the console")
    sign_in_with_keyboard(browser, base, "viewer@acme.test")
    assert not browser.find_elements(By.LINK_TEXT, "API Access")
    browser.get(base + "/console/keys")
    showing(browser, "permission_denied")
    assert "spk_" not in browser.page_source
    shot("forbidden")
