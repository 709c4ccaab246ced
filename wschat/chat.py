"""The chat application, built on the server's public API only.

Two dialects share every room:

* Plain clients (no subprotocol, like the seed's HTML page) get the welcome
  text, then every chat message of their room as bare text.  Alone and with
  the welcome and limits off, the chat is an echo.
* Clients that negotiate the subprotocol ``wschat.v1`` speak JSON (see
  README.rst): nicknames, join/leave notices, the user list, and the room's
  recent history replayed on join.

A room is the path below the resource: ``/chat`` is the room ``main``,
``/chat/lobby`` the room ``lobby``.  Each message is encoded once per dialect
and the same bytes go to every member.
"""

from __future__ import annotations

import itertools
import json
import logging
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable
from urllib.parse import parse_qs, unquote, urlsplit

from .connection import Connection
from .frames import CloseCode
from .errors import HandshakeError
from .handshake import Request, text_response
from .logsafe import quoted
from .names import nick_key, nick_problem, normalize, room_problem
from .outbound import PreparedMessage
from .server import Server

log = logging.getLogger("wschat")

SUBPROTOCOL = "wschat.v1"
DEFAULT_WELCOME = "Welcome to Corvusoft Chat!"
DEFAULT_ROOM = "main"
MAX_REQUEST = 64 * 1024  # characters in one wschat.v1 request when messages have no length limit


@dataclass
class ChatLimits:
    """Abuse limits; 0 turns one off."""

    max_length: int = 2000  # characters in one chat message
    rate: float = 5.0  # messages per second, sustained
    burst: int = 10  # messages in a burst
    max_nick_length: int = 24

    def __post_init__(self) -> None:
        if self.rate and self.burst < 1:  # a bucket must hold one message
            self.burst = 1

    @classmethod
    def off(cls) -> ChatLimits:
        return cls(max_length=0, rate=0, burst=0)


@dataclass(eq=False)
class Member:
    """A connection's place in the chat (kept in ``Connection.context``)."""

    conn: Connection
    room: Room
    nick: str
    structured: bool  # speaks wschat.v1 JSON
    identified: bool = False  # the nick is the app's user name (see Chat's ``authorize``)
    tokens: float = 0.0
    refilled: float = field(default_factory=time.monotonic)


@dataclass(eq=False)
class Room:
    """A room's members and history; changed only under the chat's lock."""

    name: str
    history: deque
    members: dict = field(default_factory=dict)  # nick_key(nick) -> [Member]: one, or one user's several tabs
    plain: dict = field(default_factory=dict)  # Connection -> None: insertion-ordered sets,
    structured: dict = field(default_factory=dict)  # updated in O(1) on join and leave
    seq: int = 0
    epoch: str = field(default_factory=lambda: secrets.token_hex(6))  # new room, new sequence: a page starts over

    def add(self, member: Member) -> bool:
        """Seat ``member``; True when its nick is new here (a join to announce)."""
        holders = self.members.setdefault(nick_key(member.nick), [])
        holders.append(member)
        (self.structured if member.structured else self.plain)[member.conn] = None
        return len(holders) == 1

    def remove(self, member: Member) -> bool:
        """Unseat ``member``; True when its nick is gone from here (a leave to announce)."""
        key = nick_key(member.nick)
        holders = self.members.get(key, [])
        if member not in holders:
            return False
        holders.remove(member)
        (self.structured if member.structured else self.plain).pop(member.conn, None)
        if holders:
            return False
        del self.members[key]
        return True

    def holders(self, nick: str) -> list[Member]:
        return self.members.get(nick_key(nick), [])

    def nicks(self) -> list[str]:
        return sorted(holders[0].nick for holders in self.members.values())


def _json(event: dict) -> str:
    """One wschat.v1 message, the same compact form everywhere."""
    return json.dumps(event, ensure_ascii=False, separators=(",", ":"))


def _now_ms() -> int:
    return int(time.time() * 1000)


def _prepare_text(server: Server, text: str) -> tuple[PreparedMessage | None, str | None]:
    """The plain clients' frame of ``text``, or why it cannot be sent: framing
    encodes it, and a lone surrogate (valid JSON, not Unicode) fails there,
    before anything is stored."""
    try:
        return server.prepare(text), None
    except UnicodeEncodeError as exc:
        return None, f"text is not valid Unicode (a lone surrogate at character {exc.start})"


class Chat:
    """A chat on ``server`` at ``path``: the seed's behaviour, and rooms, nicknames and history.

    ``page_config`` is where the browser client finds the chat's path and
    limits (a plain HTTP route; None for none).

    ``authorize`` is the resource's hook (see ``Resource``): it refuses a
    handshake, or names the app's user.  A named user's nickname is
    ``nick_of(user)``, normalized; it cannot be changed, an anonymous client
    holding it is renamed to a guest, and the user's several tabs share it (one
    join, one leave).  Without a hook, or when it returns None, people choose
    their nicknames as before.
    """

    def __init__(
        self,
        server: Server,
        path: str = "/chat",
        *,
        welcome: str = DEFAULT_WELCOME,
        history: int = 50,
        limits: ChatLimits | None = None,
        max_idle_rooms: int = 100,
        page_config: str | None = "/wschat.json",
        authorize: Callable[[Request], object] | None = None,
        nick_of: Callable[[object], str] = str,
    ):
        self.server = server
        self.nick_of = nick_of
        self._app_authorize = authorize
        self.welcome = welcome
        self.history_size = history
        self.limits = limits or ChatLimits()
        self.max_idle_rooms = max_idle_rooms
        self.rooms: dict[str, Room] = {}
        self._idle: dict[str, None] = {}  # empty rooms kept for their history, oldest first
        self._lock = threading.Lock()  # guards rooms, members, sequence numbers
        self._guests = itertools.count(1)
        self.resource = server.resource(
            path,
            on_open=self.on_open,
            on_message=self.on_message,
            on_close=self.on_close,
            on_error=self.on_error,
            subprotocols=[SUBPROTOCOL],
            authorize=self._authorize if authorize is not None else None,
        )
        if page_config:
            server.http_route(page_config, self._page_config)

    # -- the public API, for embedding applications -----------------------------

    def post(self, text: str, room: str = DEFAULT_ROOM, nick: str = "server") -> None:
        """Post a chat message to ``room`` as ``nick`` (from any thread).
        Raises ``ValueError`` for text that is not valid Unicode."""
        plain, problem = _prepare_text(self.server, text)
        if problem is not None:
            raise ValueError(problem)
        with self._lock:
            target = self.rooms.get(normalize(room))
            if target is not None:
                self._publish(target, nick, text, plain)

    def users(self, room: str = DEFAULT_ROOM) -> list[str]:
        with self._lock:
            target = self.rooms.get(normalize(room))
            return target.nicks() if target else []

    def page_config(self, user: object = None) -> dict:
        """What the browser client needs to know: where the chat is, its
        limits, and the nickname of the app's ``user`` when one is logged in
        (an app that serves the page itself serves this as ``wschat.json``)."""
        return {
            "path": self.resource.path, "subprotocol": SUBPROTOCOL, "history": self.history_size,
            "maxLength": self.limits.max_length, "maxNickLength": self.limits.max_nick_length,
            "user": None if user is None else self.nick_for(user),
        }

    def nick_for(self, user: object) -> str:
        """The nickname of the app's ``user``."""
        return normalize(str(self.nick_of(user)).strip())

    def _page_config(self, request) -> bytes:
        body = _json(self.page_config()).encode("utf-8")
        return text_response(200, body, "application/json; charset=utf-8", head_only=request.method == "HEAD")

    def _authorize(self, request: Request) -> object:
        """The app's hook, and a check that its user's name can be a nickname."""
        user = self._app_authorize(request)
        if user is not None:
            nick = self.nick_for(user)
            problem = nick_problem(nick, self.limits.max_nick_length)
            if problem is not None:
                log.warning("user name %s cannot be a nickname: %s", quoted(nick, 40), problem)
                raise HandshakeError(403, f"your user name cannot be a nickname here: {problem}")
        return user

    # -- handlers ----------------------------------------------------------------

    def on_open(self, conn: Connection) -> None:
        raw = conn.path[len(self.resource.path):].strip("/")
        try:
            name = normalize(unquote(raw, errors="strict")) or DEFAULT_ROOM
        except UnicodeDecodeError:
            name = raw  # refused below
        problem = room_problem(name)
        if problem is not None:
            conn.close(CloseCode.POLICY_VIOLATION, "invalid room name")
            return
        structured = conn.subprotocol == SUBPROTOCOL
        identified = conn.user is not None
        if identified:
            wanted = self.nick_for(conn.user)
        else:
            wanted = normalize(parse_qs(urlsplit(conn.target).query).get("nick", [""])[0].strip())
        with self._lock:
            room = self.rooms.get(name)
            if identified and room is not None and not self._make_way(room, wanted, conn.user):
                conn.close(CloseCode.POLICY_VIOLATION, "another user has this nickname")
                return
            if room is None:
                room = self.rooms[name] = Room(name, deque(maxlen=self.history_size))
            self._idle.pop(name, None)
            if identified:
                problem, nick = None, wanted
            else:
                problem = self._nick_problem(room, wanted) if wanted else "no nickname asked for"
                nick = wanted if problem is None else self._guest_nick(room)
            member = Member(conn, room, nick, structured, identified, tokens=float(self.limits.burst))
            conn.context = member
            if structured:
                welcome = {
                    "type": "welcome", "text": self.welcome, "room": name, "nick": nick, "epoch": room.epoch,
                    "users": sorted({*room.nicks(), nick}), "history": list(room.history),
                }
                if identified:
                    welcome["identified"] = True
                conn.send(_json(welcome))
                if wanted and problem:
                    self._notify(member, "nick_refused", f"{problem}; you are {nick}")
            elif self.welcome:
                conn.send(self.welcome)
            if room.add(member):
                self._tell_structured(room, {"type": "join", "room": name, "nick": nick, "time": _now_ms()}, skip=conn)
        log.info("%s joined room %s as %s from %s", conn.key, quoted(name), quoted(nick), conn.remote_address[0])

    def on_message(self, conn: Connection, message: str | bytes) -> None:
        member: Member | None = conn.context
        if member is None:
            return
        if isinstance(message, bytes):
            conn.close(CloseCode.UNSUPPORTED_DATA, "binary messages are not supported")
            return
        # %r and a cut: a message can neither flood the log nor forge lines in it.
        log.info("Received message %r from %s", message[:200], conn.key)
        if not self._within_rate(member):
            return
        if not member.structured:
            self._say(member, message)
            return
        request, problem = self._parse_request(message)
        if problem is not None:
            self._notify(member, "bad_request", problem)
            return
        kind = request["type"]
        if kind == "message":
            if not isinstance(request.get("text"), str):
                self._notify(member, "bad_request", 'a "message" needs a "text" string')
            else:
                self._say(member, request["text"])
        elif kind == "nick":
            if not isinstance(request.get("nick"), str):
                self._notify(member, "bad_request", 'a "nick" request needs a "nick" string')
            else:
                self._rename(member, normalize(request["nick"].strip()))
        elif kind == "users":
            with self._lock:
                users = member.room.nicks()
            conn.send(_json({"type": "users", "room": member.room.name, "users": users}))
        else:
            self._notify(member, "bad_request", f'unknown request type {quoted(kind, 40)}: '
                                                f'"message", "nick" or "users"')

    def _parse_request(self, message: str) -> tuple[dict | None, str | None]:
        """A wschat.v1 request, or why it is not one.  Bounded: a request is a
        flat JSON object no longer than a message may be (with room for escapes)."""
        limit = 6 * self.limits.max_length + 1024 if self.limits.max_length else MAX_REQUEST
        if len(message) > limit:
            return None, f"request longer than {limit} characters"
        try:
            request = json.loads(message)
        except RecursionError:
            return None, "request nested too deeply: a request is a flat JSON object"
        except ValueError as exc:
            return None, f"not JSON ({exc.msg} at character {exc.pos})"
        if not isinstance(request, dict) or not isinstance(request.get("type"), str):
            return None, 'expected a JSON object with a "type" string'
        return request, None

    def on_close(self, conn: Connection, code: int, reason: str) -> None:
        member: Member | None = conn.context
        log.info("Closed connection to %s (%d%s).", conn.key, code, f" {quoted(reason)}" if reason else "")
        if member is None:
            return
        with self._lock:
            room = member.room
            if room.remove(member):  # its nick's last connection here
                self._tell_structured(room, {"type": "leave", "room": room.name, "nick": member.nick, "time": _now_ms()})
                if not room.members:
                    self._forget_idle(room)

    def _forget_idle(self, room: Room) -> None:
        """An empty room keeps its history for newcomers, but only the
        ``max_idle_rooms`` most recently left do: clients choose room names,
        so they must not be able to fill memory with rooms (lock held)."""
        if not room.history:
            del self.rooms[room.name]
            return
        self._idle[room.name] = None
        while len(self._idle) > self.max_idle_rooms:
            oldest = next(iter(self._idle))
            del self._idle[oldest]
            del self.rooms[oldest]

    def on_error(self, conn: Connection, error: Exception) -> None:
        log.warning("WebSocket Errored '%s' for %s.", error, conn.key)

    # -- the work ------------------------------------------------------------------

    def _say(self, member: Member, text: str) -> None:
        limit = self.limits.max_length
        if limit and len(text) > limit:
            self._notify(member, "too_long", f"message longer than {limit} characters; not sent")
            return
        plain, problem = _prepare_text(self.server, text)
        if problem is not None:
            self._notify(member, "bad_request", f"{problem}; not sent")
            return
        with self._lock:
            self._publish(member.room, member.nick, text, plain)

    def _publish(self, room: Room, nick: str, text: str, plain: PreparedMessage) -> None:
        """Give a message its sequence number and queue it for every member
        (lock held).  ``plain`` is its frame for plain clients: that it could
        be framed is what proves the text sendable, before it is kept.  The
        JSON form is made only for a room with wschat.v1 members."""
        room.seq += 1
        record = {"type": "message", "room": room.name, "nick": nick, "text": text, "time": _now_ms(), "seq": room.seq}
        room.history.append(record)
        if room.plain:
            self.server.broadcast(plain, connections=room.plain)
        if room.structured:
            self.server.broadcast(_json(record), connections=room.structured)

    def _rename(self, member: Member, nick: str) -> None:
        with self._lock:
            if member.identified:
                problem = "your nickname is your user name: it cannot change"
            else:
                problem = self._nick_problem(member.room, nick, member)
            if problem is None:
                self._move(member, nick)
        if problem is not None:
            self._notify(member, "nick_refused", problem)

    def _move(self, member: Member, nick: str) -> None:
        """Give ``member`` another nickname, and say so (lock held)."""
        room = member.room
        room.remove(member)
        old, member.nick = member.nick, nick
        room.add(member)
        self._tell_structured(room, {"type": "nick", "room": room.name, "old": old, "nick": nick, "time": _now_ms()})

    def _make_way(self, room: Room, nick: str, user: object) -> bool:
        """Clear ``nick`` for the app's ``user`` (lock held): anonymous holders
        become guests; False when another identified user holds it."""
        holders = room.holders(nick)
        if holders and holders[0].identified:
            return holders[0].conn.user == user
        for squatter in list(holders):
            guest = self._guest_nick(room)
            self._notify(squatter, "renamed", f"the user {nick} joined and has that name; you are now {guest}")
            self._move(squatter, guest)
        return True

    def _nick_problem(self, room: Room, nick: str, member: Member | None = None) -> str | None:
        """Why ``nick`` is refused in ``room`` (``member`` may keep its own, re-cased)."""
        problem = nick_problem(nick, self.limits.max_nick_length)
        if problem is not None:
            return f"nickname {quoted(nick, 40)} refused: {problem}"
        holders = room.holders(nick)
        if holders and holders[0] is not member:
            return f"nickname {quoted(nick, 40)} is taken in this room"
        return None

    def _guest_nick(self, room: Room) -> str:
        while nick_key(nick := f"guest-{next(self._guests)}") in room.members:
            pass
        return nick

    def _within_rate(self, member: Member) -> bool:
        """A token bucket: ``rate`` per second, ``burst`` at once.  A client
        that keeps sending when out of tokens is closed with 1008."""
        limits = self.limits
        if not limits.rate:
            return True
        now = time.monotonic()
        member.tokens = min(limits.burst, member.tokens + (now - member.refilled) * limits.rate)
        member.refilled = now
        member.tokens -= 1
        if member.tokens >= 0:
            return True
        if member.tokens < -limits.burst:
            log.warning("%s: rate limit exceeded again and again, closing", member.conn.key)
            member.conn.close(CloseCode.POLICY_VIOLATION, "rate limit exceeded")
        else:
            self._notify(member, "rate_limited", f"more than {limits.rate:g} messages per second; message dropped")
        return False

    def _notify(self, member: Member, code: str, text: str) -> None:
        """Tell one client what went wrong, in its dialect."""
        if member.structured:
            member.conn.send(_json({"type": "error", "code": code, "text": text}))
        else:
            member.conn.send(f"* {text}")

    def _tell_structured(self, room: Room, event: dict, skip: Connection | None = None) -> None:
        if room.structured:
            self.server.broadcast(_json(event), connections=room.structured, exclude=skip)
