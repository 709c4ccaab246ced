"""The Redis engine: several wschat processes, on one machine or many, are one chat.

The data and its atomic changes are ``redis_store``'s; which node serves a
room is ``redis_nodes``'.  This module makes them an engine (see
``engine.py``) that a chat can lean on while Redis comes and goes:

* ``--redis`` names one Redis, or any node of a Redis Cluster (found out at
  start): a room's keys and channel hash to one slot, so rooms spread over
  the masters, and a cluster's rooms use sharded pub/sub (SPUBLISH,
  SSUBSCRIBE);
* publishing never waits (``redis_publisher``): events queue, and the
  engine's thread sends them in batches, one script call per room, and
  settles them as the replies come; a failure reaches the sender through
  its ``failed`` callback.  Each room's order is the queue's, and its
  sequence numbers are Redis's.  What a server's loop publishes (a chat's
  messages, handled there) the loop sends itself when it is about to sleep
  (``on_loop``): a batch holds all that its passes took in (at most 500
  events or 1 MiB), and no thread is woken for it;
* a process subscribes to the rooms it has members in, and only those;
* one thread (``wschat-redis``) does that publishing and owns the
  subscriptions (one connection per node for each): it delivers each read's
  events, a room's batch at a time, in each room's order, fills any gap
  in a room's sequence from the history, keeps this process's heartbeat,
  and sweeps the members of processes that died without a word (they leave
  within ``presence_timeout`` and a third);
* while Redis (or a cluster's master) is unreachable every call fails at
  once with ``EngineUnavailable`` (the chat tells the sender), the outage is
  logged once, and the thread reconnects with backoff (on a cluster, to
  whichever node masters each slot after a failover); when it is back, the
  leaves that could not be announced are, the claims Redis lost are made
  again, and each room's members get what they missed and who is there now;
* a Redis that answers but refuses writes (out of memory under
  ``maxmemory`` with ``noeviction``) refuses each message (its sender is
  told), and serving goes on; what serving cannot do without writing is
  tried again, backing off (a warning says so once).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import selectors
import socket
import threading
import time
from typing import Any, Callable, ParamSpec, TypeVar

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from . import checks
from .dialect import Event, now_ms, utf8_size
from .engine import (ADDED, DEFAULT_MAX_HISTORY_BYTES, JOINED, TAKEN, Claim, Deliver, Delivery, EngineUnavailable,
                     Failed, History, Lines, Records)
from .logsafe import quoted, without_password
from .osthread import named
from .redis_nodes import Address, Nodes
from .redis_publisher import Publisher, Waiter
from .redis_store import MAX_BATCH, RedisStore, event_item, message_item, message_lines, seq_of
from .resp import ReplyError, RespConnection, pack

log = logging.getLogger("wschat")
LOOP_BATCH_BYTES = 2**20  # what a busy loop holds of its publications before it sends them
STEADY = 1.0  # seconds of serving after which a drop is a lone one: subscribing again at once
P = ParamSpec("P")
T = TypeVar("T")


class RedisEngine:
    """Rooms, history and presence in the Redis at ``url``
    (``redis://HOST:PORT/DB``, or any node of a Redis Cluster); see the module
    docstring.  A room keeps its last ``history`` messages, and of them only
    the newest that fit in ``max_history_bytes`` (each counted as its JSON's
    length; 0: no bound; the chat's bound, past which no welcome carries
    them).  ``max_backlog`` bounds the events waiting for Redis, and
    ``max_backlog_bytes`` their size: past either, a sender is told its
    message was not sent."""

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        history: int = 50,
        max_history_bytes: int = DEFAULT_MAX_HISTORY_BYTES,
        presence_timeout: float = 10.0,
        room_ttl: int = 30 * 86400,
        prefix: str = "wschat",
        timeout: float = 2.0,
        max_backlog: int = 10_000,
        max_backlog_bytes: int = 16 * 2**20,  # (sent at once, half what Redis lets a subscriber fall behind)
    ):
        checks.whole("history", history, 0, " (0: none kept)")
        checks.whole("max_history_bytes", max_history_bytes, 0, " (0: no bound)")
        checks.whole("max_backlog", max_backlog, 1)
        checks.whole("max_backlog_bytes", max_backlog_bytes, 1)
        checks.seconds("presence_timeout", presence_timeout, positive=True)
        checks.whole("room_ttl", room_ttl, 1)
        if "{" in prefix or "}" in prefix:
            raise checks.SettingError("prefix", "a name without '{' or '}' (a room's hash tag follows it)", prefix)
        self.url = without_password(url)  # for messages and logs
        self.history_size = history
        self.max_history_bytes = max_history_bytes
        self.presence_timeout = presence_timeout
        self.room_ttl = room_ttl
        self.timeout = timeout
        self.prefix = prefix + ":"
        self.process_id = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        # No retries inside redis-py: an outage must fail fast, and is retried here.
        self.redis: Any = redis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0),
            decode_responses=True,
        )
        self.nodes = Nodes(url, timeout)
        self.store = self._new_store()
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._wanted: dict[str, int] = {}  # room -> members here: the rooms to subscribe to
        self._rooms_changed = False  # a room came into _wanted or left it since the last _reconcile
        self._confirmed: set[str] = set()  # rooms whose subscription Redis confirmed
        self._left: set[str] = set()  # rooms no member here is in any more (see _heartbeat_and_sweep)
        self._last: dict[str, tuple[str, int]] = {}  # room -> (epoch, seq) last delivered
        self._held: dict[tuple[str, str], tuple[str, str]] = {}  # (room, holder) -> (nick, user)
        self._pending_releases: list[tuple[str, str, str]] = []  # (room, nick, holder)
        self._down_since: float | None = None
        self._beat_refused = False  # Redis answered the last heartbeat with a refusal (out of memory, say)
        self._deliver: Deliver | None = None
        self._send_failed: Exception | None = None  # a send on the loop failed: the engine's thread raises it
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._wake_reader, self._wake_writer = socket.socketpair()  # wakes the engine's thread
        self._wake_writer.setblocking(False)
        self._selector = selectors.DefaultSelector()  # the engine thread's: wake-ups, subscriptions, publishing
        self._selector.register(self._wake_reader, selectors.EVENT_READ, self._drain_wake)
        self.publisher = Publisher(self.nodes, self.store, self._wake, timeout, self._selector, max_backlog,
                                   max_backlog_bytes)

    @property
    def reachable(self) -> bool:
        """Whether Redis answers (False from an outage's first failure until it is over)."""
        return self._down_since is None

    def __repr__(self) -> str:
        return f"RedisEngine({self.url!r}, process {self.process_id})"

    def _new_store(self) -> RedisStore:
        return RedisStore(self.redis, self.prefix, self.process_id, history=self.history_size,
                          room_ttl=self.room_ttl, presence_timeout=self.presence_timeout,
                          sharded=self.nodes.cluster, max_history_bytes=self.max_history_bytes)

    # -- lifetime ----------------------------------------------------------------------

    def start(self, deliver: Deliver) -> None:
        """Find out whether ``url`` is a cluster, announce this process, and
        start delivering.  Raises ``EngineUnavailable`` when Redis cannot be reached."""
        self._deliver = deliver
        try:
            self.nodes.discover()
            if self.nodes.cluster:
                from redis.cluster import RedisCluster

                self.redis.close()
                host, port = self.nodes.address
                self.redis = RedisCluster(host=host, port=port, socket_timeout=self.timeout,
                                          socket_connect_timeout=self.timeout, decode_responses=True)
                self.store = self.publisher.store = self._new_store()
            self.store.heartbeat()
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            raise EngineUnavailable(f"cannot reach Redis at {self.url}: {exc}") from None
        except (redis.RedisError, ReplyError) as exc:  # a wrong password, a database that does not exist...
            raise EngineUnavailable(f"Redis at {self.url} refused: {exc}") from None
        self._stopping.clear()
        self._thread = threading.Thread(target=named(self._run), name="wschat-redis", daemon=True)
        self._thread.start()

    def flush(self, timeout: float) -> None:
        """Wait up to ``timeout`` until everything published so far is in
        Redis, or has failed (and its sender was told)."""
        self._wake()  # first: what a loop put and has not sent (it may be the caller) goes now
        if not self.publisher.drained(timeout):
            log.warning("Redis: some published events were not confirmed within %g s", timeout)

    def backlog(self) -> int:
        """Events published and not yet confirmed by Redis."""
        return self.publisher.unsettled

    def backlog_bytes(self) -> int:
        """Their size in UTF-8 (``max_backlog_bytes`` bounds it)."""
        return self.publisher.unsettled_bytes

    def stop(self) -> None:
        """Publish what is queued, and stop delivering; this process's
        members that are still held leave every room now (not after ``presence_timeout``)."""
        if self._thread is not None and self._down_since is None:
            self.flush(self.timeout)
        self._stopping.set()
        self._wake()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(self.timeout * 2 + 1)
        self._deliver = None
        try:
            self.store.leave_everywhere()
        except (redis.RedisError, OSError) as exc:
            log.warning("Redis: could not remove this process's members at once (%s); "
                        "they leave after %g s", exc, self.presence_timeout)
        self.redis.close()
        self._selector.close()
        self._wake_reader.close()
        self._wake_writer.close()

    # -- calls, failing fast while Redis is down ------------------------------------------

    def _call(self, function: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        if self._down_since is not None:
            raise EngineUnavailable("Redis is unreachable")
        try:
            return function(*args, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            self._went_down(exc)
            raise EngineUnavailable(f"Redis is unreachable ({exc})") from None
        except redis.RedisError as exc:  # refused by Redis (out of memory, read-only replica...)
            raise EngineUnavailable(f"Redis refused: {exc}") from None

    def _went_down(self, exc: Exception) -> None:
        with self._changed:
            if self._down_since is not None:
                return
            self._down_since = time.monotonic()
            self._confirmed.clear()
            self._changed.notify_all()
        self._wake()
        log.warning("Redis at %s is unreachable (%s): chat messages are refused until it is back",
                    self.url, exc)

    # -- rooms ----------------------------------------------------------------------------

    def subscribe(self, room: str) -> None:
        """Count one more member here; the first one waits for Redis to confirm the subscription."""
        with self._changed:
            if self._down_since is not None:
                raise EngineUnavailable("Redis is unreachable")
            self._wanted[room] = self._wanted.get(room, 0) + 1
            self._rooms_changed = True
            self._left.discard(room)
            if room in self._confirmed:
                return
        self._wake()
        with self._changed:
            self._changed.wait_for(lambda: room in self._confirmed or self._down_since is not None, self.timeout)
            if room in self._confirmed:
                return
        self.unsubscribe(room)
        raise EngineUnavailable("Redis did not confirm the subscription")

    def unsubscribe(self, room: str) -> None:
        with self._changed:
            count = self._wanted.get(room, 0) - 1
            if count > 0:
                self._wanted[room] = count
                return
            self._wanted.pop(room, None)
            self._rooms_changed = True
            self._left.add(room)
        self._wake()

    def _wake(self) -> None:
        try:
            self._wake_writer.send(b"\0")
        except OSError:
            pass  # a byte is already waiting, or the engine is stopped

    def publish_message(self, room: str, record: Event, failed: Failed | None = None) -> None:
        """Publish a chat message (Redis numbers it).  With ``failed``,
        returns at once and calls ``failed`` (on some thread) if it could not
        be published; without, waits, and raises ``EngineUnavailable``."""
        self._publish(room, message_item(record), failed)

    def publish(self, room: str, event: Event, failed: Failed | None = None) -> None:
        """Publish a presence event, in the room's order with its messages."""
        self._publish(room, event_item(event), failed)

    def _publish(self, room: str, item: str, failed: Failed | None) -> None:
        if self._down_since is not None:
            raise EngineUnavailable("Redis is unreachable")
        waiter = Waiter() if failed is None else None
        self.publisher.put((room, item, failed, waiter, utf8_size(item)))
        if waiter is not None:
            if not waiter.wait(self.timeout * 2 + 1):
                raise EngineUnavailable("Redis did not answer in time")
            if waiter.error is not None:
                raise waiter.error

    def history(self, room: str, since: int | None = None, epoch: str | None = None) -> History:
        return self._call(self.store.history, room, since, epoch)

    def position(self, room: str) -> tuple[str, int]:
        return self._call(self.store.position, room)

    # -- presence ---------------------------------------------------------------------------

    def claim(self, room: str, nick: str, holder: str, user_id: str | None = None) -> Claim:
        user = "" if user_id is None else "u" + user_id
        with self._lock:  # first: a room with a claim under way is never tidied off this process's list
            self._held[room, holder] = (nick, user)
        outcome = "taken"
        evicted: list[str] = []
        try:
            outcome, evicted = self._call(self.store.claim, room, nick, holder, user)
        finally:
            if outcome == "taken":
                with self._lock:
                    self._held.pop((room, holder), None)
        if outcome == "taken":
            return Claim(TAKEN)
        return Claim(JOINED if outcome == "joined" else ADDED, evicted)

    def rename(self, room: str, old: str, new: str, holder: str) -> bool:
        renamed = self._call(self.store.rename, room, old, new, holder)
        if renamed:
            with self._lock:
                self._held[room, holder] = (new, "")
        return renamed

    def release(self, room: str, nick: str, holder: str) -> bool:
        """Let ``holder``'s claim go; True when no one holds the nickname any
        more (the caller announces the leave).  While Redis is down the
        release waits, and the engine announces the leave when it is back."""
        with self._lock:
            self._held.pop((room, holder), None)
        try:
            return self._call(self.store.release, room, nick, holder)
        except EngineUnavailable:
            with self._lock:
                self._pending_releases.append((room, nick, holder))
            return False

    def users(self, room: str) -> list[str]:
        return self._call(self.store.users, room)

    # -- the engine's thread: subscriptions and publishing ------------------------------------

    def _run(self) -> None:
        delay = 0.0  # before connecting again: none after a lone drop, backing off while Redis is down or refuses
        while not self._stopping.is_set():
            subscriptions: dict[Address, RespConnection] = {}
            started = time.monotonic()
            try:
                self._serve(subscriptions)
            except (redis.RedisError, ReplyError, EngineUnavailable, OSError) as exc:
                if self._down_since is None and self._answers():  # Redis answers: a subscription dropped, or a refusal
                    if time.monotonic() - started >= STEADY:
                        log.info("Redis subscription dropped (%s): subscribing again", exc)
                        delay = 0.0
                    else:  # failing again as soon as it is served: Redis refuses what serving needs
                        if not delay:  # (filling a gap from the history writes too: out of memory, it is refused)
                            log.warning("Redis refuses what this process needs to serve its rooms (%s): "
                                        "trying again, backing off to every 2 s", exc)
                        delay = min(max(delay * 2, 0.1), 2.0)
                else:
                    self._went_down(exc)
                    delay = min(max(delay * 2, 0.1), 2.0)
            except Exception:  # a bug must not end delivery for good
                log.exception("Redis subscriber failed; restarting it")
                self._went_down(RuntimeError("subscriber failed"))
                delay = 2.0
            finally:
                for conn in subscriptions.values():
                    self._selector.unregister(conn)
                    conn.close()
                if self._down_since is not None or self._stopping.is_set():  # (a mere drop keeps publishing)
                    self.publisher.close(EngineUnavailable("Redis is unreachable, or this engine stopped"))
            self._stopping.wait(delay)

    def _answers(self) -> bool:
        try:
            return self.nodes.reachable() and bool(self.redis.ping())
        except (redis.RedisError, OSError):
            return False

    def _serve(self, subscriptions: dict[Address, RespConnection]) -> None:
        """Subscribe, catch up, then deliver and publish until Redis or this engine stops."""
        requested: dict[str, RespConnection] = {}  # room -> the connection it is subscribed on
        with self._lock:
            again = set(self._wanted)  # subscribed before this connection: events may have been missed
            self._rooms_changed = True  # (new connections: every room wanted is to be subscribed)

        def reader(conn: RespConnection) -> Callable[[], None]:
            def read() -> None:
                """Every push of one read; a room's messages among them delivered as one batch."""
                received: dict[str, list[Delivery]] = {}
                for push in conn.pending():
                    if type(push) is list and push[0] in (b"message", b"smessage"):
                        room = self.store.room_of(push[1].decode())
                        try:
                            self._received(room, push[2], received.setdefault(room, []))
                        except (ValueError, IndexError):  # not what PUBLISH_BATCH publishes
                            log.warning("room %s: ignored a publication on its channel that is not wschat's",
                                        quoted(room))
                        continue
                    self._deliver_all(received)  # first: in the order Redis sent them
                    self._pushed(push, requested, again)
                self._deliver_all(received)
            return read

        self.nodes.discover()  # on a cluster: which master owns each slot now
        for node in self.nodes.masters():  # raises while a node is down
            conn = subscriptions[node] = self.nodes.connect(node, raw=True)
            self._selector.register(conn, selectors.EVENT_READ, reader(conn))
        self._back_up()
        interval = self.presence_timeout / 3
        next_beat = 0.0
        while not self._stopping.is_set():
            self._reconcile(subscriptions, requested)
            now = time.monotonic()
            if now >= next_beat:
                self._beat()
                next_beat = now + interval
            events = self._selector.select(max(0.0, min(interval, next_beat - now, self.timeout)))
            if self._down_since is not None:  # a call on another thread failed
                raise ConnectionError("reconnecting to check")
            failed, self._send_failed = self._send_failed, None
            if failed is not None:
                raise failed
            for key, _ in events:
                key.data()
            self.publisher.send()
            if self.publisher.overdue(time.monotonic()):
                raise TimeoutError(f"Redis did not answer in {self.timeout:g} s")

    def on_loop(self, idle: bool) -> None:
        """For ``Server.on_idle``: on a server's loop, send what it published,
        when it is about to sleep (or a batch is full, in events or in
        ``LOOP_BATCH_BYTES``: a loop that never sleeps holds no more).  What would wait (a
        node to connect to, bytes the kernel does not take now) or fails is
        left to the engine's thread: a Redis that stops reading never stalls the loop."""
        publisher = self.publisher
        publisher.loop_thread = threading.get_ident()
        if not publisher.queued or self._down_since is not None:
            return
        if not (idle or publisher.queued >= MAX_BATCH or publisher.queued_bytes >= LOOP_BATCH_BYTES):
            return
        try:
            if publisher.send(wait=False):
                return
        except Exception as exc:  # (what it was meant for has failed, and its senders were told)
            self._send_failed = exc
        self._wake()

    def _drain_wake(self) -> None:
        try:
            self._wake_reader.recv(4096)
        except OSError:
            pass

    def _reconcile(self, subscriptions: dict[Address, RespConnection], requested: dict[str, RespConnection]) -> None:
        """Subscribe to the rooms wanted, and only those (once they changed:
        this runs on every pass of the engine's thread)."""
        with self._lock:
            if not self._rooms_changed:
                return
            self._rooms_changed = False
            wanted = set(self._wanted)
            dropped = set(requested) - wanted
            for room in dropped:
                self._confirmed.discard(room)
                self._last.pop(room, None)
        sharded = self.nodes.cluster
        for room in wanted - set(requested):
            channel = self.store.channel(room)
            conn = requested[room] = subscriptions[self.nodes.node_of(channel)]
            conn.send(pack("SSUBSCRIBE" if sharded else "SUBSCRIBE", channel))
        for room in dropped:
            requested.pop(room).send(pack("SUNSUBSCRIBE" if sharded else "UNSUBSCRIBE", self.store.channel(room)))

    def _pushed(self, push: Any, requested: dict[str, RespConnection], again: set[str]) -> None:
        if isinstance(push, ReplyError):
            raise push  # a slot moved (MOVED): subscribe again where it is now
        kind, channel, _ = push
        room = self.store.room_of(channel.decode())
        if kind in (b"subscribe", b"ssubscribe"):
            self._subscribed(room, requested, again)
        elif kind == b"sunsubscribe" and room in requested and room in self._wanted:
            raise ConnectionError(f"Redis moved room {quoted(room)} to another node")

    def _subscribed(self, room: str, requested: dict[str, RespConnection], again: set[str]) -> None:
        if room not in requested:
            return
        # Subscribed again (after a drop or an outage, or after the room's
        # last member here left, when a batch read before the unsubscription
        # took effect was delivered here): the messages published while
        # unsubscribed, from the history, before a joiner reads it.
        if room in self._last:
            self._fill(room, *self._last[room])
        with self._changed:
            self._confirmed.add(room)
            self._changed.notify_all()
        if room not in again:
            return
        # And the user list as it is now (joins and leaves are not kept anywhere to be replayed).
        again.discard(room)
        if self._deliver is not None:
            self._deliver(room, [{"type": "users", "room": room, "users": self.users(room)}])

    def _back_up(self) -> None:
        """The subscriptions are connected: calls may go to Redis again, once
        no room's numbering has gone back (see ``_numbering_goes_on``)."""
        if self._down_since is not None:
            self._numbering_goes_on()
        with self._changed:
            since, self._down_since = self._down_since, None
            pending, self._pending_releases = self._pending_releases, []
            held = dict(self._held)
        if since is None:
            return
        log.warning("Redis at %s is reachable again after %.1f s", self.url, time.monotonic() - since)
        self._heartbeat_and_sweep()
        for index, (room, nick, holder) in enumerate(pending):  # the leaves that could not be announced
            try:
                self.store.release(room, nick, holder, {"type": "leave", "room": room, "nick": nick, "time": now_ms()})
            except BaseException:
                with self._lock:
                    self._pending_releases[:0] = pending[index:]  # announced once Redis is back again
                raise
        self._claim_again(held)

    def _claim_again(self, held: dict[tuple[str, str], tuple[str, str]]) -> None:
        """The claims of this process's members (``held``) that Redis lost
        (restarted empty) or that another process swept (it took this one for
        gone while it could not say it was alive): made again, and announced."""
        for (room, holder), (nick, user) in held.items():
            outcome, _ = self.store.claim(room, nick, holder, user)
            if outcome == "joined":
                self.publish(room, {"type": "join", "room": room, "nick": nick, "time": now_ms()}, _ignore)
            elif outcome == "taken":
                log.warning("room %s: nickname %s was taken while this process could not reach Redis, or write to it",
                            quoted(room), quoted(nick))

    def _numbering_goes_on(self) -> None:
        """Before anything is published after an outage: a Redis that lost
        the last messages this process delivered (a master that failed over
        before its replica had them, a restart with ``appendfsync everysec``)
        would number the next ones as those were, and members who saw them
        would take the new ones for repeats.  So each room's number goes on
        from the last one delivered here (the lost ones stay a gap)."""
        with self._lock:
            last = dict(self._last)
        for room, (epoch, seq) in last.items():
            if self.store.advance(room, epoch, seq):
                log.warning("room %s: Redis had lost messages up to %d; numbering goes on after them",
                            quoted(room), seq)

    def _deliver_all(self, received: dict[str, list[Delivery]]) -> None:
        deliver = self._deliver
        for room, batch in received.items():
            if batch and deliver is not None:
                deliver(room, batch)
        received.clear()

    def _received(self, room: str, data: bytes, batch: list[Delivery]) -> None:
        """A published batch of ``room``'s events (the epoch, then one event a
        line), added to ``batch`` in order (with any messages missed before
        them).  A message's line is kept as it is (see ``engine.Messages``):
        only its number is read, from the end the script gave it."""
        split = message_lines(data)
        if split is not None:  # messages only, the common case: numbered one after another
            first, lines = split
            self._received_messages(room, Lines(first.decode(), seq_of(lines[0]), lines), batch)
            return
        first, *lines = data.split(b"\n")
        epoch = first.decode()
        for line in lines:
            if line[:1] == b"E":
                batch.append(json.loads(line[1:]))
            else:
                self._received_messages(room, Lines(epoch, seq_of(line), [line[1:]]), batch)

    def _received_messages(self, room: str, run: Lines, batch: list[Delivery]) -> None:
        """A run of ``room``'s messages, added to ``batch``: those not
        delivered yet, after any missed before them."""
        seen = self._last.get(room)
        if seen is not None and seen[0] == run.epoch:
            if run.last <= seen[1]:
                return  # delivered already (by a gap fill)
            if run.first <= seen[1]:
                run = run.after(seen[1])
            elif run.first > seen[1] + 1:
                batch += self._missed(room, run.epoch, seen[1], run.first)
        self._last[room] = (run.epoch, run.last)
        batch.append(run)

    def _fill(self, room: str, epoch: str, after: int) -> None:
        """Deliver the messages of ``room`` after ``after``: the ones this process missed."""
        missed = self._missed(room, epoch, after, None)
        if missed and self._deliver is not None:
            self._deliver(room, missed)

    def _missed(self, room: str, epoch: str, after: int, before: int | None) -> list[Delivery]:
        """The messages of ``room`` after ``after`` (and before ``before``)
        from the history, counted as delivered."""
        history = self.history(room, after, epoch)
        records = [record for record in history.records if before is None or record["seq"] < before]
        if history.missed:
            log.warning("room %s: messages after %d are no longer in the history; some were not delivered here",
                        quoted(room), after)
        if records:
            self._last[room] = (history.epoch, records[-1]["seq"])
        return [*Records.runs(history.epoch, records)]

    # -- heartbeat and sweeping -------------------------------------------------------------

    def _beat(self) -> None:
        """``_heartbeat_and_sweep``; when Redis is out of memory (``maxmemory``
        with ``noeviction``: every write refused) the engine serves on,
        delivering and telling senders their messages were refused, and says
        so once until a heartbeat is taken again; then its members are claimed
        again (another process may have taken this one for gone meanwhile)."""
        try:
            self._heartbeat_and_sweep()
        except redis.exceptions.OutOfMemoryError as exc:
            if not self._beat_refused:
                log.warning("Redis refused this process's heartbeat (%s): other processes may take its members "
                            "for gone after %g s", exc, self.presence_timeout)
            self._beat_refused = True
            return
        if self._beat_refused:
            log.warning("Redis takes this process's heartbeat again")
            self._beat_refused = False
            with self._lock:
                held = dict(self._held)
            self._claim_again(held)

    def _heartbeat_and_sweep(self) -> None:
        """Say this process is alive; sweep the members of the processes that
        are not; take the rooms this process left off its list."""
        store = self.store
        for process in store.dead(store.heartbeat()):
            left = store.sweep(process)
            if left > 0:
                log.info("process %s stopped answering: %d members left its rooms", process, left)
        with self._lock:
            rooms, self._left = [room for room in self._left if room not in self._wanted], set()
        for room in rooms:
            if store.holds(room):
                continue
            with self._lock:  # a claim under way puts the room in _held first (see claim)
                if room not in self._wanted and not any(key[0] == room for key in self._held):
                    store.forget_room(room)


def _ignore(error: EngineUnavailable) -> None:
    """A presence event that could not be published: the next reconciliation tells the members."""
