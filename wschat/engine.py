"""What a chat shares between the processes that serve it: its engine.

The chat (``chat.py``) keeps its own connections; what must be one and the
same for every process serving the chat goes through an engine:

* publishing: a chat message gets its room's next sequence number and goes
  into the room's history, and every event of a room reaches every process
  subscribed to it, in one order, once;
* history: a room's recent messages, from a sequence number on;
* presence: who is in a room, and who holds which nickname.

``MemoryEngine`` (the default) keeps it all in this process;
``redis_engine.RedisEngine`` keeps it in Redis, so that several processes, on
one machine or several, are one chat.  Both deliver events through the
callback given to ``start``, a room's events at a time, in its order:
``deliver(room, [delivery, ...])``, where a delivery is a presence event (a
dict), or a run of chat messages numbered one after another (``Messages``).
A run keeps each message as the engine has it at hand: its record (this
process published it, or read it from the history), or its JSON as wschat.v1
clients receive it (Redis carries that); what a client needs is made from it
only when a client here needs it (see ``Messages``).

A holder is one connection's claim on a nickname (``"process/connection"``);
a nickname held for an app's user (``user_id``) may have several holders, the
user's tabs; an anonymous one has exactly one.
"""

from __future__ import annotations

import itertools
import json
import logging
import secrets
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Iterable, Protocol, TypeVar

from .dialect import Event, encode, texts_of, utf8_size
from .names import nick_key

log = logging.getLogger("wschat")

JOINED = "joined"  # the nickname is new to the room: a join to announce
ADDED = "added"  # one more connection of the user who holds it
TAKEN = "taken"  # someone else holds it

Kept = TypeVar("Kept", Event, bytes)
Run = TypeVar("Run", bound="Messages[Any]")  # (typing.Self is Python 3.11's)


class Messages(Generic[Kept]):
    """Chat messages of one room numbered one after another, from ``first``,
    in the room's sequence ``epoch``, each kept as the engine had it at hand:
    its record (``Records``), or its JSON in UTF-8 as Redis carries it and
    wschat.v1 clients receive it (``Lines``).

    A process delivers every message of a room it has members in, whoever
    published it, so receiving must cost little per message: a run from
    Redis is neither decoded nor copied message by message unless a client
    here needs that (a plain client needs the texts, a newcomer's catch-up
    the records).
    """

    __slots__ = ("epoch", "first", "items")

    def __init__(self, epoch: str, first: int, items: list[Kept]):
        self.epoch = epoch
        self.first = first
        self.items: list[Kept] = items

    def __len__(self) -> int:
        return len(self.items)

    @property
    def last(self) -> int:
        return self.first + len(self.items) - 1

    def after(self: Run, seq: int) -> Run:
        """The messages numbered after ``seq``."""
        skip = max(0, seq + 1 - self.first)
        return type(self)(self.epoch, self.first + skip, self.items[skip:])

    def kept(self, most: int | None = None) -> Iterable[tuple[int, Kept]]:
        """Each message as ``(seq, what it is kept as)`` (see ``record_of``);
        only the last ``most`` when given."""
        skip = 0 if most is None else max(0, len(self.items) - most)
        return zip(itertools.count(self.first + skip), itertools.islice(self.items, skip, None))

    def sizes(self, most: int) -> list[int]:
        """What each of the last ``most`` messages weighs: its JSON line's
        length, or its text's in UTF-8 and ``RECORD_OVERHEAD``, as a welcome
        counts it (``rooms.newest_within``; but for the id), so that a
        history cut at a welcome's bound keeps what a welcome can carry."""
        raise NotImplementedError

    def texts(self) -> list[bytes]:
        """What a plain client receives: each message's text, in UTF-8."""
        raise NotImplementedError

    def jsons(self) -> list[bytes]:
        """What a wschat.v1 client receives: each message's JSON, in UTF-8."""
        raise NotImplementedError


class Records(Messages[Event]):
    """Messages as their records: published here, or read from the history."""

    __slots__ = ()

    @classmethod
    def runs(cls, epoch: str, records: list[Event]) -> list[Records]:
        """``records`` (in order) as runs: a run ends where the numbering skips."""
        found: list[Records] = []
        for record in records:
            if found and found[-1].last + 1 == record["seq"]:
                found[-1].items.append(record)
            else:
                found.append(cls(epoch, record["seq"], [record]))
        return found

    def sizes(self, most: int) -> list[int]:
        return record_sizes(self.items[-most:])

    def texts(self) -> list[bytes]:
        return [record["text"].encode("utf-8") for record in self.items]

    def jsons(self) -> list[bytes]:
        return [encode(record).encode("utf-8") for record in self.items]


class Lines(Messages[bytes]):
    """Messages as the JSON lines Redis carries, whichever process (this one
    included) published them."""

    __slots__ = ()

    def sizes(self, most: int) -> list[int]:
        return list(map(len, self.items[-most:]))

    def texts(self) -> list[bytes]:
        return texts_of(self.items)

    def jsons(self) -> list[bytes]:
        return self.items


def record_of(kept: Event | bytes) -> Event:
    """A message's record, from what ``Messages.kept`` gave."""
    return json.loads(kept) if isinstance(kept, bytes) else kept


# What a room keeps, and all rooms together, unless told otherwise (the engines',
# the chat's and the command line's defaults): clients choose rooms and what they say.
DEFAULT_MAX_HISTORY_BYTES = 32 << 10  # 50 typical messages fit 3 times over; long ones are cut to the newest
DEFAULT_MAX_HISTORY_TOTAL = 64 << 20  # 2048 rooms of max_history_bytes: what all rooms keep here, and hold in recent
RECORD_OVERHEAD = 160  # what a message's JSON holds besides its text: keys, room, nick, time, seq


def record_sizes(records: Iterable[Event]) -> list[int]:
    """What each record weighs (see ``Messages.sizes``)."""
    return [RECORD_OVERHEAD + utf8_size(record["text"]) for record in records]


def within(items: deque[Any], sizes: deque[int], max_bytes: int, keep: int = 0) -> int:
    """Drop the oldest of ``items`` (and their ``sizes``, in step) while
    they weigh more than ``max_bytes`` in all, but the newest ``keep``; what
    is left weighs (``Recent`` and ``MemoryEngine``'s rooms keep a history so)."""
    size = sum(sizes)
    while size > max_bytes and len(items) > keep:
        items.popleft()
        size -= sizes.popleft()
    return size


Shed = TypeVar("Shed")


def heaviest_first(weighed: Iterable[tuple[int, Shed]], total: int, limit: int) -> list[Shed]:
    """What to let go of when ``total`` is past ``limit``: the heaviest of
    ``weighed`` ((weight, what) pairs) until what is left weighs 3/4 of
    ``limit`` at most (so that this, which sorts them all, is rare)."""
    excess, chosen = total - limit * 3 // 4, []
    for weight, item in sorted(weighed, key=lambda pair: pair[0], reverse=True):
        if excess <= 0:
            break
        chosen.append(item)
        excess -= weight
    return chosen


Delivery = Event | Messages[Any]  # a presence event, or a run of chat messages
Deliver = Callable[[str, list[Delivery]], None]


class EngineUnavailable(Exception):
    """The engine cannot be reached (its broker is down): nothing was done."""


Failed = Callable[[EngineUnavailable], None]


@dataclass
class Claim:
    outcome: str  # JOINED, ADDED or TAKEN
    evicted: list[str] = field(default_factory=list)  # anonymous holders an app user's claim displaced


@dataclass
class History:
    epoch: str  # names the room's sequence of messages; new when the room is made anew
    seq: int  # the room's last sequence number
    records: list[Event]  # messages after ``since``, oldest first (at most the kept history)
    missed: bool  # some messages after ``since`` are no longer kept


def new_epoch() -> str:
    return secrets.token_hex(6)


class Engine(Protocol):
    """The interface ``Chat`` uses (see the module docstring)."""

    history_size: int

    def start(self, deliver: Deliver) -> None: ...
    def stop(self) -> None: ...
    process_id: str  # names this process in holders

    def subscribe(self, room: str) -> None: ...  # once per member: counted, like unsubscribe
    def unsubscribe(self, room: str) -> None: ...
    # Without ``failed`` these wait, and raise EngineUnavailable; with it they
    # return at once (the chat publishes from the loop thread, which must not
    # wait), and ``failed`` is called (on any thread) on failure.
    def publish_message(self, room: str, record: Event, failed: Failed | None = None) -> None: ...
    def publish(self, room: str, event: Event, failed: Failed | None = None) -> None: ...
    def flush(self, timeout: float) -> None: ...  # wait (up to timeout) until what was published is kept
    def backlog(self) -> int: ...  # events published and not yet kept (a backlog that grows: the broker is the limit)
    def history(self, room: str, since: int | None = None, epoch: str | None = None) -> History: ...
    def position(self, room: str) -> tuple[str, int]: ...  # (epoch, last sequence number)
    def claim(self, room: str, nick: str, holder: str, user_id: str | None = None) -> Claim: ...
    def rename(self, room: str, old: str, new: str, holder: str) -> bool: ...
    def release(self, room: str, nick: str, holder: str) -> bool: ...
    def users(self, room: str) -> list[str]: ...


def select_history(kept: list[Event], seq: int, since: int | None, epoch_matches: bool) -> tuple[list[Event], bool]:
    """What a client that saw up to ``since`` gets of the ``kept`` messages,
    and whether it missed some: all of them when it saw nothing of this room
    (``since`` None, or another epoch)."""
    if since is None or not epoch_matches or since > seq:
        return kept, since is not None and since > 0
    records = [record for record in kept if record["seq"] > since]
    first = records[0]["seq"] if records else seq + 1
    return records, first > since + 1


@dataclass(eq=False)
class _Entry:
    nick: str  # as shown
    user_id: str | None
    holders: list[str]


@dataclass(eq=False)
class _Room:
    history: deque[Event]
    sizes: deque[int]  # what each weighs (see Messages.sizes), in step but for the unweighed
    size: int = 0  # their sum
    unweighed: int = 0  # the newest messages, kept since the last _weigh
    seq: int = 0
    epoch: str = field(default_factory=new_epoch)
    members: dict[str, _Entry] = field(default_factory=dict)  # nick_key -> entry


class MemoryEngine:
    """Everything in this process's memory: one process is the whole chat.

    What a server's loop publishes (its inline handlers' messages) is
    delivered once a pass (``on_loop``), each room's as one batch, as Redis
    delivers; what other threads publish, at once, after the loop's.

    A room keeps its last ``history`` messages, and of them only the newest
    that fit in ``max_bytes`` (see ``Messages.sizes``; the newest one
    always; 0: no bound): the chat's ``max_history_bytes``, past which no
    welcome carries them anyway.  All rooms together keep at most
    ``max_total_bytes`` (0: no bound): past it, the heaviest rooms' history
    goes first (the chat's ``max_history_total``).
    Rooms come and go with their members; an empty room keeps its history
    for newcomers, but only the ``max_idle_rooms`` most recently left do
    (clients choose room names and what they say: they must not be able to fill memory).
    """

    process_id = "local"

    def __init__(self, history: int = 50, max_idle_rooms: int = 100, max_bytes: int = DEFAULT_MAX_HISTORY_BYTES,
                 max_total_bytes: int = DEFAULT_MAX_HISTORY_TOTAL):
        self.history_size = history
        self.max_idle_rooms = max_idle_rooms
        self.max_bytes = max_bytes
        self.max_total_bytes = max_total_bytes
        self.size = 0  # what every room's history weighs
        self.rooms: dict[str, _Room] = {}
        self._idle: dict[str, None] = {}  # empty rooms with history, oldest first
        self._lock = threading.RLock()  # delivering may call back in (an eviction's rename)
        self._deliver: Deliver | None = None
        self._loop: threading.Thread | None = None  # a server's loop: what it publishes waits for on_loop
        self._pending: dict[str, list[Delivery]] = {}  # room -> what the loop published since on_loop

    def start(self, deliver: Deliver) -> None:
        self._deliver = deliver

    def stop(self) -> None:
        self._deliver = None
        self._pending.clear()

    def on_loop(self, idle: bool) -> None:
        """For ``Server.on_idle``: on a server's loop, after each pass's reads,
        deliver what the pass published, each room's as one batch, so that
        its members get the pass's messages framed once and queued once,
        not message by message (the loop writes them at the end of the same pass)."""
        self._loop = threading.current_thread()
        if self._pending:
            with self._lock:
                self._deliver_pending()

    def _deliver_pending(self, room: str | None = None) -> None:
        """(Lock held.)  Deliver what the loop published: in ``room``, or in every room."""
        while self._pending:  # (what delivering publishes, an eviction's rename, is delivered too)
            name = next(iter(self._pending)) if room is None else room
            batch = self._pending.pop(name, None)
            if batch is None:
                return
            self._weigh(name)
            if self._deliver is not None:
                self._deliver(name, batch)

    def _publish(self, room: str, delivery: Delivery) -> None:
        """(Lock held.)  Deliver now, or with the rest of the pass when on the loop."""
        if self._deliver is None:
            self._weigh(room)
            return
        if threading.current_thread() is not self._loop:
            if self._pending:
                self._deliver_pending(room)  # first: what the loop published before this
            self._weigh(room)
            self._deliver(room, [delivery])
            return
        batch = self._pending.setdefault(room, [])
        if batch and isinstance(delivery, Records):
            run = batch[-1]
            if isinstance(run, Records) and run.epoch == delivery.epoch and run.last + 1 == delivery.first:
                run.items += delivery.items
                return
        batch.append(delivery)

    def subscribe(self, room: str) -> None:
        pass  # one process: every room's events are delivered here

    def unsubscribe(self, room: str) -> None:
        pass

    def _room(self, name: str) -> _Room:
        room = self.rooms.get(name)
        if room is None:
            room = self.rooms[name] = _Room(deque(maxlen=self.history_size), deque(maxlen=self.history_size))
        return room

    def publish_message(self, room: str, record: Event, failed: Failed | None = None) -> None:
        with self._lock:
            target = self._room(room)
            target.seq += 1
            record["seq"] = target.seq
            target.history.append(record)  # (the oldest goes past history_size: the deque's maxlen)
            target.unweighed += 1  # (weighed a batch at a time, as it is delivered)
            self._forget_if_idle(room)
            self._publish(room, Records(target.epoch, target.seq, [record]))

    def _weigh(self, name: str) -> None:
        """(Lock held.)  Weigh the messages ``name`` kept since the last time
        (see ``Records.sizes``), and drop its oldest past ``max_bytes``, but
        never the newest: an empty room with history is kept, its numbering
        with it (see ``_forget_if_idle``).  Then, past ``max_total_bytes``,
        shed the heaviest rooms' history."""
        room = self.rooms.get(name)
        if room is None or not room.unweighed:
            return
        history, sizes = room.history, room.sizes
        sizes.extend(record_sizes(itertools.islice(history, max(0, len(history) - room.unweighed), None)))  # in step
        room.unweighed = 0
        size = within(history, sizes, self.max_bytes, keep=1) if self.max_bytes else sum(sizes)
        self.size += size - room.size
        room.size = size
        if self.max_total_bytes and self.size > self.max_total_bytes:
            self._shed(room)

    def _shed(self, keep: _Room) -> None:
        """(Lock held.)  Over ``max_total_bytes``: the heaviest rooms' history
        goes, but ``keep``'s (see ``heaviest_first``); an empty room goes
        with it, as an idle one does."""
        dropped = heaviest_first(((room.size, (name, room)) for name, room in self.rooms.items()
                                  if room is not keep and room.size), self.size, self.max_total_bytes)
        for name, room in dropped:
            self._drop_history(name, room)
        log.warning("the history of %d rooms is dropped (the heaviest): all rooms' history weighed over %d bytes "
                    "(max_history_total)", len(dropped), self.max_total_bytes)

    def _drop_history(self, name: str, room: _Room) -> None:
        """(Lock held.)  Let go of ``room``'s history, and of the room if it is
        empty (it was kept for it)."""
        self.size -= room.size
        room.history.clear()
        room.sizes.clear()
        room.size = room.unweighed = 0
        if not room.members:
            self._idle.pop(name, None)
            del self.rooms[name]

    def publish(self, room: str, event: Event, failed: Failed | None = None) -> None:
        with self._lock:
            self._publish(room, event)

    def flush(self, timeout: float) -> None:
        """Deliver what the loop published and has not delivered yet."""
        with self._lock:
            self._deliver_pending()

    def backlog(self) -> int:
        return 0

    def history(self, room: str, since: int | None = None, epoch: str | None = None) -> History:
        with self._lock:
            self._weigh(room)  # (what the loop published this pass is cut to the bound too)
            target = self.rooms.get(room)
            if target is None:  # nothing said there yet, and no one in it
                return History(new_epoch(), 0, [], bool(since))
            records, missed = select_history(list(target.history), target.seq, since, epoch == target.epoch)
            return History(target.epoch, target.seq, records, missed)

    def position(self, room: str) -> tuple[str, int]:
        with self._lock:
            target = self._room(room)
            self._forget_if_idle(room)
            return target.epoch, target.seq

    def claim(self, room: str, nick: str, holder: str, user_id: str | None = None) -> Claim:
        with self._lock:
            members = self._room(room).members
            self._idle.pop(room, None)
            key = nick_key(nick)
            entry = members.get(key)
            if entry is None:
                members[key] = _Entry(nick, user_id, [holder])
                return Claim(JOINED)
            if user_id is not None and entry.user_id == user_id:
                entry.holders.append(holder)
                return Claim(ADDED)
            if user_id is not None and entry.user_id is None:  # the app's user takes its name back
                members[key] = _Entry(nick, user_id, [holder])
                return Claim(ADDED, evicted=entry.holders)
            return Claim(TAKEN)

    def rename(self, room: str, old: str, new: str, holder: str) -> bool:
        with self._lock:
            members = self._room(room).members
            old_key, new_key = nick_key(old), nick_key(new)
            entry = members.get(old_key)
            if entry is None or holder not in entry.holders or entry.user_id is not None:
                return False
            if new_key != old_key:
                if new_key in members:
                    return False
                del members[old_key]
                members[new_key] = entry
            entry.nick = new
            return True

    def release(self, room: str, nick: str, holder: str) -> bool:
        with self._lock:
            target = self.rooms.get(room)
            key = nick_key(nick)
            entry = target.members.get(key) if target is not None else None
            if target is None or entry is None or holder not in entry.holders:
                return False  # evicted meanwhile
            entry.holders.remove(holder)
            if entry.holders:
                return False
            del target.members[key]
            self._forget_if_idle(room)
            return True

    def users(self, room: str) -> list[str]:
        with self._lock:
            target = self.rooms.get(room)
            return sorted(entry.nick for entry in target.members.values()) if target is not None else []

    def _forget_if_idle(self, name: str) -> None:
        """Keep an empty room only for its history, and only so many (lock held)."""
        room = self.rooms[name]
        self._idle.pop(name, None)
        if room.members:
            return
        if not room.history:
            del self.rooms[name]
            return
        self._idle[name] = None
        while len(self._idle) > self.max_idle_rooms:
            oldest = next(iter(self._idle))
            self._drop_history(oldest, self.rooms[oldest])
