"""The public handle of one client connection.

Handlers and other threads hold a ``Connection``: ``send``, ``ping`` and
``close`` are safe from any thread.  Each takes the connection's lock, asks
the protocol to queue its frame (the protocol refuses anything after a close),
and asks the loop to flush.  The underscored slots belong to the loop and the
dispatcher; nothing outside wschat should touch them.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Iterable

from .errors import ConnectionClosed, SendTimeout, WebSocketError
from .frames import CloseCode
from .handshake import Request, parse_request
from .logsafe import quoted
from .outbound import BUFFER_OVERHEAD, COST_PER_BYTE_AT_MOST, PreparedMessage
from .protocol import OPEN, ServerProtocol, State

if TYPE_CHECKING:
    from .loop import Loop
    from .resources import Resource
    from .transport import TLS

log = logging.getLogger("wschat")


class Connection:
    """One client connection: what handlers and other threads use.

    ``context`` is free for the application's own per-connection state.
    ``client_address`` is the client's IP address: the peer's, or behind a
    trusted proxy the one it forwarded (see ``Server.forwarded_allow_ips``).
    ``latency`` is the round-trip time of the last answered keepalive ping,
    in seconds (None until one was answered).  ``user`` is who the
    resource's ``authorize`` hook said the client is (None: anonymous).
    """

    __slots__ = (
        "key", "remote_address", "client_address", "resource", "subprotocol", "user", "context", "last_seen", "latency",
        "_loop", "_protocol", "_lock", "_room", "_closed", "_head",
        # the loop's: socket, deadline, selector events, stages of the end, bytes held for the budget
        "_sock", "_tls", "_deadline", "_events", "_ending", "_lingering", "_held",
        # the dispatcher's: handler calls waiting, one running, reading paused
        "_tasks", "_running", "_paused",
    )

    def __init__(self, loop: Loop, sock, address, key: str, protocol: ServerProtocol, *, tls: TLS | None = None):
        self.key = key
        self.remote_address = address
        self.client_address: str = address[0] if isinstance(address, tuple) else str(address)
        self.resource: Resource | None = None
        self.subprotocol: str | None = None
        self.user: object = None
        self.context = None
        self.last_seen = time.monotonic()
        self.latency: float | None = None
        self._loop = loop
        self._protocol = protocol
        self._lock = threading.Lock()
        self._room: threading.Condition | None = None  # made when a sender must wait for room
        self._closed: threading.Event | None = None  # made when someone waits for the end
        self._head = b""  # the raw request head, once upgraded
        self._sock = sock
        self._tls = tls
        self._deadline: float | None = None
        self._events = 0
        self._ending = False  # the close deadline is set
        self._lingering = False  # our write side is shut; waiting for the peer's EOF
        self._held = 0  # what its protocol held when the budget last counted it
        self._tasks = None
        self._running = False
        self._paused = False

    def __repr__(self) -> str:
        return f"<Connection {self.key} {self.remote_address} {self.state.name.lower()}>"

    # -- what it is ------------------------------------------------------------------

    @property
    def request(self) -> Request | None:
        """The upgrade request (parsed again from the raw head at each access)."""
        return parse_request(self._head) if self._head else None

    @property
    def target(self) -> str | None:
        """The request target, path and query (from the request line alone)."""
        return self._head.split(b" ", 2)[1].decode("ascii") if self._head else None

    @property
    def path(self) -> str | None:
        """The request path, without the query."""
        target = self.target
        return target.split("?", 1)[0] if target else None

    @property
    def headers(self):
        """The request headers (an ``email.message.Message``; parsed at each access)."""
        request = self.request
        return request.headers if request else None

    @property
    def compression(self) -> str | None:
        """The permessage-deflate parameters agreed on (as answered), or None."""
        deflate = self._protocol.deflate
        return deflate.response if deflate is not None else None

    @property
    def state(self) -> State:
        return self._protocol.state

    @property
    def is_open(self) -> bool:
        return self._protocol.state is OPEN

    @property
    def queued(self) -> int:
        """What the outbound queue holds, in bytes: its frames and the
        overhead of their buffers, as ``max_queue`` counts it.  Read under
        the lock: the loop thread may be writing the queue meanwhile."""
        with self._lock:
            return self._protocol.outbox.cost

    @property
    def close_code(self) -> int:
        """The first close code received; else the one sent; else 1006."""
        return self._protocol.close_code

    @property
    def close_reason(self) -> str:
        return self._protocol.close_reason

    # -- what it does ----------------------------------------------------------------

    def send(self, message: str | bytes | PreparedMessage, timeout: float | None = None) -> None:
        """Send a text (``str``), binary (``bytes``) or prepared message.

        Past the outbound mark (``Server.max_queue``), a sender on any thread
        but the loop's waits for room, up to ``timeout`` (the server's
        ``send_timeout`` by default), then raises ``SendTimeout``; on the loop
        thread, which must never block, the client is closed as too slow.
        Raises ``ConnectionClosed`` once the connection is closing.
        """
        prepared = message if isinstance(message, PreparedMessage) else PreparedMessage(message)
        with self._lock:
            parts, size = prepared.frame_for(self._protocol.deflate)
            self._make_room(size + BUFFER_OVERHEAD * len(parts), timeout)
            self._protocol.send_frame(parts, size)
        self._loop.flush_soon(self, messages=1)

    def ping(self, payload: bytes = b"") -> None:
        """Send a ping (at most 125 bytes); raises ``ConnectionClosed`` once closing."""
        with self._lock:
            self._protocol.ping(payload)
        self._loop.flush_soon(self)

    def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Start the closing handshake; does nothing once it has started."""
        with self._lock:
            if self._protocol.state is not OPEN:
                return
            self._protocol.close(code, reason)
        self._loop.flush_soon(self)

    def wait_closed(self, timeout: float | None = None) -> bool:
        """Block until the connection is gone (True), or ``timeout`` passed (False)."""
        with self._lock:
            if self._sock is None:
                return True
            if self._closed is None:
                self._closed = threading.Event()
            closed = self._closed
        return closed.wait(timeout)

    # -- for the loop and the dispatcher ---------------------------------------------------

    def _make_room(self, cost: int, timeout: float | None) -> None:
        """Wait (lock held) until a frame that costs ``cost`` fits under the
        mark (what the queue holds, counted as ``Outbox.cost`` counts it)."""
        outbox = self._protocol.outbox
        limit = self._loop.max_queue
        if not outbox.size or outbox.cost + cost <= limit or self._protocol.state is not OPEN:
            return
        if self._loop.on_loop_thread():
            self._overflow()
            raise ConnectionClosed("client too slow: closed")
        if self._room is None:
            self._room = threading.Condition(self._lock)
        timeout = self._loop.send_timeout if timeout is None else timeout
        end = time.monotonic() + timeout
        while outbox.size and outbox.cost + cost > limit and self._protocol.state is OPEN:
            remaining = end - time.monotonic()
            if remaining <= 0:
                raise SendTimeout(f"{self.key}: outbound queue still full after {timeout:.1f}s")
            self._room.wait(remaining)

    def _overflow(self) -> None:
        """A client too slow to read (lock held): drop what it has not begun
        to receive and close it with 1008; the close deadline ends it if it
        stays stuck."""
        log.warning("%s: outbound queue over %d bytes, closing slow client", self.key, self._loop.max_queue)
        self._loop.server.metrics.add("slow_clients")
        self._protocol.close(CloseCode.POLICY_VIOLATION, "client too slow", discard=True)
        self._loop.flush_soon(self)

    def _acknowledge_close(self) -> None:
        """Answer the peer's close frame (run in order after earlier handlers)."""
        with self._lock:
            self._protocol.acknowledge_close()
        self._loop.flush_soon(self)

    def _fail(self, error: WebSocketError) -> None:
        """Fail the connection with the error's close code (in order, too)."""
        with self._lock:
            self._protocol.fail(error)
        self._loop.flush_soon(self)

    def _on_pong(self, payload: bytes) -> None:
        """A keepalive ping carries its send time: the pong gives the round trip."""
        if len(payload) == 8:
            sent = int.from_bytes(payload, "big") / 1e9
            rtt = time.monotonic() - sent
            if 0 <= rtt < 3600:
                self.latency = rtt

    def _describe_close(self) -> str:
        reason = self._protocol.close_reason
        return f"{self._protocol.close_code}" + (f" {quoted(reason)}" if reason else "")


def queue_for_many(message: PreparedMessage, connections: Iterable[Connection], limit: int) -> list[Connection]:
    """Queue one prepared message for many connections: the hot path of every
    broadcast; returns those it was queued for.  Never blocks: a client over
    the mark ``limit`` is closed as too slow.  For speed it does inline what
    ``ServerProtocol.send_frame`` and ``Outbox.extend`` do: the state test, the
    mark and the append, under each connection's lock."""
    plain_parts, plain_size = message.parts, message.size
    plain_cost = plain_size + BUFFER_OVERHEAD * len(plain_parts)
    agreement = agreed_parts = agreed_size = agreed_cost = None  # the last agreement met: most connections share one
    queued = []
    for conn in connections:
        protocol = conn._protocol
        outbox = protocol.outbox
        deflate = protocol.deflate
        if deflate is None:
            parts, size, cost = plain_parts, plain_size, plain_cost
        elif deflate is agreement:
            parts, size, cost = agreed_parts, agreed_size, agreed_cost
        else:  # compressed once per agreement, not once per recipient
            parts, size = agreed_parts, agreed_size = message.frame_for(deflate)
            cost = agreed_cost = size + BUFFER_OVERHEAD * len(parts)
            agreement = deflate
        with conn._lock:
            if protocol.state is not OPEN:
                continue
            queued_size = outbox.size  # a queue far under the mark is not counted buffer by buffer
            if queued_size and (queued_size + size) * COST_PER_BYTE_AT_MOST > limit and outbox.cost + cost > limit:
                conn._overflow()
                continue
            outbox.buffers += parts
            outbox.size = queued_size + size
        queued.append(conn)
    return queued
