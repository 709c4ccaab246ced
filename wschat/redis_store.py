"""The chat's data in Redis: its keys, and the Lua scripts that change them.

Keys, under the engine's ``prefix`` (``wschat:`` by default).  A room's keys
and its channel share the hash tag ``{r:ROOM}``, so that on a Redis Cluster
they live in one slot, on one master, and every script below touches one
slot only:

* ``{r:ROOM}:seq``, ``{r:ROOM}:epoch``, ``{r:ROOM}:history``: a room's last
  sequence number, the name of its sequence, and its last ``history``
  messages (a capped list; with ``max_history_bytes``, no more than fit in
  it, and ``{r:ROOM}:weight`` their size), kept ``room_ttl`` seconds after the last message;
* ``{r:ROOM}:members``: who holds which nickname (a hash: nickname key ->
  JSON ``{"nick", "user", "holders"}``);
* ``alive:PROCESS`` (a key that expires after ``presence_timeout``),
  ``processes`` and ``rooms-of:PROCESS``: which processes are alive, and
  where their members are, so that the members of a process that died
  without a word can be swept out of every room, one room at a time.

Events go out on the room's channel ``{r:ROOM}:events`` (with ``SPUBLISH``,
sharded pub/sub, on a Redis Cluster; ``PUBLISH`` on one Redis), in batches:
the epoch of the room's messages, then one line per event, ``M`` and a
message's JSON or ``E`` and a presence event's JSON (JSON has no raw line
breaks).  A batch of one room's events is one script (``PUBLISH_BATCH``): its
messages get their sequence numbers, their place in the history and their
publication together, so every process sees one order.

``RedisStore`` builds the keys and the commands and reads the replies; the
blocking calls go through a redis-py client (``redis.Redis`` or
``redis.cluster.RedisCluster``), the batches through whatever sends them
(``redis_engine``).  No threads, no retries, no state of its own.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from typing import TYPE_CHECKING, Any, cast

from .accelerator import speedups
from .dialect import Event, encode, now_ms
from .engine import History, new_epoch, select_history
from .names import nick_key

if TYPE_CHECKING:
    import redis

# A batch of one room's events: KEYS seq, epoch, history, weight; ARGV the
# history size, the channel, an epoch for a new room, the keys' TTL, the
# publishing command, the history's most bytes (0: no bound), then the events
# (see ``message_item`` and ``event_item``).  Returns the first message's
# sequence number (0: none).  With a bound, ``weight`` is the history's size
# (its entries' lengths), and the oldest entries go while it is over; without
# one, no weight is kept (a process with a bound weighs the history afresh).
# (A history an older wschat kept is weighed when the weight is missing; while
# older processes still write to it, in a rolling upgrade, it may read low.)
PUBLISH_BATCH = """
local pieces, first, count = {}, 0, 0
for i = 7, #ARGV do
  if string.byte(ARGV[i], 1) == 123 then count = count + 1 end
end
if count > 0 then
  local epoch = redis.call('GET', KEYS[2])
  if not epoch then
    epoch = ARGV[3]
    redis.call('SET', KEYS[2], epoch)
    redis.call('DEL', KEYS[3], KEYS[4])
  end
  pieces[1] = epoch
  local seq = redis.call('INCRBY', KEYS[1], count) - count
  first = seq + 1
  local size = tonumber(ARGV[1])
  local kept_after, texts, n, max_bytes = seq + count - size, {}, 1, tonumber(ARGV[6])
  for i = 7, #ARGV do
    local item = ARGV[i]
    if string.byte(item, 1) == 123 then
      seq = seq + 1
      pieces[n + 1], pieces[n + 2], pieces[n + 3], pieces[n + 4], pieces[n + 5] = '\\nM', item, ',"seq":', seq, '}'
      n = n + 5
      if seq > kept_after then texts[#texts + 1] = item .. ',"seq":' .. seq .. '}' end
    else
      pieces[n + 1], pieces[n + 2] = '\\n', item
      n = n + 2
    end
  end
  if size > 0 and count >= size then  -- the newest replace the whole history: none is read
    local weight, from = 0, 1
    if max_bytes > 0 then
      for _, text in ipairs(texts) do weight = weight + #text end
      while weight > max_bytes and from <= size do weight, from = weight - #texts[from], from + 1 end
      redis.call('SET', KEYS[4], weight, 'EX', ARGV[4])
    end
    redis.call('DEL', KEYS[3])
    if from <= size then
      redis.call('RPUSH', KEYS[3], unpack(texts, from))
      redis.call('EXPIRE', KEYS[3], ARGV[4])
    end
  elseif size > 0 then
    local weight = 0
    if max_bytes > 0 then
      weight = tonumber(redis.call('GET', KEYS[4]))
      if not weight then  -- a new room, or a history an older wschat kept: weigh it once
        weight = 0
        for _, text in ipairs(redis.call('LRANGE', KEYS[3], 0, -1)) do weight = weight + #text end
      end
    end
    local kept = redis.call('RPUSH', KEYS[3], unpack(texts))  -- only what is kept
    if max_bytes > 0 then
      for _, text in ipairs(texts) do weight = weight + #text end
      if kept > size then
        for _, text in ipairs(redis.call('LRANGE', KEYS[3], 0, kept - size - 1)) do weight = weight - #text end
        redis.call('LTRIM', KEYS[3], -size, -1)
        kept = size
      end
      while weight > max_bytes and kept > 0 do
        weight, kept = weight - #redis.call('LPOP', KEYS[3]), kept - 1
      end
      redis.call('SET', KEYS[4], kept > 0 and math.max(weight, 0) or 0, 'EX', ARGV[4])
    else
      redis.call('LTRIM', KEYS[3], -size, -1)
    end
    redis.call('EXPIRE', KEYS[3], ARGV[4])
  end
  if size > 0 and max_bytes == 0 then  -- no weight kept: one left would go stale
    redis.call('DEL', KEYS[4])
  end
  redis.call('EXPIRE', KEYS[1], ARGV[4])
  redis.call('EXPIRE', KEYS[2], ARGV[4])
  redis.call(ARGV[5], ARGV[2], table.concat(pieces))
else
  redis.call(ARGV[5], ARGV[2], '\\n' .. table.concat(ARGV, '\\n', 7))
end
return first
"""

# A room's position, and its history when asked: KEYS seq, epoch, history;
# ARGV an epoch for a new room, the keys' TTL, which history ("": none, "all",
# or the sequence number a client saw up to in the epoch ARGV[4]).  For the
# last, only the newest entries that can be later than it are read: each has a
# number of its own, so seq - since of them hold every one (see history below).
POSITION = """
redis.call('SET', KEYS[2], ARGV[1], 'NX', 'EX', ARGV[2])
local seq, epoch = redis.call('GET', KEYS[1]) or '0', redis.call('GET', KEYS[2])
local found = {seq, epoch}
local want = ARGV[3]
if want == 'all' or (want ~= '' and (ARGV[4] ~= epoch or tonumber(want) > tonumber(seq))) then
  found[3] = redis.call('LRANGE', KEYS[3], 0, -1)
elseif want ~= '' then
  local count = tonumber(seq) - tonumber(want)
  found[3] = count > 0 and redis.call('LRANGE', KEYS[3], -count, -1) or {}
end
return found
"""

# A room's numbering goes on after ``seq`` if it went back: KEYS seq, epoch;
# ARGV the epoch the number belongs to, the number.  Returns 1 if it had gone back.
ADVANCE = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
if tonumber(redis.call('GET', KEYS[1]) or '0') >= tonumber(ARGV[2]) then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL')
return 1
"""

# A nickname claimed: KEYS the room's members; ARGV the nickname's key, the
# nickname, the holder, the user ("" for anonymous).
CLAIM = """
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

# KEYS the room's members; ARGV the old key, the new key, the new nickname, the holder.
RENAME = """
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

# KEYS the room's members; ARGV the nickname's key, the holder, a leave event
# to publish when no one holds it any more ("" for none), the room's channel,
# the publishing command.
RELEASE = """
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
if ARGV[3] ~= '' then redis.call(ARGV[5], ARGV[4], '\\nE' .. ARGV[3]) end
return 1
"""

# The holders of one process leave one room: KEYS the room's members; ARGV the
# process's holder prefix ("PROCESS/"), the room, the time, the room's channel,
# the publishing command.  Returns how many nicknames left.
SWEEP_ROOM = """
local left = 0
local flat = redis.call('HGETALL', KEYS[1])
for i = 1, #flat, 2 do
  local entry = cjson.decode(flat[i + 1])
  local rest = {}
  for _, holder in ipairs(entry.holders) do
    if string.sub(holder, 1, #ARGV[1]) ~= ARGV[1] then table.insert(rest, holder) end
  end
  if #rest == 0 then
    redis.call('HDEL', KEYS[1], flat[i])
    left = left + 1
    local leave = cjson.encode({type = 'leave', room = ARGV[2], nick = entry.nick, time = tonumber(ARGV[3])})
    redis.call(ARGV[5], ARGV[4], '\\nE' .. leave)
  elseif #rest < #entry.holders then
    entry.holders = rest
    redis.call('HSET', KEYS[1], flat[i], cjson.encode(entry))
  end
end
return left
"""

# Whether a process holds a nickname in a room: KEYS the room's members; ARGV "PROCESS/".
HOLDS = """
for _, raw in ipairs(redis.call('HVALS', KEYS[1])) do
  for _, holder in ipairs(cjson.decode(raw).holders) do
    if string.sub(holder, 1, #ARGV[1]) == ARGV[1] then return 1 end
  end
end
return 0
"""


def message_lines_python(batch: bytes) -> tuple[bytes, list[bytes]] | None:
    """A published batch of messages only, as its first line (the epoch) and
    its messages' JSON lines; None when an event is in it (a line that starts
    with ``E``: the batch is then read line by line)."""
    if b"\nE" in batch:
        return None
    first, *lines = batch.split(b"\nM")
    return first, lines


#: ``message_lines_python``, in one pass in the C accelerator when it is there.
message_lines = speedups.message_lines if speedups else message_lines_python


def seq_of(line: bytes) -> int:
    """A published message's sequence number, which ``PUBLISH_BATCH`` put
    last in its JSON (``...,"seq":N}``), read without decoding the rest."""
    return int(line[line.rindex(b":") + 1 : -1])


def message_item(record: Event) -> str:
    """A chat message as ``PUBLISH_BATCH`` takes it: its JSON without the
    closing brace, where the script writes its seq (so the script makes
    one string of each message, its history entry: what Lua allocates is
    most of its time)."""
    return encode(record)[:-1]


def event_item(event: Event) -> str:
    """A presence event as ``PUBLISH_BATCH`` takes it: "E" and its JSON."""
    return "E" + encode(event)


BATCH_SHA = hashlib.sha1(PUBLISH_BATCH.encode()).hexdigest()  # EVALSHA's name for it; SCRIPT LOAD makes it known
MAX_BATCH = 500  # events in one PUBLISH_BATCH call: bounds the script's stack and the published line


class RedisStore:
    """The calls that read and change the chat's data (see the module docstring)."""

    def __init__(self, client: redis.Redis, prefix: str, process_id: str, *, history: int, room_ttl: int,
                 presence_timeout: float, sharded: bool = False, max_history_bytes: int = 0):
        self.redis = client
        self.prefix = prefix
        self.process_id = process_id
        self.history_size = history
        self.max_history_bytes = max_history_bytes
        self.room_ttl = room_ttl
        self.presence_timeout = presence_timeout
        self.publish_command = "SPUBLISH" if sharded else "PUBLISH"
        self._scripts = {name: client.register_script(source) for name, source in (
            ("position", POSITION), ("advance", ADVANCE), ("claim", CLAIM), ("rename", RENAME), ("release", RELEASE),
            ("sweep_room", SWEEP_ROOM), ("holds", HOLDS))}
        self._epoch_base = new_epoch()
        self._epochs = itertools.count()  # with the base: a fresh epoch name, without os.urandom per message

    def key(self, kind: str, room: str) -> str:
        """A room's key: every key of a room shares its hash tag (one slot)."""
        return f"{self.prefix}{{r:{room}}}:{kind}"

    def channel(self, room: str) -> str:
        return self.key("events", room)

    def room_of(self, channel: str) -> str:
        return channel[len(self.prefix) + 3 : -len("}:events")]

    def process_key(self, kind: str, process: str) -> str:
        return f"{self.prefix}{kind}:{process}"

    def _new_epoch(self) -> str:
        """The epoch a room gets if it has none (used once per room, offered every time)."""
        return f"{self._epoch_base}{next(self._epochs):x}"

    # -- messages and history ------------------------------------------------------------

    def batch(self, room: str, items: list[str]) -> tuple[str | int, ...]:
        """The command that publishes ``items`` (made by ``message_item`` and
        ``event_item``; at most MAX_BATCH) of ``room`` in one script call;
        its reply is the first message's sequence number."""
        keys = (self.key("seq", room), self.key("epoch", room), self.key("history", room), self.key("weight", room))
        return ("EVALSHA", BATCH_SHA, 4, *keys, self.history_size, self.channel(room), self._new_epoch(),
                self.room_ttl, self.publish_command, self.max_history_bytes, *items)

    def history(self, room: str, since: int | None = None, epoch: str | None = None) -> History:
        """The room's history after ``since`` (of ``epoch``): only those
        entries are read and decoded, not the whole history at every join."""
        seq, kept_epoch, kept = self._position(room, "all" if since is None else str(since), epoch or "")
        records, missed = select_history([json.loads(text) for text in kept], seq, since, epoch == kept_epoch)
        return History(kept_epoch, seq, records, missed)

    def position(self, room: str) -> tuple[str, int]:
        seq, epoch = self._position(room, "", "")
        return epoch, seq

    def _position(self, room: str, want: str, epoch: str) -> list[Any]:
        found: list[Any] = self._scripts["position"](
            keys=[self.key("seq", room), self.key("epoch", room), self.key("history", room)],
            args=[self._new_epoch(), self.room_ttl, want, epoch])
        found[0] = int(found[0])
        return found

    def advance(self, room: str, epoch: str, seq: int) -> bool:
        """Make ``room``'s numbering go on after ``seq`` (of ``epoch``) if it
        went back; whether it had."""
        return bool(self._scripts["advance"](keys=[self.key("seq", room), self.key("epoch", room)], args=[epoch, seq]))

    # -- presence --------------------------------------------------------------------------

    def claim(self, room: str, nick: str, holder: str, user: str) -> tuple[str, list[str]]:
        """``holder`` claims ``nick`` for ``user`` ("" for anonymous): the
        outcome ("joined", "added", "held" or "taken") and the anonymous
        holders an app user's claim displaced.  The room goes on this
        process's list first, so a sweep finds the claim if this process dies."""
        self.redis.sadd(self.process_key("rooms-of", self.process_id), room)
        outcome, *evicted = self._scripts["claim"](keys=[self.key("members", room)],
                                                   args=[nick_key(nick), nick, holder, user])
        return outcome, evicted

    def rename(self, room: str, old: str, new: str, holder: str) -> bool:
        return bool(self._scripts["rename"](keys=[self.key("members", room)],
                                            args=[nick_key(old), nick_key(new), new, holder]))

    def release(self, room: str, nick: str, holder: str, leave: Event | None = None) -> bool:
        """Let ``holder``'s claim go; True when no one holds ``nick`` any
        more (``leave``, if given, is then published)."""
        return bool(self._scripts["release"](
            keys=[self.key("members", room)],
            args=[nick_key(nick), holder, encode(leave) if leave else "", self.channel(room), self.publish_command]))

    def users(self, room: str) -> list[str]:
        return sorted(json.loads(entry)["nick"] for entry in self.redis.hvals(self.key("members", room)))

    # -- which processes are alive -------------------------------------------------------------

    def heartbeat(self) -> list[str]:
        """Say this process is alive for ``presence_timeout``; the other processes Redis knows of."""
        self.redis.set(self.process_key("alive", self.process_id), "1", px=int(self.presence_timeout * 1000))
        self.redis.sadd(f"{self.prefix}processes", self.process_id)
        return [process for process in self._members(f"{self.prefix}processes") if process != self.process_id]

    def _members(self, key: str) -> set[str]:
        """A set's members (as text: the client decodes responses)."""
        return cast(set[str], self.redis.smembers(key))

    def dead(self, processes: list[str]) -> list[str]:
        """Those of ``processes`` whose heartbeat expired."""
        return [process for process in processes if not self.redis.exists(self.process_key("alive", process))]

    def sweep(self, process: str) -> int:
        """The members of ``process``, if it is not alive, leave every room
        (their leaves are published), one room at a time; how many left
        (-1: it is alive).  Several processes may sweep the same one: each
        nickname leaves once."""
        if self.redis.exists(self.process_key("alive", process)):
            return -1
        rooms_of = self.process_key("rooms-of", process)
        left = 0
        for room in self._members(rooms_of):
            left += self._scripts["sweep_room"](
                keys=[self.key("members", room)],
                args=[process + "/", room, now_ms(), self.channel(room), self.publish_command])
        self.redis.delete(rooms_of)
        self.redis.srem(f"{self.prefix}processes", process)
        return left

    def holds(self, room: str) -> bool:
        """Whether this process holds a nickname in ``room``."""
        return bool(self._scripts["holds"](keys=[self.key("members", room)], args=[self.process_id + "/"]))

    def forget_room(self, room: str) -> None:
        """``room`` comes off this process's list (it holds nothing there)."""
        self.redis.srem(self.process_key("rooms-of", self.process_id), room)

    def leave_everywhere(self) -> None:
        """This process is stopping: its members leave every room now."""
        self.redis.delete(self.process_key("alive", self.process_id))
        self.sweep(self.process_id)

