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
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Callable

from .errors import ConnectionClosed
from .frames import CloseCode

if TYPE_CHECKING:
    from .connection import Connection
    from .loop import Loop

log = logging.getLogger("wschat")
_worker = threading.local()  # .dispatcher on the pool's own threads


def run_handler(conn: Connection, handler: Callable, args: tuple) -> None:
    """Call one handler; a failure is logged, given to ``on_error``, and
    closes the connection with 1011."""
    try:
        handler(*args)
    except ConnectionClosed:
        log.debug("%s: a handler sent on a closed connection", conn.key)
    except Exception as exc:
        log.exception("%s: handler %s failed", conn.key, getattr(handler, "__name__", handler))
        on_error = conn.resource.on_error if conn.resource is not None else None
        if on_error is not None and handler is not on_error:
            try:
                on_error(conn, exc)
            except Exception:
                log.exception("%s: error handler failed", conn.key)
        conn.close(CloseCode.INTERNAL_ERROR, "internal server error")


class InlineDispatcher:
    """Handlers run at once, on the loop thread: they must not block."""

    def submit(self, conn: Connection, handler: Callable, *args) -> None:
        run_handler(conn, handler, args)

    def is_worker_thread(self) -> bool:
        return False

    def shutdown(self) -> None:
        pass


class PoolDispatcher:
    """Handlers run on ``workers`` threads, one at a time per connection, in order."""

    def __init__(self, loop: Loop, workers: int, max_pending: int):
        self._loop = loop
        self.max_pending = max(1, max_pending)
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="wschat-handler", initializer=self._enter)

    def _enter(self) -> None:
        _worker.dispatcher = self

    def is_worker_thread(self) -> bool:
        return getattr(_worker, "dispatcher", None) is self

    def submit(self, conn: Connection, handler: Callable, *args) -> None:
        with conn._lock:
            tasks = conn._tasks
            if tasks is None:
                tasks = conn._tasks = deque()
            tasks.append((handler, args))
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
                handler, args = tasks.popleft()
                resume = conn._paused and len(tasks) <= low
            if resume:
                self._loop.resume_reading(conn)
            run_handler(conn, handler, args)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True)
