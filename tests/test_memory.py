"""Memory under attack (issue 18): what peers make the server hold has a
server-wide bound, an unfinished message a deadline, a slow client's queue
its real cost, and a welcome's history a size in bytes.

Each test here failed on 6ddb637, the version before these bounds.
"""

from __future__ import annotations

import contextlib
import http.client
import inspect
import json
import os
import re
import struct
import subprocess
import sys
import threading
import tracemalloc
import zlib
from pathlib import Path

import pytest
from websockets.sync.client import connect

from wschat import SendTimeout
from wschat.chat import Chat, ChatLimits
from wschat.connection import Connection
from wschat.frames import Opcode, encode_frame
from wschat.outbound import Outbox

from .helpers import RawClient, Recorder, start_server, wait_until
from .test_hostile import barrier

DEFLATE = "Sec-WebSocket-Extensions: permessage-deflate"


def masked(opcode, payload=b"", fin=True, rsv=0):
    return encode_frame(opcode, payload, fin=fin, rsv=rsv, mask=os.urandom(4))


def bomb(size: int) -> bytes:
    """``size`` zero bytes, deflated as a client sends them: about size/1000 bytes on the wire."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    return compressor.compress(bytes(size)) + compressor.flush(zlib.Z_SYNC_FLUSH)[:-4]


def gauge(server, name: str) -> float:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    connection.request("GET", "/metrics")
    body = connection.getresponse().read().decode()
    connection.close()
    return float(re.search(rf"^{name} (\S+)$", body, re.M).group(1))


def close_code_now(peer):
    """The close code the server already sent ``peer`` (None: EOF without one), or "open"."""
    peer.sock.setblocking(False)
    try:
        return peer.recv_close()
    except BlockingIOError:  # nothing more to read: still open
        return "open"
    finally:
        peer.sock.setblocking(True)


def allocated_within(snapshot, function) -> int:
    """Bytes still held that were allocated by a call to ``function``: only
    this thread's sends, not what the loop thread allocates meanwhile."""
    lines, first = inspect.getsourcelines(function)
    filename, last = inspect.getsourcefile(function), first + len(lines)
    return sum(trace.size for trace in snapshot.traces
               if any(frame.filename == filename and first <= frame.lineno < last for frame in trace.traceback))


def echo(server):
    with connect(f"ws://127.0.0.1:{server.port}/chat") as ws:
        ws.send("still here")
        return ws.recv(timeout=10)


# -- the server-wide budget ---------------------------------------------------------------


def test_stalled_compressed_messages_are_held_within_the_budget_and_others_chat_on():
    """40 peers each send the first fragment of a message that inflates to
    900 KB (under 1 KB on the wire) and stall: 36 MB asked for, 8 MiB
    allowed.  The largest holders are closed with 1013 as the budget runs
    over; what the server holds stays within it (plus one message); a
    newcomer still chats."""
    recorder = Recorder()
    server = start_server(max_buffered=8 << 20, metrics_path="/metrics")
    server.resource("/chat", on_message=lambda conn, message: conn.send(message), on_close=recorder.on_close)
    first = bomb(900_000)
    assert len(first) < 1000
    peers = []
    try:
        for _ in range(40):
            peer = RawClient(server.port, headers=[DEFLATE])
            assert b"permessage-deflate" in peer.response
            peer.sock.sendall(masked(Opcode.BINARY, first, fin=False, rsv=0b100))
            peers.append(peer)
            assert echo(server) == "still here"  # the loop has read the fragment; a newcomer is served
            assert gauge(server, "wschat_buffered_bytes") <= (8 << 20) + 1_000_000
        codes = [close_code_now(peer) for peer in peers]  # the echo above was a barrier: closes are written
        assert codes.count(1013) >= 40 - 9 and codes.count("open") >= 7, codes  # 8 MiB holds 8 of them
        assert gauge(server, "wschat_budget_closes_total") == codes.count(1013)
        assert gauge(server, "wschat_buffered_limit_bytes") == 8 << 20
    finally:
        for peer in peers:
            peer.close()
        server.stop()


def test_the_budget_counts_request_heads_and_sheds_the_largest():
    """Request heads in progress count too: with a budget of 64 KiB, a
    dozen peers dribbling 7 KiB heads run it over, and the server drops the
    ones holding the most instead of holding them all."""
    server = start_server(max_buffered=64 << 10, max_message_size=16 << 10, metrics_path="/metrics")
    server.resource("/chat", on_message=lambda conn, message: conn.send(message))
    peers = []
    try:
        for _ in range(12):
            peer = RawClient(server.port, handshake=False)
            peer.sock.sendall(b"GET /chat HTTP/1.1\r\nX-Pad: " + b"p" * 7000)  # no end of head
            peers.append(peer)
            assert echo(server) == "still here"
        assert gauge(server, "wschat_buffered_bytes") <= 64 << 10
        assert gauge(server, "wschat_budget_closes_total") >= 3
        assert sum(close_code_now(peer) is None for peer in peers) >= 3  # dropped: EOF
    finally:
        for peer in peers:
            peer.close()
        server.stop()


def test_handler_calls_waiting_for_a_worker_count_and_are_given_back():
    release = threading.Event()
    server = start_server(workers=1, max_pending_calls=1000, metrics_path="/metrics")
    server.resource("/chat", on_message=lambda conn, message: release.wait(10))
    try:
        with RawClient(server.port) as peer:
            for _ in range(20):
                peer.send_frame(Opcode.BINARY, b"x" * 10_000)
            wait_until(lambda: gauge(server, "wschat_buffered_bytes") >= 19 * 10_000, what="calls counted")
            release.set()
            wait_until(lambda: gauge(server, "wschat_buffered_bytes") == 0, what="calls given back")
    finally:
        release.set()
        server.stop()


# -- an unfinished message's deadline -------------------------------------------------------


@pytest.mark.parametrize("unfinished", ["fragment", "frame", "compressed"])
def test_a_message_not_finished_in_time_is_closed_with_1008(unfinished):
    recorder = Recorder()
    server = start_server(message_timeout=0.5)
    server.resource("/chat", on_message=lambda conn, message: conn.send(message), **{
        k: v for k, v in recorder.handlers().items() if k in ("on_open", "on_close")})
    try:
        with RawClient(server.port, headers=[DEFLATE]) as idle, RawClient(server.port, headers=[DEFLATE]) as stalled:
            idle.send_frame(Opcode.TEXT, b"whole")
            assert idle.recv_frame().payload == b"whole"
            if unfinished == "fragment":
                stalled.sock.sendall(masked(Opcode.TEXT, b"begun", fin=False))
            elif unfinished == "frame":
                stalled.sock.sendall(masked(Opcode.TEXT, b"x" * 100)[:50])  # its header says 100 bytes
            else:
                stalled.sock.sendall(masked(Opcode.TEXT, bomb(100_000), fin=False, rsv=0b100))
            assert stalled.recv_close() == 1008
            stalled.send_frame(Opcode.CLOSE, struct.pack("!H", 1008))  # the closing handshake, answered
            assert stalled.at_eof()
            stalled.close()  # and our side of TCP: the server releases the connection
            _, _, code, reason = recorder.wait("close")
            assert code == 1008 and "not completed within 0.5s" in reason
            # The idle one was quiet all along, longer than the timeout: a deadline is for messages begun.
            idle.send_frame(Opcode.TEXT, b"again")
            assert idle.recv_frame().payload == b"again"
    finally:
        server.stop()


def test_a_slow_message_that_ends_in_time_passes():
    server = start_server(message_timeout=5)
    server.resource("/chat", on_message=lambda conn, message: conn.send(message))
    try:
        with RawClient(server.port) as peer:
            for index in range(10):
                peer.sock.sendall(masked(Opcode.TEXT if index == 0 else Opcode.CONTINUATION, b"piece", fin=index == 9))
            assert peer.recv_frame().payload == b"piece" * 10
    finally:
        server.stop()


# -- a slow client's queue, counted as it costs ---------------------------------------------


def test_slow_clients_hold_what_max_queue_says():
    """Clients that never read, sent small messages until their queues are
    full: what their queues hold in memory is what ``queued`` says, within
    10%, and never past ``max_queue`` (6ddb637 counted frame bytes only, a
    quarter of what 14-byte frames cost)."""
    recorder = Recorder()
    max_queue = 64 << 10
    server = start_server(max_queue=max_queue, close_timeout=0.5)
    server.resource("/chat", on_open=recorder.on_open)
    server.resource("/echo", on_message=lambda conn, message: conn.send(message))
    slow = [RawClient(server.port, rcvbuf=4096) for _ in range(2)]
    try:
        conns = [recorder.wait("open")[1] for _ in slow]
        for conn in conns:  # until the kernel pushes back: what it holds is not the queue's
            while not conn.queued:
                for _ in range(500):
                    conn.send("tiny message", timeout=0)
                barrier(server, "/echo")
        before = sum(conn.queued for conn in conns)
        lists_before = sum(sys.getsizeof(conn.link.protocol.outbox.buffers) for conn in conns)
        tracemalloc.start(4)  # deep enough to see Connection.send under the allocation
        try:
            for conn in conns:
                with pytest.raises(SendTimeout):
                    while True:
                        conn.send("tiny message", timeout=0)
            snapshot = tracemalloc.take_snapshot()
        finally:
            tracemalloc.stop()
        # A queue's list, grown meanwhile, is a new block holding the slots of the
        # buffers queued before too: count what the list grew by, not the block.
        lists_grew = sum(sys.getsizeof(conn.link.protocol.outbox.buffers) for conn in conns) - lists_before
        held = allocated_within(snapshot, Connection.send) - allocated_within(snapshot, Outbox.extend) + lists_grew
        # Every frame still held is in a queue: what the queues count now bounds it
        # (the loop may have written older frames meanwhile, so not the growth alone).
        counted = sum(conn.queued for conn in conns)
        assert counted - before > max_queue // 2 and held <= 1.1 * counted, (held, counted)
        assert all(max_queue - 64 < conn.queued <= max_queue and conn.is_open for conn in conns)
    finally:
        for client in slow:
            client.close()
        server.stop()


# -- the history a welcome carries -----------------------------------------------------------


def test_a_welcome_carries_at_most_max_history_bytes_of_history():
    server = start_server()
    chat = Chat(server, limits=ChatLimits.off())
    try:
        for index in range(50):
            chat.post(f"{index:02d} " + "long " * 400, nick="bot")  # 2 KB each, 100 KB in all
        with connect(f"ws://127.0.0.1:{server.port}/chat?nick=new", subprotocols=["wschat.v1"]) as ws:
            welcome = json.loads(ws.recv(timeout=10))
        history = welcome["history"]
        assert len(json.dumps(history)) <= 32 << 10  # the default bound
        assert history and history[-1]["text"].startswith("49 ")  # the newest kept
        seqs = [record["seq"] for record in history]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
        since = f"&since=1&epoch={welcome['epoch']}"
        with connect(f"ws://127.0.0.1:{server.port}/chat?nick=back{since}", subprotocols=["wschat.v1"]) as ws:
            catch_up = json.loads(ws.recv(timeout=10))
        assert catch_up["history"] == history and catch_up["missed"] is True
    finally:
        server.stop()


def test_the_history_rooms_keep_is_bounded_in_bytes_as_a_welcome_is():
    """Clients choose rooms and what they say: 20 rooms of 100 long
    messages (4-byte characters, the most a character weighs) must not keep
    more than a welcome can carry, ``max_history_bytes`` a room (in UTF-8),
    however many ``history`` allows.  Kept as it was, this history held 16 MB."""
    server = start_server()
    chat = Chat(server, history=200, limits=ChatLimits.off())
    text = "\U0001d11e" * 2000
    try:
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        for index in range(100):
            for room in range(20):
                chat.post(f"{index:03d}{text}", room=f"r{room}", nick="bot")
        held = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        assert held < 2 << 20, held  # 20 rooms x 32 KiB, and the records
        with connect(f"ws://127.0.0.1:{server.port}/chat/r7?nick=new", subprotocols=["wschat.v1"]) as ws:
            welcome = json.loads(ws.recv(timeout=10))
        assert [record["text"][:3] for record in welcome["history"]] == ["096", "097", "098", "099"]  # as before
        assert chat.engine.history("r7").records[0]["text"][:3] == "096"  # what a welcome can carry, and no more
    finally:
        server.stop()


def test_a_message_heavier_than_the_bound_is_kept_alone_and_the_numbering_goes_on():
    """The newest message stays, however heavy: an empty room is kept for
    its history, and with it where its numbering stands."""
    from wschat.engine import MemoryEngine

    engine = MemoryEngine(history=50, max_bytes=300)
    engine.start(lambda room, deliveries: None)
    epochs = []
    for text in ("a" * 500, "short"):  # 660 with the overhead, then 165
        engine.publish_message("quiet", {"type": "message", "room": "quiet", "nick": "n", "text": text, "time": 1})
        epochs.append(engine.position("quiet")[0])
        assert [record["text"] for record in engine.history("quiet").records] == [text]
    assert engine.position("quiet") == (epochs[0], 2) and epochs[0] == epochs[1]


def test_an_engine_built_with_its_defaults_keeps_rooms_within_the_chats_bounds():
    """An embedder's ``MemoryEngine()`` bounds what a room keeps, and all
    rooms together, by the chat's defaults, not by a count of messages alone."""
    from wschat.engine import DEFAULT_MAX_HISTORY_BYTES, DEFAULT_MAX_HISTORY_TOTAL, RECORD_OVERHEAD, MemoryEngine

    engine = MemoryEngine()
    engine.start(lambda room, deliveries: None)
    text = "\u20ac" * 2000  # 6000 bytes in UTF-8
    for room in ("r0", "r1"):
        for _ in range(50):
            engine.publish_message(room, {"type": "message", "room": room, "nick": "n", "text": text, "time": 1})
    kept = engine.history("r0").records
    assert len(kept) == DEFAULT_MAX_HISTORY_BYTES // (RECORD_OVERHEAD + 6000) == 5
    assert engine.max_total_bytes == DEFAULT_MAX_HISTORY_TOTAL and engine.size == 2 * 5 * (RECORD_OVERHEAD + 6000)


def test_all_rooms_together_keep_no_more_than_max_total_bytes_the_heaviest_going_first():
    """Many rooms each within its own bound still add up: past
    ``max_total_bytes`` the heaviest rooms' history goes (to 3/4 of it),
    a light room's stays, and an empty room goes with its history."""
    from wschat.engine import MemoryEngine

    engine = MemoryEngine(history=50, max_bytes=10_000, max_total_bytes=30_000)
    engine.start(lambda room, deliveries: None)
    engine.claim("light", "ann", "p/1")  # a member: the room stays when its history goes
    engine.claim("heavy-0", "bob", "p/2")

    def say(room, text):
        engine.publish_message(room, {"type": "message", "room": room, "nick": "n", "text": text, "time": 1})
        assert engine.size == sum(kept.size for kept in engine.rooms.values()) <= 30_000

    say("light", "hello")
    for index in range(6):  # 6 rooms of 9,600: 57,600 without the bound
        for _ in range(3):
            say(f"heavy-{index}", "x" * 3040)
    assert [record["text"] for record in engine.history("light").records] == ["hello"]
    assert len(engine.history("heavy-5").records) == 3  # the room that spoke last keeps its own
    assert "heavy-0" in engine.rooms and engine.history("heavy-0").records == []  # its member keeps it here
    assert len([name for name in engine.rooms if name.startswith("heavy-")]) < 6  # empty ones went


def test_the_recent_messages_of_all_rooms_here_weigh_no_more_than_max_history_total():
    """Each room here holds the last messages delivered (see ``Recent``):
    with many rooms of long messages, what they hold together stays under
    ``max_history_total``, the heaviest going first, and every room chats on."""
    server = start_server()
    chat = Chat(server, welcome="", limits=ChatLimits.off(), max_history_total=40_000)
    url = f"ws://127.0.0.1:{server.port}/chat/room-"
    try:
        with contextlib.ExitStack() as stack:
            clients = [stack.enter_context(connect(f"{url}{index}")) for index in range(6)]
            for client in clients:
                for number in range(3):
                    text = f"{number}" + "y" * 3000
                    client.send(text)
                    assert client.recv(timeout=10) == text
                    assert chat.engine.size <= 40_000
            with chat._lock:
                held = sum(local.recent.size for local in chat.rooms.values())
                assert held == chat._recent.total <= 40_000
                assert chat.rooms["room-5"].recent.size > 9_000  # the room that spoke last keeps its own
            clients[0].send("still here")
            assert clients[0].recv(timeout=10) == "still here"
    finally:
        server.stop()


# -- an upgrade with a body --------------------------------------------------------------


@pytest.mark.parametrize("body_headers, body", [
    ("Content-Length: 5\r\n", b"hello"),
    ("Transfer-Encoding: chunked\r\n", b"5\r\nhello\r\n0\r\n\r\n"),
])
def test_an_upgrade_with_a_body_gets_400_and_no_101(body_headers, body):
    server = start_server()
    server.resource("/chat", on_message=lambda conn, message: conn.send(message))
    try:
        with RawClient(server.port, handshake=False) as peer:
            head = (f"GET /chat HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                    f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{body_headers}\r\n")
            peer.sock.sendall(head.encode() + body + masked(Opcode.TEXT, b"frame"))
            response = peer.read_head()
            assert response.startswith(b"HTTP/1.1 400 ") and peer.at_eof()
    finally:
        server.stop()


def test_the_hostile_tool_runs_its_attacks_on_a_live_server():
    tool = Path(__file__).resolve().parent.parent / "tools" / "hostile.py"
    result = subprocess.run([sys.executable, str(tool), "--stallers", "20", "--flooders", "2", "--flood-megabytes", "4",
                             "--rooms", "20", "--room-messages", "10", "--server-args", "--max-buffered 8MiB"],
                            capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ping-flood: 2 non-reading peers sent 8 MiB" in result.stdout
    assert re.search(r"stall: .* a newcomer chats", result.stdout)
    assert re.search(r"history: 20 rooms of 10 long messages, 2 MiB said: .* a newcomer chats", result.stdout)
