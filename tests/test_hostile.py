"""Hostile clients and racing threads: one test per defect of the first version.

Each was reproduced on 1d5edf3 (issue 8) and each test here failed there.
They use only what that version had too (the helpers, the public API and
real sockets), so this file can be run against it again.
"""

import contextlib
import logging
import os
import selectors
import signal
import socket
import struct
import threading
import tracemalloc

import pytest
from websockets.sync.client import connect

from wschat import ConnectionClosed, SendTimeout
from wschat.chat import Chat, ChatLimits
from wschat.frames import Opcode, encode_frame
from wschat.outbound import BUFFER_OVERHEAD
from wschat.server import Server

from .helpers import RawClient, Recorder, blocked_in, server_with_slow_client, start_server, wait_until

MiB = 1 << 20


def masked(opcode, payload=b"", fin=True, rsv=0):
    return encode_frame(opcode, payload, fin=fin, rsv=rsv, mask=os.urandom(4))


def echo_server(**kwargs):
    server = start_server(**kwargs)
    server.resource("/chat", on_message=lambda conn, message: conn.send(message))
    return server


def barrier(server, path="/chat"):
    """One echo round trip on a fresh connection: the loop has since read
    everything that was sent to it before, and flushed what it could."""
    with connect(f"ws://127.0.0.1:{server.port}{path}") as ws:
        ws.send("barrier")
        assert ws.recv(timeout=10) == "barrier"


def fill_to_the_mark(server, conn):
    """Queue for a client that never reads until the kernel takes no more
    and the queue is at the mark: any frame more is over it."""
    for _ in range(20):  # again if the kernel took more meanwhile (its buffers grow under load)
        while True:
            try:
                conn.send(b"f" * 8192, timeout=0)
            except SendTimeout:
                before = conn.queued
                barrier(server, "/echo")
                if before and conn.queued == before:  # a loop pass later the kernel took none of it: full
                    break
        gap = server.max_queue - conn.queued - BUFFER_OVERHEAD  # the frame's buffer counts too
        if gap >= 2:
            conn.send(b"g" * (gap - 2 if gap - 2 < 126 else gap - 4), timeout=0)  # header of 2 or 4 bytes
        if server.max_queue - conn.queued < 2 + BUFFER_OVERHEAD:  # the smallest frame no longer fits
            return
    raise AssertionError("the queue never stayed at the mark")


@contextlib.contextmanager
def traced():
    """Memory allocated meanwhile (``held()``: still held; ``peak()``: at most)."""
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    probe = type("Probe", (), {})()
    probe.held = lambda: tracemalloc.get_traced_memory()[0] - base
    probe.peak = lambda: tracemalloc.get_traced_memory()[1] - base
    try:
        yield probe
    finally:
        tracemalloc.stop()


def record_selects(monkeypatch, event):
    """Make the loop's selector record, for each select(), whether ``event``
    was set when it returned and how many sockets were ready (0: it timed out)."""
    results = []

    class RecordingSelector(selectors.DefaultSelector):
        def select(self, timeout=None):
            ready = super().select(timeout)
            results.append((event.is_set(), len(ready)))
            return ready

    monkeypatch.setattr(selectors, "DefaultSelector", RecordingSelector)
    return results


def read_frames_until_eof(raw, answer_close=True):
    """Every frame until the server closes TCP; a close frame is answered."""
    frames = []
    while (frame := raw.recv_frame()) is not None:
        frames.append(frame)
        if frame.opcode == Opcode.CLOSE and answer_close:
            with contextlib.suppress(OSError):
                raw.send_frame(Opcode.CLOSE, frame.payload[:2])
    return frames


# -- 1. pipelined HTTP, garbage after a refusal ------------------------------------


def test_pipelined_requests_get_one_response_and_memory_stays_bounded(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    (root / "big.bin").write_bytes(os.urandom(4 * MiB))
    server = echo_server(static_dir=str(root))
    try:
        with traced() as memory, RawClient(server.port, handshake=False, rcvbuf=4096) as raw:
            for _ in range(20):  # one request per read of the server: each was answered, 4 MiB apiece
                raw.sock.sendall(b"GET /big.bin HTTP/1.1\r\nHost: x\r\n\r\n")
                barrier(server)
            assert memory.held() < 2 * 4 * MiB
            raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            data = b""
            while chunk := raw.sock.recv(1 << 20):
                data += chunk
        assert data.count(b"HTTP/1.1 200 OK") == 1 and len(data) < 4 * MiB + 1000
    finally:
        server.stop()


def test_garbage_behind_an_unsent_response_is_discarded_not_buffered(tmp_path):
    """A client that never reads its response, then sends garbage: the bytes
    are read and dropped, never kept as a request head that grows."""
    root = tmp_path / "www"
    root.mkdir()
    (root / "big.bin").write_bytes(os.urandom(4 * MiB))
    server = echo_server(static_dir=str(root), max_header_size=1024)
    try:
        with traced() as memory, RawClient(server.port, handshake=False, rcvbuf=4096) as raw:
            raw.sock.sendall(b"GET /big.bin HTTP/1.1\r\nHost: x\r\n\r\n")
            barrier(server)
            for _ in range(40):
                raw.sock.sendall(b"x" * 100_000)
                barrier(server)
            assert memory.held() < 5 * MiB  # the 4 MiB response, not the 4 MB of garbage too
    finally:
        server.stop()


# -- 2. nothing after our close frame ------------------------------------------------


@pytest.mark.parametrize("closer", ["close", "overflow"])
def test_no_data_frame_ever_follows_our_close_frame(closer):
    """A sender waiting for room while another thread closes (or a broadcast
    finds the client too slow): the waiting message must never go out after
    the close frame (RFC 6455 5.5.1)."""
    server, recorder, slow, conn = server_with_slow_client(32 * 1024, close_timeout=5)
    server.resource("/echo", on_message=lambda c, m: c.send(m))
    outcome = []
    try:
        fill_to_the_mark(server, conn)

        def send_more():
            try:
                conn.send(b"late" * 2048, timeout=20)
                outcome.append("sent")
            except ConnectionClosed:
                outcome.append("refused")

        sender = threading.Thread(target=send_more)
        sender.start()
        wait_until(lambda: blocked_in(sender, "wait"), what="the sender waiting for room")
        if closer == "close":
            conn.close(4000, "bye")
        else:
            server.broadcast(b"b" * 40000)  # over the mark: closed as too slow
        frames = read_frames_until_eof(slow)
        sender.join(10)
        closes = [i for i, f in enumerate(frames) if f.opcode == Opcode.CLOSE]
        assert closes and closes[0] == len(frames) - 1, [f.opcode for f in frames[closes[0]:]]
        assert outcome == ["refused"]
    finally:
        slow.close()
        server.stop()


# -- 3. what arrived before an error or a close is answered first --------------------


@pytest.mark.parametrize("bad, code", [
    (masked(Opcode.TEXT, b"rsv", rsv=0b100), 1002),
    (masked(Opcode.TEXT, b"\xff\xfe"), 1007),
    (masked(Opcode.CLOSE, struct.pack("!H", 1000)), 1000),
], ids=["protocol-error", "invalid-utf8", "close"])
@pytest.mark.parametrize("workers", [0, 4], ids=["inline", "pool"])
def test_a_message_before_an_error_or_close_still_gets_its_answer(bad, code, workers):
    server = start_server(workers=workers)
    Chat(server, welcome="", limits=ChatLimits.off())
    try:
        with RawClient(server.port) as raw:
            raw.sock.sendall(masked(Opcode.TEXT, b"hello") + bad)  # in one write
            frames = read_frames_until_eof(raw, answer_close=False)
        assert [(f.opcode, f.payload) for f in frames[:1]] == [(Opcode.TEXT, b"hello")]
        assert frames[-1].opcode == Opcode.CLOSE and struct.unpack("!H", frames[-1].payload[:2])[0] == code
    finally:
        server.stop()


# -- 4. fragment floods -------------------------------------------------------------


def test_tiny_fragment_flood_holds_memory_near_the_message_size():
    server = echo_server(max_message_size=4 * MiB)
    try:
        with RawClient(server.port) as raw, traced() as memory:
            raw.sock.settimeout(60)  # tracing every allocation (and coverage) slows the server tenfold
            raw.sock.sendall(masked(Opcode.BINARY, b"", fin=False))
            chunk = masked(Opcode.CONTINUATION, b"ab", fin=False) * 10_000
            for _ in range(8):  # 80,000 fragments of 2 bytes: a 160 kB message
                raw.sock.sendall(chunk)
            raw.send_frame(Opcode.PING, b"sync")  # answered after every fragment before it was parsed
            assert raw.recv_frame().payload == b"sync"
            assert memory.held() < 1 * MiB  # a list item per fragment (1d5edf3) held 3.8 MB
            raw.sock.sendall(masked(Opcode.CONTINUATION, b"!"))
            frame = raw.recv_frame()
        assert frame.payload == b"ab" * 80_000 + b"!"
    finally:
        server.stop()


# -- 5. a slow handler on a pool stops the reading ------------------------------------


def test_workers_pause_reading_while_handler_calls_pile_up():
    release = threading.Event()
    seen = []
    recorder = Recorder()
    server = start_server(workers=2)

    def on_message(conn, message):
        release.wait(30)
        seen.append(message[:6])

    server.resource("/chat", on_open=recorder.on_open, on_message=on_message)
    frames = [masked(Opcode.BINARY, b"%06d" % i + b"x" * 100_000) for i in range(300)]  # 30 MB
    try:
        with RawClient(server.port) as raw, traced() as memory:
            _, conn = recorder.wait("open")
            sender = threading.Thread(target=lambda: [raw.sock.sendall(f) for f in frames])
            sender.start()
            wait_until(lambda: not sender.is_alive() or conn.link.paused,
                       what="the server to pause reading, or the client to finish")
            release.set()
            sender.join(30)
            wait_until(lambda: len(seen) == 300, timeout=30, what="every message handled")
            peak = memory.peak()
        assert peak < 8 * MiB  # 16 waiting calls of 100 kB, and a read or two; not 30 MB
        assert seen == [b"%06d" % i for i in range(300)]
    finally:
        release.set()
        server.stop()


# -- 6. stop() from any thread ------------------------------------------------------------


@pytest.mark.parametrize("workers", [0, 2])
def test_stop_from_a_handler_returns_at_once_and_the_server_stops(workers):
    returned = threading.Event()
    server = start_server(workers=workers, close_timeout=30)

    def on_message(conn, message):
        server.stop()  # the shutdown waits for this very handler: stop must not wait for it
        returned.set()

    server.resource("/chat", on_message=on_message)
    try:
        with connect(f"ws://127.0.0.1:{server.port}/chat") as ws:
            ws.send("stop, please")
            assert returned.wait(10)
            with pytest.raises(Exception) as info:
                ws.recv(timeout=10)
            assert getattr(info.value, "rcvd", None) is not None and info.value.rcvd.code == 1001
    finally:
        server.stop()


# -- 7. UTF-8 checked while a frame still arrives --------------------------------------------


@pytest.mark.parametrize("prefix", [b"\xff", b"\xed\xa0", b"ok\xf4\x90"])
def test_invalid_utf8_fails_before_the_rest_of_a_large_frame_arrives(prefix):
    server = echo_server()
    try:
        with RawClient(server.port) as raw:
            frame = masked(Opcode.TEXT, prefix + b"x" * 500_000)
            raw.sock.sendall(frame[: 14 + len(prefix) + 100])  # header, bad bytes, a little more: no end
            assert raw.recv_close() == 1007
    finally:
        server.stop()


# -- 8. a signal stops the loop at once ----------------------------------------------------


def test_a_signal_handler_calling_stop_wakes_the_loop(monkeypatch):
    """serve_forever on the main thread, stop() from a signal handler: the
    select() the signal interrupts must return with the waker, not sleep
    out its timeout."""
    signalled = threading.Event()
    results = record_selects(monkeypatch, signalled)
    server = Server("127.0.0.1", 0, ping_interval=0)
    previous = signal.signal(signal.SIGUSR1, lambda *_: server.stop())

    def send_signal():
        wait_until(lambda: blocked_in(threading.main_thread(), "select"), what="the loop in select()")
        signalled.set()
        signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR1)

    killer = threading.Thread(target=send_signal)
    killer.start()
    try:
        server.serve_forever()
    finally:
        signal.signal(signal.SIGUSR1, previous)
        killer.join(10)
    assert next(count for after, count in results if after) >= 1  # the waker, not a timeout


# -- 9. HEAD, 10. symbolic links out of the static folder --------------------------------------


@pytest.mark.parametrize("path, status", [("/missing", 404), ("/chat", 426), ("/", 405)])
def test_head_responses_carry_no_body(tmp_path, path, status):
    server = echo_server(static_dir=str(tmp_path))
    try:
        with RawClient(server.port, handshake=False) as raw:
            method = "DELETE" if status == 405 else "HEAD"
            raw.sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            data = b""
            while chunk := raw.sock.recv(65536):
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(f"HTTP/1.1 {status} ".encode()) and b"Content-Length:" in head
        assert (body == b"") == (method == "HEAD")
    finally:
        server.stop()


def test_index_html_linking_out_of_the_static_dir_is_not_served(tmp_path):
    root = tmp_path / "www"
    (root / "docs").mkdir(parents=True)
    (tmp_path / "secret.html").write_text("top secret")
    (root / "docs" / "index.html").symlink_to(tmp_path / "secret.html")
    (root / "index.html").write_text("home")
    server = echo_server(static_dir=str(root))
    try:
        for path, expected in [("/docs/", b"404"), ("/docs/index.html", b"404"), ("/", b"200")]:
            with RawClient(server.port, handshake=False) as raw:
                raw.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                data = b""
                while chunk := raw.sock.recv(65536):
                    data += chunk
            assert data.split(b" ")[1] == expected and b"top secret" not in data
    finally:
        server.stop()


# -- 11. peer text never forges a log line ------------------------------------------------------


def test_peer_text_in_log_lines_is_escaped(caplog):
    caplog.set_level(logging.DEBUG, logger="wschat")
    recorder = Recorder()
    server = start_server(allowed_origins=["http://good.example"])
    server.resource("/chat", **recorder.handlers())
    forged = "\nERROR wschat: forged line"
    try:
        with RawClient(server.port) as raw:  # a close reason with a newline
            raw.send_frame(Opcode.CLOSE, struct.pack("!H", 4000) + forged.encode())
            raw.recv_close()
        recorder.wait("close")
        for request in [
            f"GET /chat{forged.replace(' ', '_')} HTTP/1.1\r\nHost: x\r\n\r\n",  # a bare LF in the target
            "GET /chat HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            f"Origin: http://evil.example\r\n {forged.strip()}\r\n\r\n",  # an obs-folded Origin
        ]:
            with RawClient(server.port, handshake=False) as raw:
                raw.sock.sendall(request.encode())
                assert raw.at_eof()
        barrier_server = server  # the loop has logged what it logs about them
        with RawClient(barrier_server.port) as raw:
            raw.send_frame(Opcode.PING, b"sync")
            assert raw.recv_frame().opcode == Opcode.PONG
    finally:
        server.stop()
    lines = [record.getMessage() for record in caplog.records]
    assert not [line for line in lines if "\n" in line or "\r" in line]
    assert any("forged" in line for line in lines)  # it was logged, escaped


# -- 12. life-cycle loose ends ------------------------------------------------------------------


def test_the_ping_timer_never_outlives_stop():
    for _ in range(200):
        server = Server("127.0.0.1", 0, ping_interval=0.0005)
        server.start()
        server.stop()
        assert [t for t in threading.enumerate() if t.name == "wschat-ping"] == []


def test_close_never_raises_while_the_peer_vanishes():
    recorder = Recorder()
    server = start_server()
    server.resource("/chat", **recorder.handlers())
    errors = []

    def close_until_closed(conn):
        try:
            while conn.is_open or conn.queued:
                conn.close(1000, "bye")
        except Exception as exc:  # documented as a no-op once closing: never raises
            errors.append(exc)

    previous = __import__("sys").getswitchinterval()
    __import__("sys").setswitchinterval(1e-6)
    try:
        for _ in range(100):
            raw = RawClient(server.port)
            _, conn = recorder.wait("open")
            closer = threading.Thread(target=close_until_closed, args=(conn,))
            closer.start()
            raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            raw.close()  # a reset
            recorder.wait("close", conn=conn)
            closer.join(10)
    finally:
        __import__("sys").setswitchinterval(previous)
        server.stop()
    assert errors == []


def test_a_stopped_server_starts_again():
    server = echo_server()
    port = server.port
    server.stop()
    server.requested_port = port
    server.start()
    try:
        with connect(f"ws://127.0.0.1:{server.port}/chat") as ws:
            ws.send("again")
            assert ws.recv(timeout=5) == "again"
    finally:
        server.stop()


def test_resources_registered_while_running_never_break_routing():
    server = echo_server()
    stop = threading.Event()

    def register():
        i = 0
        while not stop.is_set():
            server.resource(f"/extra/{i}")
            i += 1

    previous = __import__("sys").getswitchinterval()
    __import__("sys").setswitchinterval(1e-6)
    registrar = threading.Thread(target=register)
    registrar.start()
    try:
        for i in range(100):
            with RawClient(server.port) as raw:
                assert raw.status == 101, raw.response
    finally:
        stop.set()
        registrar.join(10)
        __import__("sys").setswitchinterval(previous)
        server.stop()


def test_an_overflow_from_another_thread_wakes_the_loop(monkeypatch):
    """A broadcast from another thread that closes a slow client must wake
    the loop to write the close, not leave it for the select() timeout."""
    broadcasting = threading.Event()
    results = record_selects(monkeypatch, broadcasting)
    server, recorder, slow, conn = server_with_slow_client(32 * 1024, close_timeout=5)
    server.resource("/echo", on_message=lambda c, m: c.send(m))
    try:
        fill_to_the_mark(server, conn)
        quiet = len(results)  # then one select() that timed out: nothing else is about to wake the loop
        wait_until(lambda: any(count == 0 for _, count in results[quiet:]), what="the loop quiet")
        loop_thread = next(thread for thread in threading.enumerate() if thread.name == "wschat-loop")
        wait_until(lambda: blocked_in(loop_thread, "select"), what="the loop asleep")
        broadcasting.set()
        server.broadcast(b"b" * 40000)  # over the mark: the client is closed as too slow
        wait_until(lambda: any(after for after, _ in results), what="the loop to wake")
        assert next(count for after, count in results if after) >= 1  # the waker, not a timeout
    finally:
        slow.close()
        server.stop()


def test_the_close_echo_goes_out_even_over_the_mark():
    server, recorder, slow, conn = server_with_slow_client(32 * 1024, close_timeout=5)
    server.resource("/echo", on_message=lambda c, m: c.send(m))
    try:
        fill_to_the_mark(server, conn)
        slow.send_frame(Opcode.CLOSE, struct.pack("!H", 4001) + b"done")
        frames = read_frames_until_eof(slow, answer_close=False)
        assert frames[-1].opcode == Opcode.CLOSE and frames[-1].payload == struct.pack("!H", 4001)
    finally:
        slow.close()
        server.stop()


def test_the_subprotocol_is_answered_in_the_clients_spelling():
    recorder = Recorder()
    server = start_server()
    server.resource("/chat", subprotocols=["wschat.v1"], **recorder.handlers())
    try:
        with RawClient(server.port, headers=["Sec-WebSocket-Protocol: other, WSChat.V1"]) as raw:
            assert raw.status == 101 and b"\r\nSec-WebSocket-Protocol: WSChat.V1" in raw.response
            _, conn = recorder.wait("open")
            assert conn.subprotocol == "wschat.v1"
    finally:
        server.stop()
