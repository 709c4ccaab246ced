"""Running handlers: on the loop thread, or on a pool that keeps each connection's order.

Every call that a connection's events cause (``on_open``, ``on_message``,
``on_error``, ``on_close``, and the closing steps after them) goes through
``submit`` in event order, so a message received before a close or an error
is handled before the closing frame is queued.

With a pool, a connection whose handler calls pile up past ``max_pending``
is paused: the loop stops reading it until its backlog is down to half; and
a message of a connection with no call waiting or running is offered first
to the resource's ``on_message_inline``, on the loop thread, which either
handles it there or hands it on (then it is submitted like any other).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Protocol

from .budget import Budget
from .connection import Connection
from .errors import ConnectionClosed, WebSocketError
from .frames import CloseCode
from .handoff import Handoff
from .metrics import Metrics
from .osthread import named
from .protocol import (
    CLOSING,
    OPEN,
    BinaryMessage,
    CloseReceived,
    ConnectionFailed,
    Pong,
    RequestReceived,
    RequestRefused,
    TextMessage,
)

log = logging.getLogger("wschat")
_worker = threading.local()  # .dispatcher on the pool's own threads
CALL_OVERHEAD = 160  # a waiting call's tuple, its queue slot, the event it came from
Handler = Callable[..., Any]


class Reading(Protocol):
    """What the dispatcher asks of the loop: to watch a connection again
    (paused or not), to resume a paused one, on the loop thread, and to
    deliver what this pass's handlers published (an engine delivers a pass's
    messages together) before a closing frame is queued behind them."""

    def watch(self, conn: Connection) -> None: ...

    def resume_reading(self, conn: Connection) -> None: ...

    def deliver_published(self) -> None: ...


def run_handler(conn: Connection, handler: Handler, args: tuple[Any, ...], metrics: Metrics) -> object:
    """Call one handler and return what it returns; a failure is logged,
    given to ``on_error``, and closes the connection with 1011 (None then)."""
    try:
        return handler(*args)
    except ConnectionClosed:
        log.debug("%s: a handler sent on a closed connection", conn.key)
    except Exception as exc:
        metrics.add("handler_errors")
        log.exception("%s: handler %s failed", conn.key, getattr(handler, "__name__", handler))
        on_error = conn.resource.on_error if conn.resource is not None else None
        if on_error is not None and handler is not on_error:
            try:
                on_error(conn, exc)
            except Exception:
                log.exception("%s: error handler failed", conn.key)
        conn.close(CloseCode.INTERNAL_ERROR, "internal server error")
    return None


def call_cost(args: tuple[Any, ...]) -> int:
    """What a handler call waiting for a worker holds: its message, and the call itself."""
    cost = CALL_OVERHEAD
    for arg in args:  # (a loop: half the time of sum() over a generator, once a message)
        if isinstance(arg, (str, bytes)):
            cost += sys.getsizeof(arg)
    return cost


def record_pong(conn: Connection, payload: bytes) -> None:
    """A keepalive ping carries its send time: the pong gives the round trip."""
    if len(payload) == 8:
        rtt = time.monotonic() - int.from_bytes(payload, "big") / 1e9
        if 0 <= rtt < 3600:
            conn.latency = rtt


class InlineDispatcher:
    """Handlers run at once, on the loop thread: they must not block."""

    pooled = False  # on_message_inline is for pools: here every handler runs inline

    def __init__(self, reading: Reading, handoff: Handoff[Connection], metrics: Metrics):
        self._reading = reading
        self._handoff = handoff
        self._metrics = metrics

    def process(self, conn: Connection) -> RequestReceived | RequestRefused | None:
        """Hand the connection's events to their handlers, in order, until
        the received bytes run out or its backlog of handler calls pauses it.
        The request head is not the handlers': it is returned, unprocessed,
        for the handshake to answer (then ``process`` goes on)."""
        metrics = self._metrics
        link = conn.link
        protocol = link.protocol
        submit = self.submit
        # Once per call, not per message: the resource is set by the upgrade, which a head event stops for.
        resource = conn.resource
        on_message = resource.on_message if resource is not None else None
        inline = resource.on_message_inline if resource is not None and self.pooled else None
        head: RequestReceived | RequestRefused | None = None
        while not link.paused:
            with link.lock:
                event = protocol.next_event()
            if event is None:
                break
            if isinstance(event, (TextMessage, BinaryMessage)):
                metrics.messages_received += 1
                if protocol.state is CLOSING:
                    continue  # sent before the peer saw our close: not handled (RFC 6455 1.4), and it can tell
                if inline is not None and link.calls is None:  # none waits or runs (only this thread adds them)
                    if run_handler(conn, inline, (conn, event.data), metrics) is True or protocol.state is not OPEN:
                        continue  # handled, or it failed and the connection is closing
                if on_message is not None:
                    if self.pooled:  # what this pass published goes before this call's replies (a worker's)
                        self._reading.deliver_published()
                    submit(conn, on_message, conn, event.data)
            elif isinstance(event, CloseReceived):
                self._reading.deliver_published()
                submit(conn, self._acknowledge_close, conn)
            elif isinstance(event, ConnectionFailed):
                self._reading.deliver_published()
                self.fail(conn, event.error)
            elif isinstance(event, Pong):
                record_pong(conn, event.payload)
            elif isinstance(event, (RequestReceived, RequestRefused)):
                head = event
                break
        if link.paused:
            self._reading.watch(conn)
        if protocol.outbox.size:
            self._handoff.mark_dirty((conn,))
        return head

    def fail(self, conn: Connection, error: WebSocketError) -> None:
        """Fail the connection with the error's close code, after the handlers
        of what arrived before it; ``on_error`` is told first."""
        self._metrics.count("failures", error.close_code)
        log.info("%s: failing the connection with %d: %s", conn.key, error.close_code, error)
        on_error = conn.resource.on_error if conn.resource is not None else None
        if on_error is not None:
            self.submit(conn, on_error, conn, error)
        self.submit(conn, self._fail, conn, error)

    def _acknowledge_close(self, conn: Connection) -> None:
        """Answer the peer's close frame (run in order after earlier handlers)."""
        with conn.link.lock:
            conn.link.protocol.acknowledge_close()
        self._handoff.mark_dirty((conn,))

    def _fail(self, conn: Connection, error: WebSocketError) -> None:
        """Queue the error's close frame (in order, too)."""
        with conn.link.lock:
            conn.link.protocol.fail(error)
        self._handoff.mark_dirty((conn,))

    def submit(self, conn: Connection, handler: Handler, *args: Any) -> None:
        run_handler(conn, handler, args, self._metrics)

    def is_worker_thread(self) -> bool:
        return False

    def idle(self) -> bool:
        """Whether no handler call waits or runs."""
        return True

    def shutdown(self) -> None:
        pass


class PoolDispatcher(InlineDispatcher):
    """Handlers run on ``workers`` threads, one at a time per connection, in
    order; a message that ``on_message_inline`` takes, on the loop thread."""

    pooled = True

    def __init__(self, reading: Reading, handoff: Handoff[Connection], metrics: Metrics, budget: Budget,
                 workers: int, max_pending: int):
        super().__init__(reading, handoff, metrics)
        self.max_pending = max(1, max_pending)
        self._budget = budget
        self._busy: set[Connection] = set()  # those with calls waiting or running (set ops are atomic)
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="wschat-handler", initializer=named(self._enter))

    def _enter(self) -> None:
        _worker.dispatcher = self

    def is_worker_thread(self) -> bool:
        return getattr(_worker, "dispatcher", None) is self

    def idle(self) -> bool:
        return not self._busy

    def submit(self, conn: Connection, handler: Handler, *args: Any) -> None:
        cost = call_cost(args)
        self._budget.change(conn, cost)  # held until the call has run
        link = conn.link
        with link.lock:
            calls = link.calls
            if calls is None:
                calls = link.calls = deque()
            calls.append((handler, args, cost))
            if len(calls) >= self.max_pending:
                link.paused = True
            if link.running:
                return
            link.running = True
            self._busy.add(conn)
        try:
            self._executor.submit(self._run, conn)
        except RuntimeError:  # the pool is shut down: run them here
            self._run(conn)

    def _run(self, conn: Connection) -> None:
        """Run one connection's waiting calls in order (on a worker thread)."""
        low = self.max_pending // 2
        link = conn.link
        while True:
            with link.lock:
                calls = link.calls
                if not calls:
                    link.calls = None
                    link.running = False
                    self._busy.discard(conn)
                    return
                handler, args, cost = calls.popleft()
                resume = link.paused and len(calls) <= low
            if resume:
                self._reading.resume_reading(conn)
            run_handler(conn, handler, args, self._metrics)
            self._budget.change(conn, -cost)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True)
