"""A WebSocket endpoint: where it is, and what handles its connections."""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

from . import checks
from .handshake import Request


class Resource:
    """A WebSocket endpoint: a path and the handlers of its connections.

    Handlers (each optional) mirror restbed's: ``on_open(conn)``,
    ``on_message(conn, message)`` with ``str`` or ``bytes``,
    ``on_close(conn, code, reason)`` and ``on_error(conn, exception)``.
    The path also matches its sub-paths: ``/chat`` serves ``/chat/lobby``.

    ``authorize(request)`` (optional) decides before the upgrade, once the
    request passed every other check: it returns who the client is (any
    object, kept as ``Connection.user``; None for anonymous), or raises
    ``HandshakeError(status, reason, headers)`` to refuse with that status,
    headers and ``reason`` as the body.  Any other exception is a 500.  With
    ``Server(workers=...)`` it runs on threads of its own (it may look up a
    session in a database); otherwise on the loop thread, so it must be quick.

    ``dialects`` maps a subprotocol to how its clients are told a text
    message that ``Server.broadcast`` sends to everyone (the chat's
    ``wschat.v1`` clients expect a JSON event, not bare text).

    ``on_message_inline(conn, message)`` (optional) is tried first with
    ``Server(workers=...)``, on the loop thread, for a message of a connection
    that has no handler call waiting or running (so each connection's order
    holds): it must not block, and returns True when it handled the message,
    False to hand it to ``on_message`` on a worker as usual.  A message that
    only needs queueing is then handled without passing between threads.

    ``on_drain(timeout)`` (optional) is called when the server stops, once
    every message it read has been handled and before any client is closed
    (clients are not read meanwhile): the moment to make sure what the
    handlers accepted is not lost (the chat waits for its engine to confirm
    what it published).  It runs on the loop thread and must return within
    ``timeout`` seconds.
    """

    def __init__(
        self,
        path: str,
        *,
        on_open: Callable[..., object] | None = None,
        on_message: Callable[..., object] | None = None,
        on_message_inline: Callable[..., bool] | None = None,
        on_close: Callable[..., object] | None = None,
        on_error: Callable[..., object] | None = None,
        subprotocols: Sequence[str] = (),
        authorize: Callable[[Request], object] | None = None,
        dialects: Mapping[str, Callable[[str], str]] | None = None,
        on_drain: Callable[[float], None] | None = None,
    ):
        self.path = checks.url_path("path", path).rstrip("/") or "/"
        handlers = {"on_open": on_open, "on_message": on_message, "on_message_inline": on_message_inline,
                    "on_close": on_close, "on_error": on_error, "authorize": authorize, "on_drain": on_drain}
        for name, handler in handlers.items():
            checks.function(name, handler)
        protocols = checks.strings("subprotocols", subprotocols, "['wschat.v1']", tokens=True)
        self.authorize = authorize
        self.on_open = on_open
        self.on_message = on_message
        self.on_message_inline = on_message_inline
        self.on_close = on_close
        self.on_error = on_error
        self.subprotocols = protocols
        self.dialects = dict(dialects or {})
        self.on_drain = on_drain

    def matches(self, path: str) -> bool:
        return path == self.path or path.startswith(self.path if self.path.endswith("/") else self.path + "/")
