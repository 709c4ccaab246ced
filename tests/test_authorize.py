"""The authorize hook: who may connect, decided before the upgrade."""

import logging
import socket
import threading

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from wschat import HandshakeError
from wschat.handshake import parse_request

from .helpers import REQUEST, RawClient, Recorder, start_server, wait_until


def echo(conn, message):
    conn.send(message)


def answer_of(port: int, request: bytes = REQUEST) -> tuple[bytes, bytes]:
    """Send ``request`` and read the whole answer, to the end of the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return head + b"\r\n", body


def request_with(*lines: str):
    head = REQUEST.replace(b"\r\n\r\n", b"\r\n" + "".join(line + "\r\n" for line in lines).encode() + b"\r\n")
    return parse_request(head)


def test_request_cookies_and_query():
    request = request_with('Cookie: session=abc; theme="dark"', "Cookie: bad pair; session=later; =x; a=b=c")
    assert request.cookies == {"session": "abc", "theme": "dark", "a": "b=c"}
    request = parse_request(REQUEST.replace(b"/chat", b"/chat?user=ann&tag=a&tag=b%20c"))
    assert request.query == {"user": ["ann"], "tag": ["a", "b c"]}
    assert request_with().cookies == {} and request_with().query == {}


@pytest.mark.parametrize("workers", [0, 2])
def test_hook_sees_the_request_and_names_the_user(workers):
    seen = []

    def authorize(request):
        seen.append((request.path, request.query, request.cookies, request.fields["x-app"], request.client_address,
                     threading.current_thread().name))
        return {"name": request.cookies["session"]}

    recorder = Recorder()
    with start_server(workers=workers) as server:
        server.resource("/chat", authorize=authorize, **recorder.handlers())
        with connect(f"ws://127.0.0.1:{server.port}/chat/x?room=1",
                     additional_headers={"Cookie": "session=ann", "X-App": "yes"}):
            _, conn = recorder.wait("open")
            assert conn.user == {"name": "ann"}
    path, query, cookies, app_header, address, thread = seen[0]
    assert (path, query, cookies, app_header, address) == ("/chat/x", {"room": ["1"]}, {"session": "ann"}, ["yes"],
                                                           "127.0.0.1")
    assert thread.startswith("wschat-authorize" if workers else "wschat-loop")


@pytest.mark.parametrize("workers", [0, 2])
def test_hook_returning_none_lets_an_anonymous_client_in(workers):
    recorder = Recorder()
    with start_server(workers=workers) as server:
        server.resource("/chat", authorize=lambda request: None, **recorder.handlers())
        with connect(f"ws://127.0.0.1:{server.port}/chat"):
            _, conn = recorder.wait("open")
            assert conn.user is None


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("status, headers", [
    (401, (("WWW-Authenticate", 'Cookie realm="app"'),)),
    (403, ()),
    (429, (("Retry-After", "30"),)),
])
def test_hook_refuses_with_its_status_headers_and_body(workers, status, headers):
    def authorize(request):
        raise HandshakeError(status, "log in at /login first", headers)

    with start_server(workers=workers) as server:
        server.resource("/chat", authorize=authorize, on_open=lambda conn: pytest.fail("opened"))
        head, body = answer_of(server.port)
        assert head.startswith(f"HTTP/1.1 {status} ".encode())
        for name, value in headers:
            assert f"\r\n{name}: {value}\r\n".encode() in head
        assert b"\r\nContent-Length: 23\r\n" in head and body == b"log in at /login first\n"
        assert server.metrics.handshakes[status] == 1


@pytest.mark.parametrize("workers", [0, 2])
def test_a_failing_hook_is_a_logged_500_and_the_server_carries_on(workers, caplog):
    def authorize(request):
        if "boom" in request.query:
            raise KeyError("session store down")
        return "ann"

    with start_server(workers=workers) as server:
        server.resource("/chat", authorize=authorize, on_message=echo)
        with caplog.at_level(logging.ERROR, logger="wschat"):
            with pytest.raises(InvalidStatus) as refused:
                connect(f"ws://127.0.0.1:{server.port}/chat?boom=1")
            assert refused.value.response.status_code == 500
            assert refused.value.response.body == b"internal server error\n"
        assert any("authorize hook authorize failed" in r.getMessage() and r.exc_info for r in caplog.records)
        with connect(f"ws://127.0.0.1:{server.port}/chat") as ws:
            ws.send("still here")
            assert ws.recv(timeout=5) == "still here"
        assert server.metrics.handler_errors == 1


def test_a_slow_hook_holds_up_no_one_else():
    release = threading.Event()

    def authorize(request):
        if "slow" in request.query:
            release.wait(10)
        return request.query.get("user", [None])[0]

    recorder = Recorder()
    with start_server(workers=2) as server:
        server.resource("/chat", authorize=authorize, on_message=echo, on_open=recorder.on_open)
        with connect(f"ws://127.0.0.1:{server.port}/chat?user=early") as early:
            slow = RawClient(server.port, handshake=False)
            slow.sock.sendall(REQUEST.replace(b"/chat", b"/chat?slow=1&user=slow"))
            # The slow handshake's hook is running: an open connection and a new one go on.
            early.send("hello")
            assert early.recv(timeout=5) == "hello"
            with connect(f"ws://127.0.0.1:{server.port}/chat?user=late") as late:
                late.send("hi")
                assert late.recv(timeout=5) == "hi"
            assert [event[1].user for event in (recorder.wait("open"), recorder.wait("open"))] == ["early", "late"]
            release.set()
            assert slow.read_head().startswith(b"HTTP/1.1 101 ")
            assert recorder.wait("open")[1].user == "slow"
            slow.close()


class Gate:
    """An authorize hook that lets nobody in until released, counting who waits."""

    def __init__(self):
        self.waiting = 0
        self.release = threading.Event()

    def __call__(self, request):
        self.waiting += 1
        self.release.wait(10)
        return "ann"


def test_frames_sent_behind_the_request_wait_for_the_verdict():
    gate = Gate()
    with start_server(workers=2) as server:
        server.resource("/chat", authorize=gate, on_message=echo)
        with RawClient(server.port, handshake=False) as client:
            frame = b"\x81\x85" + b"\0\0\0\0" + b"early"
            client.sock.sendall(REQUEST + frame)
            wait_until(lambda: gate.waiting == 1, what="the hook running")
            gate.release.set()
            assert client.read_head().startswith(b"HTTP/1.1 101 ")
            assert client.recv_frame().payload == b"early"


def test_the_handshake_deadline_answers_503_when_a_hook_takes_too_long(caplog):
    gate = Gate()
    recorder = Recorder()
    with start_server(workers=1, handshake_timeout=0.3) as server:
        server.resource("/chat", authorize=gate, on_message=echo, on_open=recorder.on_open)
        with caplog.at_level(logging.WARNING, logger="wschat"):
            answers = []
            threads = [threading.Thread(target=lambda: answers.append(answer_of(server.port))) for _ in range(2)]
            for thread in threads:  # one hook thread: the second request waits for the first
                thread.start()
            for thread in threads:
                thread.join(10)
            assert [(head.split(b"\r\n")[0], body) for head, body in answers] == \
                [(b"HTTP/1.1 503 Service Unavailable", b"authorization timed out\n")] * 2
        assert "authorization took longer than the handshake timeout" in caplog.text
        gate.release.set()  # the late verdicts find their connections answered: nothing more happens
        with connect(f"ws://127.0.0.1:{server.port}/chat") as ws:
            ws.send("after")
            assert ws.recv(timeout=5) == "after"
        assert recorder.events.qsize() == 1


def test_limits_are_checked_again_after_a_deferred_hook():
    gate = Gate()
    recorder = Recorder()
    with start_server(workers=2, max_connections_per_ip=1) as server:
        server.resource("/chat", authorize=gate, on_open=recorder.on_open)
        clients = [RawClient(server.port, handshake=False) for _ in range(2)]
        for client in clients:
            client.sock.sendall(REQUEST)
        wait_until(lambda: gate.waiting == 2, what="both hooks running")
        gate.release.set()
        statuses = sorted(int(client.read_head().split()[1]) for client in clients)
        assert statuses == [101, 429]
        recorder.wait("open")
        for client in clients:
            client.close()


def test_stop_does_not_wait_for_a_hook():
    gate = Gate()
    server = start_server(workers=1, close_timeout=0.5)
    server.resource("/chat", authorize=gate)
    client = RawClient(server.port, handshake=False)
    client.sock.sendall(REQUEST)
    wait_until(lambda: gate.waiting == 1, what="the hook running")
    stopper = threading.Thread(target=server.stop)
    stopper.start()
    stopper.join(5)
    alive = stopper.is_alive()
    gate.release.set()
    client.close()
    assert not alive, "stop() waited for the hook"
