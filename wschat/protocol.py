"""A connection's whole life as one state machine, sans I/O.

Received bytes go in (``receive_data``, ``receive_eof``); events come out one
at a time, in order (``next_event``); every byte to write goes to ``outbox``.
No sockets, threads or clocks: the same class serves the server, the tests
and a client (``client=True``, which starts OPEN and masks its frames)::

    CONNECTING --accept()--> OPEN --close()--> CLOSING --acknowledge_close()--> CLOSED
        |                      \\-- acknowledge_close() / fail() ------------------^
        \\-- respond() or a malformed request head: one plain HTTP response ------^

It alone decides what may still be written: once a close frame or a plain
response is in the outbox nothing else goes in, and once CLOSED the
transport closes as soon as the outbox is written.

Events are pulled one at a time so that the I/O layer can hand each to its
handler before the next is parsed.  A peer's close frame or a protocol error
is returned as an event and stops the parsing, but the closing frame is only
queued when the I/O layer calls ``acknowledge_close`` or ``fail`` after the
handlers of every earlier message ran: a message that arrived before an error
still gets its answer.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass

from .errors import ConnectionClosed, HandshakeError, InvalidPayload, MessageTooBig, ProtocolError, WebSocketError
from .frames import (
    MAX_CONTROL_PAYLOAD,
    CloseCode,
    Frame,
    FrameParser,
    Opcode,
    encode_close_payload,
    encode_frame,
    parse_close_payload,
)
from .deflate import INFLATER_COST, Agreement, Inflater
from .handshake import DEFAULT_MAX_HEADER_SIZE, Request, build_error_response, find_head_end, parse_request
from .outbound import Outbox, Parts
from .reassembly import Reassembly

DEFAULT_MAX_MESSAGE_SIZE = 1 << 20


class State(enum.IntEnum):
    CONNECTING = 0  # reading the request head, then waiting for the server's answer
    OPEN = 1  # frames flow both ways
    CLOSING = 2  # we sent a close frame and wait for the peer's
    CLOSED = 3  # nothing more is written: the transport closes once the outbox is empty


CONNECTING, OPEN, CLOSING, CLOSED = State


@dataclass(slots=True)
class RequestReceived:
    """A request head arrived; answer it with ``accept`` or ``respond``."""

    request: Request


@dataclass(slots=True)
class RequestRefused:
    """The request head was malformed or too large; its 4xx is already queued."""

    error: HandshakeError


@dataclass(slots=True)
class TextMessage:
    data: str


@dataclass(slots=True)
class BinaryMessage:
    data: bytes


@dataclass(slots=True)
class Ping:
    payload: bytes


@dataclass(slots=True)
class Pong:
    payload: bytes


@dataclass(slots=True)
class CloseReceived:
    """The peer sent a close frame (``code`` 1005 when it carried none); answer with ``acknowledge_close``."""

    code: int
    reason: str


@dataclass(slots=True)
class ConnectionFailed:
    """The peer broke the protocol; close with ``fail(error)``."""

    error: WebSocketError


Event = (RequestReceived | RequestRefused | TextMessage | BinaryMessage | Ping | Pong | CloseReceived
         | ConnectionFailed)


class ServerProtocol:
    """One connection, from its first byte to its last (see the module docstring)."""

    __slots__ = (
        "state", "outbox", "request", "close_sent", "close_received", "max_message_size", "max_header_size",
        "client", "deflate", "_reading", "_head", "_searched", "_parser", "_message", "_inflater",
    )

    def __init__(self, *, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
                 max_header_size: int = DEFAULT_MAX_HEADER_SIZE, client: bool = False):
        self.outbox = Outbox()
        self.request: Request | None = None  # the request waiting for an answer
        self.close_sent: tuple[int, str] | None = None
        self.close_received: tuple[int, str] | None = None
        self.max_message_size = max_message_size
        self.max_header_size = max_header_size
        self.client = client
        self.deflate: Agreement | None = None  # the permessage-deflate agreement, once accepted
        self._inflater: Inflater | None = None  # while a compressed message arrives (or for good, with context takeover)
        self._reading = True  # false once input can only be discarded
        self._head: bytearray | None = None
        self._searched = 0
        self._parser: FrameParser | None = None
        self._message: Reassembly | None = None  # a message arriving in pieces
        if client:
            self.state = OPEN
            self._parser = FrameParser(require_mask=False, max_payload=max_message_size, partial=True)
        else:
            self.state = CONNECTING
            self._head = bytearray()

    # -- receiving ---------------------------------------------------------------------------

    def receive_data(self, data: bytes | memoryview) -> None:
        """Take received bytes; ``next_event`` then returns what they complete.
        ``data`` may be a view of a buffer the caller reuses for every read:
        the caller then calls ``detach`` before it reads into it again."""
        if not self._reading:
            return  # after a close frame, an error or a plain response: discarded
        if self._parser is not None:
            self._parser.feed(data)
        elif self._head is not None:
            self._head += data

    def detach(self) -> None:
        """Copy what is received and not yet parsed out of the caller's buffer."""
        if self._parser is not None:
            self._parser.detach()

    def receive_eof(self) -> None:
        """The transport is gone: nothing more is read or written."""
        self._reading = False
        self.state = CLOSED
        self.outbox.clear()
        self._head = self._message = self._inflater = None

    def next_event(self) -> Event | None:
        """The next event the received bytes complete, or None until more arrive."""
        if not self._reading:
            return None
        if self._parser is None:
            return self._next_request() if self.request is None else None
        parser = self._parser
        try:
            while True:
                if self.deflate is None:  # the frame's declared length is checked before its payload comes
                    parser.max_payload = self.max_message_size - (self._message.size if self._message else 0)
                frame = parser.next_frame()
                if frame is None:
                    return None
                event = self._control(frame) if frame[0] >= 0x8 else self._data(frame)
                if event is not None:
                    return event
        except WebSocketError as error:
            self._reading = False
            return ConnectionFailed(error)

    def data_to_send(self) -> bytes:
        """Everything queued, taken out of the outbox at once (for a client,
        a test or a fuzzer; the server writes the outbox itself)."""
        outbox = self.outbox
        data = b"".join(outbox.buffers[outbox.start :])
        outbox.clear()
        return data

    @property
    def awaiting_answer(self) -> bool:
        """A request arrived and neither ``accept`` nor ``respond`` was called yet."""
        return self.state is CONNECTING and self.request is not None

    @property
    def buffered(self) -> int:
        """What received bytes hold: an unfinished request head, frame or
        message (inflated), and an inflater's state."""
        if self._parser is None:
            return len(self._head) if self._head else 0
        held = self._parser.buffered
        if self._message is not None:
            held += self._message.size
        if self._inflater is not None:
            held += INFLATER_COST
        return held

    @property
    def receiving(self) -> bool:
        """A message (or a frame) has begun to arrive and has not ended."""
        return self._reading and (self._message is not None or (self._parser is not None and self._parser.buffered > 0))

    @property
    def reading(self) -> bool:
        """Whether received bytes are still parsed (not after a close frame, an error or ``abandon``)."""
        return self._reading

    def abandon(self) -> None:
        """Read no more, and let go of what an unfinished message holds: the
        connection is to be failed (queue its close with ``fail``)."""
        self._reading = False
        self._message = self._inflater = None
        if self._parser is not None:
            self._parser.clear()

    def _next_request(self) -> RequestReceived | RequestRefused | None:
        head = self._head
        assert head is not None  # reading, and no parser yet
        try:
            end = find_head_end(head, self.max_header_size, self._searched)
            if end is None:
                self._searched = len(head)
                return None
            request = parse_request(bytes(head[:end]))
        except HandshakeError as error:
            self.respond(build_error_response(error))
            return RequestRefused(error)
        del head[:end]  # what follows the head: frames sent right behind it
        self.request = request
        return RequestReceived(request)

    def _data(self, frame: Frame) -> TextMessage | BinaryMessage | None:
        opcode, payload, fin, rsv, more = frame
        message = self._message
        if message is not None and message.in_frame:
            pass  # the next piece of a frame whose start was checked
        elif opcode == Opcode.CONTINUATION:
            if message is None:
                raise ProtocolError("continuation frame without a message to continue")
            if rsv:
                raise ProtocolError("RSV1 set on a continuation frame")
        elif message is not None:
            raise ProtocolError("new data frame inside a fragmented message")
        elif fin and not more:  # the common case: a whole message in one piece
            if rsv:
                payload = self._inflate_whole(payload)
            elif len(payload) > self.max_message_size:  # with deflate the parser bounds the wire size only
                raise MessageTooBig(f"message larger than {self.max_message_size} bytes")
            if opcode == Opcode.TEXT:
                try:
                    return TextMessage(payload.decode("utf-8"))
                except UnicodeDecodeError:
                    raise InvalidPayload("text message is not valid UTF-8") from None
            return BinaryMessage(payload)
        else:
            inflater = self._inflater_for_message() if rsv else None
            message = self._message = Reassembly(opcode, self.max_message_size, inflater)
        message.in_frame = more
        data = message.add(payload, fin and not more)
        if data is None:
            return None
        self._message = None
        if message.compressed:
            self._end_inflation()
        return TextMessage(data) if isinstance(data, str) else BinaryMessage(data)

    def _inflater_for_message(self) -> Inflater:
        if self._inflater is None:
            if self.deflate is None:
                raise ProtocolError("RSV1 set without permessage-deflate")  # the parser refuses it first
            self._inflater = self.deflate.inflater()
        return self._inflater

    def _end_inflation(self) -> None:
        """After a message: no inflater is kept unless the client keeps its
        context and its stream goes on (a final block ends it)."""
        inflater, deflate = self._inflater, self.deflate
        if deflate is None or inflater is None or deflate.client_no_context_takeover or inflater.ended:
            self._inflater = None

    def _inflate_whole(self, payload: bytes) -> bytes:
        inflater = self._inflater_for_message()
        data = inflater.feed(payload, self.max_message_size)
        data += inflater.finish(self.max_message_size - len(data))
        self._end_inflation()
        return data

    def _control(self, frame: Frame) -> Ping | Pong | CloseReceived:
        opcode, payload = frame[0], frame[1]
        if frame[3]:
            raise ProtocolError("RSV bits set on a control frame")
        if opcode == Opcode.PING:
            if self.state is OPEN:
                self.outbox.put_pong(self._frame(Opcode.PONG, payload))
            return Ping(payload)
        if opcode == Opcode.PONG:
            return Pong(payload)
        code, reason = parse_close_payload(payload)
        self.close_received = (code, reason)
        self._reading = False
        return CloseReceived(code, reason)

    # -- answering the request ----------------------------------------------------------------

    def accept(self, response: bytes, *, rsv: int = 0, deflate: Agreement | None = None) -> None:
        """Upgrade: queue the ``101`` response; frames flow from here on.
        ``rsv`` is the RSV bits the negotiated extensions allow; ``deflate``
        the permessage-deflate agreement, if one was reached."""
        if not self.awaiting_answer:
            raise ConnectionClosed("no request waits for an answer")
        self.outbox.append(response)
        self.state = OPEN
        self.deflate = deflate
        self.request = None  # what a connection keeps of it is the raw head: the parsed headers are large
        # With deflate, a frame's wire length says little of the message's size (the inflater
        # bounds that): the parser only refuses lengths no honest compressed frame has.
        wire_limit = self.max_message_size + (self.max_message_size >> 6) + 1024 if deflate else self.max_message_size
        self._parser = FrameParser(require_mask=True, max_payload=wire_limit, allowed_rsv=rsv, partial=True)
        early, self._head = self._head, None
        if early:
            self._parser.feed(bytes(early))

    def respond(self, response: bytes) -> None:
        """Answer with one plain HTTP response; the connection then ends."""
        if self.state is not CONNECTING:
            raise ConnectionClosed("the connection was answered already")
        self.outbox.append(response)
        self.state = CLOSED
        self._reading = False
        self._head = self.request = None

    # -- sending ---------------------------------------------------------------------------

    def send_frame(self, parts: Parts, size: int) -> None:
        """Queue an encoded data frame (see ``PreparedMessage``)."""
        if self.state is not OPEN:
            raise ConnectionClosed(f"connection is {self.state.name.lower()}")
        self.outbox.extend(parts, size)

    def send_text(self, text: str) -> None:
        self._send(Opcode.TEXT, text.encode("utf-8"))

    def send_binary(self, data: bytes) -> None:
        self._send(Opcode.BINARY, bytes(data))

    def ping(self, payload: bytes = b"") -> None:
        self._send(Opcode.PING, payload)

    def pong(self, payload: bytes = b"") -> None:
        self._send(Opcode.PONG, payload)

    def _send(self, opcode: int, payload: bytes) -> None:
        if self.state is not OPEN:
            raise ConnectionClosed(f"connection is {self.state.name.lower()}")
        if opcode >= 0x8 and len(payload) > MAX_CONTROL_PAYLOAD:
            raise ValueError(f"{Opcode(opcode).name.lower()} payload longer than 125 bytes")
        self.outbox.append(self._frame(opcode, payload))

    def _frame(self, opcode: int, payload: bytes) -> bytes:
        return encode_frame(opcode, payload, mask=os.urandom(4) if self.client else None)

    # -- closing ---------------------------------------------------------------------------

    def close(self, code: int = CloseCode.NORMAL, reason: str = "", *, discard: bool = False) -> None:
        """Start the closing handshake.  ``discard`` drops what is queued and
        not yet begun (for a client too slow to read it)."""
        if self.state is not OPEN:
            raise ConnectionClosed(f"connection is {self.state.name.lower()}")
        payload = encode_close_payload(code, reason)
        if discard:
            self.outbox.discard_unstarted()
        self.outbox.append(self._frame(Opcode.CLOSE, payload))
        self.close_sent = (CloseCode.NO_STATUS if code is None else code, reason)
        self.state = CLOSING

    def acknowledge_close(self) -> None:
        """Answer the peer's close frame (section 5.5.1): echo its code,
        unless our own close went first; the closing handshake is then over."""
        if self.state is OPEN and self.close_received is not None:
            code = self.close_received[0]
            self.outbox.append(self._frame(Opcode.CLOSE, b"" if code == CloseCode.NO_STATUS else code.to_bytes(2, "big")))
            self.close_sent = (code, "")
        if self.state is not CONNECTING:
            self.state = CLOSED

    def fail(self, error: WebSocketError) -> None:
        """Fail the connection (section 7.1.7): a close with the error's code, then nothing more."""
        self.abandon()
        if self.state is OPEN:
            reason = str(error).encode("utf-8")[: MAX_CONTROL_PAYLOAD - 2].decode("utf-8", "ignore")
            self.outbox.append(self._frame(Opcode.CLOSE, encode_close_payload(error.close_code, reason)))
            self.close_sent = (error.close_code, reason)
        self.state = CLOSED

    @property
    def close_code(self) -> int:
        """The first close code received; else the one we sent; else 1006."""
        if self.close_received:
            return self.close_received[0]
        return self.close_sent[0] if self.close_sent else CloseCode.ABNORMAL

    @property
    def close_reason(self) -> str:
        if self.close_received:
            return self.close_received[1]
        return self.close_sent[1] if self.close_sent else ""
