"""The outbox and prepared messages, sans I/O."""

import random

import pytest

from wschat.frames import Opcode, encode_frame
from wschat.outbound import BUFFER_OVERHEAD, COST_PER_BYTE_AT_MOST, Outbox, PreparedMessage


def contents(outbox):
    return b"".join(bytes(b) for b in outbox.buffers[outbox.start :])


def test_consume_across_buffers_keeps_order_and_size():
    outbox = Outbox()
    data = [bytes([i]) * (i + 1) for i in range(200)]
    for item in data:
        outbox.append(item)
    whole = b"".join(data)
    taken = 0
    for step in [1, 2, 3, 50, 7, 1000, 4000, 13]:
        outbox.consume(step)
        taken += step
        assert contents(outbox) == whole[taken:] and outbox.size == len(whole) - taken
    outbox.consume(outbox.size)
    assert outbox.buffers == [] and outbox.start == 0 and len(outbox) == 0


def test_pending_gives_at_most_that_many_buffers_from_the_front():
    outbox = Outbox()
    for i in range(10):
        outbox.append(b"%d" % i)
    assert outbox.pending(100) is outbox.buffers  # the common case: no copy
    assert outbox.pending(3) == [b"0", b"1", b"2"]
    outbox.consume(2)
    assert outbox.pending(3) == [b"2", b"3", b"4"]


def test_discard_unstarted_keeps_a_partly_written_buffer_only():
    outbox = Outbox()
    outbox.extend((b"abcd", b"efgh"), 8)
    outbox.discard_unstarted()
    assert outbox.size == 0 and contents(outbox) == b""
    outbox.extend((b"abcd", b"efgh"), 8)
    outbox.consume(1)
    outbox.discard_unstarted()
    assert contents(outbox) == b"bcd" and outbox.size == 3


@pytest.mark.parametrize("written", [0, 1, 10, 11, 70009])
def test_discard_unstarted_never_cuts_a_large_frame_after_its_header(written):
    """A large frame is a header and a payload buffer: once any of it is
    written, all of it stays (1d5edf3's outbox dropped the payload after
    its header had gone, and the peer read the close frame as payload)."""
    large = PreparedMessage(b"L" * 70000)  # header 10 bytes, payload apart
    small = PreparedMessage(b"s")
    outbox = Outbox()
    for message in (large, small, large):
        outbox.extend(message.parts, message.size)
    outbox.consume(written)
    outbox.discard_unstarted()
    first = encode_frame(Opcode.BINARY, b"L" * 70000)
    assert contents(outbox) == first[written:] if written else contents(outbox) == b""
    assert outbox.size == len(contents(outbox))


@pytest.mark.parametrize("size", [0, 125, 126, 16383, 16384, 70000])
def test_prepared_message_is_the_encoded_frame(size):
    text = "é" * (size // 2) + "x" * (size % 2)
    prepared = PreparedMessage(text)
    assert b"".join(prepared.parts) == encode_frame(Opcode.TEXT, text.encode())
    assert prepared.size == len(b"".join(prepared.parts)) and prepared.opcode == Opcode.TEXT
    binary = PreparedMessage(bytearray(size))
    assert b"".join(binary.parts) == encode_frame(Opcode.BINARY, bytes(size))
    assert len(binary.parts) == (2 if size >= 16384 else 1)  # a large payload is never copied into the frame
    assert repr(PreparedMessage(b"", Opcode.PING)) == "<PreparedMessage PING 2 bytes>"


@pytest.mark.parametrize("wrong", [123, None, ["a"], {"text": "hi"}])
def test_a_message_that_is_neither_text_nor_bytes_is_refused(wrong):
    """``bytes(123)`` is 123 zero bytes: a number must not go out as them."""
    with pytest.raises(TypeError, match=f"str \\(text\\) or bytes \\(binary\\), not {type(wrong).__name__}"):
        PreparedMessage(wrong)
    assert PreparedMessage(memoryview(b"ok")).payload == b"ok"


def test_a_pong_not_yet_begun_is_replaced_by_the_next_and_a_begun_one_is_not():
    outbox = Outbox()
    outbox.put_pong(b"\x8a\x01a")
    outbox.append(b"\x81\x02hi")
    outbox.put_pong(b"\x8a\x02bb")  # replaces the first, where it stands
    assert outbox.buffers == [b"\x8a\x02bb", b"\x81\x02hi"] and outbox.size == 8
    outbox.consume(1)  # the pong is under way: it stays whole, and the next is queued behind
    outbox.put_pong(b"\x8a\x01c")
    assert [bytes(b) for b in outbox.buffers[outbox.start:]] == [b"\x02bb", b"\x81\x02hi", b"\x8a\x01c"]
    outbox.consume(outbox.size)
    outbox.append(b"\x81\x01x")  # where the last pong stood there is now a text frame: never replaced
    outbox.put_pong(b"\x8a\x01d")
    assert outbox.buffers == [b"\x81\x01x", b"\x8a\x01d"]


def test_cost_counts_each_buffer_beyond_its_bytes():
    outbox = Outbox()
    assert outbox.cost == 0
    outbox.extend((b"head", memoryview(b"payload")), 11)
    assert outbox.cost == 11 + 2 * BUFFER_OVERHEAD
    outbox.consume(4)
    assert outbox.cost == 7 + BUFFER_OVERHEAD


def test_a_queue_never_costs_more_per_byte_than_the_broadcast_path_assumes():
    """``queue_for_many`` counts a queue's buffers only past limit /
    COST_PER_BYTE_AT_MOST bytes: that must bound every queue, whatever mix
    of frames, pongs, partial writes and discards made it."""
    rng = random.Random(7)
    outbox = Outbox()
    for _ in range(5000):
        action = rng.random()
        if action < 0.3:
            outbox.append(bytes([0x81, 1]) + b"x")
        elif action < 0.5:
            parts = (b"\x82\x7e\x40\x00", memoryview(bytes(rng.randrange(1, 300))))
            outbox.extend(parts, sum(map(len, parts)))
        elif action < 0.6:
            outbox.put_pong(bytes([0x8A, 2]) + b"pp")
        elif action < 0.95 and outbox.size:
            outbox.consume(rng.randrange(1, outbox.size + 1))
        elif action >= 0.95:
            outbox.discard_unstarted()
        live = outbox.buffers[outbox.start:]
        assert outbox.size == sum(map(len, live))
        assert outbox.cost == outbox.size + BUFFER_OVERHEAD * len(live) <= COST_PER_BYTE_AT_MOST * outbox.size
