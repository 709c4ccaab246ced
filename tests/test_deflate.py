"""permessage-deflate (RFC 7692): negotiation, compressed messages in and out, bombs."""

import os
import tracemalloc
import zlib

import pytest

from wschat.deflate import INFLATER_COST, PerMessageDeflate
from wschat.errors import InvalidPayload, MessageTooBig, ProtocolError
from wschat.frames import FrameParser, Opcode, encode_frame
from wschat.outbound import LARGE_PAYLOAD, PreparedBatch, PreparedMessage
from wschat.protocol import BinaryMessage, ConnectionFailed, Ping, ServerProtocol, TextMessage

from .helpers import REQUEST, pull


def agreement(offer="", **settings):
    params = []
    for part in filter(None, (p.strip() for p in offer.split(";"))):
        name, _, value = part.partition("=")
        params.append((name, value or None))
    return PerMessageDeflate(**settings).accept(params)


# -- negotiation -----------------------------------------------------------------------------


@pytest.mark.parametrize("offer, response, wbits", [
    ("", "permessage-deflate; server_no_context_takeover; client_no_context_takeover", 15),
    ("client_max_window_bits", "permessage-deflate; server_no_context_takeover; client_no_context_takeover", 15),
    ("client_max_window_bits=10", "permessage-deflate; server_no_context_takeover; client_no_context_takeover", 15),
    ("server_no_context_takeover; client_no_context_takeover",
     "permessage-deflate; server_no_context_takeover; client_no_context_takeover", 15),
    ("server_max_window_bits=9",
     "permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=9", 9),
    ("server_max_window_bits=15; client_max_window_bits",
     "permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=15", 15),
])
def test_accepted_offers(offer, response, wbits):
    accepted = agreement(offer)
    assert (accepted.response, accepted.server_wbits, accepted.client_no_context_takeover) == (response, wbits, True)


@pytest.mark.parametrize("offer", [
    "server_max_window_bits=8",  # zlib cannot compress with a 256-byte window
    "server_max_window_bits",  # needs a value
    "server_max_window_bits=16", "server_max_window_bits=7", "server_max_window_bits=010", "server_max_window_bits=x",
    "client_max_window_bits=16", "client_max_window_bits=08",
    "server_no_context_takeover=1", "client_no_context_takeover=true",
    "unknown_parameter", "client_max_window_bits; client_max_window_bits",
])
def test_offers_that_are_declined(offer):
    assert agreement(offer) is None


def test_keeping_the_clients_context_is_a_setting():
    kept = agreement("client_max_window_bits", client_no_context_takeover=False)
    assert kept.response == "permessage-deflate; server_no_context_takeover" and not kept.client_no_context_takeover
    asked = agreement("client_no_context_takeover", client_no_context_takeover=False)
    assert asked.client_no_context_takeover  # the client offered it: no context to keep


def test_agreements_are_shared():
    extension = PerMessageDeflate()
    assert extension.accept([]) is extension.accept([("client_max_window_bits", None)])


# -- receiving -------------------------------------------------------------------------------


def deflate_protocol(max_message_size=1 << 20, **settings):
    protocol = ServerProtocol(max_message_size=max_message_size)
    protocol.receive_data(REQUEST)
    protocol.next_event()
    protocol.accept(b"", rsv=0b100, deflate=PerMessageDeflate(**settings).accept([]))
    return protocol


def compressed(data, compressor=None):
    """What a client with no context takeover sends: one message, compressed on its own."""
    compressor = compressor or zlib.compressobj(6, zlib.DEFLATED, -15)
    out = compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH)
    assert out.endswith(b"\x00\x00\xff\xff")
    return out[:-4]


def client_frame(opcode, payload=b"", fin=True, rsv=0):
    return encode_frame(opcode, payload, fin=fin, rsv=rsv, mask=os.urandom(4))


@pytest.fixture(params=["whole", "bytewise"])
def feed(request):
    def run(protocol, data):
        if request.param == "whole":
            return pull(protocol, data)
        events = []
        for i in range(len(data)):
            events += pull(protocol, data[i : i + 1])
        return events

    return run


def test_compressed_text_in_one_frame_and_in_fragments(feed):
    protocol = deflate_protocol()
    text = "héllo, compressed world! " * 40
    data = compressed(text.encode())
    stream = client_frame(Opcode.TEXT, data, rsv=0b100)
    stream += client_frame(Opcode.TEXT, data[:10], fin=False, rsv=0b100)  # RSV1 on the first frame only
    stream += client_frame(Opcode.PING, b"between")
    stream += client_frame(Opcode.CONTINUATION, data[10:20], fin=False) + client_frame(Opcode.CONTINUATION, data[20:])
    stream += client_frame(Opcode.BINARY, b"not compressed")  # allowed: RSV1 clear
    assert feed(protocol, stream) == [TextMessage(text), Ping(b"between"), TextMessage(text), BinaryMessage(b"not compressed")]
    assert protocol.buffered == 0  # no context takeover: no inflater kept between messages


def test_with_context_takeover_the_inflater_lives_on():
    protocol = deflate_protocol(client_no_context_takeover=False)
    compressor = zlib.compressobj(6, zlib.DEFLATED, -15)  # one context for every message, as the client keeps it
    first, second = b"repeated phrase " * 20, b"repeated phrase " * 21
    stream = client_frame(Opcode.BINARY, compressed(first, compressor), rsv=0b100)
    stream += client_frame(Opcode.BINARY, compressed(second, compressor), rsv=0b100)
    assert pull(protocol, stream) == [BinaryMessage(first), BinaryMessage(second)]
    assert protocol.buffered >= INFLATER_COST  # the inflater is kept


@pytest.mark.parametrize("stream, error", [
    (client_frame(Opcode.TEXT, b"a", fin=False) + client_frame(Opcode.CONTINUATION, b"b", rsv=0b100), ProtocolError),
    (client_frame(Opcode.PING, b"x", rsv=0b100), ProtocolError),
    (client_frame(Opcode.TEXT, b"\xff\xff\xff not deflate", rsv=0b100), InvalidPayload),
    (client_frame(Opcode.TEXT, compressed(b"\xff\xfe"), rsv=0b100), InvalidPayload),  # inflates to invalid UTF-8
    (client_frame(Opcode.TEXT, b"x", rsv=0b010), ProtocolError),  # RSV2: nothing negotiated it
], ids=["rsv1-continuation", "rsv1-control", "bad-deflate", "bad-utf8", "rsv2"])
def test_misuse_fails_with_the_right_code(feed, stream, error):
    events = feed(deflate_protocol(), stream)
    assert isinstance(events[-1], ConnectionFailed) and isinstance(events[-1].error, error)


def test_rsv1_without_negotiation_is_a_protocol_error():
    protocol = ServerProtocol()
    protocol.receive_data(REQUEST)
    protocol.next_event()
    protocol.accept(b"")
    [event] = pull(protocol, client_frame(Opcode.TEXT, compressed(b"hi" * 50), rsv=0b100))
    assert isinstance(event.error, ProtocolError)


@pytest.mark.parametrize("fragments", [1, 64])
def test_a_bomb_is_refused_before_it_is_inflated(fragments):
    """1 GB of zeros deflates to about 1 MB: refused with 1009 after at most
    the limit's worth of output, whatever the ratio."""
    protocol = deflate_protocol(max_message_size=1 << 20)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    chunk = bytes(16 << 20)
    bomb = b"".join(compressor.compress(chunk) for _ in range(64)) + compressor.flush(zlib.Z_SYNC_FLUSH)
    step = -(-len(bomb) // fragments)
    pieces = [bomb[i : i + step] for i in range(0, len(bomb), step)]
    stream = b"".join(client_frame(Opcode.BINARY if i == 0 else Opcode.CONTINUATION, piece, fin=i == len(pieces) - 1,
                                   rsv=0b100 if i == 0 else 0) for i, piece in enumerate(pieces))
    tracemalloc.start()
    try:
        events = pull(protocol, stream)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert isinstance(events[-1].error, MessageTooBig)
    assert peak < 6 << 20  # a small factor of the 1 MiB limit (the frame, zlib's doubling output): not the gigabyte


def test_the_limit_applies_to_the_inflated_size():
    protocol = deflate_protocol(max_message_size=1000)
    assert pull(protocol, client_frame(Opcode.BINARY, compressed(bytes(1000)), rsv=0b100)) == [BinaryMessage(bytes(1000))]
    [event] = pull(protocol, client_frame(Opcode.BINARY, compressed(bytes(1001)), rsv=0b100))
    assert isinstance(event.error, MessageTooBig) and str(event.error) == "message larger than the limit once inflated"


def test_an_uncompressed_message_too_big_is_not_said_to_be_inflated():
    """On a connection that agreed on compression, a plain (RSV1 clear) message's 1009 reason gives the limit."""
    protocol = deflate_protocol(max_message_size=1000)
    [event] = pull(protocol, client_frame(Opcode.BINARY, bytes(1001)))
    assert isinstance(event.error, MessageTooBig) and str(event.error) == "message larger than 1000 bytes"


# -- sending -------------------------------------------------------------------------------


def server_frames(parts):
    parser = FrameParser(require_mask=False, max_payload=1 << 30, allowed_rsv=0b100)
    parser.feed(b"".join(parts))
    return [parser.next_frame()]


def test_a_prepared_message_is_compressed_once_per_agreement():
    extension = PerMessageDeflate()
    default, small_window = extension.accept([]), extension.accept([("server_max_window_bits", "9")])
    message = PreparedMessage("broadcast to everyone " * 50)
    parts, size = message.frame_for(default)
    assert message.frame_for(default)[0] is parts  # cached: compressed once
    assert message.frame_for(small_window)[0] is not parts  # another window, other bytes
    [frame] = server_frames(parts)
    assert frame.rsv == 0b100 and size < message.size
    assert zlib.decompressobj(-15).decompress(frame.payload + b"\x00\x00\xff\xff") == message.payload
    assert message.frame_for(None) == (message.parts, message.size)


@pytest.mark.parametrize("texts", [["a", "bb", "é" * 40], ["small", "x" * 200, "large " * 5000, "small again"]],
                         ids=["small", "small-medium-large"])
def test_a_prepared_batch_is_its_messages_framed_in_order_plain_and_compressed(texts):
    """PreparedBatch frames in one pass what PreparedMessage frames one by
    one: the same frames, in order, and per agreement the same compressed ones."""
    batch = PreparedBatch([text.encode() for text in texts])
    assert batch.count == len(texts)
    assert b"".join(batch.parts) == b"".join(b"".join(PreparedMessage(text).parts) for text in texts)
    assert batch.size == sum(PreparedMessage(text).size for text in texts)
    assert all(type(part) is bytes for part in batch.parts[:1])  # a buffer that starts a frame (Outbox's rule)
    large = max(map(len, batch.payloads)) >= LARGE_PAYLOAD  # its payload is a buffer of its own, not copied
    assert [type(part) for part in batch.parts].count(memoryview) == large and (len(batch.parts) == 1) != large
    default = PerMessageDeflate().accept([])
    parts, size = batch.frame_for(default)
    assert batch.frame_for(default)[0] is parts  # compressed once
    parser = FrameParser(require_mask=False, max_payload=1 << 30, allowed_rsv=0b100)
    parser.feed(b"".join(parts))
    frames = [parser.next_frame() for _ in texts]
    inflated = [zlib.decompressobj(-15).decompress(frame.payload + b"\x00\x00\xff\xff") if frame.rsv else frame.payload
                for frame in frames]
    assert inflated == [text.encode() for text in texts] and size == len(b"".join(parts))


@pytest.mark.parametrize("payload", [b"tiny", os.urandom(5000)], ids=["below-min-size", "incompressible"])
def test_what_would_not_shrink_is_sent_as_it_is(payload):
    message = PreparedMessage(payload)
    assert message.frame_for(PerMessageDeflate().accept([])) == (message.parts, message.size)
    assert PreparedMessage(b"", Opcode.PING).frame_for(PerMessageDeflate().accept([]))[1] == 2  # control: never


def test_an_agreement_answers_what_its_own_offer_asked():
    extension = PerMessageDeflate()
    assert "server_max_window_bits" not in extension.accept([]).response
    asked = extension.accept([("server_max_window_bits", "15")])  # same window, but it was asked for: echoed
    assert asked.response.endswith("server_max_window_bits=15")


def test_on_a_deflate_connection_plain_messages_still_meet_the_limit():
    protocol = deflate_protocol(max_message_size=1000)
    assert pull(protocol, client_frame(Opcode.BINARY, bytes(1000))) == [BinaryMessage(bytes(1000))]
    [event] = pull(protocol, client_frame(Opcode.BINARY, bytes(1001)))
    assert isinstance(event.error, MessageTooBig)
    protocol = deflate_protocol(max_message_size=1000)
    [event] = pull(protocol, client_frame(Opcode.BINARY, bytes(600), fin=False) + client_frame(Opcode.CONTINUATION, bytes(401)))
    assert isinstance(event.error, MessageTooBig)


def test_an_incompressible_message_at_the_limit_passes_compressed():
    """Deflate makes random bytes a little longer: the wire bound leaves room for that."""
    protocol = deflate_protocol(max_message_size=100_000)
    payload = os.urandom(100_000)
    data = compressed(payload)
    assert len(data) > len(payload)
    assert pull(protocol, client_frame(Opcode.BINARY, data, rsv=0b100)) == [BinaryMessage(payload)]


def test_messages_compressed_one_after_another_each_inflate_alone():
    """The reused compressor's full flush: no message refers to an earlier one."""
    extension = PerMessageDeflate()
    agreement = extension.accept([])
    texts = [f"the same long phrase again and again, message {i} " * 5 for i in range(20)]
    for text in texts:
        [frame] = server_frames(PreparedMessage(text).frame_for(agreement)[0])
        assert zlib.decompressobj(-15).decompress(frame.payload + b"\x00\x00\xff\xff") == text.encode()


def test_a_small_bomb_fed_one_byte_at_a_time_is_refused_too(feed):
    protocol = deflate_protocol(max_message_size=64 * 1024)
    bomb = compressed(bytes(4 << 20))  # 4 MiB of zeros in about 4 kB
    events = feed(protocol, client_frame(Opcode.BINARY, bomb, rsv=0b100))
    assert isinstance(events[-1], ConnectionFailed) and isinstance(events[-1].error, MessageTooBig)


def finished(data):
    """A message compressed as a whole stream, ended by a final block (BFINAL), as some clients send it."""
    compressor = zlib.compressobj(6, zlib.DEFLATED, -15)
    return compressor.compress(data) + compressor.flush(zlib.Z_FINISH)


@pytest.mark.parametrize("takeover", [False, True], ids=["no-takeover", "takeover"])
def test_a_stream_ended_by_a_final_block_is_a_message_and_the_next_starts_anew(feed, takeover):
    protocol = deflate_protocol(client_no_context_takeover=not takeover)
    stream = client_frame(Opcode.TEXT, finished(b"first " * 30), rsv=0b100)
    stream += client_frame(Opcode.TEXT, finished(b"second " * 30)[:7], fin=False, rsv=0b100)
    stream += client_frame(Opcode.CONTINUATION, finished(b"second " * 30)[7:])
    assert feed(protocol, stream) == [TextMessage("first " * 30), TextMessage("second " * 30)]


@pytest.mark.parametrize("split", [None, "fragment"])
def test_data_after_the_final_deflate_block_fails_with_1007(feed, split):
    """RFC 7692 section 7.2.2: what follows a final block is not part of the message."""
    data = finished(b"the message " * 20) + compressed(b"smuggled")
    if split is None:
        stream = client_frame(Opcode.TEXT, data, rsv=0b100)
    else:
        end = len(finished(b"the message " * 20))
        stream = client_frame(Opcode.TEXT, data[:end], fin=False, rsv=0b100) + client_frame(Opcode.CONTINUATION, data[end:])
    events = feed(deflate_protocol(), stream)
    assert isinstance(events[-1], ConnectionFailed) and isinstance(events[-1].error, InvalidPayload)
    assert events[-1].error.close_code == 1007 and not any(isinstance(e, TextMessage) for e in events)
