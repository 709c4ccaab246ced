"""What waits to be written to one connection, sans I/O.

``Outbox`` is a queue of byte buffers that the I/O layer writes with one
``sendmsg`` (or encrypts, under TLS) and then ``consume``\\s.
``PreparedMessage`` is a message framed once for many recipients: a
broadcast appends the same buffers to every outbox.

Neither knows about sockets or threads: the connection's lock guards an
outbox, and the protocol decides what may be appended to it.
"""

from __future__ import annotations

from typing import Protocol

from .frames import Opcode, frame_header, frame_texts

Buffer = bytes | memoryview
Parts = tuple[Buffer, ...]  # one frame or more: bytes, or a header and a view of a large payload
Framed = tuple[Parts, int]  # the buffers and their size


class Compression(Protocol):
    """What a permessage-deflate agreement offers a message (see ``deflate.Agreement``)."""

    @property
    def rsv(self) -> int: ...

    def compress(self, payload: bytes) -> bytes | None: ...


LARGE_PAYLOAD = 16384  # from here on a payload is a buffer of its own, never copied into the frame
# What one queued buffer costs beyond its bytes: the object's header (33 bytes), the allocator's
# rounding and the queue's slot (measured with tracemalloc: 41 bytes, before rounding).
BUFFER_OVERHEAD = 48
# A buffer holds a byte at least, so a queue costs at most this many times its size: below
# limit / COST_PER_BYTE_AT_MOST bytes a queue is under the mark without counting its buffers.
COST_PER_BYTE_AT_MOST = BUFFER_OVERHEAD + 1
_PONG = 0x8A  # the first byte of a pong frame (FIN, opcode 0xA)


class PreparedMessage:
    """A text (``str``) or binary (``bytes``) message framed once.

    Server frames are not masked, so the same buffers serve every recipient:
    one buffer for a small message, header and payload apart for a large one
    (whose payload is then never copied).  For connections that agreed on
    permessage-deflate, ``frame_for`` compresses it once per agreement (the
    server never keeps a compression context, so the same bytes suit all).
    """

    __slots__ = ("parts", "size", "opcode", "payload", "_variants")
    count = 1  # messages in it (see PreparedBatch)

    def __init__(self, message: str | bytes | bytearray | memoryview, opcode: int | None = None):
        if isinstance(message, str):
            payload, default = message.encode("utf-8"), Opcode.TEXT
        elif isinstance(message, (bytes, bytearray, memoryview)):
            payload, default = bytes(message), Opcode.BINARY
        else:  # (bytes(123) would be 123 zero bytes, sent as if meant)
            raise TypeError(f"a message is str (text) or bytes (binary), not {type(message).__name__}")
        self.opcode = default if opcode is None else opcode
        self.payload = payload
        self.parts, self.size = _frame(self.opcode, payload, 0)
        self._variants: dict[Compression, Framed] | None = None  # agreement -> (parts, size)

    def frame_for(self, agreement: Compression | None) -> Framed:
        """The frame for a connection with this permessage-deflate ``agreement`` (or None)."""
        if agreement is None or self.opcode >= 0x8:
            return self.parts, self.size
        variants = self._variants
        if variants is None:
            variants = self._variants = {}
        variant = variants.get(agreement)
        if variant is None:
            variant = variants[agreement] = self._compressed(agreement)
        return variant

    def _compressed(self, agreement: Compression) -> Framed:
        """The frame under ``agreement``, made once (``frame_for`` keeps it)."""
        compressed = agreement.compress(self.payload)
        return (self.parts, self.size) if compressed is None else _frame(self.opcode, compressed, agreement.rsv)

    def __repr__(self) -> str:
        return f"<PreparedMessage {Opcode(self.opcode).name} {self.size} bytes>"


class PreparedBatch(PreparedMessage):
    """Several text messages (their payloads, UTF-8) queued as one, in
    order: their small frames joined in one buffer, so that a batch costs
    each recipient one append (the Redis engine delivers a room's messages a
    batch at a time).  Framed here in one pass; each message is prepared on
    its own only for a permessage-deflate agreement, once."""

    __slots__ = ("payloads", "count")

    def __init__(self, payloads: list[bytes]):
        self.payloads = payloads
        self.count = len(payloads)
        self.opcode = Opcode.TEXT
        joined = frame_texts(payloads, LARGE_PAYLOAD)
        if joined is not None:  # the common case: no payload is a buffer of its own
            self.parts, self.size = (joined,), len(joined)
        else:
            self.parts, self.size = _joined([_frame(Opcode.TEXT, payload, 0)[0] for payload in payloads])
        self._variants = None

    def _compressed(self, agreement: Compression) -> Framed:
        return _joined([PreparedMessage(payload, Opcode.TEXT).frame_for(agreement)[0] for payload in self.payloads])

    def __repr__(self) -> str:
        return f"<PreparedBatch of {self.count}, {self.size} bytes>"


def _joined(frames: list[Parts]) -> Framed:
    """Frames' buffers, each run of whole small frames joined in one ``bytes``."""
    parts: list[Buffer] = []
    run: list[Buffer] = []
    for frame in frames:
        if len(frame) == 1:
            run.append(frame[0])
            continue
        if run:
            parts.append(b"".join(run))
            run = []
        parts += frame
    if run:
        parts.append(b"".join(run))
    return tuple(parts), sum(map(len, parts))


def _frame(opcode: int, payload: bytes, rsv: int) -> Framed:
    header = frame_header(opcode, len(payload), rsv=rsv)
    # A large payload goes as a buffer of its own, a view: in an outbox a view
    # never starts a frame (see Outbox.discard_unstarted).
    parts = (header + payload,) if len(payload) < LARGE_PAYLOAD else (header, memoryview(payload))
    return parts, len(header) + len(payload)


class Outbox:
    """Buffers to write, in order, and their total size.

    A list with a read index rather than a deque: an idle connection's empty
    list costs 56 bytes where a deque costs 760, and consuming from the front
    does not shift the rest.

    A frame is one ``bytes`` buffer, or a ``bytes`` header followed by
    ``memoryview`` payload buffers; a buffer partly written becomes a
    ``memoryview`` of its rest.  So a ``memoryview`` at the front means a
    frame is under way, and a ``bytes`` buffer is always a frame's start.
    """

    __slots__ = ("buffers", "start", "size", "_pong")

    def __init__(self) -> None:
        self.buffers: list[Buffer] = []
        self.start = 0  # buffers before this index are written
        self.size = 0  # bytes to write
        self._pong = -1  # where the last pong was queued

    def __len__(self) -> int:
        return self.size

    @property
    def cost(self) -> int:
        """What the queue holds in memory: its bytes, and BUFFER_OVERHEAD per buffer."""
        return self.size + BUFFER_OVERHEAD * (len(self.buffers) - self.start)

    def append(self, data: Buffer) -> None:
        self.buffers.append(data)
        self.size += len(data)

    def put_pong(self, frame: bytes) -> None:
        """Queue a pong, in place of a pong queued and not yet begun: RFC 6455
        section 5.5.3 lets an endpoint answer only the most recent ping, so a
        ping flood holds one pong, not one per ping.  (A ``bytes`` buffer
        starting with the pong byte is a whole pong frame: see the class docstring.)"""
        buffers, index = self.buffers, self._pong
        if self.start <= index < len(buffers):
            queued = buffers[index]
            if type(queued) is bytes and queued[0] == _PONG:
                buffers[index] = frame
                self.size += len(frame) - len(queued)
                return
        self._pong = len(buffers)
        self.append(frame)

    def extend(self, parts: Parts, size: int) -> None:
        self.buffers += parts
        self.size += size

    def pending(self, most: int) -> list[Buffer]:
        """Up to ``most`` buffers from the front, for one ``sendmsg``."""
        if not self.start and len(self.buffers) <= most:
            return self.buffers
        return self.buffers[self.start : self.start + most]

    def consume(self, sent: int) -> None:
        """Drop ``sent`` written bytes from the front."""
        self.size -= sent
        if not self.size:  # the common case: the kernel took it all
            self.clear()
            return
        buffers = self.buffers
        index = self.start
        while sent:
            head = buffers[index]
            if len(head) > sent:
                buffers[index] = memoryview(head)[sent:]
                break
            sent -= len(head)
            buffers[index] = b""  # let go of it now
            index += 1
        if index > 64 and index * 2 > len(buffers):  # compact now and then: amortised O(1)
            del buffers[:index]
            index = 0
        self.start = index

    def clear(self) -> None:
        self.buffers.clear()
        self.start = 0
        self.size = 0

    def discard_unstarted(self) -> None:
        """Drop every frame not yet begun.  The frame under way, if any, is
        kept whole (its views at the front), so that the peer never receives
        half a frame."""
        buffers = self.buffers
        end = self.start
        while end < len(buffers) and type(buffers[end]) is memoryview:
            end += 1
        kept = buffers[self.start : end]
        self.clear()
        for buffer in kept:
            self.append(buffer)
