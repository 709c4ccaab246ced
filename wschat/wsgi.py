"""One port for a WSGI application and its WebSockets: the WSGI server hands
each upgrade's socket over to wschat's loop.

``WebSocketMiddleware(app, server)`` wraps a WSGI application.  A request
asking for a WebSocket at a path one of the server's resources serves never
reaches the application: its socket, with what the WSGI server already read of
it, goes to the wschat loop, which answers the upgrade as if it had read the
request itself (every check, the authorize hook, the 101) and serves the
connection from then on.  The WSGI worker is free again at once: no thread
per WebSocket.

The WSGI server must give the application its socket: werkzeug (Flask's
``app.run``) and gunicorn's sync and gthread workers do
(``werkzeug.socket``, ``gunicorn.socket``).  Others, waitress among them, do
not: there a reverse proxy routes the WebSocket path to wschat's own port.
A TLS socket cannot move either (its session state stays behind): terminate
TLS in a proxy in front of both.

How the socket changes hands: wschat takes a duplicate of its descriptor,
then the WSGI server's descriptor number is pointed at one end of a
socketpair whose other end is closed.  Whatever the WSGI server does next with
"its" socket (write a response, read the next request, shut it down, close it)
meets a dead end: EOF and EPIPE, which WSGI servers take for a client that
left, and never the client's connection.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
from typing import Any, Callable, Iterable
from urllib.parse import quote

from .server import Server

log = logging.getLogger("wschat")

Environ = dict[str, Any]
StartResponse = Callable[..., Any]
WSGIApplication = Callable[[Environ, StartResponse], Iterable[bytes]]
SOCKET_KEYS = ("gunicorn.socket", "werkzeug.socket")


class HandOverError(Exception):
    """This request's socket cannot be handed over; the message says what to do instead."""


class WebSocketMiddleware:
    """Wrap a WSGI application: WebSocket upgrades for ``server``'s resources
    go to ``server``; every other request goes to ``app``."""

    def __init__(self, app: WSGIApplication, server: Server):
        self.app = app
        self.server = server

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        if "websocket" not in environ.get("HTTP_UPGRADE", "").lower() or self.server.route(_path(environ)) is None:
            return self.app(environ, start_response)
        try:
            hand_over(environ, self.server)
        except HandOverError as error:
            log.error("WebSocket hand-over impossible: %s", error)
            body = f"{error}\n".encode("utf-8")
            start_response("501 Not Implemented", [("Content-Type", "text/plain; charset=utf-8"),
                                                   ("Content-Length", str(len(body)))])
            return [body]
        # What the WSGI server writes now goes nowhere; the status is for its access log.
        start_response("101 Switching Protocols", [])
        return []


def hand_over(environ: Environ, server: Server) -> None:
    """Give the socket of the request in ``environ`` to ``server``, with the
    request head rebuilt from ``environ`` and any bytes the WSGI server read
    past it.  Raises ``HandOverError`` when the WSGI server does not allow it."""
    sock = next((environ[key] for key in SOCKET_KEYS if key in environ), None)
    if sock is None:
        raise HandOverError(f"{environ.get('SERVER_SOFTWARE', 'this WSGI server')} does not give the application "
                            "its socket; route WebSocket paths to wschat's own port with a reverse proxy")
    if isinstance(sock, ssl.SSLSocket):
        raise HandOverError("the WSGI server speaks TLS on this connection, and a TLS session cannot change hands; "
                            "terminate TLS in a reverse proxy")
    if not server.running:
        raise HandOverError("the wschat server is not running")
    head = request_head(environ)
    dead_end, other_end = socket.socketpair()
    with dead_end, other_end:
        taken = socket.socket(fileno=os.dup(sock.fileno()))
        os.dup2(dead_end.fileno(), sock.fileno())  # the WSGI server's descriptor now leads nowhere
    try:
        server.adopt(taken, head + _read_ahead(environ))
    except RuntimeError as error:  # stopped meanwhile; the socket is closed
        raise HandOverError(str(error)) from None


def request_head(environ: Environ) -> bytes:
    """The request line and headers, rebuilt from a WSGI environ (latin-1, as PEP 3333 keeps them)."""
    target = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    if not target:
        target = quote(environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", ""), safe="/;=,@:!$&'()*+~")
        if environ.get("QUERY_STRING"):
            target += "?" + environ["QUERY_STRING"]
    lines = [f"{environ['REQUEST_METHOD']} {target} {environ.get('SERVER_PROTOCOL', 'HTTP/1.1')}"]
    for key, value in environ.items():
        if key.startswith("HTTP_"):
            lines.append(f"{key[5:].replace('_', '-').title()}: {value}")
        elif key in ("CONTENT_TYPE", "CONTENT_LENGTH") and value:
            lines.append(f"{key.replace('_', '-').title()}: {value}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _read_ahead(environ: Environ) -> bytes:
    """Bytes the WSGI server read past the request head (frames a client sent
    right behind it), taken from its input buffer once the socket is swapped,
    so that nothing more can come in there."""
    stream = environ.get("wsgi.input")
    unreader = getattr(getattr(stream, "reader", None), "unreader", None)  # gunicorn's
    if unreader is not None:
        return bytes(unreader.buf.getvalue())
    peek = getattr(stream, "peek", None)  # werkzeug's: a buffered reader on the socket
    return bytes(peek()) if peek is not None else b""


def _path(environ: Environ) -> str:
    target = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    if target:
        return str(target).split("?", 1)[0]
    return str(environ.get("SCRIPT_NAME", "")) + str(environ.get("PATH_INFO", ""))
