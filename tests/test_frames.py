import os
import random
import struct
import subprocess
import sys

import pytest

from wschat import frames
from wschat.errors import InvalidPayload, MessageTooBig, ProtocolError
from wschat.frames import CloseCode, Frame, FrameParser, Opcode, encode_frame

from .conftest import IMPLEMENTATIONS, _speedups

MASK = b"\x37\xfa\x21\x3d"


def parse_all(data, *, chunk=None, require_mask=True, max_payload=1 << 24, allowed_rsv=0):
    """Feed ``data`` in chunks of ``chunk`` bytes (all at once when None)."""
    parser = FrameParser(require_mask=require_mask, max_payload=max_payload, allowed_rsv=allowed_rsv)
    step = chunk or max(len(data), 1)
    out = []
    for start in range(0, len(data), step):
        parser.feed(data[start : start + step])
        while (frame := parser.next_frame()) is not None:
            out.append(frame)
    return out, parser


# -- masking -------------------------------------------------------------


def test_rfc_example_masked_hello(implementation):
    # RFC 6455 section 5.7: a masked "Hello" from a client.
    data = bytes.fromhex("818537fa213d7f9f4d5158")
    assert encode_frame(Opcode.TEXT, b"Hello", mask=MASK) == data
    assert parse_all(data)[0] == [Frame(Opcode.TEXT, b"Hello", True, 0)]


@pytest.mark.parametrize("size", [0, 1, 3, 4, 5, 7, 8, 9, 15, 16, 17, 1000, 65537])
def test_mask_is_an_involution(implementation, size):
    data = os.urandom(size)
    masked = frames.apply_mask(data, MASK)
    assert len(masked) == size
    assert frames.apply_mask(masked, MASK) == data
    assert masked == bytes(b ^ MASK[i % 4] for i, b in enumerate(data))


def test_mask_accepts_any_bytes_like(implementation):
    data = bytearray(b"abcdefghij")
    assert frames.apply_mask(memoryview(data)[2:], MASK) == frames.apply_mask(bytes(data[2:]), MASK)


@pytest.mark.skipif(_speedups is None, reason="C accelerator not built")
def test_c_and_python_agree_on_random_inputs():
    rng = random.Random(6455)
    for _ in range(500):
        data = rng.randbytes(rng.choice([rng.randrange(0, 40), rng.randrange(0, 5000)]))
        mask = rng.randbytes(4)
        assert _speedups.apply_mask(data, mask) == frames.apply_mask_python(data, mask)


@pytest.mark.skipif(_speedups is None, reason="C accelerator not built")
def test_c_mask_rejects_bad_arguments():
    with pytest.raises(ValueError):
        _speedups.apply_mask(b"abc", b"12")
    with pytest.raises(TypeError):
        _speedups.apply_mask(b"abc")
    with pytest.raises(TypeError):
        _speedups.apply_mask("text", MASK)
    with pytest.raises(TypeError):
        _speedups.apply_mask(b"abc", "mask")


def test_parsing_identical_on_both_paths_random_frames():
    rng = random.Random(1984)
    frames_in = []
    for _ in range(60):
        opcode = rng.choice([Opcode.BINARY, Opcode.PING, Opcode.PONG, Opcode.CONTINUATION])
        size = rng.randrange(0, 126) if opcode >= 8 else rng.choice([0, 5, 125, 126, 300, 70000])
        frames_in.append(Frame(opcode, rng.randbytes(size), opcode >= 8 or rng.random() < 0.5, 0))
    stream = b"".join(encode_frame(f.opcode, f.payload, fin=f.fin, mask=rng.randbytes(4)) for f in frames_in)
    results = {}
    for name, impl in IMPLEMENTATIONS.items():
        original = frames.apply_mask
        frames.apply_mask = impl
        try:
            results[name] = parse_all(stream, chunk=rng.randrange(1, 5000))[0]
        finally:
            frames.apply_mask = original
    for parsed in results.values():
        assert parsed == frames_in


def test_no_speedups_environment_forces_pure_python():
    code = ("import wschat, wschat.frames as f, wschat.dialect as d; "
            "print(wschat.IMPLEMENTATION, f.apply_mask is f.apply_mask_python, f.frame_texts is f.frame_texts_python, "
            "d.speedups)")
    env = dict(os.environ, WSCHAT_NO_SPEEDUPS="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["Python", "True", "True", "None"]


# -- encoding ------------------------------------------------------------


@pytest.mark.parametrize(
    "size, header",
    [
        (0, b"\x81\x00"),
        (125, b"\x81\x7d"),
        (126, b"\x81\x7e\x00\x7e"),
        (65535, b"\x81\x7e\xff\xff"),
        (65536, b"\x81\x7f" + struct.pack("!Q", 65536)),
    ],
)
def test_three_length_encodings(size, header):
    payload = b"x" * size
    assert encode_frame(Opcode.TEXT, payload) == header + payload


def test_fin_and_rsv_bits():
    assert encode_frame(Opcode.TEXT, b"a", fin=False)[0] == 0x01
    assert encode_frame(Opcode.CONTINUATION, b"a")[0] == 0x80
    assert encode_frame(Opcode.BINARY, b"a", rsv=0b100)[0] == 0xC2
    assert encode_frame(Opcode.PING)[:2] == b"\x89\x00"


def test_close_payload_round_trip():
    # 1003 is 0x03eb big-endian: the seed's Bytes({10, 03}) encoded 2563.
    assert frames.encode_close_payload(1003) == b"\x03\xeb"
    assert frames.encode_close_payload(1000, "bye") == b"\x03\xe8bye"
    assert frames.encode_close_payload() == b""
    assert frames.parse_close_payload(b"\x03\xe8bye") == (1000, "bye")
    assert frames.parse_close_payload(b"") == (CloseCode.NO_STATUS, "")


@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535])
def test_invalid_close_codes_are_refused_both_ways(code):
    assert not frames.is_valid_close_code(code)
    with pytest.raises(ProtocolError):
        frames.parse_close_payload(struct.pack("!H", code))
    with pytest.raises(ValueError):
        frames.encode_close_payload(code)


@pytest.mark.parametrize("code", [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 3999, 4000, 4999])
def test_valid_close_codes(code):
    assert frames.is_valid_close_code(code)
    assert frames.parse_close_payload(struct.pack("!H", code)) == (code, "")


def test_close_payload_errors():
    with pytest.raises(ProtocolError):
        frames.parse_close_payload(b"\x03")
    with pytest.raises(InvalidPayload):
        frames.parse_close_payload(b"\x03\xe8\xff")
    with pytest.raises(ValueError):
        frames.encode_close_payload(1000, "x" * 124)
    with pytest.raises(ValueError):
        frames.encode_close_payload(None, "reason without code")


# -- parsing -------------------------------------------------------------


@pytest.mark.parametrize("chunk", [None, 1, 7])
def test_parser_any_chunking(implementation, chunk):
    payloads = [b"", b"a", b"x" * 125, b"y" * 126, os.urandom(70000)]
    if chunk == 1:
        payloads = payloads[:4]  # one byte at a time: keep it quick
    stream = b"".join(encode_frame(Opcode.BINARY, p, mask=os.urandom(4)) for p in payloads)
    parsed, parser = parse_all(stream, chunk=chunk)
    assert [f.payload for f in parsed] == payloads
    assert parser.buffered == 0


def test_parser_keeps_partial_frame():
    data = encode_frame(Opcode.TEXT, b"hello", mask=MASK)
    parsed, parser = parse_all(data[:-1])
    assert parsed == [] and parser.buffered == len(data) - 1
    parser.feed(data[-1:])
    assert parser.next_frame() == Frame(Opcode.TEXT, b"hello", True, 0)


def test_client_side_parser_reads_unmasked():
    data = encode_frame(Opcode.TEXT, b"hi") + encode_frame(Opcode.PONG, b"p", fin=True)
    parsed, _ = parse_all(data, require_mask=False)
    assert parsed == [Frame(1, b"hi", True, 0), Frame(10, b"p", True, 0)]


@pytest.mark.parametrize(
    "data, message",
    [
        (encode_frame(Opcode.TEXT, b"hi"), "not masked"),
        (encode_frame(Opcode.TEXT, b"hi", rsv=0b100, mask=MASK), "reserved bits"),
        (encode_frame(Opcode.TEXT, b"hi", rsv=0b001, mask=MASK), "reserved bits"),
        (encode_frame(3, b"", mask=MASK), "reserved opcode"),
        (encode_frame(0xB, b"", mask=MASK), "reserved opcode"),
        (encode_frame(Opcode.PING, b"", fin=False, mask=MASK), "fragmented control"),
        (encode_frame(Opcode.PING, b"x" * 126, mask=MASK), "longer than 125"),
        (b"\x82\xff" + b"\x80" + b"\x00" * 7 + MASK, "most significant bit"),
    ],
)
def test_parser_protocol_errors(data, message):
    with pytest.raises(ProtocolError, match=message):
        parse_all(data[:2] if message != "most significant bit" else data)


def test_parser_errors_detected_from_first_two_bytes():
    # A reserved opcode fails before any of the (huge) payload arrives.
    with pytest.raises(ProtocolError):
        parse_all(b"\x83\xff")


def test_masked_frame_refused_by_client_parser():
    with pytest.raises(ProtocolError, match="masked frame from server"):
        parse_all(encode_frame(Opcode.TEXT, b"x", mask=MASK), require_mask=False)


@pytest.mark.parametrize("size", [11, 200, 70000])
def test_max_payload_checked_from_header(size):
    frame = encode_frame(Opcode.BINARY, b"z" * size, mask=MASK)
    # Only the header is fed: the limit trips without buffering the payload.
    header_length = {11: 2, 200: 4, 70000: 10}[size]
    with pytest.raises(MessageTooBig):
        parse_all(frame[:header_length], max_payload=10)


def test_allowed_rsv_lets_extension_bits_through():
    data = encode_frame(Opcode.TEXT, b"x", rsv=0b100, mask=MASK)
    parsed, _ = parse_all(data, allowed_rsv=0b100)
    assert parsed[0].rsv == 0b100


def test_parser_keeps_leftovers_across_feeds(implementation):
    stream = b"".join(encode_frame(Opcode.BINARY, bytes([n]) * 300, mask=MASK) for n in range(3))
    parser = FrameParser(require_mask=True, max_payload=1000)
    parser.feed(stream[:700])  # two whole frames and part of the third
    assert [parser.next_frame().payload[0] for _ in range(2)] == [0, 1]
    assert parser.next_frame() is None and parser.buffered == 700 - 2 * 308
    parser.feed(stream[700:])
    assert parser.next_frame().payload == bytes([2]) * 300 and parser.buffered == 0
