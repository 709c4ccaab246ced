"""A message that arrives in pieces, put back together, sans I/O.

Pieces are the frames of a fragmented message, or the parts of one frame
that arrive in several reads.  Each is checked as it comes: against the size
limit (once inflated, for a compressed message) and, for text, as UTF-8, so
a message fails at its first bad byte, not at its end.  Small pieces are
joined at once: what a message holds stays near its size however it is cut.
"""

from __future__ import annotations

import codecs

from .deflate import Inflater
from .errors import InvalidPayload, MessageTooBig
from .frames import Opcode

SMALL_PIECE = 512  # pieces smaller than this are joined as they come: no per-fragment overhead
_Utf8Decoder = codecs.getincrementaldecoder("utf-8")


class Reassembly:
    """One message in progress.  ``inflater`` is given for a compressed one."""

    __slots__ = ("opcode", "in_frame", "size", "compressed", "_limit", "_parts", "_decoder", "_inflater")

    def __init__(self, opcode: int, limit: int, inflater: Inflater | None = None):
        self.opcode = opcode
        self.in_frame = False  # the last piece was not its frame's last
        self.size = 0  # bytes of message so far (inflated)
        self.compressed = inflater is not None
        self._limit = limit
        self._parts: list[bytes | bytearray] = []
        self._decoder = _Utf8Decoder() if opcode == Opcode.TEXT else None
        self._inflater = inflater

    def add(self, payload: bytes, last: bool) -> str | bytes | None:
        """Take one piece; returns the whole message (``str`` for text) with
        the ``last`` piece.  Raises ``MessageTooBig`` or ``InvalidPayload``."""
        room = self._limit - self.size
        if self._inflater is not None:  # inflated in bounded steps: the limit applies to what comes out
            payload = self._inflater.feed(payload, room)
            if last:
                payload += self._inflater.finish(room - len(payload))
        elif len(payload) > room:
            raise MessageTooBig(f"message larger than {self._limit} bytes")
        if self._decoder is not None:
            check_utf8_prefix(self._decoder, payload, last)
        self._keep(payload)
        if not last:
            return None
        data = b"".join(self._parts)
        self._parts = []
        return data.decode("utf-8") if self._decoder is not None else data

    def _keep(self, payload: bytes) -> None:
        self.size += len(payload)
        parts = self._parts
        if len(payload) >= SMALL_PIECE:
            parts.append(payload)
        elif parts and type(parts[-1]) is bytearray:
            parts[-1] += payload
        else:
            parts.append(bytearray(payload))


def check_utf8_prefix(decoder: codecs.IncrementalDecoder, payload: bytes, final: bool) -> None:
    """Fail as soon as the bytes so far cannot start valid UTF-8."""
    try:
        decoder.decode(payload, final)
    except UnicodeDecodeError:
        raise InvalidPayload("text message is not valid UTF-8") from None
    pending = decoder.getstate()[0]
    if len(pending) > 1 and pending[0] == 0xED and pending[1] >= 0xA0:  # CPython waits for a third byte
        raise InvalidPayload("text message is not valid UTF-8 (a surrogate)")
