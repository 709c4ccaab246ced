"""wschat: a synchronous RFC 6455 WebSocket chat server on the standard library."""

from ._version import __version__
from .chat import Chat
from .rooms import ChatLimits
from .errors import (
    ConnectionClosed,
    HandshakeError,
    InvalidPayload,
    MessageTooBig,
    ProtocolError,
    SendTimeout,
    WebSocketError,
)
from .accelerator import IMPLEMENTATION
from .frames import CloseCode, Opcode
from .connection import Connection
from .outbound import PreparedMessage
from .resources import Resource
from .server import Server

__all__ = [
    "__version__",
    "Server",
    "Resource",
    "Connection",
    "PreparedMessage",
    "Chat",
    "ChatLimits",
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
