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

import errno
import itertools
import logging
import selectors
import socket
import ssl
import threading
import time
from typing import TYPE_CHECKING, Iterable

from .connection import Connection
from .dispatch import InlineDispatcher, PoolDispatcher
from .errors import HandshakeError
from .logsafe import quoted
from .outbound import PreparedMessage
from .pinger import Pinger
from .protocol import (
    CLOSED,
    CLOSING,
    CONNECTING,
    OPEN,
    BinaryMessage,
    CloseReceived,
    ConnectionFailed,
    Ping,
    Pong,
    RequestReceived,
    RequestRefused,
    ServerProtocol,
    TextMessage,
)

if TYPE_CHECKING:
    from .server import Server

log = logging.getLogger("wschat")

READ_SIZE = 256 * 1024
ACCEPT_PAUSE = 0.5  # seconds without accepting after running out of descriptors
RESOURCE_ERRORS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
IOV_MAX = 1024  # buffers per sendmsg call
READ, WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE
_keys = itertools.count(1)


class Loop:
    """Everything one run of a server holds: selector, sockets, connections."""

    def __init__(self, server: Server, listener: socket.socket):
        self.server = server
        self.max_queue = server.max_queue
        self.send_timeout = server.send_timeout
        self.connections: dict[str, Connection] = {}  # the socket map: open WebSockets
        self.map_lock = threading.Lock()
        self.stopped = threading.Event()
        self._listener = listener
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        for sock in (self._wake_r, self._wake_w):
            sock.setblocking(False)
        self._dirty: set[Connection] = set()  # with bytes to write; guarded by _dirty_lock
        self._resumed: set[Connection] = set()  # whose backlog drained; guarded by _dirty_lock
        self._dirty_lock = threading.Lock()
        self._wake_sent = False
        self._handshaking: set[Connection] = set()  # the loop's own, like _timed
        self._timed: set[Connection] = set()  # with a deadline
        self._thread_id: int | None = None
        self._stopping = False
        self._stop_deadline = 0.0
        self._accept_resume = 0.0  # when accepting resumes after a pause; 0 when not paused
        self.dispatcher = (PoolDispatcher(self, server.workers, server.max_pending_calls) if server.workers
                           else InlineDispatcher())
        self.pinger = Pinger(self, server.ping_interval, server.ping_timeout)
        self._selector.register(listener, READ, None)
        self._selector.register(self._wake_r, READ, self._wake_r)

    # -- thread-safe, for any thread -----------------------------------------------------

    def on_loop_thread(self) -> bool:
        return threading.get_ident() == self._thread_id

    def is_own_thread(self) -> bool:
        """Whether the caller is one of the threads that stopping waits for."""
        return self.on_loop_thread() or self.dispatcher.is_worker_thread() or self.pinger.is_timer_thread()

    def snapshot(self) -> list[Connection]:
        """The open connections, copied under the socket map's lock."""
        with self.map_lock:
            return [conn for conn in self.connections.values() if conn._protocol.state is OPEN]

    def flush_soon(self, conn: Connection) -> None:
        """``conn`` has bytes to write: flush it on the loop's next pass."""
        with self._dirty_lock:
            self._dirty.add(conn)
            if self._wake_sent or self.on_loop_thread():
                return  # the loop flushes dirty connections before it sleeps
            self._wake_sent = True
        self._wake()

    def send_many(self, message: PreparedMessage, connections: Iterable[Connection]) -> int:
        """Queue one prepared message for many connections: the hot path of
        every broadcast.  Never blocks: a client over the mark is closed as
        too slow.  It does what ``ServerProtocol.send_frame`` does, inlined
        (the state test and the append, under each connection's lock)."""
        parts, size, limit = message.parts, message.size, self.max_queue
        queued = []
        for conn in connections:
            protocol = conn._protocol
            outbox = protocol.outbox
            with conn._lock:
                if protocol.state is not OPEN:
                    continue
                if outbox.size and outbox.size + size > limit:
                    conn._overflow()
                    continue
                outbox.buffers += parts
                outbox.size += size
            queued.append(conn)
        if queued:
            with self._dirty_lock:
                self._dirty.update(queued)
                if self._wake_sent or self.on_loop_thread():
                    return len(queued)
                self._wake_sent = True
            self._wake()
        return len(queued)

    def resume_reading(self, conn: Connection) -> None:
        """A paused connection's handler backlog drained (from a worker)."""
        with self._dirty_lock:
            self._resumed.add(conn)
        self._wake()

    def request_stop(self, timeout: float) -> None:
        """Begin the shutdown (from any thread, a signal handler included)."""
        self._stop_deadline = time.monotonic() + timeout
        self._stopping = True
        self.pinger.stop()
        self._wake()  # always: from a signal handler the loop may sit in select()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass  # a byte is already waiting, or the loop is gone

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
        next_check = 0.0
        shutting_down = False
        while True:
            for key, events in select(0.25 if self._timed else 1.0):
                conn = key.data
                if conn is None:
                    self._accept()
                elif conn is self._wake_r:
                    self._drain_waker()
                else:
                    try:
                        if events & WRITE:
                            self._on_writable(conn)
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
                if self._accept_resume and now >= self._accept_resume and not self._stopping:
                    self._accept_resume = 0.0
                    self._selector.register(self._listener, READ, None)
            if self._stopping:
                if not shutting_down:
                    shutting_down = True
                    self._begin_shutdown()
                    self._flush_dirty()
                if now >= self._stop_deadline or self._all_gone():
                    return

    def _drain_waker(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:
            pass

    def _flush_dirty(self) -> None:
        with self._dirty_lock:
            dirty, self._dirty = self._dirty, set()
            resumed, self._resumed = self._resumed, set()
            self._wake_sent = False
        for conn in resumed:
            if conn._sock is not None and conn._paused:
                with conn._lock:
                    conn._paused = False
                self._process(conn)
                self._set_events(conn)
                dirty.add(conn)
        for conn in dirty:
            if conn._sock is not None:
                self._flush(conn)

    # -- accepting --------------------------------------------------------------------------

    def _accept(self) -> None:
        server = self.server
        for _ in range(128):  # bounded, so a connection storm cannot starve the others
            try:
                sock, address = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in RESOURCE_ERRORS:  # out of descriptors: pause, do not spin
                    log.error("accept failed (%s); pausing accepts for %.1fs", exc.strerror, ACCEPT_PAUSE)
                    self._selector.unregister(self._listener)
                    self._accept_resume = time.monotonic() + ACCEPT_PAUSE
                else:  # the client left before we took it
                    log.debug("accept failed: %s", exc)
                return
            if len(self._handshaking) >= server.max_connections:
                log.warning("too many connections in handshake; dropping %s", _address(address))
                sock.close()
                continue
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if server.ssl_context is not None:
                try:
                    sock = server.ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
                except (OSError, ValueError) as exc:
                    log.warning("TLS setup failed for %s: %s", _address(address), exc)
                    sock.close()
                    continue
            protocol = ServerProtocol(max_message_size=server.max_message_size, max_header_size=server.max_header_size)
            conn = Connection(self, sock, address, str(next(_keys)), protocol, tls=server.ssl_context is not None)
            conn._deadline = time.monotonic() + server.handshake_timeout
            self._handshaking.add(conn)
            self._timed.add(conn)
            conn._events = READ
            self._selector.register(sock, READ, conn)
            if conn._tls_handshake:
                self._tls_handshake(conn)

    def _tls_handshake(self, conn: Connection) -> None:
        try:
            conn._sock.do_handshake()
        except ssl.SSLWantReadError:
            self._want_write(conn, False)
            return
        except ssl.SSLWantWriteError:
            self._want_write(conn, True)
            return
        except (ssl.SSLError, OSError) as exc:
            log.info("%s: TLS handshake failed: %s", conn.key, exc)
            self._release(conn)
            return
        conn._tls_handshake = False
        self._want_write(conn, False)
        self._on_readable(conn)  # the request may already sit in TLS buffers

    # -- reading ------------------------------------------------------------------------------

    def _on_readable(self, conn: Connection) -> None:
        if conn._tls_handshake:
            self._tls_handshake(conn)
            return
        data = self._recv(conn)
        if data is None:
            return
        if not data:
            self._on_eof(conn)
            return
        conn.last_seen = time.monotonic()
        with conn._lock:
            conn._protocol.receive_data(data)
        del data
        self._process(conn)

    def _recv(self, conn: Connection) -> bytes | None:
        """Read what is there: bytes, b"" at EOF, None when nothing yet."""
        sock = conn._sock
        try:
            data = sock.recv(READ_SIZE)
            if conn._tls and data:
                while sock.pending():  # decrypted bytes select() cannot see
                    data += sock.recv(READ_SIZE)
            return data
        except (BlockingIOError, InterruptedError, ssl.SSLWantReadError):
            return None
        except ssl.SSLWantWriteError:  # renegotiation: read again once writable
            conn._read_wants_write = True
            self._want_write(conn, True)
            return None
        except OSError as exc:
            log.info("%s: read failed: %s", conn.key, exc)
            return b""

    def _process(self, conn: Connection) -> None:
        """Hand the connection's events to their handlers, in order, until
        the bytes run out or its handler backlog pauses it."""
        protocol = conn._protocol
        dispatch = self.dispatcher.submit
        while not conn._paused:
            with conn._lock:
                event = protocol.next_event()
            if event is None:
                break
            kind = type(event)
            if kind is TextMessage or kind is BinaryMessage:
                if conn.resource.on_message is not None:
                    dispatch(conn, conn.resource.on_message, conn, event.data)
            elif kind is CloseReceived:
                dispatch(conn, conn._acknowledge_close)
            elif kind is ConnectionFailed:
                log.info("%s: failing the connection with %d: %s", conn.key, event.error.close_code, event.error)
                if conn.resource.on_error is not None:
                    dispatch(conn, conn.resource.on_error, conn, event.error)
                dispatch(conn, conn._fail, event.error)
            elif kind is Ping:  # its pong counts against the mark: a peer that pings and never reads
                if protocol.outbox.size > self.max_queue and protocol.state is OPEN:
                    with conn._lock:
                        conn._overflow()
            elif kind is Pong:
                conn._on_pong(event.payload)
            elif kind is RequestReceived:
                self._answer(conn, event.request)
            elif kind is RequestRefused:
                self._log_refusal(conn, event.error)
        if conn._paused:
            self._set_events(conn)
        if protocol.outbox.size:
            self.flush_soon(conn)

    def _on_eof(self, conn: Connection) -> None:
        state = conn._protocol.state
        if conn.resource is not None and state in (OPEN, CLOSING) and not conn._protocol.close_received:
            log.info("%s: connection lost without a close frame", conn.key)
        self._release(conn)

    # -- answering the request ---------------------------------------------------------------

    def _answer(self, conn: Connection, request) -> None:
        """Route the request: upgrade it, refuse it, or serve a file."""
        server = self.server
        self._handshaking.discard(conn)
        resource = server.route(request.path)
        try:
            if resource is None:
                if request.is_upgrade:
                    raise HandshakeError(404, "no WebSocket endpoint at this path")
                with conn._lock:
                    conn._protocol.respond(server.file_response(request))
                log.debug("%s: %s %s", conn.key, request.method, quoted(request.target))
                return
            if len(self.connections) >= server.max_connections:
                raise HandshakeError(503, "too many connections", (("Retry-After", "5"),))
            accepted = server.negotiate(request, resource)
        except HandshakeError as error:
            with conn._lock:
                conn._protocol.respond(server.error_response(error, request))
            self._log_refusal(conn, error, request)
            return
        conn.resource = resource
        conn.subprotocol = accepted.subprotocol
        conn._head = request.raw
        with conn._lock:
            conn._protocol.accept(accepted.response(), rsv=accepted.rsv)
        conn._deadline = None
        self._timed.discard(conn)
        with self.map_lock:
            self.connections[conn.key] = conn
        log.info("%s: open %s from %s%s", conn.key, quoted(request.path), _address(conn.remote_address),
                 f" ({conn.subprotocol})" if conn.subprotocol else "")
        if resource.on_open is not None:
            self.dispatcher.submit(conn, resource.on_open, conn)

    def _log_refusal(self, conn: Connection, error: HandshakeError, request=None) -> None:
        target = f" {request.method} {quoted(request.target)}" if request is not None else ""
        log.info("%s: refused %s%s: %d %s", conn.key, _address(conn.remote_address), target, error.status,
                 quoted(error.reason))

    # -- writing --------------------------------------------------------------------------------

    def _on_writable(self, conn: Connection) -> None:
        if conn._tls_handshake:
            self._tls_handshake(conn)
            return
        if conn._read_wants_write:
            conn._read_wants_write = False
            self._on_readable(conn)
        if conn._sock is not None:
            self._flush(conn)

    def _flush(self, conn: Connection) -> None:
        """Write as much of the outbox as the kernel takes, then see where
        the connection's life stands.

        Plain sockets: one ``sendmsg`` for every queued buffer (up to
        ``IOV_MAX``).  TLS writes a record at a time, small buffers joined.
        """
        protocol = conn._protocol
        outbox = protocol.outbox
        sock = conn._sock
        failed = None
        with conn._lock:
            while outbox.size:
                try:
                    if conn._tls:
                        data = outbox.tls_chunk()
                        sent = sock.send(data)
                        complete = sent == len(data)
                    else:
                        buffers = outbox.pending(IOV_MAX)
                        sent = sock.sendmsg(buffers)
                        complete = len(buffers) < IOV_MAX and sent == outbox.size or sent == sum(map(len, buffers))
                except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                    break
                except OSError as exc:
                    failed = exc
                    break
                outbox.consume(sent)
                if not complete:
                    break
            if conn._room is not None:
                conn._room.notify_all()
            state = protocol.state
        if failed is not None:
            log.info("%s: write failed: %s", conn.key, failed)
            self._release(conn)
            return
        self._want_write(conn, bool(outbox.size))
        if state is OPEN or state is CONNECTING:
            return
        if not conn._ending:  # the protocol left OPEN: the close deadline starts
            conn._ending = True
            conn._deadline = time.monotonic() + self.server.close_timeout
            self._timed.add(conn)
        if state is CLOSED and not outbox.size and not conn._lingering:
            self._linger(conn)

    def _linger(self, conn: Connection) -> None:
        """All is written: shut our write side and wait (until the deadline)
        for the peer's EOF, so that closing never resets the connection with
        our last bytes still in flight."""
        conn._lingering = True
        self._forget(conn)
        try:  # the plain TCP shutdown, also under TLS (no close_notify)
            socket.socket.shutdown(conn._sock, socket.SHUT_WR)
        except OSError:
            self._release(conn)

    def _want_write(self, conn: Connection, flag: bool) -> None:
        events = conn._events | WRITE if flag else conn._events & ~WRITE
        if events != conn._events:
            conn._events = events
            self._set_events(conn)

    def _set_events(self, conn: Connection) -> None:
        """Tell the selector what the connection waits for: reading unless
        paused, writing while the kernel pushes back."""
        events = (conn._events & WRITE) | (0 if conn._paused else READ)
        registered = self._selector.get_map().get(conn._sock)
        conn._events = events
        if not events:
            if registered is not None:
                self._selector.unregister(conn._sock)
        elif registered is None:
            self._selector.register(conn._sock, events, conn)
        elif registered.events != events:
            self._selector.modify(conn._sock, events, conn)

    # -- deadlines and the end -------------------------------------------------------------------

    def _check_deadlines(self, now: float) -> None:
        for conn in list(self._timed):
            if conn._sock is None:
                self._timed.discard(conn)
            elif conn._deadline is not None and now >= conn._deadline:
                if conn._protocol.state is CONNECTING:
                    log.info("%s: handshake timeout for %s", conn.key, _address(conn.remote_address))
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
        if self._selector.get_map().get(sock) is not None:
            self._selector.unregister(sock)
        sock.close()
        self._handshaking.discard(conn)
        self._timed.discard(conn)
        self._forget(conn)
        if closed is not None:
            closed.set()
        if conn.resource is not None:
            log.info("%s: closed (%s)", conn.key, conn._describe_close())
            if conn.resource.on_close is not None:
                self.dispatcher.submit(conn, conn.resource.on_close, conn, conn.close_code, conn.close_reason)

    def _begin_shutdown(self) -> None:
        log.info("shutting down")
        if not self._accept_resume:
            self._selector.unregister(self._listener)
        self._listener.close()
        for conn in list(self._handshaking):
            self._release(conn)
        for conn in self.snapshot():
            conn.close(1001, "server shutting down")

    def _all_gone(self) -> bool:
        """Whether every connection has said its last word (shutdown may end)."""
        if self._dirty or self._handshaking or self.connections:
            return False
        return all(conn._lingering for conn in self._timed)

    def _release_all(self) -> None:
        self.pinger.stop()
        with self.map_lock:
            remaining = list(self.connections.values())
        for conn in remaining + list(self._timed) + list(self._handshaking) + list(self._dirty):
            self._release(conn)
        self.dispatcher.shutdown()
        if self._listener.fileno() >= 0:
            self._listener.close()
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()
        self.stopped.set()
        log.info("stopped")


def _address(address) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{address[0]}:{address[1]}"
    return str(address)
