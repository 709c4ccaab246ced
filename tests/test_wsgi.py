"""One port with a WSGI app: tools/flask_example.py on Flask's own server
(werkzeug) and on gunicorn's sync and gthread workers, run as real processes.

Flask and gunicorn are test extras; where one is missing the tests that need
it skip with the reason, unless WSGI_REQUIRE_SERVICES=1 (set by CI) makes that
a failure.
"""

from __future__ import annotations

import http.client
import importlib.util
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosedOK, InvalidStatus
from websockets.sync.client import connect

from wschat import Server
from wschat.wsgi import WebSocketMiddleware, request_head

from .helpers import REQUEST, RawClient

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "tools" / "flask_example.py"
REQUIRED = bool(os.environ.get("WSCHAT_REQUIRE_SERVICES"))


def need(module: str) -> None:
    if importlib.util.find_spec(module) is None and not REQUIRED:
        pytest.skip(f"{module} is not installed (pip install -e '.[test]')")


class App:
    """The example app in a process of its own: its port, its log, its threads."""

    def __init__(self, kind: str, tmp_path: Path):
        self.kind = kind
        if kind == "werkzeug":
            need("flask")
            command = [sys.executable, str(EXAMPLE), "--host", "127.0.0.1", "--port", "0"]
            ready = re.compile(r"Running on http://127\.0\.0\.1:(\d+)")
        else:
            need("flask")
            need("gunicorn")
            worker = kind.split("-")[1]
            command = [sys.executable, "-m", "gunicorn", "-w", "1", "-k", worker, "--threads", "4",
                       "-b", "127.0.0.1:0", "--chdir", str(ROOT / "tools"), "flask_example:gunicorn_app()"]
            ready = re.compile(r"Listening at: http://127\.0\.0\.1:(\d+)")
        env = {**os.environ, "HOME": str(tmp_path), "PYTHONUNBUFFERED": "1"}  # gunicorn's control socket goes there
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                        env=env, cwd=tmp_path)
        self.log: list[str] = []
        self.port = None
        for line in self.process.stderr:
            self.log.append(line)
            match = ready.search(line)
            if match:
                self.port = int(match.group(1))
                break
        assert self.port, "".join(self.log)
        self._drain = threading.Thread(target=lambda: self.log.extend(self.process.stderr), daemon=True)
        self._drain.start()

    @property
    def worker_pid(self) -> int:
        """The process that runs the app and the chat (gunicorn's worker; else the process itself)."""
        if self.kind == "werkzeug":
            return self.process.pid
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text().split()
        return int(children[0])

    def threads(self) -> int:
        status = Path(f"/proc/{self.worker_pid}/status").read_text()
        return int(re.search(r"^Threads:\s+(\d+)", status, re.M).group(1))

    def get(self, path: str, cookie: str = "") -> http.client.HTTPResponse:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        connection.request("GET", path, headers={"Cookie": cookie} if cookie else {})
        response = connection.getresponse()
        response.body = response.read()
        connection.close()
        return response

    def login(self, user: str) -> str:
        """Log ``user`` in; the session cookie, as a Cookie header's value."""
        response = self.get(f"/login?user={user}")
        assert response.status == 302
        return response.getheader("Set-Cookie").split(";", 1)[0]

    def chat(self, cookie: str = "", **kwargs):
        headers = {"Cookie": cookie} if cookie else {}
        return connect(f"ws://127.0.0.1:{self.port}/chat", subprotocols=["wschat.v1"], additional_headers=headers,
                       **kwargs)

    def stop(self) -> str:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        self.process.wait(20)
        self._drain.join(5)
        return "".join(self.log)


@pytest.fixture(params=["werkzeug", "gunicorn-sync", "gunicorn-gthread"])
def app(request, tmp_path):
    app = App(request.param, tmp_path)
    yield app
    log = app.stop()
    assert "Traceback" not in log, log


def recv_json(ws, kind):
    while True:
        event = json.loads(ws.recv(timeout=10))
        if event["type"] == kind:
            return event


def test_a_handshake_without_a_session_gets_401(app):
    with pytest.raises(InvalidStatus) as refused:
        app.chat()
    response = refused.value.response
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == 'Cookie realm="chat"'
    assert response.body == b"log in first: /login?user=NAME\n"
    with pytest.raises(InvalidStatus) as forged:
        app.chat("session=eyJ1c2VyIjoiYW5uIn0.forged.signature")
    assert forged.value.response.status_code == 401


def test_the_session_user_chats_and_the_app_keeps_serving_on_the_same_port(app):
    ann, bob = app.login("ann"), app.login("bob")
    with app.chat(ann) as ann_ws, app.chat(bob) as bob_ws:
        welcome = recv_json(ann_ws, "welcome")
        assert (welcome["nick"], welcome["identified"]) == ("ann", True)
        assert recv_json(bob_ws, "welcome")["nick"] == "bob"
        # Plain requests on the same port while the WebSockets are open:
        page = app.get("/", ann)
        assert page.status == 200 and b"logged in as <b>ann</b>" in page.body and b"/chat-client/index.html" in page.body
        config = json.loads(app.get("/chat-client/wschat.json", bob).body)
        assert (config["path"], config["user"]) == ("/chat", "bob")
        assert app.get("/chat-client/chat.js").status == 200
        ann_ws.send(json.dumps({"type": "message", "text": "hi bob"}))
        assert recv_json(bob_ws, "message")["nick"] == "ann"
        assert recv_json(ann_ws, "message")["text"] == "hi bob"
        bob_ws.send(json.dumps({"type": "message", "text": "hi ann"}))
        message = recv_json(ann_ws, "message")
        assert (message["nick"], message["text"]) == ("bob", "hi ann")


def test_200_websockets_through_the_hand_over_hold_no_thread(app):
    cookie = app.login("ann")
    with app.chat(cookie) as first:
        recv_json(first, "welcome")
        before = app.threads()
        clients = []
        try:
            for _ in range(200):
                client = RawClient(app.port, headers=[f"Cookie: {cookie}", "Sec-WebSocket-Protocol: wschat.v1"])
                assert client.status == 101, client.response
                clients.append(client)
            after = app.threads()
            # At most the WSGI server's own pool may grow (gthread: --threads 4); a thread per WebSocket is +200.
            assert after <= before + 4, f"{before} threads before 200 WebSockets, {after} with them"
            first.send(json.dumps({"type": "message", "text": "to all 201"}))
            for client in clients:  # every one of them is live: the broadcast reaches it
                while True:
                    frame = client.recv_frame()
                    if json.loads(frame.payload)["type"] == "message":
                        break
            assert app.get("/").status == 200
        finally:
            for client in clients:
                client.close()


def test_frames_right_behind_the_request_are_not_lost_in_the_hand_over(app):
    cookie = app.login("ann")
    client = RawClient(app.port, handshake=False)
    with client:
        text = json.dumps({"type": "message", "text": "early"}).encode()
        frame = bytes([0x81, 0x80 | len(text)]) + b"\0\0\0\0" + text  # masked with a zero key
        head = (f"GET /chat HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                f"Sec-WebSocket-Protocol: wschat.v1\r\nCookie: {cookie}\r\n\r\n").encode()
        client.sock.sendall(head + frame)  # one write: the WSGI server reads the frame with the head
        assert client.read_head().startswith(b"HTTP/1.1 101 ")
        while (event := json.loads(client.recv_frame().payload))["type"] != "message":
            pass
        assert event["text"] == "early"


@pytest.mark.parametrize("framing, body", [
    ("Transfer-Encoding: chunked", b"5\r\nhello\r\n0\r\n\r\n"),
    ("Content-Length: 5", b"hello"),
])
def test_an_upgrade_with_a_body_gets_400_through_the_hand_over_too(app, framing, body):
    """RFC 6455 4.1: the upgrade is a GET without a body.  On 6ddb637 the WSGI
    server swallowed a chunked body and the frame behind it was lost."""
    cookie = app.login("ann")
    with RawClient(app.port, handshake=False) as client:
        head = (f"GET /chat HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                f"Cookie: {cookie}\r\n{framing}\r\n\r\n").encode()
        client.sock.sendall(head + body + bytes([0x81, 0x80]) + b"\0\0\0\0")
        assert client.read_head().startswith(b"HTTP/1.1 400 ") and client.at_eof()


def test_sigterm_closes_the_chat_clients_with_1001(app):
    with app.chat(app.login("ann")) as ws:
        recv_json(ws, "welcome")
        app.process.send_signal(signal.SIGTERM)
        with pytest.raises(ConnectionClosedOK) as closed:
            while True:
                ws.recv(timeout=10)
        assert closed.value.rcvd.code == 1001
    assert app.process.wait(20) == 0 or app.kind == "werkzeug"


# -- the middleware alone -------------------------------------------------------------


def test_request_head_is_rebuilt_from_the_environ():
    environ = {"REQUEST_METHOD": "GET", "SCRIPT_NAME": "", "PATH_INFO": "/chat/caf\u00e9", "QUERY_STRING": "nick=a",
               "SERVER_PROTOCOL": "HTTP/1.1", "HTTP_HOST": "example.org", "HTTP_SEC_WEBSOCKET_KEY": "k==",
               "CONTENT_TYPE": "", "wsgi.input": None}
    assert request_head(environ) == (b"GET /chat/caf%C3%A9?nick=a HTTP/1.1\r\nHost: example.org\r\n"
                                     b"Sec-Websocket-Key: k==\r\n\r\n")
    environ["RAW_URI"] = "/chat/caf%C3%A9?nick=a"
    assert request_head(environ).startswith(b"GET /chat/caf%C3%A9?nick=a HTTP/1.1\r\n")


def upgrade_environ(path="/chat", **extra):
    return {"REQUEST_METHOD": "GET", "PATH_INFO": path, "SERVER_PROTOCOL": "HTTP/1.1", "HTTP_HOST": "x",
            "HTTP_UPGRADE": "websocket", "HTTP_CONNECTION": "Upgrade", "SERVER_SOFTWARE": "waitress", **extra}


def test_other_requests_go_to_the_app_and_a_server_that_hides_its_socket_gets_501(caplog):
    server = Server(port=None)
    server.resource("/chat")
    seen = []

    def app(environ, start_response):
        seen.append(environ["PATH_INFO"])
        start_response("200 OK", [])
        return [b"app"]

    middleware = WebSocketMiddleware(app, server)
    statuses = []
    start_response = lambda status, headers: statuses.append(status)  # noqa: E731
    assert middleware({"PATH_INFO": "/chat", "REQUEST_METHOD": "GET"}, start_response) == [b"app"]
    assert middleware(upgrade_environ("/other"), start_response) == [b"app"]
    assert seen == ["/chat", "/other"]
    with caplog.at_level(logging.ERROR, logger="wschat"):
        [body] = middleware(upgrade_environ(), start_response)
    assert statuses[-1] == "501 Not Implemented"
    assert b"waitress does not give the application its socket" in body and b"reverse proxy" in body
    assert "hand-over impossible" in caplog.text


def test_a_tls_socket_or_a_stopped_server_cannot_take_the_hand_over():
    import ssl

    server = Server(port=None)
    server.resource("/chat")
    middleware = WebSocketMiddleware(None, server)
    plain, other = socket.socketpair()
    tls = ssl.create_default_context().wrap_socket(socket.socket(), do_handshake_on_connect=False,
                                                   server_hostname="x")
    statuses = []
    with plain, other, tls:
        [body] = middleware(upgrade_environ(**{"gunicorn.socket": tls}), lambda s, h: statuses.append(s))
        assert b"TLS" in body and statuses == ["501 Not Implemented"]
        [body] = middleware(upgrade_environ(**{"werkzeug.socket": plain}), lambda s, h: statuses.append(s))
        assert b"not running" in body
        other.sendall(b"x")
        assert plain.recv(1) == b"x"  # the socket stayed the WSGI server's


def test_adopt_takes_plain_sockets_of_a_running_server_only():
    import ssl

    server = Server(port=None)
    server.resource("/chat", on_message=lambda conn, message: conn.send(message))
    mine, theirs = socket.socketpair()
    with theirs:
        with pytest.raises(RuntimeError, match="not running"):
            server.adopt(mine)
        assert mine.fileno() == -1  # closed: the caller gave it away
        tls = ssl.create_default_context().wrap_socket(socket.socket(), do_handshake_on_connect=False,
                                                       server_hostname="x")
        with pytest.raises(ValueError, match="TLS"):
            server.adopt(tls)
    with server:
        client, served = socket.socketpair()
        with client:
            server.adopt(served, REQUEST)  # a Unix socket works too: no TCP options are set on it
            client.settimeout(10)
            assert client.recv(4096).startswith(b"HTTP/1.1 101 ")
            client.sendall(b"\x81\x82\0\0\0\0hi")
            assert client.recv(100) == b"\x81\x02hi"
        gone = socket.socket()
        server.adopt(gone)  # never connected: no peer, closed at once
        assert gone.fileno() == -1
