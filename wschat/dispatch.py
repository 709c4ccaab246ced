"""Running handlers: on the loop thread, or on a pool that keeps each connection's order.

Every call that a connection's events cause (``on_open``, ``on_message``,
``on_error``, ``on_close``, and the closing steps after them) goes through
``submit`` in event order, so a message received before a close or an error
is handled before the closing frame is queued.

With a pool, a connection whose handler calls pile up past ``max_pending``
is paused: the loop stops reading it until its backlog is down to half.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Callable

from .deflate import NAME as DEFLATE
from .errors import ConnectionClosed, HandshakeError, WebSocketError
from .frames import CloseCode
from .handshake import Answer, Request
from .logsafe import quoted
from .protocol import (
    CLOSING,
    BinaryMessage,
    CloseReceived,
    ConnectionFailed,
    Pong,
    RequestReceived,
    RequestRefused,
    TextMessage,
)

if TYPE_CHECKING:
    from .connection import Connection
    from .loop import Loop

log = logging.getLogger("wschat")
_worker = threading.local()
CALL_OVERHEAD = 160  # a waiting call's tuple, its queue slot, the event it came from  # .dispatcher on the pool's own threads


def run_handler(conn: Connection, handler: Callable, args: tuple) -> None:
    """Call one handler; a failure is logged, given to ``on_error``, and
    closes the connection with 1011."""
    try:
        handler(*args)
    except ConnectionClosed:
        log.debug("%s: a handler sent on a closed connection", conn.key)
    except Exception as exc:
        conn._loop.server.metrics.add("handler_errors")
        log.exception("%s: handler %s failed", conn.key, getattr(handler, "__name__", handler))
        on_error = conn.resource.on_error if conn.resource is not None else None
        if on_error is not None and handler is not on_error:
            try:
                on_error(conn, exc)
            except Exception:
                log.exception("%s: error handler failed", conn.key)
        conn.close(CloseCode.INTERNAL_ERROR, "internal server error")


def call_cost(args: tuple) -> int:
    """What a handler call waiting for a worker holds: its message, and the call itself."""
    return CALL_OVERHEAD + sum(sys.getsizeof(arg) for arg in args if isinstance(arg, (str, bytes)))


def authorize(conn: Connection, request: Request, hook: Callable) -> tuple[object, HandshakeError | None]:
    """Run an authorize hook: ``(user, None)``, or ``(None, the refusal)``;
    a failing hook is logged and refuses with 500."""
    try:
        return hook(request), None
    except HandshakeError as error:
        return None, error
    except Exception:
        conn._loop.server.metrics.add("handler_errors")
        log.exception("%s: authorize hook %s failed", conn.key, getattr(hook, "__name__", hook))
        return None, HandshakeError(500, "internal server error")


def _log_refusal(conn: Connection, error: HandshakeError, request: Request | None = None) -> None:
    target = f" {request.method} {quoted(request.target)}" if request is not None else ""
    log.info("%s: refused %s%s: %d %s", conn.key, conn.client_address, target, error.status, quoted(error.reason))


class InlineDispatcher:
    """Handlers run at once, on the loop thread: they must not block."""

    def __init__(self, loop: Loop):
        self._loop = loop

    def process(self, conn: Connection) -> None:
        """Hand the connection's events to their handlers, in order, until
        the received bytes run out or its backlog of handler calls pauses it."""
        loop = self._loop
        metrics = loop.server.metrics
        protocol = conn._protocol
        submit = self.submit
        while not conn._paused:
            with conn._lock:
                event = protocol.next_event()
            if event is None:
                break
            kind = type(event)
            if kind is TextMessage or kind is BinaryMessage:
                metrics.messages_received += 1
                if protocol.state is CLOSING:
                    continue  # sent before the peer saw our close: not handled (RFC 6455 1.4), and it can tell
                if conn.resource.on_message is not None:
                    submit(conn, conn.resource.on_message, conn, event.data)
            elif kind is CloseReceived:
                submit(conn, conn._acknowledge_close)
            elif kind is ConnectionFailed:
                self.fail(conn, event.error)
            elif kind is Pong:
                conn._on_pong(event.payload)
            elif kind is RequestReceived:
                self._answer(conn, event.request)
            elif kind is RequestRefused:
                loop.answered(conn)
                metrics.count("handshakes", event.error.status)
                _log_refusal(conn, event.error)
        if conn._paused:
            loop.watch(conn)
        if protocol.outbox.size:
            loop.flush_soon(conn)

    def fail(self, conn: Connection, error: WebSocketError) -> None:
        """Fail the connection with the error's close code, after the handlers
        of what arrived before it; ``on_error`` is told first."""
        self._loop.server.metrics.count("failures", error.close_code)
        log.info("%s: failing the connection with %d: %s", conn.key, error.close_code, error)
        if conn.resource.on_error is not None:
            self.submit(conn, conn.resource.on_error, conn, error)
        self.submit(conn, conn._fail, error)

    def _answer(self, conn: Connection, request: Request) -> None:
        """Apply the server's answer to a request: upgrade (once authorized), refuse, or serve a file."""
        loop, server = self._loop, self._loop.server
        conn.client_address = request.client_address = server.client_address(conn.client_address, request)
        answer = server.answer(request, open_count=len(loop.connections),
                               ip_count=loop.connections_from(conn.client_address), stopping=loop.stopping)
        if answer.accepted is None:
            self._respond(conn, request, answer)
        elif answer.resource.authorize is None:
            self._open(conn, request, answer, None)
        else:
            self._authorize(conn, request, answer)

    def _authorize(self, conn: Connection, request: Request, answer: Answer) -> None:
        """Run the resource's hook, here on the loop thread."""
        self._decide(conn, request, answer, *authorize(conn, request, answer.resource.authorize))

    def _decide(self, conn: Connection, request: Request, answer: Answer, user: object,
                refusal: HandshakeError | None) -> None:
        if refusal is None:
            self._open(conn, request, answer, user)
        else:
            self._respond(conn, request, Answer.refusing(refusal))

    def refuse(self, conn: Connection, error: HandshakeError) -> None:
        """Refuse a request whose hook has not answered in time (on the loop thread)."""
        self._respond(conn, None, Answer.refusing(error))
        self._resume_after_hook(conn)

    def _resume_after_hook(self, conn: Connection) -> None:
        with conn._lock:
            conn._paused = False
        self._loop.watch(conn)
        self.process(conn)  # frames that came right behind the request
        self._loop.account(conn)
        if conn._protocol.outbox.size:
            self._loop.flush_soon(conn)

    def _respond(self, conn: Connection, request: Request | None, answer: Answer) -> None:
        """Answer with a plain HTTP response: a refusal, a route or a file."""
        self._loop.answered(conn)
        self._loop.server.metrics.count("handshakes", answer.status)
        with conn._lock:
            conn._protocol.respond(answer.response)
        if answer.refusal is not None:
            _log_refusal(conn, answer.refusal, request)
        else:
            log.debug("%s: %s %s %d", conn.key, request.method, quoted(request.target), answer.status)

    def _open(self, conn: Connection, request: Request, answer: Answer, user: object) -> None:
        """Upgrade: the 101, into the socket map, ``on_open``."""
        loop = self._loop
        loop.server.metrics.count("handshakes", 101)
        conn.resource, conn.subprotocol, conn.user, conn._head = answer.resource, answer.accepted.subprotocol, user, request.raw
        with conn._lock:
            conn._protocol.accept(answer.response, rsv=answer.accepted.rsv, deflate=answer.accepted.agreement(DEFLATE))
        loop.opened(conn)
        if log.isEnabledFor(logging.DEBUG):  # one line per connection: no formatting when it is off
            log.debug("%s: open %s from %s%s", conn.key, quoted(request.path), conn.client_address,
                      f" ({conn.subprotocol})" if conn.subprotocol else "")
        if conn.resource.on_open is not None:
            self.submit(conn, conn.resource.on_open, conn)

    def submit(self, conn: Connection, handler: Callable, *args) -> None:
        run_handler(conn, handler, args)

    def is_worker_thread(self) -> bool:
        return False

    def idle(self) -> bool:
        """Whether no handler call waits or runs."""
        return True

    def shutdown(self) -> None:
        pass


class PoolDispatcher(InlineDispatcher):
    """Handlers run on ``workers`` threads, one at a time per connection, in order."""

    def __init__(self, loop: Loop, workers: int, max_pending: int):
        super().__init__(loop)
        self.max_pending = max(1, max_pending)
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="wschat-handler", initializer=self._enter)
        # Authorize hooks get threads of their own: slow ones hold up other handshakes, never handlers.
        self._hooks = ThreadPoolExecutor(workers, thread_name_prefix="wschat-authorize", initializer=self._enter)

    def _enter(self) -> None:
        _worker.dispatcher = self

    def is_worker_thread(self) -> bool:
        return getattr(_worker, "dispatcher", None) is self

    def idle(self) -> bool:
        return not any(conn._running for conn in list(self._loop.connections.values()))

    def _authorize(self, conn: Connection, request: Request, answer: Answer) -> None:
        """Run the hook on a hook thread; the connection is not read meanwhile."""
        with conn._lock:
            conn._paused = True
        try:
            self._hooks.submit(self._run_hook, conn, request, answer)
        except RuntimeError:  # shutting down
            self.refuse(conn, HandshakeError(503, "server shutting down", (("Retry-After", "5"),)))

    def _run_hook(self, conn: Connection, request: Request, answer: Answer) -> None:
        if not conn._protocol.awaiting_answer:
            return  # answered by the handshake deadline while it waited for a thread
        user, refusal = authorize(conn, request, answer.resource.authorize)
        self._loop.call_soon(self._decide_late, conn, request, answer, user, refusal)

    def _decide_late(self, conn: Connection, request: Request, answer: Answer, user: object,
                     refusal: HandshakeError | None) -> None:
        """The hook's verdict, back on the loop thread, where the world moved on meanwhile."""
        if conn._sock is None or not conn._protocol.awaiting_answer:
            return  # gone, or answered by the handshake deadline
        loop = self._loop
        if refusal is None:
            try:
                loop.server.admit(len(loop.connections), loop.connections_from(conn.client_address), loop.stopping)
            except HandshakeError as error:
                refusal = error
        self._decide(conn, request, answer, user, refusal)
        self._resume_after_hook(conn)

    def submit(self, conn: Connection, handler: Callable, *args) -> None:
        cost = call_cost(args)
        self._loop.budget.change(conn, cost)  # held until the call has run
        with conn._lock:
            tasks = conn._tasks
            if tasks is None:
                tasks = conn._tasks = deque()
            tasks.append((handler, args, cost))
            if len(tasks) >= self.max_pending:
                conn._paused = True
            if conn._running:
                return
            conn._running = True
        try:
            self._executor.submit(self._run, conn)
        except RuntimeError:  # the pool is shut down: run them here
            self._run(conn)

    def _run(self, conn: Connection) -> None:
        """Run one connection's waiting calls in order (on a worker thread)."""
        low = self.max_pending // 2
        while True:
            with conn._lock:
                tasks = conn._tasks
                if not tasks:
                    conn._tasks = None
                    conn._running = False
                    return
                handler, args, cost = tasks.popleft()
                resume = conn._paused and len(tasks) <= low
            if resume:
                self._loop.resume_reading(conn)
            run_handler(conn, handler, args)
            self._loop.budget.change(conn, -cost)

    def shutdown(self) -> None:
        self._hooks.shutdown(wait=False, cancel_futures=True)  # a hook still running finds the loop gone
        self._executor.shutdown(wait=True)
