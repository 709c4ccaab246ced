"""The chat application, built on the server's public API only.

Two dialects share every room:

* Plain clients (no subprotocol, like the seed's HTML page) get the welcome
  text, then every chat message of their room as bare text.  Alone and with
  the welcome and limits off, the chat is an echo.
* Clients that negotiate the subprotocol ``wschat.v1`` speak JSON (see
  README.rst): nicknames, join/leave notices, the user list, and the room's
  recent history replayed on join, or exactly what they missed when they
  come back (``?since=SEQ&epoch=EPOCH``).

A room is the path below the resource: ``/chat`` is the room ``main``,
``/chat/lobby`` the room ``lobby``.  What is shared between processes (the
order of messages, history, who holds which nickname) is the engine's
(``engine.py``); this process's side of each room is a ``LocalRoom``
(``rooms.py``), which encodes each message once per dialect for all its
members; the JSON dialect itself is ``dialect.py``.
"""

from __future__ import annotations

import itertools
import logging
import threading
from typing import Callable
from urllib.parse import unquote

from . import checks
from .connection import Connection
from .dialect import (
    SUBPROTOCOL,
    Event,
    announcement,
    asked_nick,
    encode,
    message_record,
    now_ms,
    parse_chat_request,
    returning_from,
    text_problem,
)
from .engine import (DEFAULT_MAX_HISTORY_BYTES, DEFAULT_MAX_HISTORY_TOTAL, JOINED, TAKEN, Claim, Delivery, Engine,
                     EngineUnavailable, MemoryEngine, heaviest_first)
from .errors import ConnectionClosed, HandshakeError
from .frames import CloseCode
from .handshake import Request, text_response
from .logsafe import quoted
from .names import guest_nick, nick_problem, normalize, room_problem
from .rooms import Arrival, ChatLimits, Held, LocalRoom, Member, Recent
from .server import Server

log = logging.getLogger("wschat")

DEFAULT_WELCOME = "Welcome to Corvusoft Chat!"
DEFAULT_ROOM = "main"
GUEST_TRIES = 1000  # guest names tried before a newcomer is told to come back later
GREET_TRIES = 3  # history reads before a newcomer is greeted with what there is (see LocalRoom.catch_up)
# What a room here keeps at least, however little history is kept, of the messages
# delivered: those between a newcomer's history read and its greeting (see
# LocalRoom.catch_up).  At most max(history, RECENT_FLOOR) of them, weighing at
# most max(max_history_bytes, RECENT_BYTES) (see Recent).
RECENT_FLOOR = 64
RECENT_BYTES = 16 << 10
TRY_AGAIN_LATER = 1013  # close code (IANA registry): the chat's engine cannot be reached


class Chat:
    """A chat on ``server`` at ``path``: the seed's behaviour, and rooms, nicknames and history.

    ``engine`` holds what processes share (``MemoryEngine(history,
    max_idle_rooms, max_history_bytes, max_history_total)`` by default, this
    process alone; see ``engine.py`` and ``redis_engine.py``).
    ``page_config`` is where the browser client finds the chat's path and
    limits (a plain HTTP route; None for none).
    A welcome carries the newest of the room's ``history`` messages that fit
    in ``max_history_bytes`` (their text in UTF-8, plus 160 bytes each; 0: no
    bound), and so does a returning client's catch-up (then ``missed``).
    Clients choose rooms and what they say, so what the rooms here keep
    weighs at most ``max_history_total`` (0: no bound): past it, the
    heaviest rooms' messages go first.

    ``authorize`` is the resource's hook (see ``Resource``): it refuses a
    handshake, or names the app's user.  A named user's nickname is
    ``nick_of(user)``, normalized, and ``user_id(user)`` tells users apart:
    the nickname cannot be changed, an anonymous client holding it is renamed
    to a guest, and the user's several tabs share it (one join, one leave).
    Without a hook, or when it returns None, people choose their nicknames.
    """

    def __init__(
        self,
        server: Server,
        path: str = "/chat",
        *,
        welcome: str = DEFAULT_WELCOME,
        history: int = 50,
        max_history_bytes: int = DEFAULT_MAX_HISTORY_BYTES,
        max_history_total: int = DEFAULT_MAX_HISTORY_TOTAL,
        limits: ChatLimits | None = None,
        max_idle_rooms: int = 100,
        page_config: str | None = "/wschat.json",
        authorize: Callable[[Request], object] | None = None,
        nick_of: Callable[[object], str] = str,
        user_id: Callable[[object], str] = str,
        engine: Engine | None = None,
    ):
        checks.url_path("path", path)
        checks.whole("history", history, 0, " (0: none kept)")
        checks.whole("max_history_bytes", max_history_bytes, 0, " (0: no bound)")
        checks.whole("max_history_total", max_history_total, 0, " (0: no bound)")
        checks.whole("max_idle_rooms", max_idle_rooms, 0)
        checks.instance("welcome", welcome, str, "a str ('' for none)")
        checks.instance("limits", limits, (ChatLimits, type(None)), "a ChatLimits (or None)")
        if page_config:  # ('' or None: none)
            checks.url_path("page_config", page_config)
        for name, function in (("authorize", authorize), ("nick_of", nick_of), ("user_id", user_id)):
            checks.function(name, function)
        if engine is not None and not all(callable(getattr(engine, name, None)) for name in ("start", "publish_message")):
            raise checks.SettingError("engine", "an engine, such as RedisEngine(url) (or None: in memory)", engine)
        self.server = server
        self.engine = engine if engine is not None else MemoryEngine(history, max_idle_rooms, max_history_bytes,
                                                                     max_history_total)
        self.nick_of = nick_of
        self.user_id = user_id
        self._app_authorize = authorize
        self.welcome = welcome
        self.max_history_bytes = max_history_bytes
        self.max_history_total = max_history_total
        self._recent = Held()  # what the rooms' recent messages weigh together
        self.limits = limits or ChatLimits()
        self.rooms: dict[str, LocalRoom] = {}
        self._lock = threading.Lock()  # guards rooms and members
        self._guests = itertools.count(1)
        self.resource = server.resource(
            path,
            on_open=self.on_open,
            on_message=self.on_message,
            on_message_inline=self.on_message_inline,  # a chat message never waits: no hand-off to a worker
            on_close=self.on_close,
            on_error=self.on_error,
            subprotocols=[SUBPROTOCOL],
            authorize=self._authorize,
            dialects={SUBPROTOCOL: announcement},
            on_drain=self.engine.flush,  # the server stops: what was said is published before clients are closed
        )
        if page_config:
            server.http_route(page_config, self._page_config)
        server.add_gauge("wschat_engine_backlog", "Chat events published and not yet kept by the engine (Redis); "
                         "one that keeps growing means the engine is the limit.", self.engine.backlog)
        backlog_bytes: Callable[[], int] | None = getattr(self.engine, "backlog_bytes", None)  # (Redis's)
        if backlog_bytes is not None:
            server.add_gauge("wschat_engine_backlog_bytes", "The size of wschat_engine_backlog's events; "
                             "past max_backlog_bytes (16 MiB) senders are told not_sent.", backlog_bytes)
        self.engine.start(self._deliver)
        # What the loop publishes goes out once a pass: delivered (memory), sent when about to sleep (Redis).
        self._on_idle: Callable[[bool], None] | None = getattr(self.engine, "on_loop", None)
        if self._on_idle is not None:
            server.on_idle(self._on_idle)

    @property
    def history_size(self) -> int:
        return self.engine.history_size

    def close(self) -> None:
        """Stop the engine (after the server stopped): a Redis engine leaves
        Redis, and this process's members leave the presence lists at once."""
        if self._on_idle is not None:
            self.server.remove_idle_hook(self._on_idle)
        self.engine.stop()

    # -- the public API, for embedding applications -----------------------------

    def post(self, text: str, room: str = DEFAULT_ROOM, nick: str = "server") -> None:
        """Post a chat message to ``room`` as ``nick`` (from any thread); it
        goes into the room's history even when no one is there.  Raises
        ``TypeError`` for text that is not a ``str``, ``ValueError`` for text
        that is not valid Unicode or a room no client could join, and
        ``EngineUnavailable`` when the engine cannot be reached."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, not {type(text).__name__}")
        name = normalize(room)
        problem = text_problem(text) or room_problem(name)
        if problem is not None:
            raise ValueError(problem)
        self.engine.publish_message(name, message_record(name, nick, text))

    def users(self, room: str = DEFAULT_ROOM) -> list[str]:
        return self.engine.users(normalize(room))

    def page_config(self, user: object = None) -> Event:
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

    def _page_config(self, request: Request) -> bytes:
        body = encode(self.page_config()).encode("utf-8")
        return text_response(200, body, "application/json; charset=utf-8", head_only=request.method == "HEAD")

    def _authorize(self, request: Request) -> Arrival:
        """Before the handshake is answered: the app's hook (its user's name
        must be able to be a nickname), and where the room stands, so that
        the client gets every message said after it was answered, even those
        said while it is joining (see ``on_open``)."""
        user = self._app_authorize(request) if self._app_authorize is not None else None
        if user is not None:
            nick = self.nick_for(user)
            problem = nick_problem(nick, self.limits.max_nick_length)
            if problem is not None:
                log.warning("user name %s cannot be a nickname: %s", quoted(nick, 40), problem)
                raise HandshakeError(403, f"your user name cannot be a nickname here: {problem}")
        name = self._room_of(request.path)
        position = None
        if room_problem(name) is None:
            try:
                position = self.engine.position(name)
            except EngineUnavailable:
                pass  # on_open closes it with 1013
        return Arrival(user, position)

    def _room_of(self, path: str) -> str:
        raw = path[len(self.resource.path):].strip("/")
        try:
            return normalize(unquote(raw, errors="strict")) or DEFAULT_ROOM
        except UnicodeDecodeError:
            return raw  # not a room name

    # -- joining -------------------------------------------------------------------

    def on_open(self, conn: Connection) -> None:
        arrival = conn.user
        assert isinstance(arrival, Arrival)  # what _authorize returned
        conn.user = arrival.user  # what the app's hook said, for the app to see
        name = self._room_of(conn.path or "")
        if room_problem(name) is not None:
            conn.close(CloseCode.POLICY_VIOLATION, "invalid room name")
            return
        structured = conn.subprotocol == SUBPROTOCOL
        identified = conn.user is not None
        holder = f"{self.engine.process_id}/{conn.key}"
        with self._lock:
            local = self.rooms.get(name)
            if local is None:
                recent = Recent(max(self.history_size, RECENT_FLOOR), max(self.max_history_bytes, RECENT_BYTES),
                                self._recent)
                local = self.rooms[name] = LocalRoom(name, self.server.broadcast, recent)
            local.joining += 1  # keeps the room here, and subscribed, until it is greeted
        claim, subscribed = None, False
        try:
            nick, claim, problem = self._claim(conn, name, holder)
            if claim is not None:
                self.engine.subscribe(name)
                subscribed = True
                if structured:
                    since, epoch = returning_from(conn.target or "")
                elif arrival.position is not None:  # a plain client gets only what was said since its handshake
                    epoch, since = arrival.position
                else:
                    since, epoch = None, None
                member = Member(conn, local, nick, holder, structured, identified, tokens=float(self.limits.burst))
                users = self.engine.users(name) if structured else None  # O(members): for those who get it
                seen = None if since is None or epoch is None else (epoch, since)
                for tries_left in reversed(range(GREET_TRIES)):  # (read again: see LocalRoom.catch_up)
                    history = self.engine.history(name, since, epoch)
                    with self._lock:
                        if local.greet(member, self.welcome, history, users, arrival,
                                       returning=structured and since is not None,
                                       max_history_bytes=self.max_history_bytes, whole=bool(tries_left),
                                       since=seen):
                            conn.context = member
                            if problem and structured:
                                self._notify(member, "nick_refused", f"{problem}; you are {nick}")
                            break
        except EngineUnavailable as exc:
            log.warning("%s: cannot join room %s: %s", conn.key, quoted(name), exc)
            conn.close(TRY_AGAIN_LATER, "chat unavailable, try again later")
            self._give_up_joining(local, subscribed, (nick, holder) if claim is not None else None)
            return
        if claim is None:
            if identified:
                conn.close(CloseCode.POLICY_VIOLATION, "another user has this nickname")
            else:
                conn.close(TRY_AGAIN_LATER, "no guest nickname is free in this room")
            self._give_up_joining(local, False, None)
            return
        if claim.evicted:
            self._publish(name, {"type": "evict", "nick": nick, "_holders": claim.evicted})
        if claim.outcome == JOINED:
            self._publish(name, {"type": "join", "room": name, "nick": nick, "time": now_ms(), "_from": holder})
        log.info("%s joined room %s as %s from %s", conn.key, quoted(name), quoted(nick), conn.client_address)

    def _claim(self, conn: Connection, room: str, holder: str) -> tuple[str, Claim | None, str | None]:
        """The nickname a newcomer gets, its claim (None: an app user's name
        held by another user), and why it is not the one asked for."""
        engine = self.engine
        claim: Claim | None
        if conn.user is not None:
            nick = self.nick_for(conn.user)
            claim = engine.claim(room, nick, holder, str(self.user_id(conn.user)))
            return nick, (None if claim.outcome == TAKEN else claim), None
        wanted = normalize(asked_nick(conn.target or ""))
        problem = self._nick_problem(wanted) if wanted else "no nickname asked for"
        if problem is None:
            claim = engine.claim(room, wanted, holder)
            if claim.outcome != TAKEN:
                return wanted, claim, None
            problem = f"nickname {quoted(wanted, 40)} is taken in this room"
        guest, claim = self._guest(room, holder)
        return guest, claim, problem if wanted else None

    def _guest(self, room: str, holder: str) -> tuple[str, Claim | None]:
        """The first free guest nickname, claimed (None: none free among the
        next GUEST_TRIES, as when short nicknames leave few to choose from)."""
        for _ in range(GUEST_TRIES):
            guest = guest_nick(next(self._guests), self.limits.max_nick_length)
            claim = self.engine.claim(room, guest, holder)
            if claim.outcome != TAKEN:
                return guest, claim
        return guest, None

    def _give_up_joining(self, local: LocalRoom, subscribed: bool, claimed: tuple[str, str] | None) -> None:
        with self._lock:
            local.joining -= 1
            self._forget_if_empty(local)
        if subscribed:
            self._unsubscribe(local.name)
        if claimed:
            self._release_nick(local.name, *claimed)

    def _forget_if_empty(self, local: LocalRoom) -> None:
        if local.empty and self.rooms.get(local.name) is local:
            del self.rooms[local.name]
            local.recent.clear()

    # -- what clients say ----------------------------------------------------------

    def on_message(self, conn: Connection, message: str | bytes) -> None:
        self._handle(conn, message, may_wait=True)

    def on_message_inline(self, conn: Connection, message: str | bytes) -> bool:
        """``on_message`` on the loop thread (see ``Resource``): a chat message
        is only queued for the engine, which never waits; a rename or a user
        list asks the engine and waits for it, so False sends it to a worker."""
        return self._handle(conn, message, may_wait=False)

    def _handle(self, conn: Connection, message: str | bytes, may_wait: bool) -> bool:
        """A client's message; False (only when not ``may_wait``) when it would wait for the engine."""
        member = conn.context
        if not isinstance(member, Member):
            return True
        if isinstance(message, bytes):
            self.server.deliver_published()
            conn.close(CloseCode.UNSUPPORTED_DATA, "binary messages are not supported")
            return True
        request, problem = parse_chat_request(message, self.limits.max_length) if member.structured else (None, None)
        if not may_wait and request is not None and request["type"] != "message":
            return False
        # %r and a cut: a message can neither flood the log nor forge lines in it.
        log.debug("Received message %r from %s", message[:200], conn.key)
        if not self._within_rate(member):
            return True
        if not member.structured:
            self._say(member, message)
            return True
        if request is not None and request["type"] == "message":
            self._say(member, request["text"], request.get("id"))
            return True
        self.server.deliver_published()  # (on the loop) first: the echoes of what this pass published
        if request is None:
            self._notify(member, "bad_request", problem or "")
        elif request["type"] == "nick":
            self._rename(member, normalize(request["nick"].strip()))
        else:
            try:
                users = self.engine.users(member.room.name)
            except EngineUnavailable:
                self._notify(member, "unavailable", "the chat cannot reach its engine; try again later")
                return True
            conn.send(encode({"type": "users", "room": member.room.name, "users": users}))
        return True

    def _say(self, member: Member, text: str, message_id: str | None = None) -> None:
        limit = self.limits.max_length
        if limit and len(text) > limit:
            self.server.deliver_published()
            self._notify(member, "too_long", f"message longer than {limit} characters; not sent")
            return
        room = member.room.name

        def not_sent(_: EngineUnavailable) -> None:
            extra = {"id": message_id} if message_id is not None else {}  # which one: the client may try again
            self._notify(member, "not_sent", "the chat cannot reach its engine; message not sent", **extra)

        try:  # returns at once: a sender never waits for another's round trip to the engine
            self.engine.publish_message(room, message_record(room, member.nick, text, message_id), not_sent)
        except EngineUnavailable as exc:
            not_sent(exc)

    def _rename(self, member: Member, nick: str) -> None:
        problem: str | None
        if member.identified:
            problem = "your nickname is your user name: it cannot change"
        else:
            problem = self._nick_problem(nick)
        if problem is None:
            try:
                renamed = self.engine.rename(member.room.name, member.nick, nick, member.holder)
            except EngineUnavailable:
                self._notify(member, "unavailable", "the chat cannot reach its engine; try again later")
                return
            if renamed:
                self._renamed(member, nick)
                return
            problem = f"nickname {quoted(nick, 40)} is taken in this room"
        self._notify(member, "nick_refused", problem)

    def _renamed(self, member: Member, nick: str) -> None:
        old, member.nick = member.nick, nick
        room = member.room.name
        self._publish(room, {"type": "nick", "room": room, "old": old, "nick": nick, "time": now_ms()})

    def _nick_problem(self, nick: str) -> str | None:
        problem = nick_problem(nick, self.limits.max_nick_length)
        return None if problem is None else f"nickname {quoted(nick, 40)} refused: {problem}"

    # -- leaving -------------------------------------------------------------------

    def on_close(self, conn: Connection, code: int, reason: str) -> None:
        member = conn.context if isinstance(conn.context, Member) else None
        log.info("Closed connection to %s (%d%s).", conn.key, code, f" {quoted(reason)}" if reason else "")
        if member is None:
            return
        local = member.room
        with self._lock:
            local.remove(member)
            self._forget_if_empty(local)
        self._unsubscribe(local.name)
        self._release_nick(local.name, member.nick, member.holder)

    def _release_nick(self, room: str, nick: str, holder: str) -> None:
        try:
            left = self.engine.release(room, nick, holder)
        except EngineUnavailable:
            return  # the engine lets the claim go when it is back (see RedisEngine)
        if left:
            self._publish(room, {"type": "leave", "room": room, "nick": nick, "time": now_ms()})

    def _unsubscribe(self, room: str) -> None:
        try:
            self.engine.unsubscribe(room)
        except EngineUnavailable:
            pass  # a broker that is gone has no subscriptions left to drop

    def on_error(self, conn: Connection, error: Exception) -> None:
        log.info("WebSocket Errored '%s' for %s.", error, conn.key)  # the client's fault: no warning

    # -- what the engine delivers --------------------------------------------------------

    def _deliver(self, room: str, deliveries: list[Delivery]) -> None:
        """A batch of ``room``'s deliveries (see ``engine``), from whichever
        process published them, in the room's order (on the engine's thread,
        or the publisher's)."""
        with self._lock:
            local = self.rooms.get(room)
            if local is not None:  # else no one here
                local.deliver(deliveries)
                if self.max_history_total and self._recent.total > self.max_history_total:
                    self._shed_recent(local)
        for delivery in deliveries:
            if isinstance(delivery, dict) and delivery["type"] == "evict":
                self._evicted(room, delivery)

    def _shed_recent(self, keep: LocalRoom) -> None:
        """(Lock held.)  Over ``max_history_total``: the heaviest rooms' recent
        messages go, but ``keep``'s (see ``heaviest_first``; a newcomer there
        reads the history again, see ``LocalRoom.catch_up``)."""
        dropped = heaviest_first(((local.recent.size, local) for local in self.rooms.values()
                                  if local is not keep and local.recent.size), self._recent.total,
                                 self.max_history_total)
        for local in dropped:
            local.recent.clear()
        log.warning("the recent messages of %d rooms are dropped (the heaviest): all rooms' weighed over %d bytes "
                    "(max_history_total)", len(dropped), self.max_history_total)

    def _evicted(self, room: str, event: Event) -> None:
        """An app user took its name back: its anonymous holders here become guests."""
        with self._lock:
            local = self.rooms.get(room)
            squatters = [local.members[holder] for holder in event["_holders"] if local and holder in local.members]
        for member in squatters:
            try:
                guest, claim = self._guest(room, member.holder)
            except EngineUnavailable:
                member.conn.close(TRY_AGAIN_LATER, "chat unavailable, try again later")
                continue
            if claim is None:
                member.conn.close(TRY_AGAIN_LATER, "no guest nickname is free in this room")
                continue
            self._notify(member, "renamed", f"the user {event['nick']} joined and has that name; you are now {guest}")
            self._renamed(member, guest)

    def _publish(self, room: str, event: Event) -> None:
        """Publish a presence event; one that cannot be published is logged
        (the engine's outage is logged once; its presence is reconciled later)."""

        def not_published(exc: EngineUnavailable) -> None:
            log.debug("room %s: %s event not published: %s", quoted(room), event["type"], exc)

        try:
            self.engine.publish(room, event, not_published)
        except EngineUnavailable as exc:
            not_published(exc)

    # -- limits and notices ------------------------------------------------------------

    def _within_rate(self, member: Member) -> bool:
        """Whether the member's message is within the rate limit; a client
        that keeps sending when out of it is closed with 1008."""
        if not member.conn.is_open:
            return False  # closed already (its handler calls left run still): one warning was enough
        allowed = member.take_token(self.limits)
        if allowed is not True:
            self.server.deliver_published()  # (on the loop) first: the echoes of what this pass published
        if allowed is None:
            log.warning("%s: rate limit exceeded again and again, closing", member.conn.key)
            member.conn.close(CloseCode.POLICY_VIOLATION, "rate limit exceeded")
        elif not allowed:
            rate = self.limits.rate
            self._notify(member, "rate_limited", f"more than {rate:g} message{'' if rate == 1 else 's'} per second; "
                                                 "message dropped")
        return bool(allowed)

    def _notify(self, member: Member, code: str, text: str, **extra: str) -> None:
        """Tell one client what went wrong, in its dialect: unless it has gone
        meanwhile (this runs on the engine's thread too, as a publication fails)."""
        try:
            if member.structured:
                member.conn.send(encode({"type": "error", "code": code, "text": text, **extra}))
            else:
                member.conn.send(f"* {text}")
        except ConnectionClosed:
            pass
