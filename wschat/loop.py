"""The selectors loop: one run of a server, from ``start`` to ``stop``.

The loop thread owns every socket: only it accepts, reads, writes and closes.
Other threads queue bytes through a connection's protocol under its lock,
then hand the connection over (``Handoff.mark_dirty``), which wakes the loop
through a socketpair.  Once per pass the loop writes every dirty connection
with one ``sendmsg``: all the frames queued for a client since the last pass
leave together.

A connection's life, as the loop sees it: accepted (TLS handshake first, if
any) -> its protocol reads the request head -> answered (a 101 and frames, or
one plain response) -> its protocol leaves OPEN: the close deadline starts ->
the outbox is written and the protocol is CLOSED: the write side is shut and
the loop waits for the peer's EOF ("lingering") -> its socket closed, ``on_close``.
"""

from __future__ import annotations

import itertools
import logging
import selectors
import socket
import ssl
import threading
import time
from typing import Any, Callable, Iterable

from . import transport
from .admission import Admission
from .budget import Budget
from .connection import Connection, queue_for_many
from .dispatch import InlineDispatcher, PoolDispatcher
from .errors import HandshakeError, PolicyViolation, TryAgainLater
from .handoff import Handoff
from .link import Link
from .logsafe import address_text, quoted
from .metrics import Metrics
from .opening import Opener
from .outbound import PreparedMessage
from .pinger import Pinger
from .protocol import CLOSED, CLOSING, CONNECTING, OPEN, ServerProtocol
from .settings import Settings

log = logging.getLogger("wschat")

READ, WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE
_keys = itertools.count(1)


class Loop:
    """Everything one run of a server holds: selector, sockets, connections."""

    def __init__(self, settings: Settings, admission: Admission, metrics: Metrics, listener: socket.socket | None):
        self.settings = settings
        self.budget = Budget(settings.max_buffered)
        self.connections: dict[str, Connection] = {}  # the socket map: open WebSockets
        self.map_lock = threading.Lock()
        self.stopped = threading.Event()  # set by the server once it has forgotten this run
        self._metrics = metrics
        self._per_ip: dict[str, int] = {}  # open WebSockets by client address: the loop's own
        self._selector = selectors.DefaultSelector()
        self._buffer = memoryview(bytearray(transport.READ_BUFFER_SIZE))  # every read goes here
        self._ciphertext = memoryview(bytearray(transport.READ_SIZE))  # and under TLS, comes from here
        self._thread_id: int | None = None
        self.handoff: Handoff[Connection] = Handoff(metrics, self.on_loop_thread)
        self._handshaking: set[Connection] = set()  # the loop's own, like _timed
        self._timed: set[Connection] = set()  # with a deadline
        self._stopping = False
        self._stop_deadline = 0.0
        self._release_port = False
        self._held_open: set[Connection] = set()  # the open connections when the shutdown began
        self._idle_hooks: list[Callable[[bool], object]] = []  # see Server.on_idle
        self.dispatcher = (PoolDispatcher(self, self.handoff, metrics, self.budget, settings.workers,
                                          settings.max_pending_calls)
                           if settings.workers else InlineDispatcher(self, self.handoff, metrics))
        # Authorize hooks get threads of their own: slow ones hold up other handshakes, never handlers.
        self.opener = Opener(admission, self, self.dispatcher.submit, metrics, hook_threads=settings.workers)
        self.pinger = Pinger(self.snapshot, self.send_many, settings.ping_interval, settings.ping_timeout)
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
                                    sum(conn.link.protocol.outbox.size for conn in conns)),
            "wschat_buffered_bytes": ("Bytes peers make the server hold: request heads, unfinished frames and "
                                      "messages (inflated), inflaters, handler calls waiting.", self.budget.total),
            "wschat_buffered_limit_bytes": ("The server-wide bound on wschat_buffered_bytes (max_buffered; 0: none).",
                                            self.budget.limit),
        }

    def open_count(self) -> int:
        """How many WebSockets are open."""
        return len(self.connections)

    def connections_from(self, address: str) -> int:
        """How many WebSockets are open from ``address`` (on the loop thread)."""
        return self._per_ip.get(address, 0)

    def is_own_thread(self) -> bool:
        """Whether the caller is one of the threads that stopping waits for."""
        return (self.on_loop_thread() or self.dispatcher.is_worker_thread() or self.opener.is_hook_thread()
                or self.pinger.is_timer_thread())

    def snapshot(self) -> list[Connection]:
        """The open connections, copied under the socket map's lock."""
        with self.map_lock:
            return [conn for conn in self.connections.values() if conn.link.protocol.state is OPEN]

    def send_many(self, message: PreparedMessage, connections: Iterable[Connection]) -> int:
        """Queue one prepared message for many connections (never blocks;
        see ``queue_for_many``), then wake the loop once."""
        queued = queue_for_many(message, connections, self.settings.max_queue, self.handoff, self._metrics)
        if queued:
            self.handoff.mark_dirty(queued, len(queued) * message.count)
        return len(queued)

    def call_soon(self, callback: Callable[..., object], *args: Any) -> bool:
        """Run ``callback(*args)`` on the loop thread, on its next pass;
        False when the loop has ended (it will not run)."""
        return self.handoff.call_soon(callback, *args)

    def resume_reading(self, conn: Connection) -> None:
        """A paused connection's handler backlog drained (from a worker)."""
        self.call_soon(self.resume, conn)

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
            timeout = 0 if handoff.has_dirty else 0.25 if self._timed else 1.0
            for key, events in self._select_or_idle(timeout) if self._idle_hooks and timeout else select(timeout):
                conn = key.data
                if conn is None:
                    if self._acceptor is not None:
                        self._acceptor.accept(self._accepted)
                elif conn is handoff:
                    handoff.drain()
                else:
                    try:
                        if events & WRITE:
                            self._flush(conn)
                        if events & READ and conn.link.sock is not None:
                            self._on_readable(conn)
                    except Exception:  # a bug must not take the loop down
                        log.exception("%s: unexpected error", conn.key)
                        self._close_socket(conn)
            if self._idle_hooks:
                self._call_idle_hooks(False)
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

    def _select_or_idle(self, timeout: float) -> list[tuple[selectors.SelectorKey, int]]:
        """What is ready now; if nothing is, the idle hooks run before the loop sleeps."""
        ready = self._selector.select(0)
        if not ready:
            self._call_idle_hooks(True)
            ready = self._selector.select(0 if self.handoff.has_dirty else timeout)
        return ready

    def _call_idle_hooks(self, idle: bool) -> None:
        for hook in self._idle_hooks:
            try:
                hook(idle)
            except Exception:  # a bug must not take the loop down
                log.exception("unexpected error in %r", hook)

    def deliver_published(self) -> None:
        """Run the idle hooks now (not idle): what handlers published in this
        pass is delivered before a closing frame queued next (see ``Reading``)."""
        if self._idle_hooks:
            self._call_idle_hooks(False)

    def add_idle_hook(self, hook: Callable[[bool], object]) -> None:
        """On the loop thread (or before it runs): see ``Server.on_idle``."""
        self._idle_hooks.append(hook)

    def remove_idle_hook(self, hook: Callable[[bool], object]) -> None:
        if hook in self._idle_hooks:
            self._idle_hooks.remove(hook)

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
            if conn.link.sock is not None:
                self._flush(conn)

    def resume(self, conn: Connection) -> None:
        """Read a paused connection again (on the loop thread), unless the
        shutdown holds it."""
        link = conn.link
        if link.sock is None or conn in self._held_open:
            return
        if link.paused:
            with link.lock:
                link.paused = False
            self.watch(conn)
            self._process(conn)
            self.account(conn)
        if link.protocol.outbox.size:  # what was queued meanwhile: a refusal, frames
            self._flush_soon(conn)

    def _flush_soon(self, conn: Connection) -> None:
        """``conn`` has bytes to write: flush it on the loop's next pass."""
        self.handoff.mark_dirty((conn,))

    # -- accepting --------------------------------------------------------------------------

    def _accepted(self, sock: socket.socket, address: Any) -> None:
        self._take(sock, address, self.settings.ssl_context)

    def adopt(self, sock: socket.socket, address: Any, data: bytes) -> None:
        """Serve a connection that another server accepted and began to read
        (``data``: the start of its request), as if accepted here."""
        conn = self._take(sock, address, None)
        if conn is not None and data:
            with conn.link.lock:
                conn.link.protocol.receive_data(data)
            self._process(conn)
            self.account(conn)

    def _take(self, sock: socket.socket, address: Any, ssl_context: ssl.SSLContext | None) -> Connection | None:
        """A new connection, waiting for its request under the handshake deadline."""
        settings = self.settings
        if len(self._handshaking) >= settings.max_connections:
            log.warning("too many connections in handshake; dropping %s", address_text(address))
            sock.close()
            return None
        try:
            tls = transport.prepare(sock, ssl_context)
        except (OSError, ValueError) as exc:
            log.warning("connection setup failed for %s: %s", address_text(address), exc)
            sock.close()
            return None
        protocol = ServerProtocol(max_message_size=settings.max_message_size, max_header_size=settings.max_header_size)
        link = Link(sock, protocol, tls)
        link.deadline = time.monotonic() + settings.handshake_timeout
        conn = Connection(str(next(_keys)), link, address, self.handoff, settings, self._metrics)
        self._handshaking.add(conn)
        self._timed.add(conn)
        self.watch(conn)
        return conn

    # -- reading ------------------------------------------------------------------------------

    def _on_readable(self, conn: Connection) -> None:
        link = conn.link
        sock, tls = link.sock, link.tls
        assert sock is not None  # only open sockets are read
        try:
            received = transport.read_into(sock, self._buffer, tls, self._ciphertext)
        except OSError as exc:
            failed = "TLS handshake" if tls is not None and tls.handshaking else "read"
            log.info("%s: %s failed: %s", conn.key, failed, exc)
            received = 0
        if tls is not None and tls.has_output and received != 0:  # handshake messages, tickets
            self._flush_soon(conn)
        if received is None:
            return
        protocol = link.protocol
        if not received:
            if conn.resource is not None and protocol.state in (OPEN, CLOSING) and not protocol.close_received:
                log.info("%s: connection lost without a close frame", conn.key)
            self._close_socket(conn)
            return
        conn.last_seen = time.monotonic()
        self._metrics.bytes_received += received
        with link.lock:
            protocol.receive_data(self._buffer[:received])  # parsed where it lies, in the loop's buffer
        try:
            self._process(conn)
        finally:
            with link.lock:
                protocol.detach()  # before the buffer takes the next read
        self.account(conn)

    def _process(self, conn: Connection) -> None:
        """Hand what ``conn`` received to its handlers, and its request head to the opener."""
        dispatcher = self.dispatcher
        while (head := dispatcher.process(conn)) is not None:
            self.opener.take(conn, head)

    # -- what peers make the server hold ------------------------------------------------------

    def account(self, conn: Connection) -> None:
        """After its bytes were parsed: count what ``conn`` holds against the
        budget (shedding the largest holders when over it), and give an
        unfinished message its deadline."""
        link = conn.link
        protocol = link.protocol
        change = protocol.buffered - link.held
        if change:
            link.held += change
            self.budget.change(conn, change)
            if change > 0 and self.budget.over:
                self._shed()
        message_timeout = self.settings.message_timeout
        if message_timeout and protocol.state is OPEN:
            if not protocol.receiving:
                if link.deadline is not None:
                    link.deadline = None
                    self._timed.discard(conn)
            elif link.deadline is None:
                link.deadline = time.monotonic() + message_timeout
                self._timed.add(conn)

    def _shed(self) -> None:
        """Over the budget: close the connections that hold the most until it is not."""
        budget = self.budget
        passed: set[object] = set()
        while budget.over:
            conn = budget.largest(passed)
            if not isinstance(conn, Connection):
                return
            passed.add(conn)
            link = conn.link
            if link.sock is None or not link.protocol.reading:
                continue  # what it holds are handler calls, which closing would not free
            log.warning("%s: the server holds %d bytes, over max_buffered (%d); closing this connection, "
                        "which holds the most (%d)", conn.key, budget.total, budget.limit, budget.held(conn))
            self._metrics.add("budget_closes")
            if link.protocol.state is CONNECTING:
                self._close_socket(conn)
            else:
                self._give_up(conn, TryAgainLater("server busy: try again later"))

    def _give_up(self, conn: Connection, error: PolicyViolation | TryAgainLater) -> None:
        """Read no more from ``conn``, let go of its unfinished message, and
        fail it with the error's close code (after its earlier messages' handlers)."""
        with conn.link.lock:
            conn.link.protocol.abandon()
        self.account(conn)
        self.dispatcher.fail(conn, error)

    # -- the opener's bookkeeping ------------------------------------------------------------

    def opened(self, conn: Connection) -> None:
        """``conn`` was upgraded: into the socket map, out of the handshake's deadline."""
        self._handshaking.discard(conn)
        self._timed.discard(conn)
        conn.link.deadline = None
        self._per_ip[conn.client_address] = self._per_ip.get(conn.client_address, 0) + 1
        with self.map_lock:
            self.connections[conn.key] = conn

    def responded(self, conn: Connection) -> None:
        """``conn`` got a plain response: no longer counted as handshaking."""
        self._handshaking.discard(conn)

    # -- writing --------------------------------------------------------------------------------

    def _flush(self, conn: Connection) -> None:
        """Write what the kernel takes, then see where the connection's life stands."""
        link = conn.link
        protocol = link.protocol
        outbox = protocol.outbox
        sock = link.sock
        assert sock is not None  # only open sockets are flushed
        with link.lock:
            before = outbox.size
            try:
                transport.write(sock, outbox, link.tls)
            except OSError as exc:
                failed: OSError | None = exc
            else:
                failed = None
            self._metrics.bytes_sent += before - outbox.size
            if link.space is not None:
                link.space.notify_all()
            state = protocol.state
        if failed is not None:
            log.info("%s: write failed: %s", conn.key, failed)
            self._close_socket(conn)
            return
        tls = link.tls
        unsent = outbox.size or (tls is not None and tls.has_output)
        self.watch(conn, write=bool(unsent))
        if state is OPEN or state is CONNECTING:
            return
        if not link.ending:  # the protocol left OPEN: the close deadline starts
            link.ending = True
            link.deadline = time.monotonic() + self.settings.close_timeout
            self._timed.add(conn)
        if state is CLOSED and not unsent and tls is not None and not tls.closed and not tls.handshaking:
            tls.close_notify()  # then written, and the write side shut, on the next flush
            self._flush_soon(conn)
        elif state is CLOSED and not unsent and not link.lingering:
            # All is written: shut our write side and wait (until the deadline)
            # for the peer's EOF, so that closing never resets the connection
            # with our last bytes still in flight.
            link.lingering = True
            self._forget(conn)
            if not transport.shutdown_write(sock):
                self._close_socket(conn)

    def watch(self, conn: Connection, write: bool | None = None) -> None:
        """Tell the selector what the connection waits for: reading unless
        paused, writing while the kernel pushes back (``write``; None: as before)."""
        link = conn.link
        events = (link.events & WRITE if write is None else WRITE if write else 0) | (0 if link.paused else READ)
        if events == link.events or link.sock is None:
            return
        if not events:
            self._selector.unregister(link.sock)
        elif not link.events:
            self._selector.register(link.sock, events, conn)
        else:
            self._selector.modify(link.sock, events, conn)
        link.events = events

    # -- deadlines and the end -------------------------------------------------------------------

    def _check_deadlines(self, now: float) -> None:
        for conn in list(self._timed):
            link = conn.link
            protocol = link.protocol
            if link.sock is None:
                self._timed.discard(conn)
            elif link.deadline is not None and now >= link.deadline:
                if protocol.state is OPEN:  # a message begun too long ago (see account)
                    link.deadline = None
                    self._timed.discard(conn)
                    message_timeout = self.settings.message_timeout
                    self._give_up(conn, PolicyViolation(f"message not completed within {message_timeout:g}s"))
                    continue
                if protocol.awaiting_answer:  # its authorize hook is still running
                    log.warning("%s: authorization took longer than the handshake timeout", conn.key)
                    self.opener.refuse_late(conn, HandshakeError(503, "authorization timed out",
                                                                 (("Retry-After", "5"),)))
                    continue
                if protocol.state is CONNECTING:
                    log.info("%s: handshake timeout for %s", conn.key, address_text(conn.remote_address))
                elif not link.lingering:
                    log.info("%s: closing handshake timed out", conn.key)
                self._close_socket(conn)

    def _forget(self, conn: Connection) -> None:
        """Take the connection out of the socket map."""
        with self.map_lock:
            self.connections.pop(conn.key, None)

    def _close_socket(self, conn: Connection) -> None:
        """Close the socket and forget the connection; ``on_close`` once."""
        link = conn.link
        sock = link.sock
        if sock is None:
            return
        with link.lock:
            link.protocol.receive_eof()
            link.sock = None
            if link.space is not None:
                link.space.notify_all()
            gone = link.gone
        if link.held:  # what its protocol held is gone; waiting handler calls give theirs back as they run
            self.budget.change(conn, -link.held)
            link.held = 0
        if link.events:
            self._selector.unregister(sock)
            link.events = 0
        sock.close()
        self._handshaking.discard(conn)
        self._timed.discard(conn)
        self._forget(conn)
        if gone is not None:
            gone.set()
        if conn.resource is not None:
            self._metrics.count("closes", conn.close_code)
            count = self._per_ip.pop(conn.client_address, 1) - 1
            if count:
                self._per_ip[conn.client_address] = count
            if log.isEnabledFor(logging.DEBUG):
                reason = conn.close_reason
                log.debug("%s: closed (%d%s)", conn.key, conn.close_code, f" {quoted(reason)}" if reason else "")
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
        self._held_open = set(self.snapshot())
        for conn in self._held_open:
            with conn.link.lock:
                conn.link.paused = True
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
        held, self._held_open = self._held_open, set()
        for conn in held:
            conn.close(1001, "server shutting down")
            self.resume(conn)

    def _all_gone(self) -> bool:
        """Whether every WebSocket has said its last word (shutdown may end)."""
        if self.handoff.has_dirty or self.connections:
            return False
        return all(conn.link.lingering or conn.link.protocol.state is CONNECTING for conn in self._timed)

    def _release_all(self) -> None:
        self.pinger.stop()
        self.handoff.end()
        self._flush_dirty()  # the last calls: what they take in is released below
        with self.map_lock:
            remaining = list(self.connections.values())
        dirty, _ = self.handoff.take()
        for conn in remaining + list(self._timed) + list(self._handshaking) + list(dirty):
            self._close_socket(conn)
        self.opener.shutdown()
        self.dispatcher.shutdown()
        if self._acceptor is not None:
            self._acceptor.close()
        self._selector.close()
        self.handoff.close()
        log.info("stopped")
