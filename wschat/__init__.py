"""wschat: a synchronous RFC 6455 WebSocket chat server on the standard library."""

from ._version import __version__
from .errors import (
    ConnectionClosed,
    HandshakeError,
    InvalidPayload,
    MessageTooBig,
    ProtocolError,
    SendTimeout,
    WebSocketError,
)
from .frames import IMPLEMENTATION, CloseCode, Opcode

__all__ = [
    "__version__",
    "IMPLEMENTATION",
    "CloseCode",
    "Opcode",
    "ConnectionClosed",
    "HandshakeError",
    "InvalidPayload",
    "MessageTooBig",
    "ProtocolError",
    "SendTimeout",
    "WebSocketError",
]
