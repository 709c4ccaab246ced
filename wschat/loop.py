"""The selectors loop: one run of a server, from ``start`` to ``stop``.

The loop thread owns every socket: only it accepts, reads, writes and closes.
Other threads queue bytes through a connection's protocol under its lock,
then call ``flush_soon``, which marks the connection dirty and wakes the loop
through a socketpair.  Once per pass the loop writes every dirty connection
with one ``sendmsg``: all the frames queued for a client since the last pass
leave together.

A connection's life, as the loop sees it: accepted (TLS handshake first, if
any) -> its protocol reads the request head -> answered (a 101 and frames, or
one plain response) -> its protocol leaves OPEN: the close deadline starts ->
the outbox is written and the protocol is CLOSED: the write side is shut and
the loop waits for the peer's EOF ("lingering") -> released, ``on_close``.
"""

from __future__ import annotations

import itertools
import logging
import selectors
import socket
import threading
import time
from typing import TYPE_CHECKING, Iterable

from . import transport
from .budget import Budget
from .connection import Connection, queue_for_many
from .dispatch import InlineDispatcher, PoolDispatcher
from .errors import HandshakeError, PolicyViolation, TryAgainLater
from .handoff import Handoff
from .logsafe import address_text
from .outbound import PreparedMessage
from .pinger import Pinger
from .protocol import CLOSED, CLOSING, CONNECTING, OPEN, ServerProtocol

if TYPE_CHECKING:
    from .server import Server

log = logging.getLogger("wschat")

READ, WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE
_keys = itertools.count(1)


class Loop:
    """Everything one run of a server holds: selector, sockets, connections."""

    def __init__(self, server: Server, listener: socket.socket | None):
        self.server = server
        self.max_queue = server.max_queue
        self.send_timeout = server.send_timeout
        self.message_timeout = server.message_timeout
        self.budget = Budget(server.max_buffered)
        self.connections: dict[str, Connection] = {}  # the socket map: open WebSockets
        self.map_lock = threading.Lock()
        self.stopped = threading.Event()  # set by the server once it has forgotten this run
        self._metrics = server.metrics
        self._per_ip: dict[str, int] = {}  # open WebSockets by client address: the loop's own
        self._selector = selectors.DefaultSelector()
        self._buffer = memoryview(bytearray(transport.READ_BUFFER_SIZE))  # every read goes here
        self._ciphertext = memoryview(bytearray(transport.READ_SIZE))  # and under TLS, comes from here
        self.handoff = Handoff(server.metrics, self.on_loop_thread)
        self._handshaking: set[Connection] = set()  # the loop's own, like _timed
        self._timed: set[Connection] = set()  # with a deadline
        self._thread_id: int | None = None
        self._stopping = False
        self._stop_deadline = 0.0
        self._release_port = False
        self._held_open: list[Connection] = []  # the open connections when the shutdown began
        self.dispatcher = (PoolDispatcher(self, server.workers, server.max_pending_calls) if server.workers
                           else InlineDispatcher(self))
        self.pinger = Pinger(self, server.ping_interval, server.ping_timeout)
        self._acceptor = transport.Acceptor(listener, self._selector) if listener is not None else None
        self._selector.register(self.handoff.reader, READ, self.handoff)

    # -- thread-safe, for any thread -----------------------------------------------------

    def on_loop_thread(self) -> bool:
        return threading.get_ident() == self._thread_id

    @property
    def stopping(self) -> bool:
        return self._stopping

    def gauges(self) -> dict[str, tuple[str, float]]:
        """The loop's gauges, for the metrics (on the loop thread)."""
        with self.map_lock:
            conns = list(self.connections.values())
        return {
            "wschat_connections": ("WebSocket connections open.", len(conns)),
            "wschat_handshakes_in_progress": ("Connections whose request is not answered yet.", len(self._handshaking)),
            "wschat_queued_bytes": ("Bytes waiting in the outbound queues of open connections.",
                                    sum(conn._protocol.outbox.size for conn in conns)),
            "wschat_buffered_bytes": ("Bytes peers make the server hold: request heads, unfinished frames and "
                                      "messages (inflated), inflaters, handler calls waiting.", self.budget.total),
            "wschat_buffered_limit_bytes": ("The server-wide bound on wschat_buffered_bytes (max_buffered; 0: none).",
                                            self.budget.limit),
        }

    def connections_from(self, address: str) -> int:
        """How many WebSockets are open from ``address`` (on the loop thread)."""
        return self._per_ip.get(address, 0)

    def is_own_thread(self) -> bool:
        """Whether the caller is one of the threads that stopping waits for."""
        return self.on_loop_thread() or self.dispatcher.is_worker_thread() or self.pinger.is_timer_thread()

    def snapshot(self) -> list[Connection]:
        """The open connections, copied under the socket map's lock."""
        with self.map_lock:
            return [conn for conn in self.connections.values() if conn._protocol.state is OPEN]

    def flush_soon(self, conn: Connection, messages: int = 0) -> None:
        """``conn`` has bytes to write (``messages`` new ones): flush it on the loop's next pass."""
        self.handoff.mark_dirty((conn,), messages)

    def send_many(self, message: PreparedMessage, connections: Iterable[Connection]) -> int:
        """Queue one prepared message for many connections (never blocks;
        see ``queue_for_many``), then wake the loop once."""
        queued = queue_for_many(message, connections, self.max_queue)
        if queued:
            self.handoff.mark_dirty(queued, len(queued) * message.count)
        return len(queued)

    def call_soon(self, callback, *args) -> bool:
        """Run ``callback(*args)`` on the loop thread, on its next pass;
        False when the loop has ended (it will not run)."""
        return self.handoff.call_soon(callback, *args)

    def resume_reading(self, conn: Connection) -> None:
        """A paused connection's handler backlog drained (from a worker)."""
        self.call_soon(self._resume, conn)

    def request_stop(self, timeout: float, release_port: bool = False) -> None:
        """Begin the shutdown.  From any thread, a signal handler included:
        it takes no lock, since a handler may run while its thread holds one.
        ``release_port``: stop listening at once (see ``Server.stop``)."""
        self._release_port = release_port
        self._stop_deadline = time.monotonic() + timeout
        self._stopping = True
        self.pinger.cancel()
        self.handoff.wake()  # always: from a signal handler the loop may sit in select()

    # -- the loop -----------------------------------------------------------------------

    def run(self) -> None:
        self._thread_id = threading.get_ident()
        self.pinger.start()
        try:
            self._run()
        finally:
            self._release_all()

    def _run(self) -> None:
        select = self._selector.select
        handoff = self.handoff
        next_check = 0.0
        shutting_down = draining = False
        while True:
            # Never sleep on dirty connections: a flush can make more (on_close handlers, close_notify).
            for key, events in select(0 if handoff.has_dirty else 0.25 if self._timed else 1.0):
                conn = key.data
                if conn is None:
                    self._acceptor.accept(self._accepted)
                elif conn is handoff:
                    handoff.drain()
                else:
                    try:
                        if events & WRITE:
                            self._flush(conn)
                        if events & READ and conn._sock is not None:
                            self._on_readable(conn)
                    except Exception:  # a bug must not take the loop down
                        log.exception("%s: unexpected error", conn.key)
                        self._release(conn)
            self._flush_dirty()
            now = time.monotonic()
            if now >= next_check:
                next_check = now + 0.2
                self._check_deadlines(now)
                if self._acceptor is not None and not self._stopping:
                    self._acceptor.resume_if_due(now)
            if self._stopping:
                if not shutting_down:
                    shutting_down = draining = True
                    self._hold_reading()
                if draining and (self.dispatcher.idle() or now >= self._stop_deadline):
                    draining = False
                    self._drain()
                    self._begin_shutdown()
                    self._flush_dirty()
                if not draining and (now >= self._stop_deadline or self._all_gone()):
                    return

    def _flush_dirty(self) -> None:
        """Run what other threads asked of the loop, then write every dirty
        connection (those the calls dirty wait for the next pass, which does not sleep)."""
        dirty, calls = self.handoff.take()
        for callback, args in calls:
            try:
                callback(*args)
            except Exception:  # a bug must not take the loop down
                log.exception("unexpected error in %r", callback)
        for conn in dirty:
            if conn._sock is not None:
                self._flush(conn)

    def _resume(self, conn: Connection) -> None:
        if conn._sock is not None and conn._paused and not self._held_open:
            with conn._lock:
                conn._paused = False
            self.watch(conn)
            self.dispatcher.process(conn)
            self.account(conn)

    # -- accepting --------------------------------------------------------------------------

    def _accepted(self, sock: socket.socket, address) -> None:
        self._take(sock, address, self.server.ssl_context)

    def adopt(self, sock: socket.socket, address, data: bytes) -> None:
        """Serve a connection that another server accepted and began to read
        (``data``: the start of its request), as if accepted here."""
        conn = self._take(sock, address, None)
        if conn is not None and data:
            with conn._lock:
                conn._protocol.receive_data(data)
            self.dispatcher.process(conn)
            self.account(conn)

    def _take(self, sock: socket.socket, address, ssl_context) -> Connection | None:
        """A new connection, waiting for its request under the handshake deadline."""
        server = self.server
        if len(self._handshaking) >= server.max_connections:
            log.warning("too many connections in handshake; dropping %s", address_text(address))
            sock.close()
            return None
        try:
            tls = transport.prepare(sock, ssl_context)
        except (OSError, ValueError) as exc:
            log.warning("connection setup failed for %s: %s", address_text(address), exc)
            sock.close()
            return None
        protocol = ServerProtocol(max_message_size=server.max_message_size, max_header_size=server.max_header_size)
        conn = Connection(self, sock, address, str(next(_keys)), protocol, tls=tls)
        conn._deadline = time.monotonic() + server.handshake_timeout
        self._handshaking.add(conn)
        self._timed.add(conn)
        self.watch(conn)
        return conn

    # -- reading ------------------------------------------------------------------------------

    def _on_readable(self, conn: Connection) -> None:
        tls = conn._tls
        try:
            received = transport.read_into(conn._sock, self._buffer, tls, self._ciphertext)
        except OSError as exc:
            failed = "TLS handshake" if tls is not None and tls.handshaking else "read"
            log.info("%s: %s failed: %s", conn.key, failed, exc)
            received = 0
        if tls is not None and tls.has_output and received != 0:  # handshake messages, tickets
            self.flush_soon(conn)
        if received is None:
            return
        if not received:
            if conn.resource is not None and conn._protocol.state in (OPEN, CLOSING) and not conn._protocol.close_received:
                log.info("%s: connection lost without a close frame", conn.key)
            self._release(conn)
            return
        conn.last_seen = time.monotonic()
        self._metrics.bytes_received += received
        protocol = conn._protocol
        with conn._lock:
            protocol.receive_data(self._buffer[:received])  # parsed where it lies, in the loop's buffer
        try:
            self.dispatcher.process(conn)
        finally:
            with conn._lock:
                protocol.detach()  # before the buffer takes the next read
        self.account(conn)

    # -- what peers make the server hold ------------------------------------------------------

    def account(self, conn: Connection) -> None:
        """After its bytes were parsed: count what ``conn`` holds against the
        budget (shedding the largest holders when over it), and give an
        unfinished message its deadline."""
        protocol = conn._protocol
        change = protocol.buffered - conn._held
        if change:
            conn._held += change
            self.budget.change(conn, change)
            if change > 0 and self.budget.over:
                self._shed()
        if self.message_timeout and protocol.state is OPEN:
            if not protocol.receiving:
                if conn._deadline is not None:
                    conn._deadline = None
                    self._timed.discard(conn)
            elif conn._deadline is None:
                conn._deadline = time.monotonic() + self.message_timeout
                self._timed.add(conn)

    def _shed(self) -> None:
        """Over the budget: close the connections that hold the most until it is not."""
        budget = self.budget
        passed: set[Connection] = set()
        while budget.over:
            conn = budget.largest(passed)
            if conn is None:
                return
            passed.add(conn)
            if conn._sock is None or not conn._protocol.reading:
                continue  # what it holds are handler calls, which closing would not free
            log.warning("%s: the server holds %d bytes, over max_buffered (%d); closing this connection, "
                        "which holds the most (%d)", conn.key, budget.total, budget.limit, budget.held(conn))
            self._metrics.add("budget_closes")
            if conn._protocol.state is CONNECTING:
                self._release(conn)
            else:
                self._give_up(conn, TryAgainLater("server busy: try again later"))

    def _give_up(self, conn: Connection, error: Exception) -> None:
        """Read no more from ``conn``, let go of its unfinished message, and
        fail it with the error's close code (after its earlier messages' handlers)."""
        with conn._lock:
            conn._protocol.abandon()
        self.account(conn)
        self.dispatcher.fail(conn, error)

    # -- answering the request ---------------------------------------------------------------

    def opened(self, conn: Connection) -> None:
        """``conn`` was upgraded: into the socket map, out of the handshake's deadline."""
        self._handshaking.discard(conn)
        self._timed.discard(conn)
        conn._deadline = None
        self._per_ip[conn.client_address] = self._per_ip.get(conn.client_address, 0) + 1
        with self.map_lock:
            self.connections[conn.key] = conn

    def answered(self, conn: Connection) -> None:
        """``conn`` got a plain response: no longer counted as handshaking."""
        self._handshaking.discard(conn)

    # -- writing --------------------------------------------------------------------------------

    def _flush(self, conn: Connection) -> None:
        """Write what the kernel takes, then see where the connection's life stands."""
        protocol = conn._protocol
        outbox = protocol.outbox
        with conn._lock:
            before = outbox.size
            try:
                transport.write(conn._sock, outbox, conn._tls)
            except OSError as exc:
                failed = exc
            else:
                failed = None
            self._metrics.bytes_sent += before - outbox.size
            if conn._room is not None:
                conn._room.notify_all()
            state = protocol.state
        if failed is not None:
            log.info("%s: write failed: %s", conn.key, failed)
            self._release(conn)
            return
        tls = conn._tls
        unsent = outbox.size or (tls is not None and tls.has_output)
        self.watch(conn, write=bool(unsent))
        if state is OPEN or state is CONNECTING:
            return
        if not conn._ending:  # the protocol left OPEN: the close deadline starts
            conn._ending = True
            conn._deadline = time.monotonic() + self.server.close_timeout
            self._timed.add(conn)
        if state is CLOSED and not unsent and tls is not None and not tls.closed and not tls.handshaking:
            tls.close_notify()  # then written, and the write side shut, on the next flush
            self.flush_soon(conn)
        elif state is CLOSED and not unsent and not conn._lingering:
            # All is written: shut our write side and wait (until the deadline)
            # for the peer's EOF, so that closing never resets the connection
            # with our last bytes still in flight.
            conn._lingering = True
            self._forget(conn)
            if not transport.shutdown_write(conn._sock):
                self._release(conn)

    def watch(self, conn: Connection, write: bool | None = None) -> None:
        """Tell the selector what the connection waits for: reading unless
        paused, writing while the kernel pushes back (``write``; None: as before)."""
        events = (conn._events & WRITE if write is None else WRITE if write else 0) | (0 if conn._paused else READ)
        if events == conn._events:
            return
        if not events:
            self._selector.unregister(conn._sock)
        elif not conn._events:
            self._selector.register(conn._sock, events, conn)
        else:
            self._selector.modify(conn._sock, events, conn)
        conn._events = events

    # -- deadlines and the end -------------------------------------------------------------------

    def _check_deadlines(self, now: float) -> None:
        for conn in list(self._timed):
            if conn._sock is None:
                self._timed.discard(conn)
            elif conn._deadline is not None and now >= conn._deadline:
                if conn._protocol.state is OPEN:  # a message begun too long ago (see _account)
                    conn._deadline = None
                    self._timed.discard(conn)
                    self._give_up(conn, PolicyViolation(f"message not completed within {self.message_timeout:g}s"))
                    continue
                if conn._protocol.awaiting_answer:  # its authorize hook is still running
                    log.warning("%s: authorization took longer than the handshake timeout", conn.key)
                    self.dispatcher.refuse(conn, HandshakeError(503, "authorization timed out", (("Retry-After", "5"),)))
                    continue
                if conn._protocol.state is CONNECTING:
                    log.info("%s: handshake timeout for %s", conn.key, address_text(conn.remote_address))
                elif not conn._lingering:
                    log.info("%s: closing handshake timed out", conn.key)
                self._release(conn)

    def _forget(self, conn: Connection) -> None:
        """Take the connection out of the socket map."""
        with self.map_lock:
            self.connections.pop(conn.key, None)

    def _release(self, conn: Connection) -> None:
        """Close the socket and forget the connection; ``on_close`` once."""
        sock = conn._sock
        if sock is None:
            return
        with conn._lock:
            conn._protocol.receive_eof()
            conn._sock = None
            if conn._room is not None:
                conn._room.notify_all()
            closed = conn._closed
        if conn._held:  # what its protocol held is gone; waiting handler calls give theirs back as they run
            self.budget.change(conn, -conn._held)
            conn._held = 0
        if conn._events:
            self._selector.unregister(sock)
            conn._events = 0
        sock.close()
        self._handshaking.discard(conn)
        self._timed.discard(conn)
        self._forget(conn)
        if closed is not None:
            closed.set()
        if conn.resource is not None:
            self._metrics.count("closes", conn.close_code)
            count = self._per_ip.pop(conn.client_address, 1) - 1
            if count:
                self._per_ip[conn.client_address] = count
            log.debug("%s: closed (%s)", conn.key, conn._describe_close())
            if conn.resource.on_close is not None:
                self.dispatcher.submit(conn, conn.resource.on_close, conn, conn.close_code, conn.close_reason)

    def _hold_reading(self) -> None:
        """The shutdown's first step: read no client any more, so that what
        they sent is either handled before they are closed or not at all
        (then they can tell: no echo, nothing in the history).  The listener
        stays open until the end (meanwhile the health check answers 503 and
        upgrades get 503), unless the port is to be released at once."""
        log.info("shutting down")
        if self._release_port and self._acceptor is not None:
            self._acceptor.close()
            self._acceptor = None
        self._held_open = self.snapshot()
        for conn in self._held_open:
            with conn._lock:
                conn._paused = True
            self.watch(conn)

    def _drain(self) -> None:
        """Every message read is handled: let each resource make sure what
        its handlers accepted is kept (``Resource.on_drain``)."""
        for resource in {conn.resource for conn in self._held_open if conn.resource is not None}:
            if resource.on_drain is not None:
                try:
                    resource.on_drain(max(0.0, self._stop_deadline - time.monotonic()))
                except Exception:
                    log.exception("drain handler %r failed", resource.on_drain)

    def _begin_shutdown(self) -> None:
        """Close every WebSocket with 1001, and read them again for their
        answers (a message that comes after our close is not handled)."""
        held, self._held_open = self._held_open, []
        for conn in held:
            conn.close(1001, "server shutting down")
            self._resume(conn)

    def _all_gone(self) -> bool:
        """Whether every WebSocket has said its last word (shutdown may end)."""
        if self.handoff.has_dirty or self.connections:
            return False
        return all(conn._lingering or conn._protocol.state is CONNECTING for conn in self._timed)

    def _release_all(self) -> None:
        self.pinger.stop()
        self.handoff.end()
        self._flush_dirty()  # the last calls: what they take in is released below
        with self.map_lock:
            remaining = list(self.connections.values())
        dirty, _ = self.handoff.take()
        for conn in remaining + list(self._timed) + list(self._handshaking) + list(dirty):
            self._release(conn)
        self.dispatcher.shutdown()
        if self._acceptor is not None:
            self._acceptor.close()
        self._selector.close()
        self.handoff.close()
        log.info("stopped")

