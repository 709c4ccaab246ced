"""The connection state machine, sans I/O: request head, frames, closing."""

import os
import struct
import tracemalloc

import pytest

from wschat.errors import ConnectionClosed, InvalidPayload, MessageTooBig, ProtocolError
from wschat.frames import CloseCode, FrameParser, Opcode, encode_frame
from wschat.protocol import (
    BinaryMessage,
    CloseReceived,
    ConnectionFailed,
    Ping,
    Pong,
    RequestReceived,
    RequestRefused,
    ServerProtocol,
    State,
    TextMessage,
)

from .helpers import REQUEST, open_protocol, pull


def client_frame(opcode, payload=b"", fin=True):
    return encode_frame(opcode, payload, fin=fin, mask=os.urandom(4))


def close_frame(code=None, reason=b""):
    payload = b"" if code is None else struct.pack("!H", code) + reason
    return client_frame(Opcode.CLOSE, payload)


@pytest.fixture(params=["whole", "bytewise"])
def feed(request, implementation):
    """Feed an open server protocol in one chunk, or one byte at a time."""

    def run(data, protocol=None):
        protocol = protocol or open_protocol(max_message_size=1 << 16)
        if request.param == "whole":
            return protocol, pull(protocol, data)
        events = []
        for i in range(len(data)):
            events += pull(protocol, data[i : i + 1])
        return protocol, events

    return run


def sent_frames(protocol):
    """Parse what the server queued (unmasked server frames)."""
    parser = FrameParser(require_mask=False, max_payload=1 << 20)
    parser.feed(protocol.data_to_send())
    out = []
    while (frame := parser.next_frame()) is not None:
        out.append(frame)
    return out


def assert_failed(protocol, events, error, code):
    assert isinstance(events[-1], ConnectionFailed)
    assert isinstance(events[-1].error, error)
    assert protocol.state is State.CLOSED
    closes = sent_frames(protocol)
    assert len(closes) == 1 and closes[0].opcode == Opcode.CLOSE
    assert struct.unpack("!H", closes[0].payload[:2])[0] == code
    # After failing, nothing more is parsed or sent.
    assert pull(protocol, client_frame(Opcode.TEXT, b"late")) == []
    with pytest.raises(ConnectionClosed):
        protocol.send_text("late")


# -- the request head --------------------------------------------------------------


def test_request_then_accept_then_frames_sent_right_behind_it():
    protocol = ServerProtocol()
    assert protocol.state is State.CONNECTING and pull(protocol, REQUEST[:20]) == []
    early = client_frame(Opcode.TEXT, b"early")
    [event] = pull(protocol, REQUEST[20:] + early)
    assert isinstance(event, RequestReceived) and event.request.path == "/chat"
    assert protocol.awaiting_answer and protocol.next_event() is None  # nothing parsed before the answer
    protocol.accept(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")
    assert protocol.state is State.OPEN and not protocol.awaiting_answer
    assert pull(protocol) == [TextMessage("early")]
    assert protocol.data_to_send().startswith(b"HTTP/1.1 101")


def test_plain_response_ends_the_connection_and_pipelined_requests_are_discarded():
    protocol = ServerProtocol()
    get = b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n"
    [event] = pull(protocol, get + get * 3)
    protocol.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert protocol.state is State.CLOSED
    for _ in range(1000):  # more requests, and garbage: never parsed, never buffered, never answered
        assert pull(protocol, get + b"x" * 1000) == []
    assert protocol.buffered == 0
    assert protocol.data_to_send().count(b"HTTP/1.1") == 1
    with pytest.raises(ConnectionClosed):
        protocol.respond(b"HTTP/1.1 200 OK\r\n\r\n")
    with pytest.raises(ConnectionClosed):
        protocol.send_text("no")


@pytest.mark.parametrize("data, status", [
    (b"GARBAGE\r\n\r\n", 400),
    (b"GET /x HTTP/1.1\r\nHost: x\r\nBad\rHeader: y\r\n\r\n", 400),
    (b"GET /x HTTP/1.1\r\nX-Big: " + b"y" * 9000 + b"\r\n\r\n", 431),
    (b"GET /x HTTP/1.1\r\nX-Big: " + b"y" * 9000, 431),  # no end in sight
])
def test_malformed_or_huge_heads_are_refused_at_once(data, status):
    protocol = ServerProtocol()
    [event] = pull(protocol, data)
    assert isinstance(event, RequestRefused) and event.error.status == status
    assert protocol.state is State.CLOSED and protocol.buffered == 0
    assert protocol.data_to_send().startswith(f"HTTP/1.1 {status} ".encode())
    assert pull(protocol, b"more") == []


def test_a_head_dribbled_byte_by_byte_is_searched_once():
    protocol = ServerProtocol()
    events = []
    for i in range(len(REQUEST)):
        events += pull(protocol, REQUEST[i : i + 1])
    assert [type(e) for e in events] == [RequestReceived]


def test_accept_and_respond_need_a_request_waiting():
    with pytest.raises(ConnectionClosed):
        ServerProtocol().accept(b"")
    with pytest.raises(ConnectionClosed):
        open_protocol().respond(b"")


# -- messages ------------------------------------------------------------


def test_text_and_binary(feed):
    _, events = feed(client_frame(Opcode.TEXT, "héllo".encode()) + client_frame(Opcode.BINARY, b"\x00\xff"))
    assert events == [TextMessage("héllo"), BinaryMessage(b"\x00\xff")]


def test_fragmented_text_reassembled_with_control_frames_between(feed):
    data = (
        client_frame(Opcode.TEXT, "κό".encode()[:3], fin=False)  # splits a character
        + client_frame(Opcode.PING, b"p1")
        + client_frame(Opcode.CONTINUATION, "κό".encode()[3:], fin=False)
        + client_frame(Opcode.PONG, b"unsolicited")
        + client_frame(Opcode.CONTINUATION, b"!", fin=True)
    )
    protocol, events = feed(data)
    assert events == [Ping(b"p1"), Pong(b"unsolicited"), TextMessage("κό!")]
    # The ping was answered at once, with the same payload; the pong ignored.
    assert [(f.opcode, f.payload) for f in sent_frames(protocol)] == [(Opcode.PONG, b"p1")]


def test_fragmented_binary(feed):
    data = b"".join(
        client_frame(op, p, fin)
        for op, p, fin in [(Opcode.BINARY, b"ab", False), (0, b"", False), (0, b"cd", True)]
    )
    assert feed(data)[1] == [BinaryMessage(b"abcd")]


def test_empty_messages(feed):
    data = client_frame(Opcode.TEXT) + client_frame(Opcode.BINARY) + client_frame(Opcode.TEXT, b"", False) + client_frame(0)
    assert feed(data)[1] == [TextMessage(""), BinaryMessage(b""), TextMessage("")]


def test_large_frame_arriving_in_pieces_is_not_held_twice():
    protocol = open_protocol(max_message_size=1 << 20)
    payload = os.urandom(600_000)
    data = client_frame(Opcode.BINARY, payload)
    events = []
    for start in range(0, len(data), 65536):
        events += pull(protocol, data[start : start + 65536])
        assert protocol.buffered <= min(start + 65536, len(data))  # the parser keeps no copy of its own
    assert events == [BinaryMessage(payload)]


def test_four_mib_in_65536_fragments_of_64_bytes():
    protocol = open_protocol(max_message_size=16 << 20)
    text = os.urandom(2 << 20).hex()  # 4 MiB of ASCII
    data = b"".join(
        client_frame(Opcode.TEXT if i == 0 else 0, text[i : i + 64].encode(), fin=i + 64 >= len(text))
        for i in range(0, len(text), 64)
    )
    events = []
    for start in range(0, len(data), 256 * 1024):
        events += pull(protocol, data[start : start + 256 * 1024])
    assert events == [TextMessage(text)]


@pytest.mark.parametrize("size, count", [(0, 100_000), (2, 100_000)])
def test_fragment_floods_hold_memory_near_the_message_size(size, count):
    """Empty or tiny continuation frames cost no memory per fragment: what is
    held stays near the bytes of the message (which the limit bounds), plus
    the one read being parsed."""
    protocol = open_protocol(max_message_size=16 << 20)
    fragment = client_frame(0, b"ab"[:size], fin=False)
    chunk = fragment * 10_000
    pull(protocol, client_frame(Opcode.BINARY, b"", fin=False))
    tracemalloc.start()
    try:
        for _ in range(count // 10_000):
            assert pull(protocol, chunk) == []
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert protocol.buffered == size * count
    assert held < 1.5 * size * count + 16 * 1024  # the chunk itself is not traced: it was made before
    assert pull(protocol, client_frame(0, b"!")) == [BinaryMessage(b"ab"[:size] * count + b"!")]


# -- failures: 1002 -------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        encode_frame(Opcode.TEXT, b"unmasked"),
        encode_frame(Opcode.TEXT, b"x", rsv=0b010, mask=b"abcd"),
        client_frame(0x3),
        client_frame(0xF),
        encode_frame(Opcode.PING, b"", fin=False, mask=b"abcd"),
        client_frame(Opcode.PING, b"x" * 126),
        client_frame(Opcode.CONTINUATION, b"nothing to continue"),
        client_frame(Opcode.TEXT, b"a", fin=False) + client_frame(Opcode.TEXT, b"b"),
        client_frame(Opcode.BINARY, b"a", fin=False) + client_frame(Opcode.BINARY, b"b", fin=False),
        close_frame(1005),
        close_frame(999),
        close_frame(2000),
        client_frame(Opcode.CLOSE, b"\x03"),
    ],
    ids=[
        "unmasked", "rsv", "opcode3", "opcodeF", "fragmented-ping", "long-ping", "lone-continuation",
        "text-in-text", "binary-in-binary", "close-1005", "close-999", "close-2000", "close-1-byte",
    ],
)
def test_protocol_errors_fail_with_1002(feed, data):
    protocol, events = feed(data)
    assert_failed(protocol, events, ProtocolError, 1002)


@pytest.mark.parametrize("last", [client_frame(0x3), client_frame(Opcode.TEXT, b"\xff"), close_frame(1000)],
                         ids=["protocol-error", "invalid-utf8", "close"])
def test_a_message_before_an_error_or_a_close_is_answered_before_the_close(last):
    """The closing frame is queued when the server says so, after the
    handlers of the messages before it: their answers go out first."""
    protocol = open_protocol()
    events = pull(protocol, client_frame(Opcode.TEXT, b"ok") + last, answer=False)
    assert events[0] == TextMessage("ok") and type(events[1]) in (ConnectionFailed, CloseReceived)
    assert protocol.data_to_send() == b""  # no close queued yet
    protocol.send_text("echo: ok")  # the handler's answer
    if isinstance(events[1], ConnectionFailed):
        protocol.fail(events[1].error)
    else:
        protocol.acknowledge_close()
    assert [f.opcode for f in sent_frames(protocol)] == [Opcode.TEXT, Opcode.CLOSE]
    with pytest.raises(ConnectionClosed):
        protocol.send_text("after the close")


# -- failures: 1007 --------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        client_frame(Opcode.TEXT, b"\xff"),
        client_frame(Opcode.TEXT, b"\xed\xa0\x80"),  # a UTF-16 surrogate
        client_frame(Opcode.TEXT, b"ok\xf4\x90\x80\x80"),  # above U+10FFFF
        client_frame(Opcode.TEXT, b"ok", fin=False) + client_frame(0, b"\xc0\xaf"),  # overlong
        client_frame(Opcode.TEXT, b"\xce", fin=False) + client_frame(0, b"", fin=True),  # truncated
        close_frame(1000, b"\xff\xfe"),
    ],
)
def test_invalid_utf8_fails_with_1007(feed, data):
    protocol, events = feed(data)
    assert_failed(protocol, events, InvalidPayload, 1007)


@pytest.mark.parametrize("prefix", [b"hello\xf4\x90", b"hello\xed\xa0", b"\xff"])
def test_invalid_utf8_fails_fast_before_the_final_fragment(prefix):
    protocol = open_protocol()
    [event] = pull(protocol, client_frame(Opcode.TEXT, prefix, fin=False))
    assert isinstance(event, ConnectionFailed) and isinstance(event.error, InvalidPayload)


@pytest.mark.parametrize("prefix", [b"\xff", b"\xed\xa0", b"ok\xf4\x90"])
def test_invalid_utf8_fails_inside_a_frame_still_arriving(prefix):
    """A 500 kB text frame whose first bytes cannot be UTF-8 fails at once,
    long before the rest of the frame arrives."""
    protocol = open_protocol()
    frame = client_frame(Opcode.TEXT, prefix + b"x" * 500_000)
    [event] = pull(protocol, frame[: 14 + len(prefix)])
    assert isinstance(event, ConnectionFailed) and isinstance(event.error, InvalidPayload)


def test_valid_prefix_of_a_character_waits_for_more():
    protocol = open_protocol()
    assert pull(protocol, client_frame(Opcode.TEXT, b"\xf0\x9f", fin=False)) == []
    assert pull(protocol, client_frame(0, b"\x98\x80")) == [TextMessage("\U0001f600")]


def test_valid_text_frame_split_inside_a_character():
    protocol = open_protocol()
    frame = client_frame(Opcode.TEXT, "ü€😀".encode() * 1000)
    events = []
    for start in range(0, len(frame), 7):
        events += pull(protocol, frame[start : start + 7])
    assert events == [TextMessage("ü€😀" * 1000)]


# -- failures: 1009 --------------------------------------------------------


def test_message_too_big_single_frame(feed):
    protocol, events = feed(client_frame(Opcode.BINARY, b"x" * (1 << 16 + 1)))
    assert_failed(protocol, events, MessageTooBig, 1009)


def test_message_too_big_across_fragments_without_buffering_it():
    protocol = open_protocol(max_message_size=1000)
    assert pull(protocol, client_frame(Opcode.TEXT, b"a" * 600, fin=False)) == []
    # Only the header of the next fragment is needed to know it is too big.
    events = pull(protocol, client_frame(0, b"b" * 600)[:8])
    assert isinstance(events[0].error, MessageTooBig)
    assert protocol.buffered <= 1000


def test_message_at_the_limit_is_fine():
    protocol = open_protocol(max_message_size=1000)
    events = pull(protocol, client_frame(Opcode.BINARY, b"a" * 500, fin=False) + client_frame(0, b"b" * 500))
    assert events == [BinaryMessage(b"a" * 500 + b"b" * 500)]


def test_control_frames_do_not_count_against_the_message_limit():
    protocol = open_protocol(max_message_size=10)
    events = pull(protocol, client_frame(Opcode.TEXT, b"a" * 10, fin=False) + client_frame(Opcode.PING, b"p" * 100) + client_frame(0))
    assert events == [Ping(b"p" * 100), TextMessage("a" * 10)]


# -- the closing handshake ---------------------------------------------------


@pytest.mark.parametrize("code, reason", [(1000, b""), (1001, "bye ✓".encode()), (3000, b""), (4999, b"app")])
def test_peer_close_is_echoed(feed, code, reason):
    protocol, events = feed(close_frame(code, reason))
    assert events == [CloseReceived(code, reason.decode())]
    assert protocol.state is State.CLOSED
    assert (protocol.close_code, protocol.close_reason) == (code, reason.decode())
    [echo] = sent_frames(protocol)
    assert echo.opcode == Opcode.CLOSE and echo.payload == struct.pack("!H", code)


def test_empty_close_is_answered_with_empty_close(feed):
    protocol, events = feed(close_frame())
    assert events == [CloseReceived(CloseCode.NO_STATUS, "")]
    assert sent_frames(protocol)[0].payload == b""


def test_nothing_parsed_after_close(feed):
    protocol, events = feed(close_frame(1000) + client_frame(Opcode.TEXT, b"after"))
    assert events == [CloseReceived(1000, "")]
    assert pull(protocol, client_frame(Opcode.TEXT, b"later")) == []


def test_server_initiated_close():
    protocol = open_protocol()
    protocol.close(1001, "going away")
    assert protocol.data_to_send() == encode_frame(Opcode.CLOSE, b"\x03\xe9going away")
    assert protocol.state is State.CLOSING
    with pytest.raises(ConnectionClosed):
        protocol.send_text("no more data after a close")
    with pytest.raises(ConnectionClosed):
        protocol.close()
    # Messages still in flight from the client are delivered; pings not answered.
    events = pull(protocol, client_frame(Opcode.TEXT, b"in flight") + client_frame(Opcode.PING))
    assert events == [TextMessage("in flight"), Ping(b"")]
    assert protocol.data_to_send() == b""
    # The client's close ends the handshake without another close from us.
    assert pull(protocol, close_frame(1001)) == [CloseReceived(1001, "")]
    assert protocol.state is State.CLOSED and protocol.data_to_send() == b""


def test_close_that_discards_what_is_queued_keeps_a_partly_written_frame():
    protocol = open_protocol()
    for i in range(3):
        protocol.send_text(f"message {i}")
    protocol.outbox.consume(4)  # the first frame is partly on the wire
    protocol.close(1008, "client too slow", discard=True)
    data = bytes(protocol.outbox.buffers[0]) + protocol.outbox.buffers[1]
    assert data == encode_frame(Opcode.TEXT, b"message 0")[4:] + encode_frame(Opcode.CLOSE, b"\x03\xf0client too slow")


def test_close_validates_code_and_reason():
    with pytest.raises(ValueError):
        open_protocol().close(1005)
    with pytest.raises(ValueError):
        open_protocol().close(1000, "é" * 62)
    protocol = open_protocol()
    protocol.close(None)
    assert protocol.data_to_send() == b"\x88\x00" and protocol.close_code == CloseCode.NO_STATUS


def test_eof_closes_and_reports_1006():
    protocol = open_protocol()
    protocol.send_text("never written")
    protocol.receive_eof()
    assert protocol.state is State.CLOSED and protocol.close_code == CloseCode.ABNORMAL
    assert pull(protocol, client_frame(Opcode.TEXT, b"x")) == [] and protocol.data_to_send() == b""


# -- sending ---------------------------------------------------------------


def test_send_methods_encode_unmasked_server_frames():
    protocol = open_protocol()
    protocol.send_text("hé")
    protocol.send_binary(bytearray(b"\x01"))
    protocol.ping(b"1")
    protocol.pong(b"2")
    assert protocol.data_to_send() == b"\x81\x03h\xc3\xa9" + b"\x82\x01\x01" + b"\x89\x011" + b"\x8a\x012"
    with pytest.raises(ValueError):
        protocol.ping(b"x" * 126)
    with pytest.raises(ValueError):
        protocol.pong(b"x" * 126)


def test_client_protocol_masks_and_talks_to_server():
    client, server = ServerProtocol(client=True), open_protocol()
    client.send_text("hello")
    data = client.data_to_send()
    assert data[1] & 0x80  # masked
    assert pull(server, data) == [TextMessage("hello")]
    server.send_binary(b"back")
    assert pull(client, server.data_to_send()) == [BinaryMessage(b"back")]
    client.ping(b"x")
    pull(server, client.data_to_send())
    assert pull(client, server.data_to_send()) == [Pong(b"x")]
    # A masked frame from a server fails the client with 1002.
    events = pull(client, encode_frame(Opcode.TEXT, b"x", mask=b"abcd"))
    assert isinstance(events[0].error, ProtocolError)


def test_bytes_fed_from_a_reused_buffer_survive_detach():
    """The server parses each read where it lies, in one buffer it reuses;
    after detach, what was not parsed yet must not depend on that buffer."""
    protocol = open_protocol()
    frames = client_frame(Opcode.TEXT, b"first") + client_frame(Opcode.BINARY, b"second" * 100)
    cut = len(frames) - 300  # the second frame is cut inside its payload
    buffer = bytearray(len(frames))
    buffer[:cut] = frames[:cut]
    protocol.receive_data(memoryview(buffer)[:cut])
    assert protocol.next_event() == TextMessage("first")
    protocol.detach()
    buffer[:] = b"\xff" * len(buffer)  # the next read lands in the same buffer
    buffer[:300] = frames[cut:]
    events = pull(protocol, memoryview(buffer)[:300])
    protocol.detach()
    assert events == [BinaryMessage(b"second" * 100)]
