"""RFC 6455 framing: opcodes, close codes, encoding and incremental parsing.

Nothing here knows about sockets or connection state.  The hot loops,
unmasking and framing a batch of texts, run in the optional C accelerator
(see ``accelerator``) when it is there; the pure-Python paths give the same
results (the tests check one against the other).
"""

from __future__ import annotations

import enum
import struct
from typing import NamedTuple

from .accelerator import speedups
from .errors import InvalidPayload, MessageTooBig, ProtocolError


class Opcode(enum.IntEnum):
    CONTINUATION = 0x0
    TEXT = 0x1
    BINARY = 0x2
    CLOSE = 0x8
    PING = 0x9
    PONG = 0xA


class CloseCode(enum.IntEnum):
    """Close codes of RFC 6455 section 7.4.1 and the IANA registry."""

    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    UNSUPPORTED_DATA = 1003
    NO_STATUS = 1005  # never on the wire: the close frame had no code
    ABNORMAL = 1006  # never on the wire: the TCP connection dropped without a close
    INVALID_PAYLOAD = 1007
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    MANDATORY_EXTENSION = 1010
    INTERNAL_ERROR = 1011
    SERVICE_RESTART = 1012
    TRY_AGAIN_LATER = 1013
    BAD_GATEWAY = 1014
    TLS_HANDSHAKE = 1015  # never on the wire


KNOWN_OPCODES = frozenset(int(op) for op in Opcode)
MAX_CONTROL_PAYLOAD = 125


def is_valid_close_code(code: int) -> bool:
    """Whether ``code`` may appear in a close frame on the wire.

    1000-1003 and 1007-1014 are registered with IANA; 3000-4999 belong to
    libraries and applications.  1004, 1005, 1006 and 1015 are reserved and
    everything else is unassigned, so a peer that sends them fails the
    connection.
    """
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


class Frame(NamedTuple):
    """One frame, or one piece of a data frame's payload, as received (unmasked)."""

    opcode: int
    payload: bytes
    fin: bool = True
    rsv: int = 0  # the three RSV bits, RSV1 being 0b100
    more: bool = False  # more of this same frame's payload follows (partial parsing only)


_new_frame = tuple.__new__  # builds a Frame without NamedTuple's Python-level __new__


# -- masking ---------------------------------------------------------------


def apply_mask_python(data: bytes | bytearray | memoryview, mask: bytes) -> bytes:
    """XOR ``data`` with the 4-byte ``mask`` repeated (RFC 6455 section 5.3).

    One big-integer XOR does the whole buffer in C inside CPython, which is
    an order of magnitude faster than a byte loop.
    """
    size = len(data)
    if not size:
        return b""
    key = (bytes(mask) * (size // 4 + 1))[:size]
    value = int.from_bytes(data, "little") ^ int.from_bytes(key, "little")
    return value.to_bytes(size, "little")


apply_mask = speedups.apply_mask if speedups else apply_mask_python


# -- encoding ----------------------------------------------------------------

_pack_16 = struct.Struct("!BBH").pack
_pack_64 = struct.Struct("!BBQ").pack


def encode_frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    rsv: int = 0,
    mask: bytes | None = None,
) -> bytes:
    """Encode one frame.

    Servers send unmasked frames (``mask=None``); clients pass a 4-byte mask,
    which is applied to the payload and written after the length.
    """
    header = frame_header(opcode, len(payload), fin=fin, rsv=rsv, masked=mask is not None)
    if mask is not None:
        return header + mask + apply_mask(payload, mask)
    return header + payload


def frame_header(opcode: int, size: int, *, fin: bool = True, rsv: int = 0, masked: bool = False) -> bytes:
    """The first 2, 4 or 10 bytes of a frame (without the mask)."""
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    mask_bit = 0x80 if masked else 0
    if size < 126:
        return bytes((first, mask_bit | size))
    if size < 65536:
        return _pack_16(first, mask_bit | 126, size)
    return _pack_64(first, mask_bit | 127, size)


def frame_texts_python(payloads: list[bytes], below: int = 0) -> bytes | None:
    """Text messages (UTF-8 payloads) as final, unmasked frames, joined
    (a small payload's two-byte header made inline: the usual case); None
    when one has ``below`` bytes or more (``below`` > 0: the caller frames
    such a batch otherwise; the C accelerator finds it in its sizing pass)."""
    if below > 0 and any(len(payload) >= below for payload in payloads):
        return None
    return b"".join([(bytes((0x81, len(payload))) if len(payload) < 126 else frame_header(Opcode.TEXT, len(payload)))
                     + payload for payload in payloads])


frame_texts = speedups.frame_texts if speedups else frame_texts_python


def encode_close_payload(code: int | None = None, reason: str = "") -> bytes:
    """The payload of a close frame: a 16-bit big-endian code, then UTF-8 reason."""
    if code is None:
        if reason:
            raise ValueError("a close reason needs a close code")
        return b""
    if not is_valid_close_code(code):
        raise ValueError(f"close code {code} may not be sent")
    data = reason.encode("utf-8")
    if len(data) > MAX_CONTROL_PAYLOAD - 2:
        raise ValueError("close reason longer than 123 bytes")
    return struct.pack("!H", code) + data


def parse_close_payload(payload: bytes) -> tuple[int, str]:
    """Decode a received close payload into ``(code, reason)``.

    An empty payload means "no status" (1005).  A 1-byte payload or a code
    that may not be sent is a protocol error (1002); a reason that is not
    UTF-8 is invalid payload data (1007).
    """
    if not payload:
        return CloseCode.NO_STATUS, ""
    if len(payload) == 1:
        raise ProtocolError("close frame with a 1-byte payload")
    code = int.from_bytes(payload[:2], "big")
    if not is_valid_close_code(code):
        raise ProtocolError(f"invalid close code {code}")
    try:
        reason = payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidPayload("close reason is not valid UTF-8") from None
    return code, reason


# -- parsing -----------------------------------------------------------------


class FrameParser:
    """An incremental frame parser: ``feed`` it bytes, pull frames out.

    It checks every rule that one frame alone can break: reserved bits,
    reserved opcodes, control frames that are fragmented or too long, the
    masking direction and the payload limit ``max_payload``, which is checked
    from the header, before any payload is buffered.  Rules about sequences
    of frames belong to the protocol.

    With ``partial=True`` a data frame's payload comes out in pieces as it
    arrives (``Frame.more`` is true on every piece but the last), so the
    parser never holds more than the bytes of one ``feed`` and a few header
    bytes, and the protocol can check a text frame's UTF-8 before its end.
    Control frames always come out whole.
    """

    __slots__ = ("_data", "_pos", "require_mask", "max_payload", "allowed_rsv", "partial", "_piece")

    def __init__(self, *, require_mask: bool, max_payload: int, allowed_rsv: int = 0, partial: bool = False):
        self._data: bytes | bytearray | memoryview = b""
        self._pos = 0
        self.require_mask = require_mask
        self.max_payload = max_payload
        self.allowed_rsv = allowed_rsv
        self.partial = partial
        self._piece: tuple[int, bool, int, bytes | None, int, int] | None = None  # inside a frame:
        # (opcode, fin, rsv, mask, offset, remaining)

    @property
    def buffered(self) -> int:
        """How many received bytes wait for the rest of their frame."""
        return len(self._data) - self._pos

    def feed(self, data: bytes | memoryview) -> None:
        """Take received bytes.  They are parsed where they lie: a view of a
        buffer the caller reuses is fine, if ``detach`` is called first."""
        if self._pos >= len(self._data):  # all consumed: keep the new bytes as they are, no copy
            self._data, self._pos = data, 0
            return
        if self._pos or not isinstance(self._data, bytearray):
            self._data = bytearray(memoryview(self._data)[self._pos :])  # the leftover, copied once
            self._pos = 0
        self._data += data

    def clear(self) -> None:
        """Drop what is received and not parsed (nothing more will be)."""
        self._data, self._pos, self._piece = b"", 0, None

    def detach(self) -> None:
        """Let go of the fed buffer: what is not parsed yet is copied (a few
        header bytes, as a rule), so the caller may reuse its buffer."""
        data = self._data
        if type(data) is memoryview:
            self._data = bytes(data[self._pos :])
            self._pos = 0

    def next_frame(self) -> Frame | None:
        """Return the next frame (or piece of one), or None until more bytes arrive."""
        if self._piece is not None:
            return self._next_piece()
        data = self._data
        pos = self._pos
        available = len(data) - pos
        if available < 2:
            return None
        first = data[pos]
        second = data[pos + 1]
        opcode = first & 0x0F
        rsv = (first >> 4) & 0x07
        fin = first >= 0x80
        if rsv & ~self.allowed_rsv:
            raise ProtocolError("reserved bits set without a negotiated extension")
        if opcode not in KNOWN_OPCODES:
            raise ProtocolError(f"reserved opcode {opcode:#x}")
        masked = second >= 0x80
        if masked != self.require_mask:
            raise ProtocolError("frame from client not masked" if self.require_mask else "masked frame from server")
        size = second & 0x7F
        header = 2
        if opcode >= 0x8:
            if not fin:
                raise ProtocolError("fragmented control frame")
            if size > MAX_CONTROL_PAYLOAD:
                raise ProtocolError("control frame payload longer than 125 bytes")
        elif size >= 126:
            header = 4 if size == 126 else 10
            if available < header:
                return None
            size = int.from_bytes(data[pos + 2 : pos + header], "big")
            if size >> 63:
                raise ProtocolError("payload length with the most significant bit set")
        if size > self.max_payload and opcode < 0x8:
            raise MessageTooBig(f"message larger than {self.max_payload} bytes")
        mask = None
        if masked:
            header += 4
            if available < header:
                return None
            mask = bytes(data[pos + header - 4 : pos + header])
        start = pos + header
        end = start + size
        if end > len(data):
            if not self.partial or opcode >= 0x8 or start == len(data):
                return None
            self._piece = (opcode, fin, rsv, mask, 0, size)
            self._pos = start
            return self._next_piece()
        self._pos = end
        return _new_frame(Frame, (opcode, self._payload(data, start, end, mask), fin, rsv, False))

    def _next_piece(self) -> Frame | None:
        """The next piece of a data frame whose payload is still arriving."""
        piece = self._piece
        assert piece is not None  # called inside a frame
        opcode, fin, rsv, mask, offset, remaining = piece
        data = self._data
        start = self._pos
        take = min(remaining, len(data) - start)
        if not take:
            return None
        if mask is not None and offset % 4:
            shift = offset % 4
            mask = mask[shift:] + mask[:shift]
        self._pos = start + take
        remaining -= take
        self._piece = (opcode, fin, rsv, piece[3], offset + take, remaining) if remaining else None
        return _new_frame(Frame, (opcode, self._payload(data, start, start + take, mask), fin, rsv, bool(remaining)))

    @staticmethod
    def _payload(data: bytes | bytearray | memoryview, start: int, end: int, mask: bytes | None) -> bytes:
        if mask is None:
            return data[start:end] if type(data) is bytes else bytes(data[start:end])
        with memoryview(data) as view:
            return apply_mask(view[start:end], mask)
