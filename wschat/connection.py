"""The public handle of one client connection.

Handlers and other threads hold a ``Connection``: ``send``, ``ping`` and
``close`` are safe from any thread.  Each takes the connection's lock, asks
the protocol to queue its frame (the protocol refuses anything after a close),
and hands the connection to the loop to be written (``Handoff``).  What the
server keeps besides about its socket is the connection's ``link``.
"""

from __future__ import annotations

import logging
from email.message import Message
import threading
import time
from typing import TYPE_CHECKING, Iterable

from .errors import ConnectionClosed, SendTimeout
from .frames import CloseCode
from .handoff import Handoff
from .handshake import Request, parse_request
from .link import Link
from .metrics import Metrics
from .outbound import BUFFER_OVERHEAD, COST_PER_BYTE_AT_MOST, Compression, PreparedMessage
from .protocol import OPEN, State
from .settings import Settings

if TYPE_CHECKING:
    from .resources import Resource

log = logging.getLogger("wschat")


class Connection:
    """One client connection: what handlers and other threads use.

    ``context`` is free for the application's own per-connection state.
    ``client_address`` is the client's IP address: the peer's, or behind a
    trusted proxy the one it forwarded (see ``Server.forwarded_allow_ips``).
    ``latency`` is the round-trip time of the last answered keepalive ping,
    in seconds (None until one was answered).  ``user`` is who the
    resource's ``authorize`` hook said the client is (None: anonymous).
    ``link`` is the server's own record of the socket: not for applications.
    """

    __slots__ = (
        "key", "remote_address", "client_address", "resource", "subprotocol", "user", "context", "last_seen", "latency",
        "link", "_handoff", "_settings", "_metrics",
    )

    def __init__(self, key: str, link: Link, address: object, handoff: Handoff[Connection], settings: Settings,
                 metrics: Metrics):
        self.key = key
        self.remote_address = address
        self.client_address: str = address[0] if isinstance(address, tuple) else str(address)
        self.resource: Resource | None = None
        self.subprotocol: str | None = None
        self.user: object = None
        self.context: object = None
        self.last_seen = time.monotonic()
        self.latency: float | None = None
        self.link = link
        self._handoff = handoff
        self._settings = settings
        self._metrics = metrics

    def __repr__(self) -> str:
        return f"<Connection {self.key} {self.remote_address} {self.state.name.lower()}>"

    # -- what it is ------------------------------------------------------------------

    @property
    def request(self) -> Request | None:
        """The upgrade request (parsed again from the raw head at each access)."""
        head = self.link.head
        return parse_request(head) if head else None

    @property
    def target(self) -> str | None:
        """The request target, path and query (from the request line alone)."""
        head = self.link.head
        return head.split(b" ", 2)[1].decode("ascii") if head else None

    @property
    def path(self) -> str | None:
        """The request path, without the query."""
        target = self.target
        return target.split("?", 1)[0] if target else None

    @property
    def headers(self) -> Message | None:
        """The request headers (an ``email.message.Message``; parsed at each access)."""
        request = self.request
        return request.headers if request else None

    @property
    def compression(self) -> str | None:
        """The permessage-deflate parameters agreed on (as answered), or None."""
        deflate = self.link.protocol.deflate
        return deflate.response if deflate is not None else None

    @property
    def state(self) -> State:
        return self.link.protocol.state

    @property
    def is_open(self) -> bool:
        return self.link.protocol.state is OPEN

    @property
    def queued(self) -> int:
        """What the outbound queue holds, in bytes: its frames and the
        overhead of their buffers, as ``max_queue`` counts it.  Read under
        the lock: the loop thread may be writing the queue meanwhile."""
        link = self.link
        with link.lock:
            return link.protocol.outbox.cost

    @property
    def close_code(self) -> int:
        """The first close code received; else the one sent; else 1006."""
        return self.link.protocol.close_code

    @property
    def close_reason(self) -> str:
        return self.link.protocol.close_reason

    # -- what it does ----------------------------------------------------------------

    def send(self, message: str | bytes | PreparedMessage, timeout: float | None = None) -> None:
        """Send a text (``str``), binary (``bytes``) or prepared message.

        Past the outbound mark (``Server.max_queue``), a sender on any thread
        but the loop's waits for space, up to ``timeout`` (the server's
        ``send_timeout`` by default), then raises ``SendTimeout``; on the loop
        thread, which must never block, the client is closed as too slow.
        Raises ``ConnectionClosed`` once the connection is closing.
        """
        prepared = message if isinstance(message, PreparedMessage) else PreparedMessage(message)
        link = self.link
        with link.lock:
            parts, size = prepared.frame_for(link.protocol.deflate)
            self._wait_for_space(size + BUFFER_OVERHEAD * len(parts), timeout)
            link.protocol.send_frame(parts, size)
        self._handoff.mark_dirty((self,), 1)

    def ping(self, payload: bytes = b"") -> None:
        """Send a ping (at most 125 bytes); raises ``ConnectionClosed`` once closing."""
        with self.link.lock:
            self.link.protocol.ping(payload)
        self._handoff.mark_dirty((self,))

    def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Start the closing handshake; does nothing once it has started."""
        link = self.link
        with link.lock:
            if link.protocol.state is not OPEN:
                return
            link.protocol.close(code, reason)
        self._handoff.mark_dirty((self,))

    def wait_closed(self, timeout: float | None = None) -> bool:
        """Block until the connection is gone (True), or ``timeout`` passed (False)."""
        link = self.link
        with link.lock:
            if link.sock is None:
                return True
            if link.gone is None:
                link.gone = threading.Event()
            gone = link.gone
        return gone.wait(timeout)

    def _wait_for_space(self, cost: int, timeout: float | None) -> None:
        """Wait (lock held) until a frame that costs ``cost`` fits under the
        mark (what the queue holds, counted as ``Outbox.cost`` counts it)."""
        link = self.link
        protocol = link.protocol
        outbox = protocol.outbox
        limit = self._settings.max_queue
        if not outbox.size or outbox.cost + cost <= limit or protocol.state is not OPEN:
            return
        if self._handoff.on_loop_thread():
            close_too_slow(self, self._handoff, self._metrics, limit)
            raise ConnectionClosed("client too slow: closed")
        if link.space is None:
            link.space = threading.Condition(link.lock)
        timeout = self._settings.send_timeout if timeout is None else timeout
        end = time.monotonic() + timeout
        while outbox.size and outbox.cost + cost > limit and protocol.state is OPEN:
            remaining = end - time.monotonic()
            if remaining <= 0:
                raise SendTimeout(f"{self.key}: outbound queue still full after {timeout:.1f}s")
            link.space.wait(remaining)


def close_too_slow(conn: Connection, handoff: Handoff[Connection], metrics: Metrics, limit: int) -> None:
    """A client too slow to read (its lock held): drop what it has not begun
    to receive and close it with 1008; the close deadline ends it if it
    stays stuck."""
    log.warning("%s: outbound queue over %d bytes, closing slow client", conn.key, limit)
    metrics.add("slow_clients")
    conn.link.protocol.close(CloseCode.POLICY_VIOLATION, "client too slow", discard=True)
    handoff.mark_dirty((conn,))


def queue_for_many(message: PreparedMessage, connections: Iterable[Connection], limit: int,
                   handoff: Handoff[Connection], metrics: Metrics) -> list[Connection]:
    """Queue one prepared message for many connections: the hot path of every
    broadcast; returns those it was queued for.  Never blocks: a client over
    the mark ``limit`` is closed as too slow.  For speed it does inline what
    ``ServerProtocol.send_frame`` and ``Outbox.extend`` do: the state test, the
    mark and the append, under each connection's lock."""
    plain_parts, plain_size = message.parts, message.size
    plain_cost = plain_size + BUFFER_OVERHEAD * len(plain_parts)
    agreement: Compression | None = None  # the last agreement met: most connections share one
    agreed_parts, agreed_size, agreed_cost = plain_parts, plain_size, plain_cost
    queued = []
    for conn in connections:
        link = conn.link
        protocol = link.protocol
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
        with link.lock:
            if protocol.state is not OPEN:
                continue
            queued_size = outbox.size  # a queue far under the mark is not counted buffer by buffer
            if queued_size and (queued_size + size) * COST_PER_BYTE_AT_MOST > limit and outbox.cost + cost > limit:
                close_too_slow(conn, handoff, metrics, limit)
                continue
            outbox.buffers += parts
            outbox.size = queued_size + size
        queued.append(conn)
    return queued
