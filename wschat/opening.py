"""The loop's side of a handshake: asking ``Admission`` what a request gets
and applying the answer to the connection.

An upgrade (once the resource's ``authorize`` hook said yes) queues the 101,
puts the connection in the socket map and submits ``on_open``; anything else
queues one plain response.  Without a worker pool the hook runs on the loop
thread; with one it runs on threads of its own while the connection is not
read, and its verdict comes back to the loop thread, where the world may
have moved on (the handshake deadline, the limits).
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Protocol

from .admission import Admission, Answer
from .connection import Connection
from .deflate import NAME as DEFLATE
from .deflate import Agreement as DeflateAgreement
from .errors import HandshakeError
from .handshake import Request
from .logsafe import quoted
from .metrics import Metrics
from .osthread import named
from .protocol import RequestReceived, RequestRefused

log = logging.getLogger("wschat")
_hook_thread = threading.local()  # .opener on the hook threads
Submit = Callable[..., None]  # the dispatcher's submit(conn, handler, *args)


class LoopSide(Protocol):
    """What opening a connection asks of the loop."""

    @property
    def stopping(self) -> bool: ...

    def open_count(self) -> int: ...

    def connections_from(self, address: str) -> int: ...

    def opened(self, conn: Connection) -> None: ...

    def responded(self, conn: Connection) -> None: ...

    def call_soon(self, callback: Callable[..., object], *args: Any) -> bool: ...

    def resume(self, conn: Connection) -> None: ...


def authorize(conn: Connection, request: Request, hook: Callable[[Request], object],
              metrics: Metrics) -> tuple[object, HandshakeError | None]:
    """Run an authorize hook: ``(user, None)``, or ``(None, the refusal)``;
    a failing hook is logged and refuses with 500."""
    try:
        return hook(request), None
    except HandshakeError as error:
        return None, error
    except Exception:
        metrics.add("handler_errors")
        log.exception("%s: authorize hook %s failed", conn.key, getattr(hook, "__name__", hook))
        return None, HandshakeError(500, "internal server error")


class Opener:
    """Answers each request head (see the module docstring); ``hook_threads``
    > 0 runs authorize hooks on that many threads of their own."""

    def __init__(self, admission: Admission, loop: LoopSide, submit: Submit, metrics: Metrics, hook_threads: int = 0):
        self._admission = admission
        self._loop = loop
        self._submit = submit
        self._metrics = metrics
        self._hooks = (ThreadPoolExecutor(hook_threads, thread_name_prefix="wschat-authorize", initializer=named(self._enter))
                       if hook_threads else None)

    def _enter(self) -> None:
        _hook_thread.opener = self

    def is_hook_thread(self) -> bool:
        return getattr(_hook_thread, "opener", None) is self

    def take(self, conn: Connection, event: RequestReceived | RequestRefused) -> None:
        """A request head arrived (or was refused as it arrived)."""
        if isinstance(event, RequestRefused):
            self._loop.responded(conn)
            self._metrics.count("handshakes", event.error.status)
            _log_refusal(conn, event.error)
            return
        request, loop = event.request, self._loop
        conn.client_address = request.client_address = self._admission.client_address(conn.client_address, request)
        answer = self._admission.decide(request, open_count=loop.open_count(),
                                        ip_count=loop.connections_from(conn.client_address), stopping=loop.stopping)
        if answer.resource is None:
            self._respond(conn, request, answer)
        elif answer.resource.authorize is None:
            self._open(conn, request, answer, None)
        elif self._hooks is None:
            self._settle(conn, request, answer, *authorize(conn, request, answer.resource.authorize, self._metrics))
        else:
            self._authorize_aside(conn, request, answer, self._hooks)

    def refuse_late(self, conn: Connection, error: HandshakeError) -> None:
        """Refuse a request whose hook has not answered in time (on the loop thread)."""
        self._respond(conn, None, Answer.refusing(error))
        self._loop.resume(conn)

    def shutdown(self) -> None:
        if self._hooks is not None:
            self._hooks.shutdown(wait=False, cancel_futures=True)  # a hook still running finds the loop gone

    def _authorize_aside(self, conn: Connection, request: Request, answer: Answer, hooks: ThreadPoolExecutor) -> None:
        """Run the hook on a hook thread; the connection is not read meanwhile."""
        link = conn.link
        with link.lock:
            link.paused = True
        try:
            hooks.submit(self._run_hook, conn, request, answer)
        except RuntimeError:  # shutting down
            self.refuse_late(conn, HandshakeError(503, "server shutting down", (("Retry-After", "5"),)))

    def _run_hook(self, conn: Connection, request: Request, answer: Answer) -> None:
        if not conn.link.protocol.awaiting_answer or answer.resource is None or answer.resource.authorize is None:
            return  # answered by the handshake deadline while it waited for a thread
        user, refusal = authorize(conn, request, answer.resource.authorize, self._metrics)
        self._loop.call_soon(self._settle_late, conn, request, answer, user, refusal)

    def _settle_late(self, conn: Connection, request: Request, answer: Answer, user: object,
                     refusal: HandshakeError | None) -> None:
        """The hook's verdict, back on the loop thread."""
        link = conn.link
        if link.sock is None or not link.protocol.awaiting_answer:
            return  # gone, or answered by the handshake deadline
        loop = self._loop
        if refusal is None:
            try:
                self._admission.admit(loop.open_count(), loop.connections_from(conn.client_address), loop.stopping)
            except HandshakeError as error:
                refusal = error
        self._settle(conn, request, answer, user, refusal)
        loop.resume(conn)

    def _settle(self, conn: Connection, request: Request, answer: Answer, user: object,
                refusal: HandshakeError | None) -> None:
        if refusal is None:
            self._open(conn, request, answer, user)
        else:
            self._respond(conn, request, Answer.refusing(refusal))

    def _respond(self, conn: Connection, request: Request | None, answer: Answer) -> None:
        """Answer with a plain HTTP response: a refusal, a route or a file."""
        self._loop.responded(conn)
        self._metrics.count("handshakes", answer.status)
        link = conn.link
        with link.lock:
            link.protocol.respond(answer.response)
        if answer.refusal is not None:
            _log_refusal(conn, answer.refusal, request)
        elif request is not None:
            log.debug("%s: %s %s %d", conn.key, request.method, quoted(request.target), answer.status)

    def _open(self, conn: Connection, request: Request, answer: Answer, user: object) -> None:
        """Upgrade: the 101, into the socket map, ``on_open``."""
        resource, accepted = answer.resource, answer.accepted
        assert resource is not None and accepted is not None  # an upgrade's answer has both
        self._metrics.count("handshakes", 101)
        conn.resource, conn.subprotocol, conn.user = resource, accepted.subprotocol, user
        link = conn.link
        link.head = request.raw
        deflate = accepted.agreement(DEFLATE)
        with link.lock:
            link.protocol.accept(answer.response, rsv=accepted.rsv,
                                 deflate=deflate if isinstance(deflate, DeflateAgreement) else None)
        self._loop.opened(conn)
        if log.isEnabledFor(logging.DEBUG):  # one line per connection: no formatting when it is off
            log.debug("%s: open %s from %s%s", conn.key, quoted(request.path), conn.client_address,
                      f" ({conn.subprotocol})" if conn.subprotocol else "")
        if resource.on_open is not None:
            self._submit(conn, resource.on_open, conn)


def _log_refusal(conn: Connection, error: HandshakeError, request: Request | None = None) -> None:
    target = f" {request.method} {quoted(request.target)}" if request is not None else ""
    log.info("%s: refused %s%s: %d %s", conn.key, conn.client_address, target, error.status, quoted(error.reason))
