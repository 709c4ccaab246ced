"""End-to-end tests of the server over real sockets on 127.0.0.1."""

import contextlib
import http.client
import os
import socket
import ssl
import subprocess
import sys
import threading

import pytest
from websockets.exceptions import ConnectionClosed as WsConnectionClosed
from websockets.exceptions import ConnectionClosedError, ConnectionClosedOK, InvalidStatus
from websockets.sync.client import connect

from wschat import ConnectionClosed, SendTimeout
from wschat.errors import InvalidPayload, ProtocolError
from wschat.handoff import Handoff
from wschat.frames import Opcode, encode_frame
from wschat.outbound import BUFFER_OVERHEAD
from wschat.server import Server

from .helpers import RawClient, Recorder, certificate_in, server_with_slow_client, start_server, wait_until


def echo_server(**kwargs):
    """A server whose /chat echoes every message to its sender."""
    recorder = Recorder()
    server = start_server(**kwargs)
    handlers = recorder.handlers()
    handlers["on_message"] = lambda conn, message: (recorder.on_message(conn, message), conn.send(message))
    server.resource("/chat", **handlers)
    server.recorder = recorder
    return server


@pytest.fixture
def echo():
    server = echo_server(max_message_size=17 << 20)
    yield server
    server.stop()


def url(server, path="/chat"):
    return f"ws://127.0.0.1:{server.port}{path}"


# -- messages ----------------------------------------------------------------


def test_text_binary_and_fragmented(echo):
    with connect(url(echo)) as ws:
        ws.send("héllo")
        assert ws.recv(timeout=5) == "héllo"
        ws.send(b"\x00\x01\xff")
        assert ws.recv(timeout=5) == b"\x00\x01\xff"
        ws.send(iter(["frag", "ment", "ed ✓"]))  # three frames, one message
        assert ws.recv(timeout=5) == "fragmented ✓"
        ws.send(iter([b"ab", b"cd"]))
        assert ws.recv(timeout=5) == b"abcd"


def test_sixteen_mib_messages(echo):
    payload = os.urandom(16 << 20)
    with connect(url(echo), max_size=None) as ws:
        ws.send(payload)
        assert ws.recv(timeout=30) == payload
        text = "ü" * (8 << 20)
        ws.send(text)
        assert ws.recv(timeout=30) == text


def test_ping_pong(echo):
    with connect(url(echo)) as ws:
        ws.ping(b"abc").wait(5)  # the server answers with the same payload
    with RawClient(echo.port) as raw:
        raw.send_frame(Opcode.PING, b"raw")
        frame = raw.recv_frame()
        assert (frame.opcode, frame.payload) == (Opcode.PONG, b"raw")


def test_connection_handle(echo):
    with connect(url(echo, "/chat/room?x=1"), additional_headers={"X-Test": "yes"}) as ws:
        _, conn = echo.recorder.wait("open")
        assert conn.path == "/chat/room" and conn.headers["X-Test"] == "yes"
        assert conn.remote_address[0] == "127.0.0.1" and conn.is_open and conn.key
        assert echo.connections() == [conn] and echo.connections("/chat/x") == [conn]
        assert echo.connections("/nothing") == []
        ws.send("x")
        ws.recv(timeout=5)


def test_routing_longest_prefix_and_404():
    server = start_server()
    seen = []
    server.resource("/a", on_open=lambda c: seen.append(("a", c.path)))
    server.resource("/a/b", on_open=lambda c: seen.append(("ab", c.path)))
    try:
        for path in ["/a", "/a/b/c", "/a/bc"]:
            with connect(url(server, path)) as ws:
                ws.ping().wait(5)
        assert seen == [("a", "/a"), ("ab", "/a/b/c"), ("a", "/a/bc")]
        with pytest.raises(InvalidStatus) as info:
            with connect(url(server, "/nowhere")):
                pass
        assert info.value.response.status_code == 404
    finally:
        server.stop()


# -- close paths -------------------------------------------------------------


def test_client_close(echo):
    with connect(url(echo)) as ws:
        ws.close(1000, "done")
    _, _, code, reason = echo.recorder.wait("close")
    assert (code, reason) == (1000, "done")


def test_server_close_from_another_thread(echo):
    with connect(url(echo)) as ws:
        _, conn = echo.recorder.wait("open")
        conn.close(4000, "bye")
        with pytest.raises(WsConnectionClosed) as info:
            ws.recv(timeout=5)
        assert info.value.rcvd.code == 4000 and info.value.rcvd.reason == "bye"
    assert echo.recorder.wait("close")[2] == 4000
    with pytest.raises(ConnectionClosed):
        conn.send("too late")
    conn.close()  # a second close is a no-op


def test_eof_without_close_is_1006(echo):
    raw = RawClient(echo.port)
    raw.close()
    assert echo.recorder.wait("close")[2] == 1006


@pytest.mark.parametrize(
    "frames, code, error",
    [
        ([(Opcode.TEXT, b"unmasked", True, False)], 1002, ProtocolError),
        ([(0x3, b"", True, True)], 1002, ProtocolError),
        ([(Opcode.CONTINUATION, b"x", True, True)], 1002, ProtocolError),
        ([(Opcode.TEXT, b"\xff", True, True)], 1007, InvalidPayload),
        ([(Opcode.TEXT, b"ok", False, True), (Opcode.CONTINUATION, b"\xed\xa0\x80", False, True)], 1007, InvalidPayload),
        ([(Opcode.CLOSE, b"\x03", True, True)], 1002, ProtocolError),
    ],
)
def test_protocol_violations_fail_the_connection(echo, frames, code, error):
    with RawClient(echo.port) as raw:
        for opcode, payload, fin, mask in frames:
            raw.send_frame(opcode, payload, fin=fin, mask=mask)
        assert raw.recv_close() == code
        assert raw.at_eof()  # and the server closed the TCP connection
    assert isinstance(echo.recorder.wait("error")[2], error)
    assert echo.recorder.wait("close")[2] == code


def test_message_too_big():
    server = echo_server(max_message_size=1000)
    try:
        with connect(url(server), max_size=None) as ws:
            ws.send("x" * 1000)
            assert ws.recv(timeout=5) == "x" * 1000
            ws.send("x" * 1001)
            with pytest.raises(ConnectionClosedError) as info:
                ws.recv(timeout=5)
            assert info.value.rcvd.code == 1009
    finally:
        server.stop()


@pytest.mark.parametrize("error_handler_fails", [False, True])
def test_handler_exception_closes_1011_and_calls_on_error(error_handler_fails, caplog):
    recorder = Recorder()

    def on_error(conn, error):
        recorder.on_error(conn, error)
        if error_handler_fails:
            raise RuntimeError("error handler bug")  # contained and logged too

    server = start_server()
    server.resource("/chat", on_message=lambda c, m: 1 / 0, on_error=on_error)
    try:
        with connect(url(server)) as ws:
            ws.send("boom")
            with pytest.raises(ConnectionClosedError) as info:
                ws.recv(timeout=5)
            assert info.value.rcvd.code == 1011
        assert isinstance(recorder.wait("error")[2], ZeroDivisionError)
        assert ("error handler failed" in caplog.text) == error_handler_fails
    finally:
        server.stop()


# -- pings -------------------------------------------------------------------


def test_ping_scheduler_pings_and_drops_silent_clients():
    server = echo_server(ping_interval=0.1, ping_timeout=0.5)
    try:
        with RawClient(server.port) as raw:  # never answers
            assert raw.recv_frame().opcode == Opcode.PING
            assert raw.recv_close() == 1011
        assert server.recorder.wait("close")[2] == 1011
        with connect(url(server)) as ws:  # answers pings: stays
            ws.send("still here")
            assert ws.recv(timeout=5) == "still here"
            ws.ping().wait(5)
    finally:
        server.stop()


# -- limits --------------------------------------------------------------------


def test_a_number_is_refused_not_sent_as_zero_bytes(echo):
    with connect(url(echo)) as client:
        client.send("hello")
        assert client.recv(timeout=5) == "hello"
        (conn,) = echo.connections("/chat")
        with pytest.raises(TypeError, match="not int"):
            conn.send(3)
        with pytest.raises(TypeError, match="not int"):
            echo.broadcast(3)
        conn.send("next")
        assert client.recv(timeout=5) == "next"  # nothing went out before it


def test_the_url_names_the_port_once_there_is_one():
    server = Server("127.0.0.1", 0)
    assert server.url is None  # port 0: any free one, known once bound
    server.start()
    try:
        assert server.url == f"ws://127.0.0.1:{server.port}" and server.port > 0
    finally:
        server.stop()
    assert Server("::1", 1984).url == "ws://[::1]:1984"


def test_a_path_is_served_by_one_resource_only():
    """A second resource at the same path would never be reached: it is
    refused, naming the path, and the first serves on (a Chat made twice on
    one server is refused the same way)."""
    from wschat.chat import Chat
    from wschat.checks import SettingError

    server = echo_server()
    try:
        with pytest.raises(SettingError, match="'/chat'") as info:
            server.resource("/chat", on_message=lambda conn, message: conn.send("the other one"))
        assert info.value.name == "path"
        with pytest.raises(SettingError, match="'/chat'"):
            Chat(server)
        with connect(url(server)) as client:
            client.send("first")
            assert client.recv(timeout=5) == "first"
    finally:
        server.stop()


def test_max_connections_503():
    server = echo_server(max_connections=2)
    try:
        with connect(url(server)) as a, connect(url(server)):  # two open: the third is one too many
            with pytest.raises(InvalidStatus) as info:
                with connect(url(server)):
                    pass
            assert info.value.response.status_code == 503
            a.send("a ok")
            assert a.recv(timeout=5) == "a ok"
        with connect(url(server)) as c:  # room again once they left
            c.send("c ok")
            assert c.recv(timeout=5) == "c ok"
    finally:
        server.stop()


@pytest.mark.parametrize("behaviour", ["silent", "dribble"])
def test_handshake_deadline(behaviour):
    server = echo_server(handshake_timeout=0.5)
    try:
        raw = RawClient(server.port, handshake=False)
        stop = threading.Event()
        server.raw = raw

        def dribble():
            for byte in b"GET /chat HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"y" * 1000:
                if stop.wait(0.02):
                    return
                try:
                    raw.sock.send(bytes([byte]))
                except OSError:
                    return

        if behaviour == "dribble":
            threading.Thread(target=dribble, daemon=True).start()
        with connect(url(server)) as ws:  # others are served meanwhile
            ws.send("fine")
            assert ws.recv(timeout=5) == "fine"
        assert raw.at_eof()
        stop.set()
    finally:
        server.raw.close()
        server.stop()


def test_max_header_size_431():
    server = echo_server(max_header_size=1024)
    try:
        with RawClient(server.port, handshake=False) as raw:
            raw.handshake(headers=["X-Big: " + "y" * 2000])
            assert raw.status == 431
        with connect(url(server)) as ws:
            ws.send("fine")
            assert ws.recv(timeout=5) == "fine"
    finally:
        server.stop()


@pytest.mark.parametrize(
    "headers, version, status",
    [((), "8", 426), (("Origin: http://evil.example",), "13", 403)],
)
def test_handshake_refusals_over_the_wire(headers, version, status):
    server = echo_server(allowed_origins=["http://good.example"])
    try:
        with RawClient(server.port, handshake=False) as raw:
            raw.handshake(headers=headers, version=version)
            assert raw.status == status
            if status == 426:
                assert b"Sec-WebSocket-Version: 13" in raw.response
            assert raw.at_eof()
    finally:
        server.stop()


def test_slow_client_closed_and_others_get_everything():
    server, recorder, slow, slow_conn = server_with_slow_client(256 * 1024)
    try:
        received = []
        progress = threading.Condition()

        def read(ws):
            for _ in range(2000):
                message = ws.recv(timeout=20)
                with progress:
                    received.append(message)
                    progress.notify()

        with connect(url(server), max_size=None) as good:
            recorder.wait("open")
            reader = threading.Thread(target=read, args=(good,))
            reader.start()
            for batch in range(200):  # 20 MB in all, 10 messages at a time
                for i in range(batch * 10, batch * 10 + 10):
                    server.broadcast(f"{i:06d}" + "x" * 10000)
                    assert slow_conn.queued <= 256 * 1024 + 10010  # bounded: never past the mark
                with progress:  # the good client keeps up: wait for it
                    assert progress.wait_for(lambda: len(received) >= batch * 10, timeout=20)
            reader.join(30)
        assert [m[:6] for m in received] == [f"{i:06d}" for i in range(2000)]
        _, _, code, reason = recorder.wait("close", conn=slow_conn)
        assert (code, reason) == (1008, "client too slow")
        slow.close()
    finally:
        server.stop()


def test_send_from_another_thread_waits_then_times_out():
    server, _, slow, conn = server_with_slow_client(32 * 1024)
    try:
        with pytest.raises(SendTimeout):
            for _ in range(10000):
                conn.send(b"z" * 8192, timeout=0.3)
        assert conn.queued <= 32 * 1024 + 8192
        # Once the client reads, the queue drains and sends go through again.
        drained = threading.Event()

        def read_all():
            while slow.recv_frame() is not None:
                if not conn.queued:
                    drained.set()

        reader = threading.Thread(target=read_all)
        reader.start()
        conn.send(b"after", timeout=10)
        assert drained.wait(10)
        conn.close()
        reader.join(10)  # the reader ends at the server's EOF
        slow.close()
    finally:
        server.stop()



def system_thread_name(native_id: int | None = None) -> str:
    with open(f"/proc/self/task/{native_id or threading.get_native_id()}/comm") as comm:
        return comm.read().strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="threads are named for the system with Linux's prctl")
def test_the_threads_a_server_starts_carry_their_names_into_the_system():
    """``top -H``, ``perf`` and tools/bench.py tell the loop from the handler
    pool by the names the system shows; the caller's thread keeps its own."""
    server = start_server(workers=2)
    names = {}

    def on_message(conn, message):
        names["handler"] = system_thread_name()
        conn.send("named")

    server.resource("/chat", on_message=on_message)
    try:
        with connect(url(server)) as ws:
            ws.send("who")
            assert ws.recv(timeout=5) == "named"
        loop = server._thread.native_id
        assert system_thread_name(loop) == "wschat-loop" and names["handler"] == "wschat-handler_"
        assert system_thread_name() != "wschat-loop"
    finally:
        server.stop()


def test_thread_names_stay_pythons_alone_where_the_system_cannot_take_them(monkeypatch):
    """Elsewhere than on Linux, or with a C library that has no prctl or
    cannot be loaded, naming a thread does nothing, and fails nothing."""
    from wschat import osthread

    def unloadable(name):
        raise OSError("no such library")

    assert osthread._prctl("darwin") is None
    assert osthread._prctl("linux", lambda name: object()) is None  # no prctl in it
    assert osthread._prctl("linux", unloadable) is None
    monkeypatch.setattr(osthread, "_set_name", None)
    osthread.name_this_thread()

# -- handlers on a worker pool ---------------------------------------------------


def test_workers_blocking_handler_does_not_stall_others_and_order_is_kept():
    release = threading.Event()
    order = []
    server = start_server(workers=4)

    def on_message(conn, message):
        if message == "block":
            release.wait(10)
        elif message.startswith("n"):
            order.append(int(message[1:]))
            if len(order) == 200:
                conn.send("done")
        else:
            conn.send(message)

    server.resource("/chat", on_message=on_message)
    try:
        with connect(url(server)) as blocked, connect(url(server)) as other, connect(url(server)) as third:
            blocked.send("block")
            other.send("ping?")
            assert other.recv(timeout=5) == "ping?"  # answered while a handler blocks
            for i in range(200):
                third.send(f"n{i}")
            assert third.recv(timeout=10) == "done"
            assert order == list(range(200))
            release.set()
    finally:
        release.set()
        server.stop()


# -- plain HTTP ------------------------------------------------------------------


@pytest.fixture
def files_server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    (root / "index.html").write_text("<h1>hi</h1>")
    (root / "app.js").write_text("let x = 1;")
    (tmp_path / "secret.txt").write_text("top secret")
    server = echo_server(static_dir=str(root))
    yield server
    server.stop()


def http_get(server, path, method="GET"):
    client = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    client.putrequest(method, path, skip_accept_encoding=True)
    client.endheaders()
    response = client.getresponse()
    return response.status, response.getheader("Content-Type"), response.read(), response


def test_static_files(files_server):
    status, ctype, body, response = http_get(files_server, "/")
    assert (status, ctype, body) == (200, "text/html; charset=utf-8", b"<h1>hi</h1>")
    assert response.getheader("Content-Length") == "11"
    status, ctype, body, _ = http_get(files_server, "/app.js")
    assert status == 200 and "javascript" in ctype and body == b"let x = 1;"
    status, _, body, response = http_get(files_server, "/", "HEAD")
    assert status == 200 and body == b"" and response.getheader("Content-Length") == "11"


@pytest.mark.parametrize("path", ["/missing.html", "/../secret.txt", "/%2e%2e/secret.txt", "/..%2fsecret.txt", "/a/../../secret.txt", "/%00"])
def test_static_404_and_no_traversal(files_server, path):
    status, _, body, _ = http_get(files_server, path)
    assert status == 404 and b"top secret" not in body


def test_static_405_and_upgrade_needed(files_server):
    assert http_get(files_server, "/", "POST")[0] == 405
    status, _, body, _ = http_get(files_server, "/chat")  # the WebSocket path, without an upgrade
    assert status == 426 and b"WebSocket connections only" in body


def test_a_chat_at_the_root_leaves_the_files_to_plain_http(tmp_path):
    """``--path /``: a WebSocket endpoint that every path falls under.  A
    plain request for a file gets it (the page at /), one for no file gets
    426, and every upgrade goes to the endpoint."""
    root = tmp_path / "www"
    root.mkdir()
    (root / "index.html").write_text("<h1>hi</h1>")
    (root / "app.js").write_text("let x = 1;")
    server = start_server(static_dir=str(root))
    server.resource("/", on_message=lambda conn, message: conn.send(message))
    try:
        assert http_get(server, "/")[2] == b"<h1>hi</h1>"
        assert http_get(server, "/app.js")[2] == b"let x = 1;"
        status, _, body, _ = http_get(server, "/room")
        assert status == 426 and b"WebSocket connections only" in body
        assert http_get(server, "/", "POST")[0] == 405
        for path in ("/", "/app.js"):
            with connect(f"ws://127.0.0.1:{server.port}{path}") as client:
                client.send("echo")
                assert client.recv(timeout=5) == "echo"
    finally:
        server.stop()


def test_no_static_dir_means_404():
    server = echo_server()
    try:
        assert http_get(server, "/")[0] == 404
    finally:
        server.stop()


# -- TLS -----------------------------------------------------------------------


def tls_echo(client, payload):
    """One echo over a TLS RawClient.  The TLS tests use RawClient, one thread
    per session: python-websockets' sync client reads in a thread of its own
    while the caller writes, and one OpenSSL session used by two threads at
    once loses records now and then (its request never reaches the server)."""
    client.send_frame(Opcode.BINARY, payload)
    return client.recv_frame().payload


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    return certificate_in(tmp_path_factory.mktemp("tls"))


def test_tls(certificate):
    cert, key = certificate
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert, key)
    client_context = ssl.create_default_context(cafile=cert)
    server = echo_server(ssl_context=server_context, handshake_timeout=1, max_message_size=4 << 20)
    try:
        assert server.url.startswith("wss://")
        # A client that opens TCP and never starts TLS does not stall anyone.
        idle = socket.create_connection(("127.0.0.1", server.port))
        with RawClient(server.port, ssl_context=client_context) as tls:  # one thread per TLS session (see tls_echo)
            assert tls.status == 101
            assert tls_echo(tls, b"secret hello") == b"secret hello"
            big = os.urandom(3 << 20)
            assert tls_echo(tls, big) == big
            many = [f"m{i}".encode() for i in range(300)]
            for message in many:
                tls.send_frame(Opcode.BINARY, message)
            assert [tls.recv_frame().payload for _ in many] == many
        idle.settimeout(5)
        assert idle.recv(1) == b""  # dropped at the handshake deadline
        idle.close()
    finally:
        server.stop()


# -- shutdown ----------------------------------------------------------------------


def open_fds():
    return set(os.listdir("/proc/self/fd"))


def test_stop_sends_1001_and_leaks_nothing():
    threads_before = set(threading.enumerate())
    fds_before = open_fds()
    server = echo_server(ping_interval=0.05, workers=2)
    stack = contextlib.ExitStack()
    clients = [stack.enter_context(connect(url(server))) for _ in range(5)]
    for ws in clients:
        ws.send("hi")
        assert ws.recv(timeout=5) == "hi"
    server.stop()
    for ws in clients:
        with pytest.raises(ConnectionClosedOK) as info:
            ws.recv(timeout=5)
        assert info.value.rcvd.code == 1001
    stack.close()
    assert server.recorder.wait("close")[2] == 1001
    left = set(threading.enumerate()) - threads_before
    assert {thread for thread in left if not thread.name.endswith("(keepalive)")} == set()  # the server's: at once
    wait_until(lambda: not any(thread.is_alive() for thread in left), what="the test clients' keepalive threads")
    assert open_fds() - fds_before == set()


def test_stop_handles_what_it_read_then_drains_then_closes_and_reads_no_more(tmp_path):
    """Server.stop: no client is read any more; the handlers of what was read
    finish; ``on_drain`` runs; only then the 1001 (and what a client sends
    after it is not handled).  With ``release_port`` the port is free at once."""
    order, release, handling = [], threading.Event(), threading.Event()

    def on_message(conn, message):
        handling.set()
        release.wait(10)
        order.append(("handled", message))

    server = start_server(workers=2)
    server.resource("/chat", on_message=on_message, on_drain=lambda timeout: order.append(("drain", timeout > 0)))
    port = server.port
    raw = RawClient(port)
    raw.send_frame(Opcode.TEXT, b"before the stop")
    assert handling.wait(5)
    stopping = threading.Thread(target=server.stop, kwargs={"timeout": 5, "release_port": True})
    stopping.start()
    try:
        wait_until(lambda: socket_refused(port), what="the port to be let go of")
        raw.send_frame(Opcode.TEXT, b"during the drain")  # not read: held until the close, then not handled
        assert order == []  # nothing drains while a handler runs
    finally:
        release.set()  # a failure here must not leave the server for the next test
    assert raw.recv_close() == 1001
    raw.send_frame(Opcode.CLOSE, (1001).to_bytes(2, "big"))
    stopping.join(10)
    assert order == [("handled", "before the stop"), ("drain", True)]


def socket_refused(port: int) -> bool:
    """True once nothing listens on ``port``.  A connect that races the close
    of the listening socket is reset rather than refused: ask again."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return False
    except ConnectionRefusedError:
        return True
    except ConnectionResetError:
        return False


def test_serve_forever_in_calling_thread_and_port_in_use():
    server = Server("127.0.0.1", 0, ping_interval=0)
    server.resource("/chat", on_message=lambda c, m: c.send(m))
    thread = threading.Thread(target=server.serve_forever)
    server.bind()
    thread.start()
    try:
        with connect(url(server)) as ws:
            ws.send("x")
            assert ws.recv(timeout=5) == "x"
        with pytest.raises(OSError):
            Server("127.0.0.1", server.port).start()
    finally:
        server.stop()
        thread.join(10)
    assert not thread.is_alive()


def test_stop_before_serving_releases_the_socket():
    server = Server("127.0.0.1", 0)
    server.bind()
    port = server.port
    server.stop()
    again = Server("127.0.0.1", port)
    again.bind()  # the port is free again
    again.stop()


# -- more of the API and its edges ----------------------------------------------


def test_context_manager_ping_and_binary_broadcast():
    recorder = Recorder()
    with Server("127.0.0.1", 0, ping_interval=0) as server:
        server.resource("/chat", **recorder.handlers())
        assert server.start() is server  # already running: nothing more starts
        assert [t.name for t in threading.enumerate()].count("wschat-loop") == 1
        with RawClient(server.port) as raw:
            _, conn = recorder.wait("open")
            assert "open" in repr(conn)
            conn.ping(b"hey")
            frame = raw.recv_frame()
            assert (frame.opcode, frame.payload) == (Opcode.PING, b"hey")
            assert server.broadcast(b"\x00\xffbinary") == 1
            frame = raw.recv_frame()
            assert (frame.opcode, frame.payload) == (Opcode.BINARY, b"\x00\xffbinary")
    assert not conn.is_open


def test_frames_right_behind_the_request():
    server = echo_server()
    try:
        with RawClient(server.port, handshake=False) as raw:
            request = (b"GET /chat HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                       b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
            raw.sock.sendall(request + b"".join(
                encode_frame(Opcode.TEXT, b"early %d" % i, mask=os.urandom(4))
                for i in range(3)))
            raw.response = raw.read_head()
            assert raw.status == 101
            assert [raw.recv_frame().payload for _ in range(3)] == [b"early 0", b"early 1", b"early 2"]
    finally:
        server.stop()


def test_send_from_the_loop_thread_to_a_slow_client_closes_it():
    server, recorder, slow, slow_conn = server_with_slow_client(64 * 1024)
    # A handler runs on the loop thread: it must never block, so the overflow
    # closes the slow client instead of waiting for it.
    sender = RawClient(server.port)
    try:
        recorder.wait("open")
        server.resources[0].on_message = lambda conn, message: [slow_conn.send(message) for _ in range(200)]
        sender.send_frame(Opcode.TEXT, b"x" * 10000)
        _, _, code, reason = recorder.wait("close", conn=slow_conn)
        assert (code, reason) == (1008, "client too slow")
        sender.send_frame(Opcode.PING, b"alive")
        assert sender.recv_frame().payload == b"alive"  # the loop went on
    finally:
        sender.close()
        slow.close()
        server.stop()


def test_plain_tcp_on_the_tls_port_is_dropped(certificate):
    cert, key = certificate
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server = echo_server(ssl_context=context)
    try:
        with RawClient(server.port, handshake=False) as raw:
            raw.sock.sendall(b"GET /chat HTTP/1.1\r\nHost: x\r\n\r\n")  # not a TLS hello
            assert raw.at_eof()
        with RawClient(server.port, ssl_context=ssl.create_default_context(cafile=cert)) as tls:
            assert tls_echo(tls, b"still serving") == b"still serving"
    finally:
        server.stop()


def test_tls_writes_survive_backpressure(certificate):
    """Small frames queue up behind a TLS write the kernel refused; each
    retried write must start with the same bytes, and all arrive in order."""
    cert, key = certificate
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    recorder = Recorder()
    server = start_server(ssl_context=context)
    server.resource("/chat", **recorder.handlers())
    try:
        with RawClient(server.port, rcvbuf=4096, ssl_context=ssl.create_default_context(cafile=cert)) as raw:
            _, conn = recorder.wait("open")
            sent = 0
            while not conn.queued and sent < 100000:  # until the kernel pushes back
                conn.send(f"{sent:06d}" + "x" * 500)
                sent += 1
            assert conn.queued
            for _ in range(500):  # more small frames behind the blocked write
                conn.send(f"{sent:06d}" + "x" * 500)
                sent += 1
            received = [raw.recv_frame().payload[:6] for _ in range(sent)]
            assert received == [f"{i:06d}".encode() for i in range(sent)]
    finally:
        server.stop()


def test_tls_connections_come_and_go_among_plain_http_on_the_port(certificate):
    """Many TLS connections, each closed with close_notify, among clients
    that speak plain HTTP to the TLS port: each is served, none waits."""
    cert, key = certificate
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server = echo_server(ssl_context=context)
    client_context = ssl.create_default_context(cafile=cert)
    try:
        for i in range(300):
            if i % 3 == 0:  # plain HTTP on the TLS port, as a confused client would
                with RawClient(server.port, handshake=False) as raw:
                    raw.sock.sendall(b"GET /chat HTTP/1.1\r\nHost: x\r\n\r\n")
                    assert raw.at_eof()
            with RawClient(server.port, ssl_context=client_context) as tls:
                assert tls_echo(tls, b"x") == b"x"
                tls.send_frame(Opcode.CLOSE, b"\x03\xe8")
                assert tls.recv_close() == 1000 and tls.at_eof()
    finally:
        server.stop()


def test_the_loop_never_sleeps_with_connections_to_flush(certificate, monkeypatch):
    """A flush can queue more bytes (our TLS close_notify; an on_close handler
    that tells the others): the loop must write them before it sleeps, not
    after its select() timeout."""
    import selectors

    sleeps = []

    class RecordingSelector(selectors.DefaultSelector):
        def select(self, timeout=None):
            if timeout and any(isinstance(key.data, Handoff) and key.data.has_dirty for key in self.get_map().values()):
                sleeps.append(timeout)
            return super().select(timeout)

    monkeypatch.setattr(selectors, "DefaultSelector", RecordingSelector)
    cert, key = certificate
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server = start_server(ssl_context=context)
    server.resource("/chat", on_message=lambda c, m: c.send(m),
                    on_close=lambda conn, code, reason: server.broadcast("someone left"))
    client_context = ssl.create_default_context(cafile=cert)
    try:
        with RawClient(server.port, ssl_context=client_context) as stays:
            for _ in range(20):
                with RawClient(server.port, ssl_context=client_context) as tls:
                    assert tls_echo(tls, b"x") == b"x"
                    tls.send_frame(Opcode.CLOSE, b"\x03\xe8")
                    assert tls.recv_close() == 1000 and tls.at_eof()
                assert stays.recv_frame().payload == b"someone left"
    finally:
        server.stop()
    assert sleeps == []


def test_a_ping_flood_without_reading_holds_one_pong_and_the_last_ping_is_answered():
    """RFC 6455 5.5.3 lets an endpoint answer only the most recent ping: a
    client that floods pings and never reads holds one pong in its queue,
    not one per ping (on 6ddb637 each ping queued its own and the client
    was closed with 1008), and the pong it gets last answers its last ping."""
    server, recorder, slow, slow_conn = server_with_slow_client(64 * 1024)
    try:
        peak = 0
        for batch in range(100):  # 20,000 pings, 2.6 MB
            slow.sock.sendall(b"".join(encode_frame(Opcode.PING, b"%06d" % (batch * 200 + i) + b"p" * 119,
                                                    mask=os.urandom(4)) for i in range(200)))
            peak = max(peak, slow_conn.queued)
        slow.send_frame(Opcode.PING, b"last")
        pongs = []
        while not pongs or pongs[-1] != b"last":
            frame = slow.recv_frame()
            assert frame.opcode == Opcode.PONG
            pongs.append(frame.payload)
        assert peak <= 127 + BUFFER_OVERHEAD  # one pong of 125 bytes, and its buffer
        assert len(pongs) < 20000 and pongs == sorted(pongs)  # coalesced; each the latest ping of its time
        assert slow_conn.is_open
    finally:
        slow.close()
        server.stop()


OUT_OF_DESCRIPTORS_SERVER = r"""
import logging, resource, sys, time
from wschat.server import Server

logging.basicConfig(level=logging.ERROR, stream=sys.stdout, format="%(message)s")
resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
server = Server("127.0.0.1", 0, ping_interval=0)
server.resource("/chat", on_message=lambda c, m: c.send(m))
server.start()
print("port", server.port, flush=True)
sys.stdin.readline()  # the clients are connected: more than there are descriptors
start = time.process_time()
time.sleep(1.5)  # what is measured is the CPU the loop burns meanwhile
print("cpu", time.process_time() - start, flush=True)
sys.stdin.readline()
server.stop()
"""


def test_out_of_descriptors_pauses_accepting_instead_of_spinning():
    process = subprocess.Popen([sys.executable, "-c", OUT_OF_DESCRIPTORS_SERVER], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    try:
        port = int(process.stdout.readline().split()[1])
        with contextlib.ExitStack() as stack:
            for _ in range(100):
                stack.enter_context(socket.create_connection(("127.0.0.1", port)))
            process.stdin.write("go\n")
            process.stdin.flush()
            while not (line := process.stdout.readline()).startswith("cpu"):
                assert line, process.stderr.read()  # the server died
                lines.append(line)
            cpu = float(line.split()[1])
        with connect(f"ws://127.0.0.1:{port}/chat", open_timeout=10) as ws:  # accepting again
            ws.send("back")
            assert ws.recv(timeout=10) == "back"
        output, errors = process.communicate("stop\n", timeout=30)
        lines += output.splitlines()
    finally:
        process.kill()
    assert process.returncode == 0, errors
    assert cpu < 0.5  # paused, not spinning on accept
    assert any("pausing accepts" in line for line in lines)
    assert sum("accept failed" in line for line in lines) <= 10  # once per pause, not per spin
