"""Publishing to Redis without waiting: events queued by any thread, sent
by the Redis engine's own thread (or a server's loop) and answered on the former.

A chat message must not wait for another sender's round trip, nor hold a
handler thread while Redis answers.  So ``put`` only queues (and wakes the
engine's thread, once however many are queued before it wakes), and that
thread, between reading its subscriptions, sends everything queued: one
``PUBLISH_BATCH`` script call per room (in chunks of ``MAX_BATCH``), the calls
for one node in one write, on one connection per node, without waiting for
the replies of earlier writes (pipelining).  What a server's loop puts it
sends itself when it is about to sleep, without waiting: what the kernel
does not take at once, or a node to connect to, is left to the engine's
thread (``send(wait=False)``).  Replies come back in order on
each connection and settle their calls: a sender that waits is woken, a
sender that gave a ``failed`` callback hears of a failure.  Each room's
order is the queue's, since a room is served by one node and a connection's
commands run in order.
"""

from __future__ import annotations

import logging
import selectors
import threading
import time
from collections import defaultdict, deque
from typing import Callable

from .engine import EngineUnavailable, Failed
from .redis_nodes import Address, Nodes
from .redis_store import MAX_BATCH, PUBLISH_BATCH, RedisStore
from .resp import ReplyError, RespConnection, pack, pack_all

log = logging.getLogger("wschat")


class Waiter(threading.Event):
    """A blocking publish's outcome: set when done, with ``error`` when it failed."""

    error: EngineUnavailable | None = None

    def failed(self, error: EngineUnavailable) -> None:
        self.error = error
        self.set()


Entry = tuple[str, str, Failed | None, Waiter | None, int]  # (room, "M..." or "E...", failed, waiter, its UTF-8 size)


class Publisher:
    """The queue, and the connections that send it (see the module docstring)."""

    def __init__(self, nodes: Nodes, store: RedisStore, wake: Callable[[], None], timeout: float,
                 selector: selectors.BaseSelector, max_unsettled: int, max_unsettled_bytes: int):
        self.nodes = nodes
        self.max_unsettled = max_unsettled  # past it, put refuses: what waits for Redis is bounded,
        self.max_unsettled_bytes = max_unsettled_bytes  # in events and in bytes
        self.selector = selector  # the engine thread's, which calls ``answered`` when a connection is readable
        self.store = store
        self.timeout = timeout
        self._wake = wake
        self._lock = threading.Lock()
        self._sending = threading.Lock()  # the connections and what they await: the engine's thread, or the loop
        self.loop_thread: int | None = None  # a server loop's, which sends what it puts (see send)
        self._queue: list[Entry] = []
        self._queued_bytes = 0  # the size of the events in _queue
        self._woken = False  # a wake-up is on its way
        self._unsettled = 0  # events put and not yet answered nor failed
        self._unsettled_bytes = 0  # their size
        self._settled = threading.Condition(self._lock)
        self._links: dict[Address, RespConnection] = {}
        self._sent: dict[RespConnection, deque[tuple[float, list[Entry]]]] = {}  # awaiting replies, in order

    def put(self, entry: Entry) -> None:
        """Queue one event (any thread); the engine's thread sends it.
        Raises ``EngineUnavailable`` when ``max_unsettled`` events wait
        already, or some do and with this one they would pass ``max_unsettled_bytes``."""
        size = entry[4]
        with self._lock:
            if self._unsettled >= self.max_unsettled or (
                    self._unsettled_bytes and self._unsettled_bytes + size > self.max_unsettled_bytes):
                raise EngineUnavailable(f"Redis is not keeping up ({self._unsettled} events, "
                                        f"{self._unsettled_bytes} bytes wait for it)")
            self._queue.append(entry)
            self._queued_bytes += size
            self._unsettled += 1
            self._unsettled_bytes += size
            if self._woken or (threading.get_ident() == self.loop_thread and entry[3] is None):
                return  # a wake-up is on its way, or the loop sends this before it sleeps
            self._woken = True
        self._wake()

    @property
    def queued(self) -> int:
        """Events put and not yet sent."""
        return len(self._queue)

    @property
    def queued_bytes(self) -> int:
        """Their size."""
        return self._queued_bytes

    @property
    def unsettled(self) -> int:
        """Events put and not yet answered nor failed."""
        return self._unsettled

    @property
    def unsettled_bytes(self) -> int:
        """Their size in UTF-8 (see ``dialect.utf8_size``)."""
        return self._unsettled_bytes

    def drained(self, timeout: float) -> bool:
        """Wait up to ``timeout`` until every event put so far is settled."""
        with self._settled:
            return self._settled.wait_for(lambda: not self._unsettled, timeout)

    def _settle(self, entries: list[Entry]) -> None:
        if entries:
            with self._settled:
                self._unsettled -= len(entries)
                self._unsettled_bytes -= sum(entry[4] for entry in entries)
                if not self._unsettled:
                    self._settled.notify_all()

    # -- on the engine's thread (or the loop, for send without wait) -----------------------

    def send(self, wait: bool = True) -> bool:
        """Send what is queued: on the engine's thread, or without ``wait``
        on a loop about to sleep (``loop_thread``), which must not wait: then
        False says the engine's thread is needed, to connect to a node first
        (nothing is sent) or to write what the kernel did not take at once.
        A node that cannot be reached raises, after failing what was meant for it."""
        if not self._sending.acquire(blocking=wait):
            return False  # the engine's thread is sending (maybe waiting for Redis): it sends these too
        try:
            if wait:
                for link in self._links.values():
                    if link.unsent:
                        link.send(b"")
            return self._send(wait)
        finally:
            self._sending.release()

    def _send(self, wait: bool) -> bool:
        with self._lock:
            queued, self._queue, queued_bytes, self._queued_bytes = self._queue, [], self._queued_bytes, 0
            self._woken = False
        if not queued:
            return True
        by_room: dict[str, list[Entry]] = defaultdict(list)
        for entry in queued:
            by_room[entry[0]].append(entry)
        by_node: dict[Address, list[tuple[str, list[Entry]]]] = defaultdict(list)
        for room, entries in by_room.items():
            calls = by_node[self.nodes.node_of(self.store.channel(room))]
            for start in range(0, len(entries), MAX_BATCH):
                calls.append((room, entries[start : start + MAX_BATCH]))
        if not wait and not self._links.keys() >= by_node.keys():
            with self._lock:
                self._queue[:0] = queued
                self._queued_bytes += queued_bytes
            return False
        now = time.monotonic()
        nodes = list(by_node.items())
        written = True
        for index, (node, calls) in enumerate(nodes):
            try:
                link = self._links.get(node) or self._connect(node)
                data = pack_all(self.store.batch(room, [entry[1] for entry in entries]) for room, entries in calls)
                if wait:
                    link.send(data)
                else:
                    written = link.send_nowait(data) and written
            except (OSError, ReplyError) as exc:  # unreachable, or refused (a password that changed)
                error = EngineUnavailable(f"Redis is unreachable ({exc})")
                if node in self._links:
                    self._drop(self._links[node], error)
                unsent = [entry for _, calls_left in nodes[index:] for _, entries in calls_left for entry in entries]
                fail(unsent, error)
                self._settle(unsent)
                raise
            self._sent[link].extend((now, entries) for _, entries in calls)
        return written

    def _connect(self, node: Address) -> RespConnection:
        link = self.nodes.connect(node)
        self.selector.register(link, selectors.EVENT_READ, lambda: self.answered(link))
        self._links[node] = link
        self._sent[link] = deque([(time.monotonic(), [])])  # the script load's reply settles nothing
        link.send(pack("SCRIPT", "LOAD", PUBLISH_BATCH))  # first: EVALSHA then never meets NOSCRIPT
        return link

    def answered(self, link: RespConnection) -> None:
        """``link`` is readable: settle the calls its replies answer."""
        with self._sending:
            self._answered(link)

    def _answered(self, link: RespConnection) -> None:
        sent = self._sent.get(link)
        if sent is None:
            return  # dropped since the selector saw it (by a send on the loop)
        try:
            replies = link.pending()
        except OSError as exc:  # this connection is gone (if Redis is too, the subscriptions say so)
            log.info("Redis: a publishing connection dropped (%s)", exc)
            self._drop(link, EngineUnavailable(f"the connection to Redis dropped ({exc})"))
            return
        settled: list[Entry] = []
        for reply in replies:
            _, entries = sent.popleft()
            settled += entries
            if not isinstance(reply, ReplyError):
                for entry in entries:
                    if entry[3] is not None:
                        entry[3].set()
                continue
            text = str(reply)
            if text.startswith(("MOVED", "ASK")):  # a slot moved: later calls go to its new node
                self.nodes.moved(text.replace("ASK", "MOVED", 1))
            fail(entries, EngineUnavailable(f"Redis refused: {text}"))
        self._settle(settled)

    def overdue(self, now: float) -> bool:
        """Whether some call has waited for its reply longer than ``timeout``."""
        with self._sending:
            return any(sent and now - sent[0][0] > self.timeout for sent in self._sent.values())

    def close(self, error: EngineUnavailable) -> None:
        """The connections are gone (an outage, or the engine stopping):
        every call not answered, and every event queued, fails with ``error``."""
        with self._sending:
            for link in list(self._sent):
                self._drop(link, error)
        with self._lock:
            queued, self._queue, self._queued_bytes = self._queue, [], 0
            self._woken = False
        fail(queued, error)
        self._settle(queued)

    def _drop(self, link: RespConnection, error: EngineUnavailable) -> None:
        """Close ``link``; the calls it has not answered fail with ``error``."""
        self.selector.unregister(link)
        link.close()
        del self._links[link.address]
        unanswered = [entry for _, entries in self._sent.pop(link) for entry in entries]
        fail(unanswered, error)
        self._settle(unanswered)


def fail(entries: list[Entry], error: EngineUnavailable) -> None:
    """Tell each sender its event was not published."""
    for _, _, failed, waiter, _ in entries:
        if waiter is not None:
            waiter.failed(error)
        elif failed is not None:
            try:
                failed(error)
            except Exception:
                log.exception("Redis: a publishing failure's callback failed")
