"""The Redis engine: several wschat processes, on one machine or many, are one chat.

What lives in Redis (keys under ``prefix``, ``wschat`` by default):

* ``seq:ROOM``, ``epoch:ROOM``, ``history:ROOM``: a room's last sequence
  number, the name of its sequence, and its last ``history`` messages (a
  capped list), kept ``room_ttl`` seconds after the last message;
* ``members:ROOM``: who holds which nickname (a hash: nickname key -> JSON
  ``{"nick", "user", "holders"}``);
* ``alive:PROCESS`` (a key that expires after ``presence_timeout``),
  ``processes`` and ``rooms-of:PROCESS``: which processes are alive, and
  where their members are, so that the members of a process that died
  without a word leave every room within ``presence_timeout`` plus a third of it.

Every change to a room is one Lua script, atomic in Redis: a message's
sequence number, its place in the history and its publication happen
together, so every process sees one order.  Events go out on the channel
``room:ROOM``; a process subscribes to the rooms it has members in.  Scripts
touch keys they compute (the rooms of a dead process), so the engine needs
one Redis, not a Redis Cluster.

One thread (``wschat-redis``) owns the subscription: it delivers events,
keeps this process's heartbeat, sweeps dead processes' members, fills any gap
in a room's sequence from the history, and when Redis is gone, reconnects with
backoff.  While Redis is unreachable every call fails at once with
``EngineUnavailable`` (the chat tells the sender); the outage is logged once.
"""

from __future__ import annotations

import itertools
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

from .engine import ADDED, JOINED, TAKEN, Claim, Deliver, EngineUnavailable, History, encode, new_epoch, select_history
from .logsafe import quoted
from .names import nick_key

log = logging.getLogger("wschat")

_PUBLISH_MESSAGE = """
local seq = redis.call('INCR', KEYS[1])
local epoch = redis.call('GET', KEYS[2])
if not epoch then
  epoch = ARGV[4]
  redis.call('SET', KEYS[2], epoch)
  redis.call('DEL', KEYS[3])
end
local text = string.sub(ARGV[1], 1, -2) .. ',"seq":' .. seq .. '}'
local size = tonumber(ARGV[2])
if size > 0 then
  redis.call('RPUSH', KEYS[3], text)
  redis.call('LTRIM', KEYS[3], -size, -1)
  redis.call('EXPIRE', KEYS[3], ARGV[5])
end
redis.call('EXPIRE', KEYS[1], ARGV[5])
redis.call('EXPIRE', KEYS[2], ARGV[5])
redis.call('PUBLISH', ARGV[3], 'M' .. epoch .. ' ' .. text)
return seq
"""

_CLAIM = """
redis.call('SADD', KEYS[2], ARGV[5])
local raw = redis.call('HGET', KEYS[1], ARGV[1])
local entry = {nick = ARGV[2], user = ARGV[4], holders = {ARGV[3]}}
if not raw then
  redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(entry))
  return {'joined'}
end
local old = cjson.decode(raw)
for _, holder in ipairs(old.holders) do
  if holder == ARGV[3] then return {'held'} end
end
if ARGV[4] ~= '' and old.user == ARGV[4] then
  table.insert(old.holders, ARGV[3])
  redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(old))
  return {'added'}
end
if ARGV[4] ~= '' and old.user == '' then
  redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(entry))
  local result = {'added'}
  for _, holder in ipairs(old.holders) do table.insert(result, holder) end
  return result
end
return {'taken'}
"""

_RENAME = """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return 0 end
local entry = cjson.decode(raw)
if entry.user ~= '' or #entry.holders ~= 1 or entry.holders[1] ~= ARGV[4] then return 0 end
if ARGV[2] ~= ARGV[1] then
  if redis.call('HEXISTS', KEYS[1], ARGV[2]) == 1 then return 0 end
  redis.call('HDEL', KEYS[1], ARGV[1])
end
entry.nick = ARGV[3]
redis.call('HSET', KEYS[1], ARGV[2], cjson.encode(entry))
return 1
"""

_RELEASE = """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return 0 end
local entry = cjson.decode(raw)
local rest, found = {}, false
for _, holder in ipairs(entry.holders) do
  if holder == ARGV[2] then found = true else table.insert(rest, holder) end
end
if not found then return 0 end
if #rest > 0 then
  entry.holders = rest
  redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(entry))
  return 0
end
redis.call('HDEL', KEYS[1], ARGV[1])
if ARGV[3] ~= '' then redis.call('PUBLISH', ARGV[4], 'E' .. ARGV[3]) end
return 1
"""

# The members of a process that is no longer alive leave every room it was in.
_SWEEP = """
if redis.call('EXISTS', KEYS[1]) == 1 then return -1 end
local mine = ARGV[1] .. '/'
local left = 0
for _, room in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  local hash = ARGV[2] .. 'members:' .. room
  local flat = redis.call('HGETALL', hash)
  for i = 1, #flat, 2 do
    local entry = cjson.decode(flat[i + 1])
    local rest = {}
    for _, holder in ipairs(entry.holders) do
      if string.sub(holder, 1, #mine) ~= mine then table.insert(rest, holder) end
    end
    if #rest == 0 then
      redis.call('HDEL', hash, flat[i])
      left = left + 1
      local leave = cjson.encode({type = 'leave', room = room, nick = entry.nick, time = tonumber(ARGV[3])})
      redis.call('PUBLISH', ARGV[2] .. 'room:' .. room, 'E' .. leave)
    elseif #rest < #entry.holders then
      entry.holders = rest
      redis.call('HSET', hash, flat[i], cjson.encode(entry))
    end
  end
end
redis.call('DEL', KEYS[2])
redis.call('SREM', KEYS[3], ARGV[1])
return left
"""

# Rooms where this process has no members left come off its list.
_TIDY = """
local mine = ARGV[1] .. '/'
for i = 3, #ARGV do
  local keep = false
  for _, raw in ipairs(redis.call('HVALS', ARGV[2] .. 'members:' .. ARGV[i])) do
    for _, holder in ipairs(cjson.decode(raw).holders) do
      if string.sub(holder, 1, #mine) == mine then keep = true end
    end
  end
  if not keep then redis.call('SREM', KEYS[1], ARGV[i]) end
end
return 0
"""


def _now_ms() -> int:
    return int(time.time() * 1000)


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
        self.url = url
        self.history_size = history
        self.presence_timeout = presence_timeout
        self.room_ttl = room_ttl
        self.timeout = timeout
        self.prefix = prefix + ":"
        self.process_id = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        # No retries inside redis-py: an outage must fail fast, and is retried here.
        self.redis = redis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0),
            decode_responses=True,
        )
        self._scripts = {name: self.redis.register_script(source) for name, source in (
            ("publish", _PUBLISH_MESSAGE), ("claim", _CLAIM), ("rename", _RENAME),
            ("release", _RELEASE), ("sweep", _SWEEP), ("tidy", _TIDY))}
        self._control = f"{self.prefix}control:{self.process_id}"
        self._epoch_base = new_epoch()
        self._epochs = itertools.count()  # with process_id: a fresh epoch name, without os.urandom per message
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._wanted: dict[str, int] = {}  # room -> members here: the rooms to subscribe to
        self._confirmed: set[str] = set()  # rooms whose subscription Redis confirmed
        self._left: set[str] = set()  # rooms no member here is in any more (see _tidy)
        self._last: dict[str, tuple[str, int]] = {}  # room -> (epoch, seq) last delivered
        self._held: dict[tuple[str, str], tuple[str, str]] = {}  # (room, holder) -> (nick, user)
        self._pending_releases: list[tuple[str, str, str]] = []  # (room, nick, holder)
        self._down_since: float | None = None
        self._deliver: Deliver | None = None
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"RedisEngine({self.url!r}, process {self.process_id})"

    # -- keys --------------------------------------------------------------------------

    def _key(self, kind: str, name: str) -> str:
        return f"{self.prefix}{kind}:{name}"

    def _new_epoch(self) -> str:
        """The epoch a room gets if it has none (used once per room, offered every time)."""
        return f"{self._epoch_base}{next(self._epochs):x}"

    # -- lifetime ----------------------------------------------------------------------

    def start(self, deliver: Deliver) -> None:
        """Announce this process, and start delivering.  Raises
        ``EngineUnavailable`` when Redis cannot be reached."""
        self._deliver = deliver
        try:
            self._heartbeat()
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
            self.redis.delete(self._key("alive", self.process_id))
            self._sweep(self.process_id)
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
        seq = self._call(
            self._scripts["publish"],
            keys=[self._key("seq", room), self._key("epoch", room), self._key("history", room)],
            args=[encode(record), self.history_size, self._key("room", room), self._new_epoch(), self.room_ttl],
        )
        record["seq"] = seq
        return seq

    def publish(self, room: str, event: dict) -> None:
        self._call(self.redis.publish, self._key("room", room), "E" + encode(event))

    def history(self, room: str, since: int | None = None, epoch: str | None = None) -> History:
        pipe = self.redis.pipeline(transaction=True)
        pipe.set(self._key("epoch", room), self._new_epoch(), nx=True, ex=self.room_ttl)  # a new room's epoch
        pipe.get(self._key("seq", room))
        pipe.get(self._key("epoch", room))
        pipe.lrange(self._key("history", room), 0, -1)
        _, seq, kept_epoch, kept = self._call(pipe.execute)
        seq = int(seq or 0)
        records, missed = select_history([json.loads(text) for text in kept], seq, since, epoch == kept_epoch)
        return History(kept_epoch, seq, records, missed)

    def position(self, room: str) -> tuple[str, int]:
        pipe = self.redis.pipeline(transaction=True)
        pipe.set(self._key("epoch", room), self._new_epoch(), nx=True, ex=self.room_ttl)
        pipe.get(self._key("epoch", room))
        pipe.get(self._key("seq", room))
        _, epoch, seq = self._call(pipe.execute)
        return epoch, int(seq or 0)

    # -- presence ---------------------------------------------------------------------------

    def claim(self, room: str, nick: str, holder: str, user_id: str | None = None) -> Claim:
        user = "" if user_id is None else "u" + user_id
        outcome, *evicted = self._call(
            self._scripts["claim"],
            keys=[self._key("members", room), self._key("rooms-of", self.process_id)],
            args=[nick_key(nick), nick, holder, user, room],
        )
        if outcome == "taken":
            return Claim(TAKEN)
        with self._lock:
            self._held[room, holder] = (nick, user)
        return Claim(JOINED if outcome == "joined" else ADDED, evicted)

    def rename(self, room: str, old: str, new: str, holder: str) -> bool:
        renamed = self._call(self._scripts["rename"], keys=[self._key("members", room)],
                             args=[nick_key(old), nick_key(new), new, holder])
        if renamed:
            with self._lock:
                self._held[room, holder] = (new, "")
        return bool(renamed)

    def release(self, room: str, nick: str, holder: str) -> bool:
        """Let ``holder``'s claim go; True when no one holds the nickname any
        more (the caller announces the leave).  While Redis is down the
        release waits, and the engine announces the leave when it is back."""
        with self._lock:
            self._held.pop((room, holder), None)
        try:
            return bool(self._release(room, nick, holder, leave=None))
        except EngineUnavailable:
            with self._lock:
                self._pending_releases.append((room, nick, holder))
            return False

    def _release(self, room: str, nick: str, holder: str, leave: dict | None) -> int:
        return self._call(self._scripts["release"], keys=[self._key("members", room)],
                          args=[nick_key(nick), holder, encode(leave) if leave else "", self._key("room", room)])

    def users(self, room: str) -> list[str]:
        entries = self._call(self.redis.hvals, self._key("members", room))
        return sorted(json.loads(entry)["nick"] for entry in entries)

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
            room = message["channel"][len(self.prefix) + len("room:"):]
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
            pubsub.subscribe(*(self._key("room", room) for room in added))
        if dropped:
            pubsub.unsubscribe(*(self._key("room", room) for room in dropped))
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
        for room, nick, holder in pending:  # the leaves that could not be announced
            self._release(room, nick, holder, {"type": "leave", "room": room, "nick": nick, "time": _now_ms()})
        for (room, holder), (nick, user) in held.items():  # claims Redis lost (restarted empty, or swept)
            outcome, *_ = self._scripts["claim"](
                keys=[self._key("members", room), self._key("rooms-of", self.process_id)],
                args=[nick_key(nick), nick, holder, user, room])
            if outcome == "joined":
                self.publish(room, {"type": "join", "room": room, "nick": nick, "time": _now_ms()})
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
                deliver(room, record, encode(record), history.epoch)
            self._last[room] = (history.epoch, record["seq"])

    # -- heartbeat and sweeping -------------------------------------------------------------

    def _heartbeat(self) -> list[str]:
        """Say this process is alive; the other processes Redis knows of."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(self._key("alive", self.process_id), "1", px=int(self.presence_timeout * 1000))
        pipe.sadd(f"{self.prefix}processes", self.process_id)
        pipe.smembers(f"{self.prefix}processes")
        return [process for process in pipe.execute()[2] if process != self.process_id]

    def _heartbeat_and_sweep(self) -> None:
        others = self._heartbeat()
        if others:
            pipe = self.redis.pipeline(transaction=False)
            for process in others:
                pipe.exists(self._key("alive", process))
            for process, alive in zip(others, pipe.execute()):
                if not alive:
                    left = self._sweep(process)
                    if left > 0:
                        log.info("process %s stopped answering: %d members left its rooms", process, left)
        self._tidy()

    def _sweep(self, process: str) -> int:
        return self._scripts["sweep"](
            keys=[self._key("alive", process), self._key("rooms-of", process), f"{self.prefix}processes"],
            args=[process, self.prefix, _now_ms()])

    def _tidy(self) -> None:
        with self._lock:
            rooms, self._left = [room for room in self._left if room not in self._wanted], set()
        if rooms:
            self._scripts["tidy"](keys=[self._key("rooms-of", self.process_id)],
                                  args=[self.process_id, self.prefix, *rooms])
