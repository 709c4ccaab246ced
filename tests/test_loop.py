"""The loop, the transport and the dispatcher: the paths the end-to-end tests do not reach."""

import contextlib
import socket
import threading

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from wschat import files, transport
from wschat.budget import Budget
from wschat.connection import Connection
from wschat.dispatch import PoolDispatcher
from wschat.handoff import Handoff
from wschat.link import Link
from wschat.metrics import Metrics
from wschat.outbound import Outbox
from wschat.protocol import ServerProtocol
from wschat.server import Server

from .helpers import REQUEST, RawClient, Recorder, start_server, wait_until


def test_too_many_connections_in_handshake_are_dropped_at_accept():
    server = start_server(max_connections=2)
    server.resource("/chat")
    try:
        waiting = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(2)]
        with socket.create_connection(("127.0.0.1", server.port)) as third:
            third.settimeout(10)
            assert third.recv(1) == b""  # closed at once
        for sock in waiting:  # the two in handshake are still served
            sock.sendall(REQUEST)
            sock.settimeout(10)
            assert sock.recv(4096).startswith(b"HTTP/1.1 101")
            sock.close()
    finally:
        server.stop()


def test_an_unexpected_error_releases_that_connection_and_the_loop_goes_on(monkeypatch, caplog):
    real_read = transport.read_into

    def read_into(sock, buffer, tls, spare):
        received = real_read(sock, buffer, tls, spare)
        if isinstance(received, int) and b"explode" in bytes(buffer[:received]):
            raise RuntimeError("a bug")
        return received

    monkeypatch.setattr(transport, "read_into", read_into)
    server = start_server()
    server.resource("/chat", on_message=lambda conn, message: conn.send(message))
    try:
        with RawClient(server.port, handshake=False) as doomed:
            doomed.sock.sendall(b"explode")
            assert doomed.at_eof()
        assert "unexpected error" in caplog.text
        with connect(f"ws://127.0.0.1:{server.port}/chat") as ws:
            ws.send("still here")
            assert ws.recv(timeout=5) == "still here"
    finally:
        server.stop()


def test_writes_past_iov_max_arrive_whole_and_in_order():
    writer, reader = socket.socketpair()
    writer.setblocking(False)
    outbox = Outbox()
    for i in range(3 * transport.IOV_MAX + 7):
        outbox.append(b"%05d," % i)
    expected = b"".join(outbox.buffers)
    received = bytearray()

    def read():
        while len(received) < len(expected):
            received.extend(reader.recv(65536))

    thread = threading.Thread(target=read)
    thread.start()
    while outbox.size:
        transport.write(writer, outbox, None)
    thread.join(10)
    writer.close()
    reader.close()
    assert bytes(received) == expected


def test_wait_closed_and_latency():
    recorder = Recorder()
    server = start_server(ping_interval=0.05)
    server.resource("/chat", **recorder.handlers())
    try:
        with connect(f"ws://127.0.0.1:{server.port}/chat") as ws:  # answers pings by itself
            _, conn = recorder.wait("open")
            assert conn.wait_closed(0.01) is False
            wait_until(lambda: conn.latency is not None, what="a keepalive round trip")
            assert 0 <= conn.latency < 5
            ws.close()
        assert conn.wait_closed(10) is True
        assert conn.wait_closed(0) is True  # and at once, once closed
    finally:
        server.stop()


def test_a_pool_that_was_shut_down_runs_calls_in_place():
    """Handed only what it uses, a dispatcher runs without a loop."""
    metrics, budget = Metrics(), Budget(0)
    handoff = Handoff(metrics, lambda: False)
    pool = PoolDispatcher(Reading(), handoff, metrics, budget, workers=1, max_pending=4)
    pool.shutdown()
    settings = Server("127.0.0.1", 0).settings()
    conn = Connection("p1", Link(socket.socket(), ServerProtocol(), None), ("127.0.0.1", 1), handoff, settings, metrics)
    ran = []
    try:
        pool.submit(conn, ran.append, threading.current_thread())
        assert ran == [threading.current_thread()]
        assert pool.idle() and budget.total == 0
    finally:
        conn.link.sock.close()
        handoff.close()


class Reading:
    def watch(self, conn):
        raise AssertionError("not paused: nothing to watch")

    def resume_reading(self, conn):
        raise AssertionError("not paused: nothing to resume")

    def deliver_published(self):
        raise AssertionError("no events read: nothing published")


def test_a_static_file_over_the_size_limit_is_a_500(tmp_path, monkeypatch):
    (tmp_path / "big.txt").write_bytes(b"x" * 100)
    monkeypatch.setattr(files, "MAX_FILE_SIZE", 10)
    server = start_server(static_dir=str(tmp_path))
    try:
        with RawClient(server.port, handshake=False) as raw:
            raw.sock.sendall(b"GET /big.txt HTTP/1.1\r\nHost: x\r\n\r\n")
            assert raw.read_head().startswith(b"HTTP/1.1 500 ")
    finally:
        server.stop()


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_file_response_for_head_has_the_length_but_no_body(tmp_path, method):
    (tmp_path / "a.css").write_text("body{}")
    server = start_server(static_dir=str(tmp_path))
    try:
        with RawClient(server.port, handshake=False) as raw:
            raw.sock.sendall(f"{method} /a.css HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            data = b""
            while chunk := raw.sock.recv(65536):
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        assert b"Content-Length: 6" in head and body == (b"body{}" if method == "GET" else b"")
    finally:
        server.stop()


@pytest.mark.timeout(60)
def test_stop_from_a_signal_handler_never_waits_on_a_lock_its_thread_holds():
    """The handler runs between two bytecodes of the loop, maybe while it
    holds a connection's lock that a ping tick waits for: stop() must take
    no lock and join nothing there."""
    import signal

    for _ in range(15):
        server = Server("127.0.0.1", 0, ping_interval=0.001)
        server.resource("/chat", on_message=lambda conn, message: conn.send(message))
        server.bind()
        echoes, done = [], threading.Event()

        def chatter():
            try:
                with connect(f"ws://127.0.0.1:{server.port}/chat") as ws:
                    while not done.is_set():
                        ws.send("x" * 100)
                        echoes.append(ws.recv(timeout=10))
            except Exception:
                pass  # closed by the shutdown

        def send_signal():
            wait_until(lambda: len(echoes) > 300, what="traffic")
            signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR1)

        previous = signal.signal(signal.SIGUSR1, lambda *_: server.stop())
        threads = [threading.Thread(target=chatter) for _ in range(4)] + [threading.Thread(target=send_signal)]
        for thread in threads:
            thread.start()
        try:
            server.serve_forever()  # returns once the signal's stop() took effect
        finally:
            done.set()
            signal.signal(signal.SIGUSR1, previous)
            for thread in threads:
                thread.join(10)


def test_frames_cut_anywhere_across_many_connections_arrive_intact():
    """Every read lands in the loop's one buffer; a connection's unparsed
    bytes must be its own before another connection's read reuses it."""
    import os
    import random

    from wschat.frames import Opcode, encode_frame

    server = start_server(max_message_size=1 << 20)
    server.resource("/chat", on_message=lambda conn, message: conn.send(message))
    rng = random.Random(7)
    errors = []

    def client(seed):
        rng = random.Random(seed)
        try:
            with RawClient(server.port) as raw:
                messages = [os.urandom(rng.choice([0, 1, 125, 126, 1000, 65535, 65536, 70000])) for _ in range(40)]
                stream = b"".join(encode_frame(Opcode.BINARY, m, mask=os.urandom(4)) for m in messages)
                position = 0
                while position < len(stream):
                    step = rng.choice([1, 2, 3, 7, 100, 4096, 70000])
                    raw.sock.sendall(stream[position : position + step])
                    position += step
                for message in messages:
                    frame = raw.recv_frame()
                    if frame.payload != message:
                        errors.append(f"client {seed}: a message came back changed")
                        return
        except Exception as exc:
            errors.append(f"client {seed}: {exc!r}")

    threads = [threading.Thread(target=client, args=(rng.random(),)) for _ in range(20)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    finally:
        server.stop()
    assert errors == []


def test_broadcast_excludes_one_or_several_connections():
    recorder = Recorder()
    with start_server() as server:
        server.resource("/chat", **recorder.handlers())
        with contextlib.ExitStack() as stack:
            clients = [stack.enter_context(connect(f"ws://127.0.0.1:{server.port}/chat")) for _ in range(4)]
            conns = [recorder.wait("open")[1] for _ in clients]
            by_conn = dict(zip(conns, clients))  # opened in order: one client at a time
            assert server.broadcast("all but one", exclude=conns[0]) == 3
            assert server.broadcast("all but two", exclude=[conns[1], conns[2]]) == 2
            assert server.broadcast("to everyone") == 4
            received = {conn: [] for conn in conns}
            for conn, client in by_conn.items():
                while (message := client.recv(timeout=5)) != "to everyone":
                    received[conn].append(message)
            assert [received[conn] for conn in conns] == [
                ["all but two"], ["all but one"], ["all but one"], ["all but one", "all but two"]]


def test_a_message_taken_inline_never_overtakes_its_connections_handler_calls():
    """With workers, ``on_message_inline`` runs on the loop thread, and only
    for a connection with no call waiting or running: a message sent while
    ``on_open`` still runs waits its turn on a worker."""
    opened = threading.Event()
    handled, conns = [], []

    def on_open(conn):
        conns.append(conn)
        opened.wait(10)

    def idle():  # its worker is done: the next message may be taken inline
        wait_until(lambda: conns[0].link.calls is None, what="the worker to finish")

    def on_message_inline(conn, message):
        handled.append(("inline", message, threading.current_thread().name))
        if message == "fail":
            raise ValueError("inline handler failed")
        return message != "pass"

    def on_message(conn, message):
        handled.append(("worker", message, threading.current_thread().name))
        conn.send(f"echo {message}")

    with start_server(workers=2) as server:
        server.resource("/chat", on_open=on_open, on_message=on_message, on_message_inline=on_message_inline)
        with connect(f"ws://127.0.0.1:{server.port}/chat") as client:
            client.send("early")
            wait_until(lambda: conns and conns[0].link.calls, what="early to wait for on_open")
            opened.set()
            assert client.recv(10) == "echo early"
            idle()
            client.send("quick")
            client.send("pass")  # the inline handler hands it on
            assert client.recv(10) == "echo pass"
            idle()
            client.send("fail")
            with pytest.raises(ConnectionClosed) as closed:
                client.recv(10)
            assert closed.value.rcvd.code == 1011
    assert [(where, message) for where, message, _ in handled] == [
        ("worker", "early"), ("inline", "quick"), ("inline", "pass"), ("worker", "pass"), ("inline", "fail")]
    assert {thread for where, _, thread in handled if where == "inline"} == {"wschat-loop"}
    assert all(thread.startswith("wschat-handler") for where, _, thread in handled if where == "worker")


def test_idle_hooks_run_on_the_loop_every_pass_and_before_it_sleeps():
    calls = []
    called = threading.Condition()

    def hook(idle):
        with called:
            calls.append((threading.current_thread().name, idle))
            called.notify_all()

    server = start_server()
    try:
        server.on_idle(hook)  # while running: from the loop's next pass
        with RawClient(server.port, handshake=False) as client:  # a pass with work in it
            client.sock.sendall(b"GET /nothing HTTP/1.1\r\n\r\n")
            assert client.sock.recv(100).startswith(b"HTTP/1.1 404")
        with called:
            assert called.wait_for(lambda: (("wschat-loop", True) in calls and ("wschat-loop", False) in calls), 10)
        assert {thread for thread, _ in calls} == {"wschat-loop"}
        server.remove_idle_hook(hook)
        server.stop()
        count = len(calls)
        server.start()  # a later run: the hook was removed, so not called
        with RawClient(server.port, handshake=False) as client:
            client.sock.sendall(b"GET /nothing HTTP/1.1\r\n\r\n")
            assert client.sock.recv(100).startswith(b"HTTP/1.1 404")
        assert len(calls) == count
    finally:
        server.stop()


def test_a_hook_added_before_the_server_runs_is_called_in_every_run_and_a_failing_one_is_logged(caplog):
    runs = []

    def hook(idle):
        runs.append(idle)
        raise RuntimeError("boom")

    server = Server("127.0.0.1", 0, ping_interval=0)
    server.on_idle(hook)
    try:
        for _ in range(2):
            runs.clear()
            server.start()
            wait_until(lambda: True in runs, what="the hook to run before the loop sleeps")
            server.stop()
    finally:
        server.stop()
    assert "unexpected error in" in caplog.text and "boom" in caplog.text
