"""The Redis engine: several wschat processes, on one machine or many, are one chat.

The data and its atomic changes are ``redis_store``'s.  This module makes
them an engine (see ``engine.py``) that a chat can lean on while Redis comes
and goes:

* a process subscribes to the rooms it has members in, and only those;
* one thread (``wschat-redis``) owns the subscription: it delivers events in
  each room's order, fills any gap in a room's sequence from the history,
  keeps this process's heartbeat, and sweeps the members of processes that
  died without a word (they leave within ``presence_timeout`` and a third);
* while Redis is unreachable every call fails at once with
  ``EngineUnavailable`` (the chat tells the sender), the outage is logged
  once, and the thread reconnects with backoff; when Redis is back, the
  leaves that could not be announced are, the claims Redis lost are made
  again, and each room's members get what they missed and who is there now.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from . import checks
from .dialect import now_ms
from .engine import ADDED, JOINED, TAKEN, Claim, Deliver, EngineUnavailable, History
from .logsafe import quoted
from .redis_store import RedisStore

log = logging.getLogger("wschat")


class RedisEngine:
    """Rooms, history and presence in the Redis at ``url``
    (``redis://HOST:PORT/DB``); see the module docstring."""

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        history: int = 50,
        presence_timeout: float = 10.0,
        room_ttl: int = 30 * 86400,
        prefix: str = "wschat",
        timeout: float = 2.0,
    ):
        checks.whole("history", history, 0, " (0: none kept)")
        checks.seconds("presence_timeout", presence_timeout, positive=True)
        checks.whole("room_ttl", room_ttl, 1)
        self.url = url
        self.history_size = history
        self.presence_timeout = presence_timeout
        self.timeout = timeout
        self.prefix = prefix + ":"
        self.process_id = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        # No retries inside redis-py: an outage must fail fast, and is retried here.
        self.redis = redis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0),
            decode_responses=True,
        )
        self.store = RedisStore(self.redis, self.prefix, self.process_id, history=history, room_ttl=room_ttl,
                                presence_timeout=presence_timeout)
        self._control = f"{self.prefix}control:{self.process_id}"  # a channel to wake the subscriber thread
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._wanted: dict[str, int] = {}  # room -> members here: the rooms to subscribe to
        self._confirmed: set[str] = set()  # rooms whose subscription Redis confirmed
        self._left: set[str] = set()  # rooms no member here is in any more (see _heartbeat_and_sweep)
        self._last: dict[str, tuple[str, int]] = {}  # room -> (epoch, seq) last delivered
        self._held: dict[tuple[str, str], tuple[str, str]] = {}  # (room, holder) -> (nick, user)
        self._pending_releases: list[tuple[str, str, str]] = []  # (room, nick, holder)
        self._down_since: float | None = None
        self._deliver: Deliver | None = None
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"RedisEngine({self.url!r}, process {self.process_id})"

    # -- lifetime ----------------------------------------------------------------------

    def start(self, deliver: Deliver) -> None:
        """Announce this process, and start delivering.  Raises
        ``EngineUnavailable`` when Redis cannot be reached."""
        self._deliver = deliver
        try:
            self.store.heartbeat()
        except redis.RedisError as exc:
            raise EngineUnavailable(f"cannot reach Redis at {self.url}: {exc}") from None
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="wschat-redis", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop delivering; this process's members that are still held leave
        every room now (not after ``presence_timeout``)."""
        self._stopping.set()
        self._wake()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(self.timeout * 2 + 1)
        self._deliver = None
        try:
            self.store.leave_everywhere()
        except redis.RedisError as exc:
            log.warning("Redis: could not remove this process's members at once (%s); "
                        "they leave after %g s", exc, self.presence_timeout)
        self.redis.close()

    # -- calls, failing fast while Redis is down ------------------------------------------

    def _call(self, function, *args, **kwargs):
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
        log.warning("Redis at %s is unreachable (%s): chat messages are refused until it is back",
                    self.url, exc)

    # -- rooms ----------------------------------------------------------------------------

    def subscribe(self, room: str) -> None:
        """Count one more member here; the first one waits for Redis to confirm the subscription."""
        with self._changed:
            self._wanted[room] = self._wanted.get(room, 0) + 1
            self._left.discard(room)
            if room in self._confirmed:
                return
        try:
            self._call(self.redis.publish, self._control, "")  # wake the subscriber thread
            with self._changed:
                self._changed.wait_for(
                    lambda: room in self._confirmed or self._down_since is not None, self.timeout)
                if room in self._confirmed:
                    return
            raise EngineUnavailable("Redis did not confirm the subscription")
        except EngineUnavailable:
            self.unsubscribe(room)
            raise

    def unsubscribe(self, room: str) -> None:
        with self._changed:
            count = self._wanted.get(room, 0) - 1
            if count > 0:
                self._wanted[room] = count
                return
            self._wanted.pop(room, None)
            self._left.add(room)
        self._wake()

    def _wake(self) -> None:
        try:
            self.redis.publish(self._control, "")
        except redis.RedisError:
            pass  # down: the subscriber thread reconciles when it is back

    def publish_message(self, room: str, record: dict) -> int:
        record["seq"] = self._call(self.store.publish_message, room, record)
        return record["seq"]

    def publish(self, room: str, event: dict) -> None:
        self._call(self.store.publish, room, event)

    def history(self, room: str, since: int | None = None, epoch: str | None = None) -> History:
        return self._call(self.store.history, room, since, epoch)

    def position(self, room: str) -> tuple[str, int]:
        return self._call(self.store.position, room)

    # -- presence ---------------------------------------------------------------------------

    def claim(self, room: str, nick: str, holder: str, user_id: str | None = None) -> Claim:
        user = "" if user_id is None else "u" + user_id
        outcome, evicted = self._call(self.store.claim, room, nick, holder, user)
        if outcome == "taken":
            return Claim(TAKEN)
        with self._lock:
            self._held[room, holder] = (nick, user)
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

    # -- the subscriber thread -----------------------------------------------------------

    def _run(self) -> None:
        delay = 0.0  # before connecting again: none after a mere drop, backing off while Redis is down
        while not self._stopping.is_set():
            pubsub = self.redis.pubsub()
            try:
                self._serve(pubsub)
            except (redis.RedisError, OSError, EngineUnavailable) as exc:
                if self._down_since is None and self._answers():  # only the subscription dropped
                    log.info("Redis subscription dropped (%s): subscribing again", exc)
                    delay = 0.0
                else:
                    self._went_down(exc)
                    delay = min(max(delay * 2, 0.1), 2.0)
            except Exception:  # a bug must not end delivery for good
                log.exception("Redis subscriber failed; restarting it")
                self._went_down(RuntimeError("subscriber failed"))
                delay = 2.0
            finally:
                try:
                    pubsub.close()
                except Exception:  # closing a broken connection
                    pass
            self._stopping.wait(delay)

    def _answers(self) -> bool:
        try:
            return bool(self.redis.ping())
        except (redis.RedisError, OSError):
            return False

    def _serve(self, pubsub) -> None:
        """Subscribe, catch up, then deliver until Redis or this engine stops."""
        pubsub.subscribe(self._control)  # raises while Redis is down
        self._back_up()
        requested: set[str] = set()
        with self._lock:
            again = set(self._wanted)  # subscribed before this connection: events may have been missed
        interval = self.presence_timeout / 3
        next_beat = 0.0
        while not self._stopping.is_set():
            self._reconcile(pubsub, requested)
            now = time.monotonic()
            if now >= next_beat:
                self._heartbeat_and_sweep()
                next_beat = now + interval
            message = pubsub.get_message(timeout=max(0.0, min(interval, next_beat - now)))
            if self._down_since is not None:  # a call on another thread failed
                raise redis.ConnectionError("reconnecting to check")
            if message is None or message["channel"] == self._control:
                continue
            room = self.store.room_of(message["channel"])
            if message["type"] == "subscribe":
                self._subscribed(room, requested, again)
            elif message["type"] == "message":
                self._received(room, message["data"])

    def _reconcile(self, pubsub, requested: set[str]) -> None:
        """Subscribe to the rooms wanted, and only those."""
        with self._lock:
            wanted = set(self._wanted)
            dropped = requested - wanted
            for room in dropped:
                self._confirmed.discard(room)
                self._last.pop(room, None)
        added = wanted - requested
        if added:
            pubsub.subscribe(*map(self.store.channel, added))
        if dropped:
            pubsub.unsubscribe(*map(self.store.channel, dropped))
        requested |= added
        requested -= dropped

    def _subscribed(self, room: str, requested: set[str], again: set[str]) -> None:
        if room not in requested:
            return
        with self._changed:
            self._confirmed.add(room)
            self._changed.notify_all()
        if room not in again:
            return
        # Subscribed again after a drop or an outage: the messages missed
        # meanwhile from the history, and the user list as it is now (joins
        # and leaves are not kept anywhere to be replayed).
        again.discard(room)
        if room in self._last:
            self._fill(room, *self._last[room], None)
        if self._deliver is not None:
            self._deliver(room, {"type": "users", "room": room, "users": self.users(room)}, None, None)

    def _back_up(self) -> None:
        """The subscriber is connected: calls may go to Redis again."""
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
        for (room, holder), (nick, user) in held.items():  # claims Redis lost (restarted empty, or swept)
            outcome, _ = self.store.claim(room, nick, holder, user)
            if outcome == "joined":
                self.store.publish(room, {"type": "join", "room": room, "nick": nick, "time": now_ms()})
            elif outcome == "taken":
                log.warning("room %s: nickname %s was taken while Redis was unreachable",
                            quoted(room), quoted(nick))

    def _received(self, room: str, data: str) -> None:
        deliver = self._deliver
        if deliver is None:
            return
        if data[0] == "E":
            deliver(room, json.loads(data[1:]), None, None)
            return
        epoch, _, text = data[1:].partition(" ")
        record = json.loads(text)
        seq = record["seq"]
        last = self._last.get(room)
        if last is not None and last[0] == epoch:
            if seq <= last[1]:
                return  # delivered already (by a gap fill)
            if seq > last[1] + 1:
                self._fill(room, epoch, last[1], seq)
        self._last[room] = (epoch, seq)
        deliver(room, record, text, epoch)

    def _fill(self, room: str, epoch: str, after: int, before: int | None) -> None:
        """Deliver the messages of ``room`` after ``after`` (and before
        ``before``) from the history: the ones this process missed."""
        history = self.history(room, after, epoch)
        records = [record for record in history.records if before is None or record["seq"] < before]
        if history.missed:
            log.warning("room %s: messages after %d are no longer in the history; some were not delivered here",
                        quoted(room), after)
        deliver = self._deliver
        for record in records:
            if deliver is not None:
                deliver(room, record, None, history.epoch)
            self._last[room] = (history.epoch, record["seq"])

    # -- heartbeat and sweeping -------------------------------------------------------------

    def _heartbeat_and_sweep(self) -> None:
        """Say this process is alive; sweep the members of the processes that are not."""
        store = self.store
        for process in store.dead(store.heartbeat()):
            left = store.sweep(process)
            if left > 0:
                log.info("process %s stopped answering: %d members left its rooms", process, left)
        with self._lock:
            rooms, self._left = [room for room in self._left if room not in self._wanted], set()
        store.tidy(rooms)
