"""The chat in a real headless Chromium, driven by Playwright.

Needs Debian's ``chromium`` at /usr/bin/chromium (``.ci/run`` installs it);
skipped with the reason where it is absent, unless WSCHAT_REQUIRE_BROWSER=1
(set by CI) turns the absence into a failure.
"""

import os
from pathlib import Path

import pytest

from wschat.cli import STATIC_DIR
from wschat.chat import Chat, ChatLimits
from wschat.server import Server

from .helpers import wait_until

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


def chat_server(port=0, static_dir=STATIC_DIR, path="/chat", chat=None, **kwargs):
    server = Server("127.0.0.1", port, static_dir=static_dir, ping_interval=0, **kwargs)
    server.chat = Chat(server, path, **(chat or {}))
    return server.start()


@pytest.fixture
def server():
    server = chat_server()
    yield server
    server.stop()


@pytest.fixture
def page_for(browser):
    contexts = []

    def open_page(server, nick, room="", viewport=None, join=True):
        context = browser.new_context(viewport=viewport or {"width": 1000, "height": 700})
        contexts.append(context)
        page = context.new_page()
        page.dialogs, page.failed = [], []
        page.on("dialog", lambda dialog: (page.dialogs.append(dialog.message), dialog.dismiss()))
        page.on("response", lambda response: response.status >= 400 and page.failed.append(response.url))
        page.goto(f"http://127.0.0.1:{server.port}/?nick={nick}&room={room}")
        assert page.is_visible("#join") and page.is_hidden("#chat")
        if join:
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
    assert page.text_content("#users-title").startswith("Last seen online")  # not "Online" while away
    server = chat_server(port)
    try:
        page.wait_for_selector("#status.online", timeout=20000)
        assert page.text_content("#users-title") == "Online (1)"
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


def texts(page, selector="#messages li.message .text"):
    return page.locator(selector).all_text_contents()


def test_the_page_finds_the_chat_where_the_server_put_it_and_takes_its_limits(page_for):
    server = chat_server(path="/talk", chat={"limits": ChatLimits(max_length=30, max_nick_length=8)})
    try:
        page = page_for(server, "erin")
        assert page.evaluate("document.getElementById('message').maxLength") == 30
        assert page.evaluate("document.getElementById('nick').maxLength") == 8
        send(page, "at another path")
        last_message(page, "at another path")
        assert page.failed == []  # no 404: not for the chat, not for a favicon
    finally:
        server.stop()


def test_a_chat_at_the_root_serves_its_page_there_too(page_for):
    """``--path /``: the page, its script and its style come over plain HTTP
    from below the chat's path, and a room is one step below it."""
    server = chat_server(path="/")
    try:
        ann, bob = page_for(server, "ann", room="lobby"), page_for(server, "bob", room="lobby")
        assert server.chat.users("lobby") == ["ann", "bob"]
        assert [conn.path for conn in server.connections("/")] == ["/lobby", "/lobby"]  # not //lobby
        send(ann, "from the root")
        last_message(bob, "from the root")
        assert ann.failed == [] and bob.failed == []
    finally:
        server.stop()


def test_reconnect_after_a_restart_keeps_the_lines_without_duplicates(page_for):
    server = chat_server()
    port = server.port
    alice, bob = page_for(server, "alice"), page_for(server, "bob")
    send(alice, "before the restart")
    last_message(bob, "before the restart")
    server.stop()
    bob.wait_for_selector("#status.offline")
    server = chat_server(port)
    try:
        bob.wait_for_selector("#status.online", timeout=20000)
        alice.wait_for_selector("#status.online", timeout=20000)
        send(alice, "after the restart")
        last_message(bob, "after the restart")
        assert texts(bob) == ["before the restart", "after the restart"]
        assert bob.locator("#messages li.notice", has_text="server restarted").count() == 1
    finally:
        server.stop()


def test_reconnect_without_a_restart_shows_what_was_missed_once(server, page_for):
    alice = page_for(server, "alice")
    send(alice, "one")
    last_message(alice, "one")
    [conn] = server.connections()
    conn.close(1012, "service restart")  # the page reconnects; the room and its sequence go on
    alice.wait_for_selector("#status.offline")
    server.chat.post("while away", nick="ci")
    alice.wait_for_selector("#status.online", timeout=20000)
    last_message(alice, "while away")
    send(alice, "two")
    last_message(alice, "two")
    assert texts(alice) == ["one", "while away", "two"]
    assert alice.locator("#messages li.notice", has_text="restarted").count() == 0


def test_a_message_the_server_never_took_is_sent_again_after_a_reconnect(server, page_for):
    """What a closing server did not read (see Server.stop) is in no history:
    the page sends it again once welcomed back, and shows it once."""
    alice = page_for(server, "alice")
    chat = server.chat
    taken = chat.engine.publish_message
    dropped = []

    def drop_first(room, record, failed=None):  # as a server closing under the page would
        if not dropped:
            dropped.append(record.get("id"))
            return
        taken(room, record, failed)

    chat.engine.publish_message = drop_first
    send(alice, "lost in the closing")
    wait_until(lambda: dropped, what="the message to reach the server")
    assert dropped[0]  # the page named it
    [conn] = server.connections()
    conn.close(1001, "server shutting down")
    alice.wait_for_selector("#status.offline")
    alice.wait_for_selector("#status.online", timeout=20000)
    last_message(alice, "lost in the closing")
    send(alice, "after")
    last_message(alice, "after")
    assert texts(alice) == ["lost in the closing", "after"]
    assert [record["text"] for record in chat.engine.history("main").records] == ["lost in the closing", "after"]


def test_coming_back_too_late_says_messages_were_missed(page_for):
    server = chat_server(chat={"history": 2})
    try:
        alice = page_for(server, "alice")
        send(alice, "one")
        last_message(alice, "one")
        [conn] = server.connections()
        conn.close(1012, "service restart")
        alice.wait_for_selector("#status.offline")
        for i in range(4):  # more than the room keeps
            server.chat.post(f"away {i}", nick="ci")
        alice.wait_for_selector("#status.online", timeout=20000)
        last_message(alice, "away 3")
        assert texts(alice) == ["one", "away 2", "away 3"]
        assert alice.locator("#messages li.notice", has_text="missed while offline").count() == 1
    finally:
        server.stop()


def test_with_redis_a_restarted_server_loses_nothing(page_for, redis_server):
    from wschat.redis_engine import RedisEngine

    def redis_chat(port=0):
        return chat_server(port, chat={"engine": RedisEngine(redis_server.url)})

    a, b = redis_chat(), redis_chat()
    try:
        alice, bob = page_for(a, "alice"), page_for(b, "bob")
        send(alice, "before")
        last_message(bob, "before")
        port = a.port
        a.stop()
        a.chat.close()
        alice.wait_for_selector("#status.offline")
        send(bob, "while alice was away")  # through the other server, into Redis
        a = redis_chat(port)
        alice.wait_for_selector("#status.online", timeout=20000)
        last_message(alice, "while alice was away")
        send(alice, "back")
        last_message(bob, "back")
        last_message(alice, "back")  # each page in its own time
        assert texts(alice) == ["before", "while alice was away", "back"]
        assert alice.locator("#messages li.notice", has_text="restarted").count() == 0
        assert alice.locator("#messages li.notice", has_text="missed").count() == 0
    finally:
        for server in (a, b):
            server.stop()
            server.chat.close()


def test_a_refused_connection_stops_retrying_with_a_message(page_for):
    server = chat_server(allowed_origins=["http://elsewhere.example"])  # the page's origin is refused: 403
    try:
        page = page_for(server, "frank", join=False)
        page.clock.install()  # the page's timers (its backoff) run when the test says so
        page.click("button[type=submit]")
        refusal = page.locator("#messages li.error", has_text="refuses")
        for _ in range(20):
            if refusal.count():
                break
            page.clock.run_for(35_000)  # past any backoff
            page.locator("#status:not(.connecting)").wait_for()  # the try is over (no eval: the page's CSP forbids it)
        assert page.text_content("#status") == "disconnected"
        refusals = server.metrics.handshakes[403]
        assert refusals >= 3
        page.clock.run_for(120_000)  # had it kept trying, it would have tried by now
        assert server.metrics.handshakes[403] == refusals and page.text_content("#status") == "disconnected"
    finally:
        server.stop()


def test_a_1008_close_stops_retrying_with_the_reason(page_for):
    server = chat_server(chat={"limits": ChatLimits(rate=0.001, burst=1)})
    try:
        page = page_for(server, "gina")
        for i in range(3):  # one within the burst, one refused, one too many: closed
            send(page, f"flood {i}")
        page.locator("#messages li.error", has_text="rate limit exceeded").wait_for()
        assert page.text_content("#status") == "disconnected"
    finally:
        server.stop()


def test_on_a_phone_the_user_list_is_one_tap_away(server, page_for):
    page_for(server, "hal")
    phone = page_for(server, "ivy", viewport={"width": 375, "height": 667})
    assert phone.is_hidden("#users-pane") and phone.is_visible("#people")
    phone.click("#people")
    assert phone.is_visible("#users-pane")
    assert phone.locator("#users li").all_text_contents() == ["hal", "ivy"]
    assert phone.get_attribute("#people", "aria-expanded") == "true"


def test_unicode_room_names_from_the_form(server, page_for):
    page = page_for(server, "zoe", room="café")
    assert page.text_content("#room-label") == "room café as zoe"
    assert server.chat.users("café") == ["zoe"]


def test_the_chosen_nickname_comes_back_when_it_is_free_again(server, page_for):
    from websockets.sync.client import connect

    with connect(f"ws://127.0.0.1:{server.port}/chat?nick=dora", subprotocols=["wschat.v1"]):
        page = page_for(server, "dora")
        assert page.text_content("#room-label").startswith("room main as guest-")
    # The other holder left, as our own previous connection would once the server drops it.
    page.locator("#room-label", has_text="as dora").wait_for(timeout=15000)


def test_backoff_grows_while_connections_open_but_never_welcome(page_for):
    """A server that accepts and then closes (here: a chat whose on_open fails,
    1011) must not be retried every second: only a welcome resets the backoff."""
    server = chat_server()
    server.chat.resource.on_open = lambda conn: 1 / 0
    try:
        page = page_for(server, "kim", join=False)
        page.clock.install()
        page.click("button[type=submit]")
        delays = []
        for _ in range(5):
            page.locator("#status", has_text="retrying in").wait_for()
            delays.append(int(page.text_content("#status").split("retrying in ")[1].split(" ")[0]))
            page.clock.run_for(35_000)  # the timer fires: the status says "reconnecting" until the next close
        assert delays[-1] >= 8 and delays == sorted(delays), delays  # 1, 2, 4, 8, 16 s, give or take the jitter
        assert page.locator("#messages li.error").count() == 0  # a 1011 is no refusal: it keeps trying
    finally:
        server.stop()


def test_chromium_negotiates_per_message_deflate(server, page_for):
    page = page_for(server, "lena")
    negotiated = page.evaluate("""() => new Promise((resolve, reject) => {
        const ws = new WebSocket(`ws://${location.host}/chat`);
        ws.onopen = () => { resolve(ws.extensions); ws.close(); };
        ws.onerror = () => reject("no connection");
    })""")
    assert negotiated == "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
    # The page's chat connection (and the one just closed, if the server has not seen its close yet):
    assert {conn.compression for conn in server.connections()} == {negotiated}
    send(page, "compressed both ways " * 10)  # the page's own connection compresses too
    last_message(page, "compressed both ways " * 10)


def test_the_flask_example_page_chats_as_the_logged_in_user(browser):
    # tools/flask_example.py on werkzeug: the app's page, the chat in it, one port.
    pytest.importorskip("flask")
    import importlib.util
    import threading

    from werkzeug.serving import make_server

    spec = importlib.util.spec_from_file_location("flask_example", Path(__file__).parent.parent / "tools" / "flask_example.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    app, server, _ = example.create_app()
    server.start()
    http = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=http.serve_forever)
    thread.start()
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(f"http://127.0.0.1:{http.server_port}/")
        page.fill("input[name=user]", "ann")
        page.click("text=Log in")
        page.locator("header", has_text="logged in as ann").wait_for()
        chat = page.frame_locator("iframe")
        nick = chat.locator("#nick")
        sync_api.expect(nick).to_have_value("ann")  # filled in once the page has read wschat.json
        assert nick.evaluate("input => input.readOnly")
        assert chat.locator("#nick-hint").text_content() == "(your login)"
        chat.locator("#join button[type=submit]").click()
        chat.locator("#status.online").wait_for()
        sync_api.expect(chat.locator("#room-label")).to_have_text("room main as ann")  # from the welcome
        chat.locator("#message").fill("hello from the app page")
        chat.locator("#message").press("Enter")
        line = chat.locator("#messages li.message", has=chat.locator("span.text", has_text="hello from the app page"))
        line.wait_for()
        assert line.locator(".nick").text_content() == "ann"
    finally:
        context.close()
        http.shutdown()
        thread.join(5)
        server.stop()
