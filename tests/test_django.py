"""tools/django_example.py on real gunicorn and Django, as README's recipe (d) runs it:
the chat on the app's port, the Django login as nickname, a view's broadcast."""

from __future__ import annotations

import http.client
import importlib.util
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from .helpers import free_port, stop_process, wait_for_port

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"

for module in ("django", "gunicorn"):
    if importlib.util.find_spec(module) is None and not os.environ.get("WSCHAT_REQUIRE_SERVICES"):
        pytest.skip(f"{module} is not installed (pip install -e '.[examples]')", allow_module_level=True)


def readme_command() -> str:
    """Recipe (d)'s gunicorn command, as README.rst gives it."""
    text = (ROOT / "README.rst").read_text(encoding="utf-8")
    [line] = [line.strip() for line in text.splitlines() if "django_example:application()" in line]
    return line


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """The README's command on a free port, with a database of its own: the app's port."""
    port = free_port()
    argv = shlex.split(readme_command().replace("127.0.0.1:8000", f"127.0.0.1:{port}"))
    assert argv[0] == "gunicorn"
    env = {**os.environ, "DJANGO_EXAMPLE_DB": str(tmp_path_factory.mktemp("django") / "db.sqlite3"),
           "HOME": str(tmp_path_factory.mktemp("home"))}
    process = subprocess.Popen([sys.executable, "-m", *argv], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_port(port, process)
        yield port
    finally:
        stop_process(process)


def get(port: int, target: str, cookie: str = "") -> tuple[int, dict, str]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    connection.request("GET", target, headers={"Cookie": cookie} if cookie else {})
    response = connection.getresponse()
    result = response.status, {k.lower(): v for k, v in response.getheaders()}, response.read().decode()
    connection.close()
    return result


def log_in(port: int, user: str) -> str:
    """The session cookie Django sets for ``user``."""
    status, headers, _ = get(port, f"/login?user={user}")
    assert status == 302 and "sessionid=" in headers["set-cookie"]
    return headers["set-cookie"].split(";", 1)[0]


def chat(port: int, cookie: str):
    return connect(f"ws://127.0.0.1:{port}/chat", subprotocols=["wschat.v1"], additional_headers={"Cookie": cookie})


def next_event(ws, kind: str, nick: str | None = None) -> dict:
    """The next event of ``kind`` (from ``nick``), skipping others."""
    while True:
        event = json.loads(ws.recv(timeout=10))
        if event["type"] == kind and nick in (None, event.get("nick")):
            return event


def test_without_a_django_session_the_upgrade_gets_401(app):
    with pytest.raises(InvalidStatus) as info:
        connect(f"ws://127.0.0.1:{app}/chat", additional_headers={"Cookie": "sessionid=forged"})
    assert info.value.response.status_code == 401


def test_django_users_chat_as_themselves_and_the_app_serves_on(app):
    alice, bob = log_in(app, "alice"), log_in(app, "bob")
    with chat(app, alice) as a, chat(app, bob) as b:
        welcome = next_event(a, "welcome")
        assert (welcome["nick"], welcome["identified"]) == ("alice", True)
        assert next_event(b, "welcome")["nick"] == "bob"
        a.send(json.dumps({"type": "message", "text": "hi bob"}))
        assert next_event(b, "message", "alice")["text"] == "hi bob"
        b.send(json.dumps({"type": "message", "text": "hi alice"}))
        assert next_event(a, "message", "bob")["text"] == "hi alice"
        status, _, page = get(app, "/", alice)  # a plain Django page, same port, while the chat is open
        assert status == 200 and "logged in as <b>alice</b>" in page
        status, _, body = get(app, "/announce?text=deploy+done", bob)
        assert status == 200 and body == "sent to 2 clients\n"
        for ws in (a, b):
            assert next_event(ws, "message", "server")["text"] == "bob announces: deploy done"
    assert get(app, "/announce?text=x")[0] == 401


def test_the_page_in_chromium_chats_as_the_django_user_and_hears_a_views_broadcast(app):
    if not os.path.exists(CHROMIUM):
        if os.environ.get("WSCHAT_REQUIRE_BROWSER"):
            pytest.fail(f"Chromium is not installed at {CHROMIUM}")
        pytest.skip(f"Chromium is not installed at {CHROMIUM} (apt-get install chromium)")
    from playwright import sync_api

    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_context().new_page()
            page.goto(f"http://127.0.0.1:{app}/")
            page.fill("input[name=user]", "carol")
            page.click("text=Log in")
            page.locator("header", has_text="logged in as carol").wait_for()
            frame = page.frame_locator("iframe")
            sync_api.expect(frame.locator("#nick")).to_have_value("carol")
            frame.locator("#join button[type=submit]").click()
            frame.locator("#status.online").wait_for()
            sync_api.expect(frame.locator("#room-label")).to_have_text("room main as carol")
            frame.locator("#message").fill("typed in the Django page")
            frame.locator("#message").press("Enter")
            mine = frame.locator("#messages li.message", has=frame.locator("span.text", has_text="typed in the Django page"))
            sync_api.expect(mine.locator(".nick")).to_have_text("carol")
            cookie = "; ".join(f"{c['name']}={c['value']}" for c in page.context.cookies())
            assert get(app, "/announce?text=from+a+view", cookie)[0] == 200
            heard = frame.locator("#messages li.message", has=frame.locator("span.text", has_text="carol announces: from a view"))
            sync_api.expect(heard.locator(".nick")).to_have_text("server")
        finally:
            browser.close()
