"""The chat's data in one Redis: its keys, and the Lua scripts that change them.

Keys, under the engine's ``prefix`` (``wschat:`` by default):

* ``seq:ROOM``, ``epoch:ROOM``, ``history:ROOM``: a room's last sequence
  number, the name of its sequence, and its last ``history`` messages (a
  capped list), kept ``room_ttl`` seconds after the last message;
* ``members:ROOM``: who holds which nickname (a hash: nickname key -> JSON
  ``{"nick", "user", "holders"}``);
* ``alive:PROCESS`` (a key that expires after ``presence_timeout``),
  ``processes`` and ``rooms-of:PROCESS``: which processes are alive, and
  where their members are, so that the members of a process that died
  without a word can be swept out of every room.

Events go out on the channel ``room:ROOM``: ``M`` + epoch + space + the
message's JSON, or ``E`` + a presence event's JSON.

Every change to a room is one Lua script, whole inside Redis, so no other
process's command comes between its steps: a message gets its sequence
number, its place in the history and its publication together (one order for
every process); a nickname is claimed, renamed or released without a race; a
dead process's members leave every room at once.  Scripts touch keys they
compute (the rooms of a dead process), so this needs one Redis, not a Redis
Cluster.  The comment above each script says what its KEYS and ARGV are.

``RedisStore`` makes those calls and nothing else: no threads, no retries,
no state of its own; redis-py's errors reach the caller (``RedisEngine``).
"""

from __future__ import annotations

import itertools
import json

from .dialect import encode, now_ms
from .engine import History, new_epoch, select_history
from .names import nick_key

# A chat message: KEYS seq, epoch, history; ARGV the record's JSON, the
# history size, the room's channel, an epoch for a new room, the keys' TTL.
PUBLISH_MESSAGE = """
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

# A nickname claimed: KEYS the room's members, this process's rooms; ARGV the
# nickname's key, the nickname, the holder, the user ("" for anonymous), the room.
CLAIM = """
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
# to publish when no one holds it any more ("" for none), the room's channel.
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
if ARGV[3] ~= '' then redis.call('PUBLISH', ARGV[4], 'E' .. ARGV[3]) end
return 1
"""

# The members of a process that is no longer alive leave every room it was in:
# KEYS its alive key, its rooms, the processes; ARGV the process, the prefix, the time.
SWEEP = """
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

# Rooms where this process has no members left come off its list: KEYS its
# rooms; ARGV the process, the prefix, then the rooms to check.
TIDY = """
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


class RedisStore:
    """The calls that read and change the chat's data (see the module docstring)."""

    def __init__(self, client, prefix: str, process_id: str, *, history: int, room_ttl: int,
                 presence_timeout: float):
        self.redis = client
        self.prefix = prefix
        self.process_id = process_id
        self.history_size = history
        self.room_ttl = room_ttl
        self.presence_timeout = presence_timeout
        self._scripts = {name: client.register_script(source) for name, source in (
            ("publish", PUBLISH_MESSAGE), ("claim", CLAIM), ("rename", RENAME), ("release", RELEASE),
            ("sweep", SWEEP), ("tidy", TIDY))}
        self._epoch_base = new_epoch()
        self._epochs = itertools.count()  # with the base: a fresh epoch name, without os.urandom per message

    def key(self, kind: str, name: str) -> str:
        return f"{self.prefix}{kind}:{name}"

    def channel(self, room: str) -> str:
        return self.key("room", room)

    def room_of(self, channel: str) -> str:
        return channel[len(self.prefix) + len("room:"):]

    def _new_epoch(self) -> str:
        """The epoch a room gets if it has none (used once per room, offered every time)."""
        return f"{self._epoch_base}{next(self._epochs):x}"

    # -- messages and history ------------------------------------------------------------

    def publish_message(self, room: str, record: dict) -> int:
        """Number, keep and publish a chat message; its sequence number."""
        return self._scripts["publish"](
            keys=[self.key("seq", room), self.key("epoch", room), self.key("history", room)],
            args=[encode(record), self.history_size, self.channel(room), self._new_epoch(), self.room_ttl])

    def publish(self, room: str, event: dict) -> None:
        self.redis.publish(self.channel(room), "E" + encode(event))

    def history(self, room: str, since: int | None = None, epoch: str | None = None) -> History:
        pipe = self.redis.pipeline(transaction=True)
        pipe.set(self.key("epoch", room), self._new_epoch(), nx=True, ex=self.room_ttl)  # a new room's epoch
        pipe.get(self.key("seq", room))
        pipe.get(self.key("epoch", room))
        pipe.lrange(self.key("history", room), 0, -1)
        _, seq, kept_epoch, kept = pipe.execute()
        seq = int(seq or 0)
        records, missed = select_history([json.loads(text) for text in kept], seq, since, epoch == kept_epoch)
        return History(kept_epoch, seq, records, missed)

    def position(self, room: str) -> tuple[str, int]:
        pipe = self.redis.pipeline(transaction=True)
        pipe.set(self.key("epoch", room), self._new_epoch(), nx=True, ex=self.room_ttl)
        pipe.get(self.key("epoch", room))
        pipe.get(self.key("seq", room))
        _, epoch, seq = pipe.execute()
        return epoch, int(seq or 0)

    # -- presence --------------------------------------------------------------------------

    def claim(self, room: str, nick: str, holder: str, user: str) -> tuple[str, list[str]]:
        """``holder`` claims ``nick`` for ``user`` ("" for anonymous): the
        outcome ("joined", "added", "held" or "taken") and the anonymous
        holders an app user's claim displaced."""
        outcome, *evicted = self._scripts["claim"](
            keys=[self.key("members", room), self.key("rooms-of", self.process_id)],
            args=[nick_key(nick), nick, holder, user, room])
        return outcome, evicted

    def rename(self, room: str, old: str, new: str, holder: str) -> bool:
        return bool(self._scripts["rename"](keys=[self.key("members", room)],
                                            args=[nick_key(old), nick_key(new), new, holder]))

    def release(self, room: str, nick: str, holder: str, leave: dict | None = None) -> bool:
        """Let ``holder``'s claim go; True when no one holds ``nick`` any
        more (``leave``, if given, is then published)."""
        return bool(self._scripts["release"](
            keys=[self.key("members", room)],
            args=[nick_key(nick), holder, encode(leave) if leave else "", self.channel(room)]))

    def users(self, room: str) -> list[str]:
        return sorted(json.loads(entry)["nick"] for entry in self.redis.hvals(self.key("members", room)))

    # -- which processes are alive -------------------------------------------------------------

    def heartbeat(self) -> list[str]:
        """Say this process is alive for ``presence_timeout``; the other processes Redis knows of."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(self.key("alive", self.process_id), "1", px=int(self.presence_timeout * 1000))
        pipe.sadd(f"{self.prefix}processes", self.process_id)
        pipe.smembers(f"{self.prefix}processes")
        return [process for process in pipe.execute()[2] if process != self.process_id]

    def dead(self, processes: list[str]) -> list[str]:
        """Those of ``processes`` whose heartbeat expired."""
        if not processes:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for process in processes:
            pipe.exists(self.key("alive", process))
        return [process for process, alive in zip(processes, pipe.execute()) if not alive]

    def sweep(self, process: str) -> int:
        """The members of ``process``, if it is not alive, leave every room
        (their leaves are published); how many left."""
        return self._scripts["sweep"](
            keys=[self.key("alive", process), self.key("rooms-of", process), f"{self.prefix}processes"],
            args=[process, self.prefix, now_ms()])

    def tidy(self, rooms: list[str]) -> None:
        """Rooms where this process has no members left come off its list."""
        if rooms:
            self._scripts["tidy"](keys=[self.key("rooms-of", self.process_id)],
                                  args=[self.process_id, self.prefix, *rooms])

    def leave_everywhere(self) -> None:
        """This process is stopping: its members leave every room now."""
        self.redis.delete(self.key("alive", self.process_id))
        self.sweep(self.process_id)
