"""permessage-deflate (RFC 7692), sans I/O: negotiation, and per-message (de)compression.

The server's choices, and why:

* it always answers ``server_no_context_takeover`` (section 7.1.1.1 lets it):
  each message it sends is compressed on its own, so a broadcast is
  compressed once and the same bytes go to every recipient with the same
  window size, and no connection keeps a compressor;
* it answers ``client_no_context_takeover`` (section 7.1.1.2 lets it) unless
  told not to: each message a client sends is then compressed on its own, so
  an inflater lives only while a compressed message arrives, and a connection
  holds no zlib state between messages, idle or not.  The price is a lower
  ratio on small client messages; ``PerMessageDeflate(client_no_context_takeover=False)``
  keeps each client's context instead;
* ``server_max_window_bits`` as the client asks, 9 to 15.  zlib cannot write a
  raw deflate stream with a 256-byte window, so an offer that insists on 8
  is declined;
* a message is sent compressed only when that makes it smaller, and only
  from ``min_size`` bytes.

Inflation proceeds in bounded steps: never more than the room left under the
message size limit, plus one byte, comes out of zlib before the message is
refused (1009), whatever the ratio of the input.
"""

from __future__ import annotations

import threading
import zlib
from dataclasses import dataclass
from typing import Protocol

from .errors import InvalidPayload, MessageTooBig

NAME = "permessage-deflate"
INFLATER_COST = 40 << 10  # what a zlib inflater holds once it has inflated (its 32 KiB window and state; tracemalloc)
RSV1 = 0b100
_EMPTY_BLOCK = b"\x00\x00\xff\xff"
_PARAMS = {"server_no_context_takeover", "client_no_context_takeover", "server_max_window_bits",
           "client_max_window_bits"}


@dataclass(frozen=True, slots=True)
class Agreement:
    """What one accepted offer settled; shared by every connection that settled the same."""

    response: str  # the entry for Sec-WebSocket-Extensions
    server_wbits: int  # the window the server compresses with
    client_no_context_takeover: bool  # True: no inflater outlives a message
    extension: PerMessageDeflate
    rsv: int = RSV1

    def inflater(self) -> Inflater:
        return Inflater()

    def compress(self, payload: bytes) -> bytes | None:
        """``payload`` compressed for connections of this agreement, or None
        when it is better sent as it is."""
        return self.extension.compress(payload, self.server_wbits)


class Compressor(Protocol):
    """What ``zlib.compressobj`` returns, as used here."""

    def compress(self, data: bytes, /) -> bytes: ...

    def flush(self, mode: int = ..., /) -> bytes: ...


class PerMessageDeflate:
    """The extension as the handshake offers it to negotiate (see ``handshake.Extension``)."""

    name = NAME
    rsv = RSV1

    def __init__(self, *, client_no_context_takeover: bool = True, min_size: int = 64, level: int = 6):
        self.client_no_context_takeover = client_no_context_takeover
        self.min_size = min_size
        self.level = level
        self._agreements: dict[tuple[int, bool, bool], Agreement] = {}
        self._compressors: dict[int, Compressor] = {}  # one per window size, reused: see compress
        self._lock = threading.Lock()  # any thread may broadcast

    def accept(self, params: list[tuple[str, str | None]]) -> Agreement | None:
        """The agreement for one offer, or None to decline it (an unknown,
        repeated or invalid parameter, or a window we cannot honour)."""
        names = [name for name, _ in params]
        if len(set(names)) != len(names) or not set(names) <= _PARAMS:
            return None
        values = dict(params)
        for name in ("server_no_context_takeover", "client_no_context_takeover"):
            if values.get(name, None) is not None:  # these take no value
                return None
        server_wbits: int | None = 15
        if "server_max_window_bits" in values:
            server_wbits = _window_bits(values["server_max_window_bits"])
        if server_wbits is None or server_wbits < 9:  # missing, invalid, or 8: zlib cannot honour it
            return None
        if "client_max_window_bits" in values and values["client_max_window_bits"] is not None:
            if _window_bits(values["client_max_window_bits"]) is None:
                return None
        client_no_context = self.client_no_context_takeover or "client_no_context_takeover" in values
        key = (server_wbits, client_no_context, "server_max_window_bits" in values)  # what the answer says
        agreement = self._agreements.get(key)
        if agreement is None:
            response = [NAME, "server_no_context_takeover"]
            if client_no_context:
                response.append("client_no_context_takeover")
            if "server_max_window_bits" in values:
                response.append(f"server_max_window_bits={server_wbits}")
            agreement = self._agreements[key] = Agreement("; ".join(response), server_wbits, client_no_context, self)
        return agreement

    def compress(self, payload: bytes, wbits: int) -> bytes | None:
        """``payload`` compressed on its own with a ``2**wbits`` window, without
        the final empty block; None when that would not make it smaller.

        One compressor per window size serves every message: a full flush
        after each resets its window, so what it writes for one message never
        refers to another (what server_no_context_takeover promises), without
        the 46 us a fresh zlib compressor costs to set up."""
        if len(payload) < self.min_size:
            return None
        with self._lock:
            compressor = self._compressors.get(wbits)
            if compressor is None:
                compressor = self._compressors[wbits] = zlib.compressobj(self.level, zlib.DEFLATED, -wbits)
            data = compressor.compress(payload) + compressor.flush(zlib.Z_FULL_FLUSH)
        if data.endswith(_EMPTY_BLOCK):
            data = data[:-4]
        return data if len(data) < len(payload) else None


def _window_bits(value: str | None) -> int | None:
    """8 to 15, written without a leading zero (RFC 7692 section 7.1.2), or None."""
    if value is None or not value.isdigit() or value != str(int(value)) or not 8 <= int(value) <= 15:
        return None
    return int(value)


class Inflater:
    """Decompresses one message (or, with context takeover, a connection's
    messages) piece by piece, in bounded steps."""

    __slots__ = ("_zlib",)

    def __init__(self) -> None:
        self._zlib = zlib.decompressobj(-15)  # a 15-bit window reads any smaller one

    @property
    def ended(self) -> bool:
        """The sender closed its deflate stream (a final block, BFINAL): the
        next message starts a new one."""
        return self._zlib.eof

    def feed(self, data: bytes, room: int) -> bytes:
        """Inflate ``data``; raise ``MessageTooBig`` as soon as more than
        ``room`` bytes would come out, ``InvalidPayload`` if it is not deflate
        or goes on after the stream's final block (RFC 7692 section 7.2.2)."""
        zlib_object = self._zlib
        try:
            out = zlib_object.decompress(data, room + 1)
        except zlib.error as exc:
            raise InvalidPayload(f"message does not inflate ({exc})") from None
        if zlib_object.eof and zlib_object.unused_data:
            raise InvalidPayload("data after the final deflate block")
        if len(out) > room:
            raise MessageTooBig("message larger than the limit once inflated")
        return out

    def finish(self, room: int) -> bytes:
        """The end of a message: the empty block its sender took off (none
        is needed after a final block)."""
        return b"" if self._zlib.eof else self.feed(_EMPTY_BLOCK, room)
