"""The chat in a real headless Chromium, driven by Playwright.

Needs Debian's ``chromium`` at /usr/bin/chromium (``.ci/run`` installs it);
skipped with the reason where it is absent, unless WSCHAT_REQUIRE_BROWSER=1
(set by CI) turns the absence into a failure.
"""

import os
from pathlib import Path

import pytest

from wschat.__main__ import STATIC_DIR
from wschat.chat import Chat
from wschat.server import Server

CHROMIUM = "/usr/bin/chromium"
FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")

if not os.path.exists(CHROMIUM) and not os.environ.get("WSCHAT_REQUIRE_BROWSER"):
    pytest.skip(f"Chromium is not installed at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"],
        )
        yield browser
        browser.close()


def chat_server(port=0, static_dir=STATIC_DIR, **kwargs):
    server = Server("127.0.0.1", port, static_dir=static_dir, ping_interval=0, **kwargs)
    Chat(server)
    return server.start()


@pytest.fixture
def server():
    server = chat_server()
    yield server
    server.stop()


@pytest.fixture
def page_for(browser):
    contexts = []

    def open_page(server, nick, room=""):
        context = browser.new_context()
        contexts.append(context)
        page = context.new_page()
        page.dialogs = []
        page.on("dialog", lambda dialog: (page.dialogs.append(dialog.message), dialog.dismiss()))
        page.goto(f"http://127.0.0.1:{server.port}/?nick={nick}&room={room}")
        assert page.is_visible("#join") and page.is_hidden("#chat")
        page.click("button[type=submit]")
        page.wait_for_selector("#status.online")
        assert page.is_hidden("#join") and page.is_visible("#chat")
        return page

    yield open_page
    for context in contexts:
        context.close()


def send(page, text):
    page.fill("#message", text)
    page.press("#message", "Enter")


def last_message(page, text):
    """The message line whose text part is ``text`` (waits for it)."""
    line = page.locator("#messages li.message", has=page.locator("span.text", has_text=text)).last
    line.wait_for()
    return line


def test_two_pages_chat(server, page_for):
    alice = page_for(server, "alice")
    bob = page_for(server, "bob")
    alice.locator("#users li", has_text="bob").wait_for()
    assert bob.locator("#users li").all_text_contents() == ["alice", "bob"]
    send(alice, "hello bob")
    line = last_message(bob, "hello bob")
    assert line.locator(".nick").text_content() == "alice"
    assert line.locator(".time").text_content().count(":") == 2
    send(bob, "hi alice")
    last_message(alice, "hi alice")
    # A newcomer sees the history, and the nickname change shows everywhere.
    carol = page_for(server, "carol")
    assert carol.locator("#messages li.history .text").all_text_contents() == ["hello bob", "hi alice"]
    send(carol, "/nick caroline")
    alice.locator("#users li", has_text="caroline").wait_for()


def test_markup_is_shown_as_text(server, page_for):
    alice = page_for(server, "alice")
    bob = page_for(server, "bob")
    payload = "<img src=x onerror=alert(1)>"
    send(alice, payload)
    line = last_message(bob, payload)
    assert line.locator(".text").text_content() == payload
    assert bob.locator("#messages img").count() == 0 and alice.locator("#messages img").count() == 0
    assert bob.dialogs == [] and alice.dialogs == []


def test_page_reconnects_after_server_restart(page_for):
    server = chat_server()
    port = server.port
    page = page_for(server, "dora")
    server.stop()
    page.wait_for_selector("#status.offline")
    assert "1001" in page.text_content("#status")
    server = chat_server(port)
    try:
        page.wait_for_selector("#status.online", timeout=20000)
        send(page, "back again")
        last_message(page, "back again")
    finally:
        server.stop()


def test_seed_html_client_talks_to_wschat(browser, tmp_path):
    # The seed's page, unchanged but for the address it connects to.
    original = Path(FIXTURES, "seed_client.html").read_text(encoding="utf-8")
    server = chat_server(static_dir=str(tmp_path), page_policy="frame-ancestors 'none'")  # its script is inline
    try:
        page_text = original.replace("ws://localhost:1984/chat", f"ws://127.0.0.1:{server.port}/chat")
        assert page_text != original
        (tmp_path / "index.html").write_text(page_text, encoding="utf-8")
        page = browser.new_page()
        page.goto(f"http://127.0.0.1:{server.port}/")
        page.click("#open")
        page.locator("#messages li", has_text="> Welcome to Corvusoft Chat!").wait_for()
        assert page.locator("#messages li").first.text_content() == "> Established connection."
        page.fill("#message", "hello from 2011")
        page.press("#message", "Enter")
        page.locator("#messages li", has_text="> hello from 2011").wait_for()
        page.click("#close")
        # A close without a code is 1005: wschat never sends the seed's bogus 2560.
        page.locator("#messages li", has_text="Connection closed with RFC6455 code 1005.").wait_for()
        page.close()
    finally:
        server.stop()
