"""The dashboard (/ui/) in a real browser: Playwright driving Debian's chromium, headless,
against a real `xdpfw serve` on TCP (127.0.0.1) guarding a veth between test namespaces.

No browser is downloaded: Playwright is pointed at /usr/bin/chromium (scripts/setup.sh
installs it), with the flags that keep it off the network.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from conftest import IN_CI, unique
from netns_tests.conftest import Pair, off_loop
from netns_tests.traffic import PY, ping, wait_for
from xdpfw import netns as nsutil

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]

# A bounded UDP flood: at most `count` datagrams over at most `seconds`, paced.
FLOOD = """
import socket, sys, time
dst, port, count, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
start, sent = time.monotonic(), 0
while sent < count and time.monotonic() - start < seconds:
    for _ in range(50):
        s.sendto(b'x' * 64, (dst, port))
    sent += 50
    time.sleep(0.002)
print(sent)
"""


def _playwright():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as e:
        if IN_CI:
            pytest.fail(f"CI=true and Playwright is missing ({e}): run scripts/setup.sh")
        pytest.skip(f"Playwright is missing: {e}")
    if not os.access(CHROMIUM, os.X_OK):
        if IN_CI:
            pytest.fail(f"CI=true and {CHROMIUM} is missing: run scripts/setup.sh (chromium)")
        pytest.skip(f"{CHROMIUM} is missing")
    return sync_playwright


@pytest.fixture(scope="module")
def browser():
    sync_playwright = _playwright()
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


class Page:
    """A page on the dashboard, with every console error and uncaught exception kept."""

    def __init__(self, browser, url: str) -> None:
        self.context = browser.new_context()
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))
        # The console names no URL: these say which request failed.
        self.page.on("response", lambda r: r.status >= 400 and self.errors.append(
            f"{r.request.method} {r.url}: {r.status}"))
        self.url = url

    def sign_in(self, token: str) -> None:
        self.page.goto(self.url + "/ui/")
        self.page.fill("#token", token)
        self.page.click("#login-form button")

    def live(self) -> None:
        self.page.wait_for_selector("#status.live", timeout=10_000)

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def page(browser, tcp_daemon):
    pages = []

    def make(url: str | None = None) -> Page:
        p = Page(browser, url or tcp_daemon.ui_url)
        pages.append(p)
        return p

    yield make
    for p in pages:
        p.close()


@pytest.fixture
def lab(tcp_daemon):
    """A client and a server namespace joined by a veth, the server end guarded by the TCP
    daemon (pass policy); all undone at teardown."""
    pair = Pair(unique("xdpfw-uc-"), unique("xdpfw-us-"))
    for ns in (pair.client, pair.server):
        off_loop(nsutil.create_netns, ns)
    off_loop(nsutil.veth_pair, pair.client, pair.client_if, pair.server, pair.server_if,
             (nsutil.Addr(pair.client4, 24),), (nsutil.Addr(pair.server4, 24),))
    api = tcp_daemon.daemon.client()
    r = api.post("/api/v1/interfaces", json={"name": pair.server_if, "netns": pair.server,
                                              "mode": "native", "policy": "pass"})
    assert r.status_code == 201, r.text
    yield pair
    api.delete(f"/api/v1/interfaces/{pair.server_if}", params={"netns": pair.server})
    for rule in api.get("/api/v1/rules", params={"limit": 10000}).json()["items"]:
        api.delete(f"/api/v1/rules/{rule['id']}")
    for ns in (pair.server, pair.client):
        off_loop(nsutil.remove_netns, ns)


def test_the_page_loads_with_no_console_errors(page, tcp_daemon, lab):
    for url in (tcp_daemon.ui_url, tcp_daemon.api_url):  # [ui] listen, and the API's own
        p = page(url)
        p.sign_in(tcp_daemon.token)
        p.live()
        p.page.wait_for_function("() => window.xdpfw.plotted && "
                                 "window.xdpfw.plotted.times.length > 1")
        p.page.wait_for_selector(f"#interfaces td:text-is('{lab.server_if}')")
        assert "token" not in p.page.url, p.page.url
        assert not p.page.evaluate("document.querySelector('#set-form').hidden"), \
            "'replace a set' hidden, yet this daemon has PUT /api/v1/sets/{name}"
        assert not p.errors, f"console errors on {url}: {p.errors}"


def test_the_plotted_drop_rate_rises_within_3_s_of_a_flood(page, tcp_daemon, lab):
    api = tcp_daemon.daemon.client()
    r = api.post("/api/v1/rules", json={"prefix": f"{lab.client4}/32", "action": "drop",
                                         "proto": "udp", "comment": "flood"})
    assert r.status_code == 201, r.text
    p = page()
    p.sign_in(tcp_daemon.token)
    p.live()
    p.page.wait_for_function("() => window.xdpfw.plotted && "
                                 "window.xdpfw.plotted.times.length > 1")
    assert float(p.page.get_attribute("#drop-rate", "data-value")) == 0, "drops before any"
    flood = subprocess.Popen(["ip", "netns", "exec", lab.client, PY, "-c", FLOOD, lab.server4,
                              "9", "100000", "6"], stdout=subprocess.PIPE, text=True)
    start = time.monotonic()
    try:
        p.page.wait_for_function(
            """() => { const r = window.xdpfw.plotted.reasons.find(s => s[0] === 'all drop');
                       const v = r && r[1][r[1].length - 1];
                       return v > 0 && Number(document.querySelector('#drop-rate')
                                                             .dataset.value) > 0; }""",
            timeout=3000)
        took = time.monotonic() - start
    finally:
        flood.wait(timeout=15)
    plotted = p.page.evaluate("window.xdpfw.plotted.reasons.find(s => s[0] === "
                              "'rule_drop (drop)')")
    assert plotted and max(v for v in plotted[1] if v is not None) > 0, plotted
    assert took < 3, f"the drop rate rose {took:.1f} s after the flood began"
    # The sampled drops are listed (1 in 100 by default: a flood brings some).
    p.page.wait_for_selector(f"#events td:has-text('{lab.client4}:')", timeout=5000)
    top = p.page.text_content("#top-rules tbody")
    assert f"{lab.client4}/32" in top, f"the flooded rule is not among the top rules: {top}"
    assert not p.errors, p.errors


def test_a_rule_added_from_the_page_makes_pings_fail(page, tcp_daemon, lab):
    assert wait_for(lambda: ping(lab.client, lab.server4, count=1).ok, 5), "no ping before"
    p = page()
    p.sign_in(tcp_daemon.token)
    p.live()
    p.page.fill("#rule-prefix", f"{lab.client4}/32")
    p.page.select_option("#rule-action", "drop")
    p.page.select_option("#rule-proto", "icmp")
    p.page.click("#rule-form button")
    p.page.wait_for_selector(f"#rules tr[data-prefix='{lab.client4}/32']")
    result = ping(lab.client, lab.server4, count=2)
    assert not result.ok, f"pings pass after the page added a drop rule: {result.detail}"
    # A refused request shows the API's own detail.
    p.page.fill("#rule-prefix", f"{lab.client4}/32")
    p.page.select_option("#rule-proto", "icmp")
    p.page.click("#rule-form button")
    p.page.wait_for_selector("#error:not([hidden])")
    detail = api_detail(tcp_daemon, {"prefix": f"{lab.client4}/32", "action": "drop",
                                     "proto": "icmp", "comment": ""})
    assert p.page.text_content("#error") == detail
    # Deleting it from the page lets pings through again.
    p.page.click(f"#rules tr[data-prefix='{lab.client4}/32'] button")
    p.page.wait_for_selector(f"#rules tr[data-prefix='{lab.client4}/32']", state="detached")
    assert wait_for(lambda: ping(lab.client, lab.server4, count=1).ok, 5), "still dropped"
    assert [e for e in p.errors if "409" not in e] == [], p.errors  # the duplicate's 409


def test_a_set_replaced_from_the_page_guards_its_prefixes(page, tcp_daemon, lab):
    assert wait_for(lambda: ping(lab.client, lab.server4, count=1).ok, 5), "no ping before"
    p = page()
    p.sign_in(tcp_daemon.token)
    p.live()
    p.page.fill("#set-name", "ui-feed")
    p.page.fill("#set-list", f"# from the page\n192.0.2.0/24\n{lab.client4}/32\n")
    p.page.click("#set-form button")
    p.page.wait_for_selector(f"#rules tr[data-prefix='{lab.client4}/32']")
    assert not ping(lab.client, lab.server4, count=2).ok, "pings pass from a set's prefix"
    api = tcp_daemon.daemon.client()
    assert api.get("/api/v1/sets/ui-feed").json()["rules"] == 2
    # The set made exactly the new list: the client's /32 leaves it, pings pass again.
    p.page.fill("#set-list", "192.0.2.0/24\n")
    p.page.click("#set-form button")
    p.page.wait_for_selector(f"#rules tr[data-prefix='{lab.client4}/32']", state="detached")
    assert wait_for(lambda: ping(lab.client, lab.server4, count=1).ok, 5), "still dropped"
    assert api.get("/api/v1/sets/ui-feed").json()["rules"] == 1
    assert p.errors == [], p.errors


PX_VIP, PX_PEER, PX_PORT = "10.202.0.1", "10.202.0.2", 8080

# A backend that accepts and holds each connection until its client closes.
HOLDING_BACKEND = """
import socket, sys, threading
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(16)
print('ready', flush=True)
def hold(c):
    with c:
        c.settimeout(60)
        while c.recv(65536):
            pass
while True:
    c, _ = s.accept()
    threading.Thread(target=hold, args=(c,), daemon=True).start()
"""


@pytest.fixture
def proxy_peer(tcp_daemon):
    """A namespace joined to the daemon's [lb] namespace by a veth: a proxy VIP on the LB
    side, a backend that holds connections on this side (where the test's clients connect
    from too); all undone at teardown."""
    peer = unique("xdpfw-up-")
    off_loop(nsutil.create_netns, peer)
    backend = None
    try:
        off_loop(nsutil.veth_pair, tcp_daemon.lb_netns, "px0", peer, "px1",
                 (nsutil.Addr(PX_VIP, 24),), (nsutil.Addr(PX_PEER, 24),))
        backend = subprocess.Popen(["ip", "netns", "exec", peer, PY, "-c", HOLDING_BACKEND,
                                    PX_PEER, str(PX_PORT)], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        assert backend.stdout.readline().strip() == "ready", backend.stderr.read()
        yield peer
    finally:
        if backend is not None:
            backend.kill()
            backend.wait()
        off_loop(nsutil.remove_netns, peer)  # takes the veth's other end with it


def test_a_proxy_service_shows_its_connections(page, tcp_daemon, proxy_peer):
    """A proxy service's heading counts connections (its packets pass XDP): two held, then
    none once the client lets go."""
    api = tcp_daemon.daemon.client()
    r = api.post("/api/v1/services", json={"name": "px-ui", "vip": PX_VIP, "port": PX_PORT,
                                            "forward": "proxy",
                                            "backends": [{"address": PX_PEER}]})
    assert r.status_code == 201, f"{r.text}\n{tcp_daemon.daemon.log()}"
    sid = r.json()["id"]
    holder = subprocess.Popen(
        ["ip", "netns", "exec", proxy_peer, PY, "-m", "netns_tests.holdconns", PX_VIP,
         str(PX_PORT), PX_PEER, "2"], cwd=ROOT, stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        report = json.loads(holder.stdout.readline() or "{}")
        assert report.get("handshakes") == 2, f"{report} {holder.stderr.read()}"
        p = page()
        p.sign_in(tcp_daemon.token)
        p.live()
        heading = p.page.locator("#services h3", has_text="px-ui")
        held = re.compile(r"\(proxy, (sockhash|userspace)\), 2 open, 2 accepted, "
                          r"0 reset by limits, 0 backend failures, ")
        try:  # the page reads services every 5 s
            p.page.locator("#services h3", has_text=held).wait_for(timeout=15_000)
        except Exception as e:
            raise AssertionError(f"{heading.all_inner_texts()}: "
                                 f"{api.get(f'/api/v1/services/{sid}').json()}") from e
        holder.stdin.close()  # the client lets go
        p.page.locator("#services h3", has_text=re.compile(r", 0 open, 2 accepted, ")).wait_for(
            timeout=15_000)
        assert p.errors == [], p.errors
    finally:
        holder.kill()
        holder.wait()
        assert api.delete(f"/api/v1/services/{sid}").status_code == 200


def api_detail(tcp_daemon, body: dict) -> str:
    r = tcp_daemon.daemon.client().post("/api/v1/rules", json=body)
    assert r.status_code == 409, r.text
    return r.json()["detail"]


def test_a_wrong_token_shows_the_login_page_again(page, tcp_daemon):
    p = page()
    p.sign_in("not-the-token")
    p.page.wait_for_selector("#login-error:has-text('refused')")
    assert p.page.is_visible("#login")
    assert p.page.is_hidden("#main")
    assert "refused" in p.page.text_content("#login-error")
    assert "not-the-token" not in p.page.url
    # The right one signs in; a token that stops working (rotated) brings the login back.
    p.page.fill("#token", tcp_daemon.token)
    p.page.click("#login-form button")
    p.live()
    assert p.page.is_hidden("#login")
    p.page.evaluate("sessionStorage.setItem('xdpfw-token', 'rotated')")
    p.page.wait_for_selector("#login-error:has-text('refused')", timeout=5000)
    assert p.page.is_visible("#login") and p.page.is_hidden("#main")
    assert [e for e in p.errors if "401" not in e] == [], p.errors
