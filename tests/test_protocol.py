import os
import struct

import pytest

from wschat.errors import ConnectionClosed, InvalidPayload, MessageTooBig, ProtocolError
from wschat.frames import CloseCode, FrameParser, Opcode, encode_frame
from wschat.protocol import (
    BinaryMessage,
    CloseReceived,
    ConnectionFailed,
    Ping,
    Pong,
    Protocol,
    State,
    TextMessage,
)


def client_frame(opcode, payload=b"", fin=True):
    return encode_frame(opcode, payload, fin=fin, mask=os.urandom(4))


def close_frame(code=None, reason=b""):
    payload = b"" if code is None else struct.pack("!H", code) + reason
    return client_frame(Opcode.CLOSE, payload)


@pytest.fixture(params=["whole", "bytewise"])
def feed(request, implementation):
    """Feed a server Protocol in one chunk, or one byte at a time."""

    def run(data, protocol=None):
        protocol = protocol or Protocol(max_message_size=1 << 16)
        if request.param == "whole":
            return protocol, protocol.receive_data(data)
        events = []
        for i in range(len(data)):
            events += protocol.receive_data(data[i : i + 1])
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
    # After failing, nothing more is parsed.
    assert protocol.receive_data(client_frame(Opcode.TEXT, b"late")) == []
    with pytest.raises(ConnectionClosed):
        protocol.send_text("late")


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


def test_messages_before_error_still_delivered(feed):
    _, events = feed(client_frame(Opcode.TEXT, b"ok") + client_frame(0x3))
    assert events[0] == TextMessage("ok")
    assert isinstance(events[1], ConnectionFailed)


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


def test_invalid_utf8_fails_fast_before_the_final_fragment():
    protocol = Protocol()
    # The first fragment ends in \xf4\x90, which can never start valid UTF-8.
    events = protocol.receive_data(client_frame(Opcode.TEXT, b"hello\xf4\x90", fin=False))
    assert isinstance(events[0], ConnectionFailed) and isinstance(events[0].error, InvalidPayload)


def test_valid_prefix_of_a_character_waits_for_more():
    protocol = Protocol()
    assert protocol.receive_data(client_frame(Opcode.TEXT, b"\xf0\x9f", fin=False)) == []
    assert protocol.receive_data(client_frame(0, b"\x98\x80")) == [TextMessage("\U0001f600")]


# -- failures: 1009 --------------------------------------------------------


def test_message_too_big_single_frame(feed):
    protocol, events = feed(client_frame(Opcode.BINARY, b"x" * (1 << 16 + 1)))
    assert_failed(protocol, events, MessageTooBig, 1009)


def test_message_too_big_across_fragments_without_buffering_it():
    protocol = Protocol(max_message_size=1000)
    assert protocol.receive_data(client_frame(Opcode.TEXT, b"a" * 600, fin=False)) == []
    # Only the header of the next fragment is needed to know it is too big.
    events = protocol.receive_data(client_frame(0, b"b" * 600)[:8])
    assert isinstance(events[0].error, MessageTooBig)
    assert protocol.buffered <= 1000


def test_message_at_the_limit_is_fine():
    protocol = Protocol(max_message_size=1000)
    events = protocol.receive_data(client_frame(Opcode.BINARY, b"a" * 500, fin=False) + client_frame(0, b"b" * 500))
    assert events == [BinaryMessage(b"a" * 500 + b"b" * 500)]


def test_control_frames_do_not_count_against_the_message_limit():
    protocol = Protocol(max_message_size=10)
    events = protocol.receive_data(client_frame(Opcode.TEXT, b"a" * 10, fin=False) + client_frame(Opcode.PING, b"p" * 100) + client_frame(0))
    assert events == [Ping(b"p" * 100), TextMessage("a" * 10)]


# -- the closing handshake ---------------------------------------------------


@pytest.mark.parametrize("code, reason", [(1000, b""), (1001, "bye ✓".encode()), (3000, b""), (4999, b"app")])
def test_peer_close_is_echoed(feed, code, reason):
    protocol, events = feed(close_frame(code, reason))
    assert events == [CloseReceived(code, reason.decode())]
    assert protocol.state is State.CLOSED
    [echo] = sent_frames(protocol)
    assert echo.opcode == Opcode.CLOSE and echo.payload == struct.pack("!H", code)


def test_empty_close_is_answered_with_empty_close(feed):
    protocol, events = feed(close_frame())
    assert events == [CloseReceived(CloseCode.NO_STATUS, "")]
    assert sent_frames(protocol)[0].payload == b""


def test_nothing_parsed_after_close(feed):
    protocol, events = feed(close_frame(1000) + client_frame(Opcode.TEXT, b"after"))
    assert events == [CloseReceived(1000, "")]
    assert protocol.receive_data(client_frame(Opcode.TEXT, b"later")) == []


def test_server_initiated_close():
    protocol = Protocol()
    data = protocol.send_close(1001, "going away")
    assert data == encode_frame(Opcode.CLOSE, b"\x03\xe9going away")
    assert protocol.state is State.CLOSING
    with pytest.raises(ConnectionClosed):
        protocol.send_text("no more data after a close")
    # Messages still in flight from the client are delivered; pings not answered.
    events = protocol.receive_data(client_frame(Opcode.TEXT, b"in flight") + client_frame(Opcode.PING))
    assert events == [TextMessage("in flight"), Ping(b"")]
    assert protocol.data_to_send() == b""
    # The client's close ends the handshake without another close from us.
    assert protocol.receive_data(close_frame(1001)) == [CloseReceived(1001, "")]
    assert protocol.state is State.CLOSED and protocol.data_to_send() == b""


def test_send_close_validates_code_and_reason():
    with pytest.raises(ValueError):
        Protocol().send_close(1005)
    with pytest.raises(ValueError):
        Protocol().send_close(1000, "é" * 62)
    assert Protocol().send_close(None) == b"\x88\x00"


def test_eof_closes():
    protocol = Protocol()
    protocol.receive_eof()
    assert protocol.state is State.CLOSED
    assert protocol.receive_data(client_frame(Opcode.TEXT, b"x")) == []


# -- sending ---------------------------------------------------------------


def test_send_methods_encode_unmasked_server_frames():
    protocol = Protocol()
    assert protocol.send_text("hé") == b"\x81\x03h\xc3\xa9"
    assert protocol.send_binary(bytearray(b"\x01")) == b"\x82\x01\x01"
    assert protocol.send_ping(b"1") == b"\x89\x011"
    assert protocol.send_pong(b"2") == b"\x8a\x012"
    with pytest.raises(ValueError):
        protocol.send_ping(b"x" * 126)
    with pytest.raises(ValueError):
        protocol.send_pong(b"x" * 126)


def test_client_protocol_masks_and_talks_to_server():
    client, server = Protocol(client=True), Protocol()
    data = client.send_text("hello")
    assert data[1] & 0x80  # masked
    assert server.receive_data(data) == [TextMessage("hello")]
    assert client.receive_data(server.send_binary(b"back")) == [BinaryMessage(b"back")]
    server.receive_data(client.send_ping(b"x"))
    assert client.receive_data(server.data_to_send()) == [Pong(b"x")]
    # A masked frame from a server fails the client with 1002.
    events = client.receive_data(encode_frame(Opcode.TEXT, b"x", mask=b"abcd"))
    assert isinstance(events[0].error, ProtocolError)
