"""A person in a real browser: headless Chromium (Debian's chromium + chromium-driver, driven by
selenium) opens the link from a mail our SMTP server really received, sees the result page,
follows a next_link; screenshots go to test-artifacts/ (kept by CI, ignored by git)."""

from __future__ import annotations

import html
import http.server
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, quote, urlsplit

import pytest
from support.db import DatabaseFactory
from support.homeserver import HomeserverStandIn
from support.server import SydentServer, new_secret, unique_email

if TYPE_CHECKING:
    from selenium.webdriver.remote.webdriver import WebDriver
from support.smtp import SmtpSink

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
V1 = "/_matrix/identity/api/v1"


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        message = "needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must never download anything
    from selenium import webdriver

    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--window-size=1024,768",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, smtp_sink: SmtpSink, homeserver: HomeserverStandIn
) -> Iterator[SydentServer]:
    # One backend is enough for what a browser sees.
    factory = DatabaseFactory("sqlite", tmp_path_factory.mktemp("browser-db"))
    srv = SydentServer(
        tmp_path_factory.mktemp("browser-server"),
        database_url=factory.create().url,
        smtp_port=smtp_sink.port,
        ca_file=homeserver.ca_path,
        name="sydent_lite (browser)",
    )
    srv.start()
    yield srv
    srv.stop()
    factory.cleanup()


# As Element Web (vector/routing.ts getScreenFromLocation, url_utils.parseQsFromFragment): the
# screen's parameters are the query inside the fragment; registration needs `sid` among them.
HASH_ROUTED_APP = b"""<!DOCTYPE html><title>App</title><h1 id="screen"></h1><p id="sid"></p>
<script>
const fragment = location.hash.substring(1);
const at = fragment.indexOf("?");
const params = new URLSearchParams(at >= 0 ? fragment.substring(at + 1) : "");
document.getElementById("screen").textContent = at >= 0 ? fragment.substring(0, at) : fragment;
document.getElementById("sid").textContent = params.getAll("sid").join(" ") || "no sid";
</script>"""


@pytest.fixture(scope="module")
def client_site() -> Iterator[str]:
    """A tiny site on loopback for next_link to send people to: `/welcome` shows the query it
    received; `/app` is a hash-routed app that reads its parameters as Element Web does."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            parts = urlsplit(self.path)
            if parts.path == "/app":
                body = HASH_ROUTED_APP
            else:
                query = html.escape(parts.query, quote=True)
                body = f'<!DOCTYPE html><title>Welcome</title><h1>Welcome back</h1><p id="query">{query}</p>'.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture(scope="module")
def other_site() -> Iterator[str]:
    """Another origin on loopback: `/frame?src=URL` is a page that shows URL in an iframe."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            src = parse_qs(urlsplit(self.path).query).get("src", [""])[0]
            body = (
                f"<!DOCTYPE html><title>Win a prize</title><h1>Click the button</h1>"
                f'<iframe src="{html.escape(src, quote=True)}" width="600" height="400"></iframe>'
            ).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def _mailed_link(server: SydentServer, smtp_sink: SmtpSink, next_link: str | None = None) -> str:
    smtp_sink.accept()
    address = unique_email("browser")
    body = {"client_secret": new_secret(), "email": address, "send_attempt": 1}
    if next_link:
        body["next_link"] = next_link
    resp = server.client.post(f"{V1}/validate/email/requestToken", json=body)
    assert resp.status_code == 200, resp.text
    return smtp_sink.wait_for(address).link


def _shot(driver: WebDriver, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    assert driver.save_screenshot(str(ARTIFACTS / name))


def test_clicking_the_mailed_link_shows_success(browser: WebDriver, server: SydentServer, smtp_sink: SmtpSink) -> None:
    from selenium.webdriver.common.by import By

    browser.get(_mailed_link(server, smtp_sink))
    assert browser.find_element(By.TAG_NAME, "h1").text == "Address verification"
    assert "Verification successful" in browser.find_element(By.CSS_SELECTOR, "[role=status]").text
    _shot(browser, "validation-success.png")


def test_next_link_is_followed(browser: WebDriver, server: SydentServer, smtp_sink: SmtpSink, client_site: str) -> None:
    from selenium.webdriver.common.by import By

    next_link = f"{client_site}/welcome?step=2"
    link = _mailed_link(server, smtp_sink, next_link=next_link)
    sid = parse_qs(urlsplit(link).query)["sid"][0]
    browser.get(link)
    assert browser.current_url == f"{next_link}&sid={sid}"
    assert browser.find_element(By.TAG_NAME, "h1").text == "Welcome back"
    assert browser.find_element(By.ID, "query").text == f"step=2&sid={sid}"  # what the site's server got
    _shot(browser, "next-link.png")


def test_a_hash_routed_app_reads_the_sid(
    browser: WebDriver, server: SydentServer, smtp_sink: SmtpSink, client_site: str
) -> None:
    from selenium.webdriver.common.by import By

    # Element Web's registration next_link: its parameters live in the fragment's query.
    next_link = f"{client_site}/app#/register?client_secret=c1&session_id=s1"
    link = _mailed_link(server, smtp_sink, next_link=next_link)
    sid = parse_qs(urlsplit(link).query)["sid"][0]
    browser.get(link)
    assert browser.find_element(By.ID, "screen").text == "/register"
    assert browser.find_element(By.ID, "sid").text == sid
    _shot(browser, "next-link-hash-route.png")


def test_a_wrong_code_shows_a_clear_failure(browser: WebDriver, server: SydentServer, smtp_sink: SmtpSink) -> None:
    from selenium.webdriver.common.by import By

    link = _mailed_link(server, smtp_sink).replace("token=", "token=x", 1)
    browser.get(link)
    status = browser.find_element(By.CSS_SELECTOR, "[role=status]").text
    assert "not valid" in status and "incorrect" in status
    _shot(browser, "validation-failed.png")


def test_pages_fit_a_phone_screen(browser: WebDriver, server: SydentServer, smtp_sink: SmtpSink) -> None:
    browser.set_window_size(375, 812)
    try:
        for url, shot in (
            (_mailed_link(server, smtp_sink), "validation-success-mobile.png"),
            (server.base_url + "/", "landing-mobile.png"),
        ):
            browser.get(url)
            assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth"), (
                f"{url} scrolls sideways"
            )
            assert browser.execute_script("return !!document.querySelector('meta[name=viewport]')")
            _shot(browser, shot)
    finally:
        browser.set_window_size(1024, 768)


def test_our_pages_cannot_be_framed_by_another_site(
    browser: WebDriver, server: SydentServer, smtp_sink: SmtpSink, other_site: str
) -> None:
    # Clickjacking: another site shows our page in a frame under its own. The browser must
    # refuse to render it there (Content-Security-Policy frame-ancestors, X-Frame-Options).
    from selenium.webdriver.common.by import By

    wrong_link = _mailed_link(server, smtp_sink).replace("token=", "token=x", 1)
    for url, ours in ((server.base_url + "/", server.server_name), (wrong_link, "Address verification")):
        browser.get(f"{other_site}/frame?src={quote(url, safe='')}")
        assert browser.find_element(By.TAG_NAME, "h1").text == "Click the button"
        browser.switch_to.frame(browser.find_element(By.TAG_NAME, "iframe"))
        try:
            shown = [h.text for h in browser.find_elements(By.TAG_NAME, "h1")]
            assert ours not in shown, f"{url} was rendered inside another site's frame"
        finally:
            browser.switch_to.default_content()
    _shot(browser, "framing-refused.png")


def test_pages_keep_their_inline_styles_under_the_content_security_policy(
    browser: WebDriver, server: SydentServer, smtp_sink: SmtpSink
) -> None:
    for url in (server.base_url + "/", _mailed_link(server, smtp_sink)):
        browser.get(url)
        # The <main> card is styled by the page's inline <style>: not the browser's transparent.
        background = browser.execute_script("return getComputedStyle(document.querySelector('main')).backgroundColor")
        assert background not in ("", "rgba(0, 0, 0, 0)", "transparent"), (url, background)
