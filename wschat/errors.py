"""The exceptions of wschat: one class per kind of failure.

Each error that ends a WebSocket connection carries the close code that
RFC 6455 section 7.4.1 assigns to it, so the layer that catches it knows what
to put on the wire without a lookup table.
"""

from __future__ import annotations


class WebSocketError(Exception):
    """Base class of every wschat error."""

    close_code = 1011  # internal error, unless a subclass knows better


class ProtocolError(WebSocketError):
    """The peer broke an RFC 6455 framing or sequencing rule (close 1002)."""

    close_code = 1002


class InvalidPayload(WebSocketError):
    """A text message or a close reason is not valid UTF-8 (close 1007)."""

    close_code = 1007


class MessageTooBig(WebSocketError):
    """A message exceeds the configured size limit (close 1009)."""

    close_code = 1009


class PolicyViolation(WebSocketError):
    """The peer broke one of the server's rules, such as finishing a message in time (close 1008)."""

    close_code = 1008


class TryAgainLater(WebSocketError):
    """The server holds more than its memory budget; this connection holds the most (close 1013)."""

    close_code = 1013


class ConnectionClosed(WebSocketError):
    """Sending on a connection that is closing or closed."""


class SendTimeout(WebSocketError):
    """A send waited too long for a slow client's outbound queue to drain."""


class HandshakeError(WebSocketError):
    """The HTTP upgrade request cannot be accepted.

    ``status`` is the HTTP status to answer with, ``reason`` a one-line
    explanation sent as the body, and ``headers`` extra response headers
    (``Sec-WebSocket-Version`` on a 426, for example).
    """

    def __init__(self, status: int, reason: str, headers: tuple[tuple[str, str], ...] = ()):
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason
        self.headers = headers
