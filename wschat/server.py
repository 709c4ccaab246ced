"""The I/O layer: a selectors event loop around the sans-I/O protocol.

Threading model (see DESIGN.md):

* The loop thread owns every socket: only it accepts, reads, writes and closes.
* Any other thread (the application's, the ping Timer) only appends encoded
  bytes to a connection's outbound queue under that connection's lock, marks
  the connection dirty and wakes the loop through a socketpair.  So ``send``,
  ``broadcast``, ``close`` and ``stop`` are safe from any thread.
* The socket map (key -> open connection) is guarded by one lock; broadcast and
  the ping Timer snapshot it under the lock and work outside it.

The loop writes every dirty connection once per iteration: all the frames
queued for one client since the last iteration leave in one ``sendmsg``.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import selectors
import socket
import ssl
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Sequence

from .errors import ConnectionClosed, HandshakeError, SendTimeout, WebSocketError
from .files import file_response
from .frames import CloseCode, Opcode, encode_frame, encode_frame_parts
from .handshake import (
    DEFAULT_MAX_HEADER_SIZE,
    Extension,
    Request,
    build_error_response,
    find_head_end,
    negotiate,
    parse_request,
)
from .protocol import (
    DEFAULT_MAX_MESSAGE_SIZE,
    BinaryMessage,
    CloseReceived,
    ConnectionFailed,
    Protocol,
    State,
    TextMessage,
)

log = logging.getLogger("wschat")

READ_SIZE = 256 * 1024
ACCEPT_PAUSE = 0.5  # seconds without accepting after running out of descriptors
RESOURCE_ERRORS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
IOV_MAX = 1024  # buffers per sendmsg call
PING_FRAME = encode_frame(Opcode.PING)
STATE_OPEN = State.OPEN

# Connection phases, as the loop sees them.
TLS_HANDSHAKE = "tls"
HTTP = "http"  # reading the request head
OPEN = "open"  # WebSocket frames flow
DRAINING = "draining"  # last bytes sent, write side shut down, waiting for the peer's EOF
CLOSED = "closed"


class Resource:
    """A WebSocket endpoint: a path and the handlers of its connections.

    Handlers (each optional) mirror restbed's: ``on_open(conn)``,
    ``on_message(conn, message)`` with ``str`` or ``bytes``,
    ``on_close(conn, code, reason)`` and ``on_error(conn, exception)``.
    The path also matches its sub-paths: ``/chat`` serves ``/chat/lobby``.
    """

    def __init__(
        self,
        path: str,
        *,
        on_open: Callable | None = None,
        on_message: Callable | None = None,
        on_close: Callable | None = None,
        on_error: Callable | None = None,
        subprotocols: Sequence[str] = (),
    ):
        self.path = path.rstrip("/") or "/"
        self.on_open = on_open
        self.on_message = on_message
        self.on_close = on_close
        self.on_error = on_error
        self.subprotocols = tuple(subprotocols)

    def matches(self, path: str) -> bool:
        return path == self.path or path.startswith(self.path if self.path.endswith("/") else self.path + "/")


class Connection:
    """One client connection: the handle that handlers and other threads use.

    ``send``, ``ping`` and ``close`` may be called from any thread.
    ``context`` is free for the application's own per-connection state.
    """

    __slots__ = (
        "server", "key", "remote_address", "sock", "phase", "resource", "request", "subprotocol",
        "context", "close_code", "close_reason", "last_seen", "deadline", "_protocol", "_lock",
        "_drained", "_out", "_out_size", "_head", "_writing", "_partial", "_finish_after_flush",
        "_tasks", "_task_running", "_tls",
    )

    def __init__(self, server: Server, sock: socket.socket, address, key: str):
        self.server = server
        self.key = key
        self.remote_address = address
        self.sock = sock
        self.phase = HTTP
        self.resource: Resource | None = None
        self.request: Request | None = None
        self.subprotocol: str | None = None
        self.context = None
        self.close_code: int | None = None
        self.close_reason = ""
        self.last_seen = time.monotonic()
        self.deadline: float | None = None
        self._protocol: Protocol | None = None
        self._lock = threading.Lock()
        self._drained: threading.Condition | None = None  # made when a sender must wait
        self._out: deque = deque()
        self._out_size = 0
        self._head = bytearray()
        self._writing = False  # registered for write readiness
        self._partial = False  # the first queued buffer is partly sent
        self._finish_after_flush = False
        self._tasks: deque | None = None
        self._task_running = False
        self._tls = isinstance(sock, ssl.SSLSocket)

    def __repr__(self) -> str:
        return f"<Connection {self.key} {self.remote_address} {self.phase}>"

    @property
    def path(self) -> str | None:
        """The request path (without query), once the request arrived."""
        return self.request.path if self.request else None

    @property
    def headers(self):
        """The request headers (an ``email.message.Message``)."""
        return self.request.headers if self.request else None

    @property
    def is_open(self) -> bool:
        protocol = self._protocol
        return self.phase == OPEN and protocol is not None and protocol.state is State.OPEN

    @property
    def queued(self) -> int:
        """Bytes waiting in the outbound queue."""
        return self._out_size

    def send(self, message: str | bytes, timeout: float | None = None) -> None:
        """Send a text (``str``) or binary (``bytes``) message.

        From a thread other than the loop's, a send to a client whose queue is
        over the high-water mark waits for it to drain, up to ``timeout``
        (the server's ``send_timeout`` by default), then raises ``SendTimeout``.
        Raises ``ConnectionClosed`` once the connection is closing.
        """
        with self._lock:
            protocol = self._check_protocol()
            data = protocol.send_text(message) if isinstance(message, str) else protocol.send_binary(message)
        self.server._enqueue(self, data, wait=True, timeout=timeout)

    def ping(self, payload: bytes = b"") -> None:
        with self._lock:
            data = self._check_protocol().send_ping(payload)
        self.server._enqueue(self, data, wait=False)

    def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Start the closing handshake; a no-op when it already started."""
        with self._lock:
            if self._protocol is None or self._protocol.state is not State.OPEN:
                return
            data = self._protocol.send_close(code, reason)
            self.close_code, self.close_reason = code, reason
        self.server._enqueue(self, data, wait=False, force=True, closing=True)

    def _check_protocol(self) -> Protocol:
        if self._protocol is None:
            raise ConnectionClosed("connection is not open")
        return self._protocol


class Server:
    """A WebSocket server on a selectors loop.

    Use ``serve_forever()`` in the calling thread, or ``start()`` for a
    background thread and ``stop()`` (also as a context manager).  Port 0
    picks a free port, readable from ``port`` once bound.

    Limits: ``max_connections`` open WebSockets (503 past it);
    ``handshake_timeout`` for TLS and the request head; ``max_header_size``;
    ``max_message_size`` (1009); ``max_queue`` bytes in one client's outbound
    queue, past which a broadcast closes it with 1008 and ``send`` from
    another thread waits up to ``send_timeout``.  ``ping_interval`` seconds
    between pings (0 for none); a client silent for ``ping_timeout`` seconds
    is closed with 1011.  ``workers`` > 0 runs handlers on a thread pool,
    one at a time per connection and in order.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 1984,
        *,
        ssl_context: ssl.SSLContext | None = None,
        static_dir: str | None = None,
        allowed_origins: Iterable[str] | None = None,
        extensions: Sequence[Extension] = (),
        max_connections: int = 10000,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        max_header_size: int = DEFAULT_MAX_HEADER_SIZE,
        max_queue: int = 16 << 20,
        send_timeout: float = 10.0,
        handshake_timeout: float = 10.0,
        close_timeout: float = 5.0,
        ping_interval: float = 5.0,
        ping_timeout: float | None = 20.0,
        workers: int = 0,
    ):
        self.host = host
        self.requested_port = port
        self.ssl_context = ssl_context
        self.static_dir = static_dir
        self.allowed_origins = list(allowed_origins) if allowed_origins is not None else None
        self.extensions = tuple(extensions)
        self.max_connections = max_connections
        self.max_message_size = max_message_size
        self.max_header_size = max_header_size
        self.max_queue = max_queue
        self.send_timeout = send_timeout
        self.handshake_timeout = handshake_timeout
        self.close_timeout = close_timeout
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.workers = workers
        self.resources: list[Resource] = []

        self._listener: socket.socket | None = None
        self._selector: selectors.BaseSelector | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._connections: dict[str, Connection] = {}  # the socket map: open WebSockets
        self._map_lock = threading.Lock()
        self._dirty: set[Connection] = set()
        self._dirty_lock = threading.Lock()
        self._wake_sent = False
        self._pending: set[Connection] = set()  # handshaking: the loop's own
        self._timed: set[Connection] = set()  # with a deadline: the loop's own
        self._keys = itertools.count(1)
        self._loop_thread: threading.Thread | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._stop_deadline = 0.0
        self._timer: threading.Timer | None = None
        self._timer_lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._accept_resume = 0.0  # when accepting resumes after a pause, 0 when not paused

    # -- configuration -------------------------------------------------------

    def resource(self, path: str, **handlers) -> Resource:
        """Publish a WebSocket endpoint at ``path`` (see ``Resource``)."""
        resource = Resource(path, **handlers)
        self.resources.append(resource)
        self.resources.sort(key=lambda r: len(r.path), reverse=True)  # longest match first
        return resource

    def _route(self, path: str) -> Resource | None:
        return next((r for r in self.resources if r.matches(path)), None)

    # -- life cycle ------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._listener is None:
            return self.requested_port
        return self._listener.getsockname()[1]

    @property
    def url(self) -> str:
        scheme = "wss" if self.ssl_context else "ws"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}"

    def bind(self) -> None:
        """Open the listening socket (done by ``start``; raises OSError when the port is taken)."""
        if self._listener is not None:
            return
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((self.host, self.requested_port))
            listener.listen(1024)
            listener.setblocking(False)
        except OSError:
            listener.close()
            raise
        self._listener = listener
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(listener, selectors.EVENT_READ, None)
        self._selector.register(self._wake_r, selectors.EVENT_READ, self._wake_r)
        if self.workers:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="wschat-handler")

    def start(self) -> Server:
        """Bind and run the loop in a background thread; returns at once.
        Starting a server that runs already does nothing."""
        if self._loop_thread is not None:
            return self
        self.bind()
        self._thread = threading.Thread(target=self.serve_forever, name="wschat-loop", daemon=True)
        self._loop_thread = self._thread
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Run the loop in the calling thread until ``stop()``."""
        self.bind()
        self._loop_thread = threading.current_thread()
        log.info("listening on %s", self.url)
        self._schedule_ping()
        try:
            self._loop()
        finally:
            self._cleanup()

    def stop(self, timeout: float | None = None) -> None:
        """Close every client with 1001, wait up to ``timeout`` for the
        closing handshakes, then release every socket and thread."""
        if self._listener is None or self._stopped.is_set():
            return
        if self._loop_thread is None:  # bound, never served
            self._cleanup()
            return
        timeout = self.close_timeout if timeout is None else timeout
        self._stop_deadline = time.monotonic() + timeout
        self._stopping.set()
        self._cancel_ping()
        self._wake()
        if threading.current_thread() is not self._loop_thread:
            self._stopped.wait(timeout + 5)
            if self._thread is not None:
                self._thread.join(timeout + 5)

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # -- the public, thread-safe API ------------------------------------------

    def connections(self, path: str | None = None) -> list[Connection]:
        """A snapshot of the open connections (of the resource serving ``path``);
        those closing are left out."""
        with self._map_lock:
            snapshot = [conn for conn in self._connections.values() if conn.is_open]
        if path is None:
            return snapshot
        resource = self._route(path)
        return [c for c in snapshot if c.resource is resource]

    def broadcast(self, message: str | bytes, *, path: str | None = None, exclude: Connection | None = None,
                  connections: Iterable[Connection] | None = None) -> int:
        """Send ``message`` to every open connection (of ``path``'s resource,
        or of ``connections``), except ``exclude``.  Never blocks: a client
        whose queue is full is closed with 1008.  Returns the number reached.
        """
        if isinstance(message, str):
            frame = encode_frame_parts(Opcode.TEXT, message.encode("utf-8"))
        else:
            frame = encode_frame_parts(Opcode.BINARY, bytes(message))
        targets = self.connections(path) if connections is None else connections
        return self.send_frame(frame, (c for c in targets if c is not exclude))

    def send_frame(self, frame: bytes | Sequence[bytes], connections: Iterable[Connection]) -> int:
        """Queue one already-encoded frame (bytes, or parts to write in turn)
        for many connections: the hot path of every broadcast.  Never blocks;
        marks them dirty under one lock and wakes the loop once."""
        parts = (frame,) if isinstance(frame, bytes) else tuple(frame)
        size = sum(map(len, parts))
        limit = self.max_queue
        queued = []
        for conn in connections:
            with conn._lock:
                if conn.phase != OPEN or conn._protocol.state is not STATE_OPEN:
                    continue
                if conn._out_size and conn._out_size + size > limit:
                    self._overflow(conn)
                    continue
                conn._out.extend(parts)
                conn._out_size += size
            queued.append(conn)
        if queued:
            with self._dirty_lock:
                self._dirty.update(queued)
            self._wake()
        return len(queued)

    # -- queues and wake-ups ---------------------------------------------------

    def _on_loop(self) -> bool:
        return threading.current_thread() is self._loop_thread

    def _enqueue(self, conn: Connection, data: bytes, *, wait: bool, timeout: float | None = None,
                 force: bool = False, closing: bool = False) -> None:
        """Append ``data`` to one connection's queue and wake the loop.

        Past the high-water mark, a sender on another thread with ``wait``
        waits for room; otherwise the slow client is closed.  ``force``
        (handshake responses, control replies, close frames) skips the mark.
        """
        with conn._lock:
            if conn.phase == CLOSED or conn.phase == DRAINING:
                raise ConnectionClosed("connection is closed")
            if not force and conn._out_size and conn._out_size + len(data) > self.max_queue:
                if wait and not self._on_loop():
                    self._wait_for_room(conn, len(data), self.send_timeout if timeout is None else timeout)
                else:
                    self._overflow(conn)
                    return
            conn._out.append(data)
            conn._out_size += len(data)
            if closing:
                conn.deadline = time.monotonic() + self.close_timeout
        with self._dirty_lock:
            self._dirty.add(conn)
        self._wake()

    def _wait_for_room(self, conn: Connection, size: int, timeout: float) -> None:
        """Block (holding ``conn._lock`` via its condition) until the queue has room."""
        if conn._drained is None:
            conn._drained = threading.Condition(conn._lock)
        end = time.monotonic() + timeout
        while conn._out_size and conn._out_size + size > self.max_queue:
            if conn.phase in (CLOSED, DRAINING):
                raise ConnectionClosed("connection closed while waiting to send")
            remaining = end - time.monotonic()
            if remaining <= 0:
                raise SendTimeout(f"{conn.key}: outbound queue still full after {timeout:.1f}s")
            conn._drained.wait(remaining)

    def _overflow(self, conn: Connection) -> None:
        """A client too slow to read: drop what it has not begun to receive,
        queue a close 1008, and let the close deadline abort it if it stays stuck.
        Called with ``conn._lock`` held."""
        log.warning("%s: outbound queue over %d bytes, closing slow client", conn.key, self.max_queue)
        keep = conn._out[0] if conn._partial else None
        conn._out.clear()
        conn._out_size = 0
        if keep is not None:
            conn._out.append(keep)
            conn._out_size = len(keep)
        if conn._protocol is not None and conn._protocol.state is State.OPEN:
            data = conn._protocol.send_close(CloseCode.POLICY_VIOLATION, "client too slow")
            conn._out.append(data)
            conn._out_size += len(data)
            conn.close_code, conn.close_reason = CloseCode.POLICY_VIOLATION, "client too slow"
        conn.deadline = time.monotonic() + self.close_timeout
        with self._dirty_lock:
            self._dirty.add(conn)

    def _wake(self) -> None:
        if self._on_loop():
            return  # the loop flushes dirty connections before it sleeps
        with self._dirty_lock:
            if self._wake_sent or not self._dirty and not self._stopping.is_set():
                return
            self._wake_sent = True
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError, AttributeError):
            pass  # a byte is already waiting, or the server is gone

    # -- the loop --------------------------------------------------------------

    def _loop(self) -> None:
        selector = self._selector
        next_check = 0.0
        stopping_begun = False
        while True:
            for key, events in selector.select(0.25 if self._timed or self._pending else 1.0):
                conn = key.data
                if conn is None:
                    self._accept()
                elif conn is self._wake_r:
                    self._drain_wake()
                else:
                    try:
                        if events & selectors.EVENT_WRITE:
                            self._on_writable(conn)
                        if events & selectors.EVENT_READ and conn.phase != CLOSED:
                            self._on_readable(conn)
                    except Exception as exc:  # a bug must not take the loop down
                        log.exception("%s: unexpected error", conn.key)
                        self._abort(conn, CloseCode.INTERNAL_ERROR, str(exc))
            self._flush_dirty()
            now = time.monotonic()
            if now >= next_check:
                self._check_deadlines(now)
                next_check = now + 0.2
                if self._accept_resume and now >= self._accept_resume and not self._stopping.is_set():
                    self._accept_resume = 0.0
                    self._selector.register(self._listener, selectors.EVENT_READ, None)
            if self._stopping.is_set():
                if not stopping_begun:
                    stopping_begun = True
                    self._begin_shutdown()
                    self._flush_dirty()
                if now >= self._stop_deadline or self._only_draining():
                    return

    def _only_draining(self) -> bool:
        """Whether every connection left has said its last word (shutdown may end)."""
        with self._dirty_lock:
            if self._dirty:
                return False
        return not self._pending and not self._connections and all(c.phase == DRAINING for c in self._timed)

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def _flush_dirty(self) -> None:
        with self._dirty_lock:
            dirty, self._dirty = self._dirty, set()
            self._wake_sent = False
        for conn in dirty:
            if conn.phase != CLOSED:
                self._flush(conn)

    def _accept(self) -> None:
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
                else:  # the client left before we took it (ECONNABORTED and the like)
                    log.debug("accept failed: %s", exc)
                return
            if len(self._pending) >= self.max_connections:
                log.warning("too many connections in handshake; dropping %s", address)
                sock.close()
                continue
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.ssl_context is not None:
                try:
                    sock = self.ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
                except (OSError, ValueError) as exc:
                    log.warning("TLS setup failed for %s: %s", address, exc)
                    sock.close()
                    continue
            conn = Connection(self, sock, address, f"{next(self._keys)}")
            conn.phase = TLS_HANDSHAKE if self.ssl_context is not None else HTTP
            conn.deadline = time.monotonic() + self.handshake_timeout
            self._pending.add(conn)
            self._timed.add(conn)
            self._selector.register(sock, selectors.EVENT_READ, conn)
            if conn.phase == TLS_HANDSHAKE:
                self._tls_handshake(conn)

    def _tls_handshake(self, conn: Connection) -> None:
        try:
            conn.sock.do_handshake()
        except ssl.SSLWantReadError:
            self._want_write(conn, False)
            return
        except ssl.SSLWantWriteError:
            self._want_write(conn, True)
            return
        except (ssl.SSLError, OSError) as exc:
            log.info("%s: TLS handshake failed: %s", conn.key, exc)
            self._teardown(conn)
            return
        conn.phase = HTTP
        self._want_write(conn, False)
        self._on_readable(conn)  # the request may already sit in TLS buffers

    def _want_write(self, conn: Connection, flag: bool) -> None:
        if conn._writing != flag:
            conn._writing = flag
            events = selectors.EVENT_READ | selectors.EVENT_WRITE if flag else selectors.EVENT_READ
            self._selector.modify(conn.sock, events, conn)

    def _on_writable(self, conn: Connection) -> None:
        if conn.phase == TLS_HANDSHAKE:
            self._tls_handshake(conn)
        else:
            self._flush(conn)

    def _recv(self, conn: Connection) -> bytes | None:
        """Read what is there: bytes, b"" at EOF, None when nothing yet."""
        sock = conn.sock
        try:
            data = sock.recv(READ_SIZE)
            if conn._tls and data:
                while sock.pending():  # decrypted bytes select() cannot see
                    data += sock.recv(READ_SIZE)
            return data
        except (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return None
        except (ConnectionError, ssl.SSLError, OSError) as exc:
            log.info("%s: read failed: %s", conn.key, exc)
            return b""

    def _on_readable(self, conn: Connection) -> None:
        if conn.phase == TLS_HANDSHAKE:
            self._tls_handshake(conn)
            return
        data = self._recv(conn)
        if data is None:
            return
        if not data:
            self._on_eof(conn)
            return
        conn.last_seen = time.monotonic()
        if conn.phase == OPEN:
            self._on_frames(conn, data)
        elif conn.phase == HTTP:
            self._on_request_bytes(conn, data)
        # DRAINING: discard whatever the peer still sends, until its EOF

    def _on_eof(self, conn: Connection) -> None:
        if conn.phase == OPEN and conn.close_code is None:
            conn.close_code, conn.close_reason = CloseCode.ABNORMAL, "connection lost"
            log.info("%s: connection lost without a close frame", conn.key)
        self._teardown(conn)  # which tells the protocol, too

    # -- HTTP: the upgrade, or a file --------------------------------------------

    def _on_request_bytes(self, conn: Connection, data: bytes) -> None:
        conn._head += data
        try:
            end = find_head_end(conn._head, self.max_header_size)
            if end is None:
                return
            request = parse_request(bytes(conn._head[:end]))
        except HandshakeError as error:
            self._refuse(conn, error)
            return
        rest = bytes(conn._head[end:])
        conn._head = bytearray()
        conn.request = request
        self._pending.discard(conn)
        resource = self._route(request.path)
        if resource is None:
            if request.is_upgrade:
                self._refuse(conn, HandshakeError(404, f"no WebSocket endpoint at {request.path}"))
            else:
                self._respond(conn, file_response(self.static_dir, request))
                log.debug("%s: %s %s", conn.key, request.method, request.target)
            return
        try:
            if len(self._connections) >= self.max_connections:
                raise HandshakeError(503, "too many connections", (("Retry-After", "5"),))
            accepted = negotiate(
                request,
                allowed_origins=self.allowed_origins,
                subprotocols=resource.subprotocols,
                extensions=self.extensions,
            )
        except HandshakeError as error:
            self._refuse(conn, error)
            return
        conn.resource = resource
        conn.subprotocol = accepted.subprotocol
        conn._protocol = Protocol(max_message_size=self.max_message_size, rsv=accepted.rsv)
        conn.phase = OPEN
        conn.deadline = None
        self._timed.discard(conn)
        self._enqueue(conn, accepted.response(), wait=False, force=True)
        with self._map_lock:
            self._connections[conn.key] = conn
        log.info("%s: open %s from %s%s", conn.key, request.path, _address(conn.remote_address),
                 f" ({conn.subprotocol})" if conn.subprotocol else "")
        self._dispatch(conn, resource.on_open, conn)
        if rest:  # frames sent right behind the request
            self._on_frames(conn, rest)

    def _refuse(self, conn: Connection, error: HandshakeError) -> None:
        log.info("%s: refused %s: %s %s", conn.key, _address(conn.remote_address), error.status, error.reason)
        self._pending.discard(conn)
        self._respond(conn, build_error_response(error))

    def _respond(self, conn: Connection, response: bytes) -> None:
        """Send a plain HTTP response, then close."""
        self._enqueue(conn, response, wait=False, force=True)
        self._finish(conn)

    # -- WebSocket frames ----------------------------------------------------------

    def _on_frames(self, conn: Connection, data: bytes) -> None:
        protocol = conn._protocol
        with conn._lock:
            events = protocol.receive_data(data)
            replies = protocol.data_to_send()
        if replies:  # pongs count against the mark: a ping flood is a slow client
            self._enqueue(conn, replies, wait=False)
        resource = conn.resource
        for event in events:
            kind = type(event)
            if kind is TextMessage or kind is BinaryMessage:
                self._dispatch(conn, resource.on_message, conn, event.data)
            elif kind is CloseReceived:
                if conn.close_code is None:  # the peer began the closing handshake
                    conn.close_code, conn.close_reason = event.code, event.reason
                self._finish(conn)
            elif kind is ConnectionFailed:
                error = event.error
                log.warning("%s: failing connection with %d: %s", conn.key, error.close_code, error)
                conn.close_code, conn.close_reason = error.close_code, str(error)
                self._dispatch(conn, resource.on_error, conn, error)
                self._finish(conn)

    def _finish(self, conn: Connection) -> None:
        """The connection is done: flush what is queued, then close the TCP
        connection, within ``close_timeout`` from now."""
        conn._finish_after_flush = True
        conn.deadline = time.monotonic() + self.close_timeout
        self._timed.add(conn)
        with self._dirty_lock:
            self._dirty.add(conn)

    # -- writing -------------------------------------------------------------------

    def _flush(self, conn: Connection) -> None:
        """Write as much of the queue as the kernel takes.

        Plain sockets: one ``sendmsg`` for every queued frame.  TLS sockets
        write a record at a time, so they loop, small frames joined first.
        """
        failed = False
        with conn._lock:
            out = conn._out
            while out:
                try:
                    if conn._tls:
                        data = self._tls_head(conn)
                        sent = conn.sock.send(data)
                        attempted = len(data)
                    else:
                        buffers = out if len(out) <= IOV_MAX else list(itertools.islice(out, IOV_MAX))
                        sent = conn.sock.sendmsg(buffers)
                        attempted = -1  # one call per flush
                except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                    if conn._tls:
                        conn._partial = True  # OpenSSL must retry this very buffer: keep it
                    break
                except OSError as exc:
                    log.info("%s: write failed: %s", conn.key, exc)
                    failed = True
                    break
                self._consume(conn, sent)
                if sent != attempted:
                    break
            if conn._drained is not None:
                conn._drained.notify_all()
            remaining = conn._out_size
            if conn.deadline is not None:
                self._timed.add(conn)
        if failed:
            self._abort(conn, CloseCode.ABNORMAL, "write failed")
        elif remaining:
            self._want_write(conn, True)
        else:
            self._want_write(conn, False)
            if conn._finish_after_flush and conn.phase != DRAINING:
                self._drain(conn)

    @staticmethod
    def _tls_head(conn: Connection) -> bytes:
        """The first queued buffer, with small frames behind it joined in (up
        to 64 KiB).  It stays at the front, so a TLS write retried after
        SSLWantWriteError starts with the same bytes, as OpenSSL requires."""
        out = conn._out
        if len(out) > 1 and len(out[0]) < 65536:
            parts = [out.popleft()]
            total = len(parts[0])
            while out and total + len(out[0]) <= 65536:
                total += len(out[0])
                parts.append(out.popleft())
            out.appendleft(b"".join(parts))
        return out[0]

    @staticmethod
    def _consume(conn: Connection, sent: int) -> None:
        """Drop ``sent`` bytes from the front of the queue (lock held)."""
        out = conn._out
        conn._out_size -= sent
        conn._partial = False
        if not conn._out_size:  # the common case: the kernel took it all
            out.clear()
            return
        while sent:
            head = out[0]
            if len(head) <= sent:
                sent -= len(head)
                out.popleft()
            else:
                out[0] = memoryview(head)[sent:]
                conn._partial = True
                return

    def _drain(self, conn: Connection) -> None:
        """All is sent: shut down our side and wait (until the deadline) for the
        peer's EOF, so that closing never resets a connection with our last
        bytes still in flight."""
        with conn._lock:
            conn.phase = DRAINING
            if conn._drained is not None:
                conn._drained.notify_all()
        try:  # the plain TCP shutdown, also under TLS (no close_notify wait)
            socket.socket.shutdown(conn.sock, socket.SHUT_WR)
        except OSError:
            self._teardown(conn)
            return
        self._remove_from_map(conn)  # _finish already set the deadline for the peer's EOF

    # -- deadlines and teardown ------------------------------------------------------

    def _check_deadlines(self, now: float) -> None:
        for conn in list(self._timed):
            if conn.phase == CLOSED:
                self._timed.discard(conn)
            elif conn.deadline is not None and now >= conn.deadline:
                if conn.phase in (HTTP, TLS_HANDSHAKE):
                    log.info("%s: handshake timeout for %s", conn.key, _address(conn.remote_address))
                elif conn.phase == OPEN:
                    log.info("%s: closing handshake timed out", conn.key)
                self._teardown(conn)

    def _abort(self, conn: Connection, code: int, reason: str) -> None:
        if conn.close_code is None:
            conn.close_code, conn.close_reason = code, reason
        self._teardown(conn)

    def _remove_from_map(self, conn: Connection) -> None:
        with self._map_lock:
            self._connections.pop(conn.key, None)

    def _teardown(self, conn: Connection) -> None:
        """Close the socket and forget the connection; calls on_close once."""
        if conn.phase == CLOSED:
            return
        was_websocket = conn.resource is not None
        with conn._lock:
            conn.phase = CLOSED
            conn._out.clear()
            conn._out_size = 0
            if conn._drained is not None:
                conn._drained.notify_all()
            if conn._protocol is not None:
                conn._protocol.receive_eof()
        try:
            self._selector.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()
        self._pending.discard(conn)
        self._timed.discard(conn)
        self._remove_from_map(conn)
        if was_websocket:
            code = conn.close_code if conn.close_code is not None else CloseCode.ABNORMAL
            log.info("%s: closed %s (%d%s)", conn.key, conn.path, code, f" {conn.close_reason}" if conn.close_reason else "")
            self._dispatch(conn, conn.resource.on_close, conn, code, conn.close_reason)

    # -- handlers --------------------------------------------------------------------

    def _dispatch(self, conn: Connection, handler: Callable | None, *args) -> None:
        if handler is None:
            return
        if self._pool is None:
            self._call(conn, handler, args)
            return
        with conn._lock:
            if conn._tasks is None:
                conn._tasks = deque()
            conn._tasks.append((handler, args))
            if conn._task_running:
                return
            conn._task_running = True
        try:
            self._pool.submit(self._run_tasks, conn)
        except RuntimeError:  # the pool is shut down: run here instead
            self._run_tasks(conn)

    def _run_tasks(self, conn: Connection) -> None:
        """Run one connection's queued handlers, in order, on a worker thread."""
        while True:
            with conn._lock:
                if not conn._tasks:
                    conn._task_running = False
                    return
                handler, args = conn._tasks.popleft()
            self._call(conn, handler, args)

    def _call(self, conn: Connection, handler: Callable, args: tuple) -> None:
        try:
            handler(*args)
        except ConnectionClosed:
            log.debug("%s: handler sent on a closed connection", conn.key)
        except Exception as exc:
            log.exception("%s: handler %s failed", conn.key, getattr(handler, "__name__", handler))
            on_error = conn.resource.on_error if conn.resource else None
            if on_error is not None and handler is not on_error:
                try:
                    on_error(conn, exc)
                except Exception:
                    log.exception("%s: error handler failed", conn.key)
            conn.close(CloseCode.INTERNAL_ERROR, "internal server error")

    # -- pings -----------------------------------------------------------------------

    def _schedule_ping(self) -> None:
        with self._timer_lock:
            if self.ping_interval <= 0 or self._stopping.is_set():
                return
            self._timer = threading.Timer(self.ping_interval, self._ping_all)
            self._timer.name = "wschat-ping"
            self._timer.daemon = True
            self._timer.start()

    def _cancel_ping(self) -> None:
        with self._timer_lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

    def _ping_all(self) -> None:
        """The Timer's tick: ping every open connection, close the silent ones."""
        try:
            now = time.monotonic()
            alive = []
            for conn in self.connections():
                if self.ping_timeout and now - conn.last_seen > self.ping_timeout:
                    log.warning("%s: no answer for %.0fs, closing", conn.key, now - conn.last_seen)
                    conn.close(CloseCode.INTERNAL_ERROR, "keepalive ping timeout")
                else:
                    alive.append(conn)
            self.send_frame(PING_FRAME, alive)
        except Exception:
            log.exception("ping scheduler failed")
        finally:
            self._schedule_ping()

    # -- shutdown --------------------------------------------------------------------

    def _begin_shutdown(self) -> None:
        log.info("shutting down")
        if not self._accept_resume:
            self._selector.unregister(self._listener)
        self._listener.close()
        for conn in list(self._pending):
            self._teardown(conn)
        for conn in self.connections():
            conn.close(CloseCode.GOING_AWAY, "server shutting down")

    def _cleanup(self) -> None:
        self._cancel_ping()
        with self._map_lock:
            remaining = list(self._connections.values())
        for conn in remaining + list(self._timed) + list(self._pending) + list(self._dirty):
            self._abort(conn, CloseCode.GOING_AWAY, "server shutting down")
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        if self._listener.fileno() >= 0:
            self._listener.close()
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()
        self._stopped.set()
        log.info("stopped")


def _address(address) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{address[0]}:{address[1]}"
    return str(address)
