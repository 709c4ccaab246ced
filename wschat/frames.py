"""RFC 6455 framing: opcodes, close codes, encoding and incremental parsing.

Nothing here knows about sockets or connection state.  The only hot loop,
unmasking, runs in the optional C accelerator ``wschat._speedups`` when it was
built and ``WSCHAT_NO_SPEEDUPS`` is not set; the pure-Python path gives the same
results (the tests check one against the other).
"""

from __future__ import annotations

import enum
import os
import struct
from typing import NamedTuple

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
LARGE_PAYLOAD = 16384  # from here on a payload is written as a buffer of its own


def is_valid_close_code(code: int) -> bool:
    """Whether ``code`` may appear in a close frame on the wire.

    1000-1003 and 1007-1014 are registered with IANA; 3000-4999 belong to
    libraries and applications.  1004, 1005, 1006 and 1015 are reserved and
    everything else is unassigned, so a peer that sends them fails the
    connection.
    """
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


class Frame(NamedTuple):
    """One frame as received: payload already unmasked."""

    opcode: int
    payload: bytes
    fin: bool = True
    rsv: int = 0  # the three RSV bits, RSV1 being 0b100


# -- masking ---------------------------------------------------------------


def _apply_mask_python(data: bytes, mask: bytes) -> bytes:
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


def _load_speedups():
    if os.environ.get("WSCHAT_NO_SPEEDUPS"):
        return None
    try:
        from . import _speedups
    except ImportError:
        return None
    return _speedups


_speedups = _load_speedups()
#: "C" when the accelerator is in use, "Python" otherwise.
IMPLEMENTATION = "C" if _speedups else "Python"
apply_mask = _speedups.apply_mask if _speedups else _apply_mask_python


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


def encode_frame_parts(opcode: int, payload: bytes) -> tuple[bytes, ...]:
    """An unmasked frame as buffers to write in turn: one for a small payload,
    header and payload apart for a large one, which is then never copied."""
    header = frame_header(opcode, len(payload))
    return (header + payload,) if len(payload) < LARGE_PAYLOAD else (header, payload)


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
    """

    __slots__ = ("_buffer", "_pos", "require_mask", "max_payload", "allowed_rsv")

    def __init__(self, *, require_mask: bool, max_payload: int, allowed_rsv: int = 0):
        self._buffer = bytearray()
        self._pos = 0
        self.require_mask = require_mask
        self.max_payload = max_payload
        self.allowed_rsv = allowed_rsv

    @property
    def buffered(self) -> int:
        """How many received bytes wait for the rest of their frame."""
        return len(self._buffer) - self._pos

    def feed(self, data: bytes) -> None:
        if self._pos:
            del self._buffer[: self._pos]  # in place: the allocation is reused
            self._pos = 0
        self._buffer += data

    def next_frame(self) -> Frame | None:
        """Return the next complete frame, or None until more bytes arrive."""
        buffer = self._buffer
        pos = self._pos
        available = len(buffer) - pos
        if available < 2:
            return None
        first = buffer[pos]
        second = buffer[pos + 1]
        opcode = first & 0x0F
        rsv = (first >> 4) & 0x07
        fin = bool(first & 0x80)
        if rsv & ~self.allowed_rsv:
            raise ProtocolError("reserved bits set without a negotiated extension")
        if opcode not in KNOWN_OPCODES:
            raise ProtocolError(f"reserved opcode {opcode:#x}")
        masked = bool(second & 0x80)
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
            if size == 126:
                header = 4
                if available < header:
                    return None
                size = int.from_bytes(buffer[pos + 2 : pos + 4], "big")
            else:
                header = 10
                if available < header:
                    return None
                size = int.from_bytes(buffer[pos + 2 : pos + 10], "big")
                if size >> 63:
                    raise ProtocolError("payload length with the most significant bit set")
            if size > self.max_payload:
                raise MessageTooBig(f"message larger than {self.max_payload} bytes")
        elif size > self.max_payload:
            raise MessageTooBig(f"message larger than {self.max_payload} bytes")
        if masked:
            header += 4
        end = pos + header + size
        if len(buffer) < end:
            return None
        if masked:
            mask = bytes(buffer[pos + header - 4 : pos + header])
            view = memoryview(buffer)
            try:
                part = view[pos + header : end]
                payload = apply_mask(part, mask)
                part.release()
            finally:
                view.release()
        else:
            payload = bytes(buffer[pos + header : end])
        self._pos = end
        return Frame(opcode, payload, fin, rsv)
