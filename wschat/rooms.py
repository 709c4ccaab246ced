"""A chat room as one process sees it: its members connected here, and the
messages delivered to them, in the room's order.

What every process shares (the order, the history, who holds which
nickname) is the engine's; a ``LocalRoom`` holds what this process alone
needs: its connections, in one set per dialect so that a message is encoded
once for each, and the last sequence number delivered here, so that a
newcomer's history and the live messages after it meet without a gap or a
duplicate.  Every method runs under the chat's lock.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from . import checks
from .connection import Connection
from .dialect import Event, encode, utf8_size
from .engine import RECORD_OVERHEAD, Delivery, History, Messages, record_of, within
from .frames import Opcode
from .logsafe import quoted
from .outbound import PreparedBatch, PreparedMessage

log = logging.getLogger("wschat")

Broadcast = Callable[..., int]  # Server.broadcast: (message, connections=..., exclude=...) -> how many


@dataclass
class ChatLimits:
    """Abuse limits; 0 turns one off."""

    max_length: int = 2000  # characters in one chat message
    rate: float = 5.0  # messages per second, sustained
    burst: int = 10  # messages in a burst
    max_nick_length: int = 24

    def __post_init__(self) -> None:
        checks.whole("max_length", self.max_length, 0, " (0: no limit)")
        checks.number("rate", self.rate, unit="messages per second", meaning=" (0: no limit)")
        checks.whole("burst", self.burst, 0)
        if self.max_nick_length != 0:  # a guest's name needs two characters at least (g1)
            checks.whole("max_nick_length", self.max_nick_length, 2, " (0: no limit)")
        if self.rate and self.burst < 1:  # a bucket must hold one message
            self.burst = 1

    @classmethod
    def off(cls) -> ChatLimits:
        return cls(max_length=0, rate=0, burst=0)


def newest_within(records: list[Event], max_bytes: int) -> tuple[list[Event], bool]:
    """The newest ``records`` that fit in ``max_bytes`` (each counted as its
    text in UTF-8 and ``RECORD_OVERHEAD``; 0: all), and whether older ones were left out."""
    if not max_bytes:
        return records, False
    total = 0
    for index in range(len(records) - 1, -1, -1):
        record = records[index]
        total += RECORD_OVERHEAD + utf8_size(record["text"]) + utf8_size(record.get("id", ""))
        if total > max_bytes:
            return records[index + 1 :], True
    return records, False


@dataclass
class Arrival:
    """What the chat learnt before answering a handshake (``Connection.user``
    until ``on_open``): the app's user, and the room's (epoch, seq) then."""

    user: object
    position: tuple[str, int] | None

    def said_since(self, epoch: str, records: list[Event]) -> list[Event]:
        """The ``records`` said after the handshake was answered."""
        if self.position is None:
            return []
        then_epoch, then_seq = self.position
        if then_seq and then_epoch != epoch:
            return []  # the room began anew meanwhile: its history is all new
        return [record for record in records if record["seq"] > then_seq]


@dataclass(eq=False)
class Member:
    """A connection's place in the chat (kept in ``Connection.context``)."""

    conn: Connection
    room: LocalRoom
    nick: str
    holder: str  # its claim on the nickname, for the engine
    structured: bool  # speaks wschat.v1 JSON
    identified: bool = False  # the nick is the app's user name (see Chat's ``authorize``)
    tokens: float = 0.0
    refilled: float = field(default_factory=time.monotonic)

    def take_token(self, limits: ChatLimits) -> bool | None:
        """The rate limit, a token bucket (``rate`` per second, ``burst`` at
        once): True when a message may go, False when it is dropped, None
        when the member kept sending that long past it (close it)."""
        if not limits.rate:
            return True
        now = time.monotonic()
        self.tokens = min(limits.burst, self.tokens + (now - self.refilled) * limits.rate) - 1
        self.refilled = now
        if self.tokens >= 0:
            return True
        return None if self.tokens < -limits.burst else False


class Held:
    """What the ``Recent`` messages of several rooms weigh together (a chat's, here)."""

    __slots__ = ("total",)

    def __init__(self) -> None:
        self.total = 0


class Recent:
    """The last messages delivered to a room here, as ``(seq, kept)``
    oldest first (see ``Messages.kept``): at most ``count``, weighing at
    most ``max_bytes`` in all (see ``Messages.sizes``), so that however long
    its messages a room holds little.  ``held`` adds up what the rooms it
    is shared by hold."""

    __slots__ = ("count", "max_bytes", "size", "held", "_items", "_sizes")

    def __init__(self, count: int, max_bytes: int, held: Held | None = None):
        self.count = count
        self.max_bytes = max_bytes
        self.size = 0  # what the messages held weigh
        self.held = held or Held()
        self._items: deque[tuple[int, Event | bytes]] = deque(maxlen=count)
        self._sizes: deque[int] = deque(maxlen=count)  # each one's, in step with _items

    def __iter__(self) -> Iterator[tuple[int, Event | bytes]]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def add(self, run: Messages[Any]) -> None:
        """``run``'s messages, after those held; the oldest go past ``count`` or ``max_bytes``."""
        self._items.extend(run.kept(self.count))  # (a message's work is in C: this runs for every batch)
        self._sizes.extend(run.sizes(self.count))
        size = within(self._items, self._sizes, self.max_bytes)
        self.held.total += size - self.size
        self.size = size

    def clear(self) -> None:
        self._items.clear()
        self._sizes.clear()
        self.held.total -= self.size
        self.size = 0


@dataclass(eq=False)
class LocalRoom:
    """This process's side of a room (see the module docstring)."""

    name: str
    broadcast: Broadcast
    recent: Recent  # the last messages delivered here: they complete a newcomer's history
    members: dict[str, Member] = field(default_factory=dict)  # holder -> Member
    plain: dict[Connection, None] = field(default_factory=dict)  # insertion-ordered sets,
    structured: dict[Connection, None] = field(default_factory=dict)  # updated in O(1) on join and leave
    joining: int = 0  # members between their claim and their welcome
    seq: int | None = None  # the last message delivered here
    epoch: str | None = None  # the sequence it belongs to

    def add(self, member: Member) -> None:
        self.members[member.holder] = member
        (self.structured if member.structured else self.plain)[member.conn] = None

    def remove(self, member: Member) -> None:
        self.members.pop(member.holder, None)
        (self.structured if member.structured else self.plain).pop(member.conn, None)

    @property
    def empty(self) -> bool:
        return not self.members and not self.joining

    def greet(self, member: Member, welcome: str, history: History, users: list[str] | None,
              arrival: Arrival, returning: bool, max_history_bytes: int = 0, whole: bool = True,
              since: tuple[str, int] | None = None) -> bool:
        """Welcome a member that finished joining, and count it in: in
        wschat.v1 with the room's ``users`` and its history (or what it
        missed, when ``returning``), the newest within ``max_history_bytes``;
        plain, with the welcome text and any message said since its handshake
        was answered (``since``: the (epoch, seq) it saw up to, if any).
        Nothing is lost or doubled between that and the live messages that
        follow.  False (and nothing done) when ``history`` is too old for
        that (see ``catch_up``): the member reads it again; with ``whole``
        False, it is greeted with what there is (and a returning one is told
        it missed some).  A history of another sequence than the one followed
        here is read again too: it may be older (read before the engine lost
        the room's messages), and following it would take the room back to a
        sequence it has left; only a last read is followed."""
        if whole and self.epoch is not None and history.epoch != self.epoch:
            return False
        records, complete, missed = self.catch_up(history, since)
        if not complete:
            if whole:
                return False
            log.warning("room %s: a newcomer's history ends at %d, before messages this process no longer "
                        "holds: it misses some", quoted(self.name), history.seq)
        self.joining -= 1
        conn = member.conn
        if member.structured:
            kept, cut = newest_within(records, max_history_bytes)
            event: Event = {"type": "welcome", "text": welcome, "room": self.name, "nick": member.nick,
                            "epoch": history.epoch, "users": sorted({*(users or ()), member.nick}), "history": kept}
            if returning:
                event["missed"] = missed or cut or not complete
            if member.identified:
                event["identified"] = True
            conn.send(encode(event))
        else:
            if welcome:
                conn.send(welcome)
            for record in arrival.said_since(history.epoch, records):
                conn.send(record["text"])
        self.add(member)
        return True

    def catch_up(self, history: History, since: tuple[str, int] | None = None) -> tuple[list[Event], bool, bool]:
        """A newcomer's history, seamless with what is delivered here next:
        the engine's records, then the messages delivered here since it read
        them, cut where delivery stands (the rest comes live); whether that
        is whole; and whether the newcomer missed some after ``since``.

        It is not whole when the room stands past ``history`` by messages it
        does not hold: more than ``recent`` keeps, or ones it never
        delivered, when an earlier newcomer's newer history set where it
        stands (newcomers read the history at once, and are greeted in
        turn).  What the engine no longer keeps after ``since`` comes from
        ``recent`` when it is there: with little history kept, the messages
        said while a plain client joined, or while a client that comes back
        here was away.  (Where delivery stands moves only when it was not set.)"""
        self.follow_epoch(history.epoch)
        limit = self.seq = self.seq if self.seq is not None else history.seq
        later = [kept for seq, kept in self.recent if history.seq < seq <= limit]
        records = [record for record in history.records if record["seq"] <= limit]
        missed = history.missed
        if since is not None and (since[0] == history.epoch or not since[1]) and since[1] <= history.seq:
            # Between since and the engine's first record (any past where delivery stands here come live).
            gap_end = min(history.records[0]["seq"] if history.records else history.seq + 1, limit + 1)
            earlier = [kept for seq, kept in self.recent if since[1] < seq < gap_end]
            records[:0] = map(record_of, earlier)
            missed = missed and len(earlier) < gap_end - since[1] - 1
        return records + [*map(record_of, later)], len(later) >= limit - history.seq, missed

    def follow_epoch(self, epoch: str) -> None:
        """The room's sequence of messages began anew (its engine lost it, as
        a Redis restarted without persistence does): numbering starts over,
        and the members here are told."""
        if self.epoch == epoch:
            return
        if self.epoch is not None:
            self.seq = None
            self.recent.clear()
            if self.structured:
                notice = encode({"type": "epoch", "room": self.name, "epoch": epoch})
                self.broadcast(notice, connections=self.structured)
        self.epoch = epoch

    def deliver(self, deliveries: list[Delivery]) -> None:
        """A batch of the room's deliveries (see ``engine``), in the room's
        order: each chat message to every member here once (its JSON to
        wschat.v1 clients, its text to plain ones), each stretch of messages
        between presence events queued as one batch."""
        stretch: list[Messages[Any]] = []  # messages not yet queued
        for delivery in deliveries:
            if not isinstance(delivery, Messages):
                self._queue_messages(stretch)
                self.deliver_event(delivery)
                continue
            run = delivery
            if self.epoch != run.epoch:
                self._queue_messages(stretch)
                self.follow_epoch(run.epoch)
            if self.seq is not None and run.first <= self.seq:  # a newcomer's history had them
                run = run.after(self.seq)
                if not run:
                    continue
            self.seq = run.last
            self.recent.add(run)
            stretch.append(run)
        self._queue_messages(stretch)

    def _queue_messages(self, stretch: list[Messages[Any]]) -> None:
        if not stretch:
            return
        if self.plain:
            self.broadcast(prepared(joined([run.texts() for run in stretch])), connections=self.plain)
        if self.structured:
            self.broadcast(prepared(joined([run.jsons() for run in stretch])), connections=self.structured)
        stretch.clear()

    def deliver_event(self, event: Event) -> None:
        """A presence event to the wschat.v1 members here, but not to the
        joiner it announces (``_from``): its welcome said it already."""
        if not self.structured or event["type"] == "evict":  # an eviction is the chat's (see Chat._evicted)
            return
        joiner = self.members.get(event.get("_from", ""))
        public = encode({key: value for key, value in event.items() if not key.startswith("_")})
        self.broadcast(public, connections=self.structured, exclude=joiner.conn if joiner else None)


def joined(lists: list[list[bytes]]) -> list[bytes]:
    """One list of several: the usual one as it is, not copied item by item."""
    return lists[0] if len(lists) == 1 else [item for items in lists for item in items]


def prepared(payloads: list[bytes]) -> PreparedMessage:
    """Text messages (UTF-8) framed once for many recipients: one, or a batch."""
    if len(payloads) == 1:
        return PreparedMessage(payloads[0], Opcode.TEXT)
    return PreparedBatch(payloads)
