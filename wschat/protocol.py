"""The WebSocket connection state machine of RFC 6455, sans I/O.

Feed received bytes to ``receive_data`` and get events back; call the
``send_*`` methods to get the bytes to write.  Replies the protocol makes on its
own (a pong for a ping, the close that answers a close, the close that fails
the connection) wait in ``data_to_send``.  No sockets, no threads, no clocks:
the same class serves the server, the tests and a client (``client=True``).
"""

from __future__ import annotations

import codecs
import enum
import os
from dataclasses import dataclass

from .errors import ConnectionClosed, InvalidPayload, ProtocolError, WebSocketError
from .frames import (
    MAX_CONTROL_PAYLOAD,
    CloseCode,
    FrameParser,
    Opcode,
    encode_close_payload,
    encode_frame,
    parse_close_payload,
)

DEFAULT_MAX_MESSAGE_SIZE = 1 << 20


class State(enum.Enum):
    OPEN = "open"
    CLOSING = "closing"  # we sent a close frame and wait for the peer's
    CLOSED = "closed"  # the closing handshake is over, or the connection failed


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
    """The peer sent a close frame; ``code`` is 1005 when it carried none."""

    code: int
    reason: str


@dataclass(slots=True)
class ConnectionFailed:
    """The peer broke the protocol; a close with ``error.close_code`` was queued."""

    error: WebSocketError


Event = TextMessage | BinaryMessage | Ping | Pong | CloseReceived | ConnectionFailed


class Protocol:
    """One WebSocket connection, after the handshake."""

    __slots__ = (
        "state",
        "client",
        "max_message_size",
        "_parser",
        "_outgoing",
        "_message_opcode",
        "_parts",
        "_message_size",
        "_decoder",
        "close_sent",
        "close_received",
    )

    def __init__(self, *, client: bool = False, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE, rsv: int = 0):
        self.state = State.OPEN
        self.client = client
        self.max_message_size = max_message_size
        self._parser = FrameParser(require_mask=not client, max_payload=max_message_size, allowed_rsv=rsv)
        self._outgoing: list[bytes] = []
        self._message_opcode: int | None = None  # opcode of the fragmented message in progress
        self._parts: list = []
        self._message_size = 0
        self._decoder = None
        self.close_sent: tuple[int, str] | None = None
        self.close_received: tuple[int, str] | None = None

    # -- receiving ---------------------------------------------------------

    def receive_data(self, data: bytes) -> list[Event]:
        """Parse ``data`` and return the events it completes, in order."""
        if self.state is State.CLOSED or self.close_received:
            return []
        parser = self._parser
        parser.feed(data)
        events: list[Event] = []
        try:
            while not self.close_received:
                parser.max_payload = self.max_message_size - self._message_size
                frame = parser.next_frame()
                if frame is None:
                    break
                opcode, payload, fin, _ = frame
                if opcode >= 0x8:
                    event = self._control(opcode, payload)
                else:
                    event = self._data(opcode, payload, fin)
                if event is not None:
                    events.append(event)
        except WebSocketError as error:
            events.append(self._fail(error))
        return events

    def _data(self, opcode: int, payload: bytes, fin: bool) -> TextMessage | BinaryMessage | None:
        if opcode == Opcode.CONTINUATION:
            if self._message_opcode is None:
                raise ProtocolError("continuation frame without a message to continue")
        elif self._message_opcode is not None:
            raise ProtocolError("new data frame inside a fragmented message")
        elif fin:  # the common case: a whole message in one frame
            if opcode == Opcode.TEXT:
                try:
                    return TextMessage(payload.decode("utf-8"))
                except UnicodeDecodeError:
                    raise InvalidPayload("text message is not valid UTF-8") from None
            return BinaryMessage(payload)
        else:
            self._message_opcode = opcode
            if opcode == Opcode.TEXT:
                self._decoder = codecs.getincrementaldecoder("utf-8")()

        if self._decoder is not None:
            try:  # fail as soon as the bytes so far cannot start valid UTF-8
                self._parts.append(self._decoder.decode(payload, fin))
            except UnicodeDecodeError:
                raise InvalidPayload("text message is not valid UTF-8") from None
        else:
            self._parts.append(payload)
        self._message_size += len(payload)
        if not fin:
            return None

        parts, text = self._parts, self._decoder is not None
        self._message_opcode = self._decoder = None
        self._parts = []
        self._message_size = 0
        return TextMessage("".join(parts)) if text else BinaryMessage(b"".join(parts))

    def _control(self, opcode: int, payload: bytes) -> Ping | Pong | CloseReceived:
        if opcode == Opcode.PING:
            if self.state is State.OPEN:
                self._outgoing.append(self._frame(Opcode.PONG, payload))
            return Ping(payload)
        if opcode == Opcode.PONG:
            return Pong(payload)
        code, reason = parse_close_payload(payload)
        self.close_received = (code, reason)
        if self.state is State.OPEN:  # echo the code, as section 5.5.1 asks
            echo = b"" if code == CloseCode.NO_STATUS else payload[:2]
            self._outgoing.append(self._frame(Opcode.CLOSE, echo))
            self.close_sent = (code, "")
        self.state = State.CLOSED
        return CloseReceived(code, reason)

    def _fail(self, error: WebSocketError) -> ConnectionFailed:
        """Fail the WebSocket connection (section 7.1.7): send a close, stop parsing."""
        if self.state is State.OPEN:
            reason = str(error).encode("utf-8")[: MAX_CONTROL_PAYLOAD - 2].decode("utf-8", "ignore")
            self._outgoing.append(self._frame(Opcode.CLOSE, encode_close_payload(error.close_code, reason)))
            self.close_sent = (error.close_code, reason)
        self.state = State.CLOSED
        return ConnectionFailed(error)

    def receive_eof(self) -> None:
        """The transport closed; nothing more is parsed or sent."""
        self.state = State.CLOSED

    def data_to_send(self) -> bytes:
        """The replies the protocol queued on its own (pongs, close frames)."""
        if not self._outgoing:
            return b""
        data = b"".join(self._outgoing)
        self._outgoing.clear()
        return data

    @property
    def buffered(self) -> int:
        """Bytes received and held for an unfinished frame or message."""
        return self._parser.buffered + self._message_size

    # -- sending -----------------------------------------------------------

    def _frame(self, opcode: int, payload: bytes) -> bytes:
        return encode_frame(opcode, payload, mask=os.urandom(4) if self.client else None)

    def _check_open(self) -> None:
        if self.state is not State.OPEN:
            raise ConnectionClosed(f"connection is {self.state.value}")

    def send_text(self, text: str) -> bytes:
        self._check_open()
        return self._frame(Opcode.TEXT, text.encode("utf-8"))

    def send_binary(self, data: bytes) -> bytes:
        self._check_open()
        return self._frame(Opcode.BINARY, bytes(data))

    def send_ping(self, payload: bytes = b"") -> bytes:
        return self._control_frame(Opcode.PING, payload)

    def send_pong(self, payload: bytes = b"") -> bytes:
        return self._control_frame(Opcode.PONG, payload)

    def _control_frame(self, opcode: int, payload: bytes) -> bytes:
        self._check_open()
        if len(payload) > MAX_CONTROL_PAYLOAD:
            raise ValueError(f"{Opcode(opcode).name.lower()} payload longer than 125 bytes")
        return self._frame(opcode, payload)

    def send_close(self, code: int | None = CloseCode.NORMAL, reason: str = "") -> bytes:
        """Start the closing handshake; the peer's close then ends it."""
        self._check_open()
        payload = encode_close_payload(code, reason)
        self.close_sent = (code if code is not None else CloseCode.NO_STATUS, reason)
        self.state = State.CLOSING
        return self._frame(Opcode.CLOSE, payload)
