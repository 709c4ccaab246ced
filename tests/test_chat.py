"""End-to-end tests of the chat: the seed's behaviour, and the wschat.v1 dialect."""

import contextlib
import json
import logging
import os
import threading

import pytest
from websockets.exceptions import ConnectionClosedError, InvalidStatus
from websockets.sync.client import connect

from wschat import HandshakeError
from wschat.chat import DEFAULT_WELCOME, RECENT_FLOOR, Chat, ChatLimits
from wschat.engine import EngineUnavailable, History, MemoryEngine, Messages
from wschat.frames import Opcode, encode_frame

from .helpers import RawClient, start_server, wait_until


@pytest.fixture
def make_chat():
    servers = []

    def make(**kwargs):
        server = start_server(workers=kwargs.pop("workers", 0))
        chat = Chat(server, **kwargs)
        chat.closed = threading.Semaphore(0)  # released after each on_close: tests wait on it
        chat.resource.on_close = lambda *args: (chat.on_close(*args), chat.closed.release())
        servers.append(server)
        chat.url = f"ws://127.0.0.1:{server.port}/chat"
        return chat

    yield make
    for server in servers:
        server.stop()


def plain(chat, room=""):
    return connect(chat.url + room)


def structured(chat, room="", nick=None):
    query = f"?nick={nick}" if nick else ""
    return connect(chat.url + room + query, subprotocols=["wschat.v1"])


def recv_json(ws, kind=None):
    """The next JSON event (of ``kind``, skipping others)."""
    while True:
        event = json.loads(ws.recv(timeout=5))
        if kind is None or event["type"] == kind:
            return event


# -- the seed's behaviour ------------------------------------------------------


def test_seed_behaviour_welcome_broadcast_and_logging(make_chat, caplog):
    chat = make_chat()
    caplog.set_level(logging.DEBUG, logger="wschat")  # the seed's "Received message" line is a debug one
    with plain(chat) as a, plain(chat) as b:
        assert a.recv(timeout=5) == DEFAULT_WELCOME
        assert b.recv(timeout=5) == DEFAULT_WELCOME
        a.send("hello everyone")
        assert a.recv(timeout=5) == "hello everyone"  # the sender too
        assert b.recv(timeout=5) == "hello everyone"
    assert chat.closed.acquire(timeout=5) and chat.closed.acquire(timeout=5)  # the server saw both close
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("Received message 'hello everyone' from") for m in messages)
    assert any(m.startswith("Closed connection to") for m in messages)


def test_the_default_log_level_logs_joins_and_closes_not_what_people_say(caplog):
    """At INFO (the default) one line per join, with the client's address
    (the one its proxy forwarded), and one per close: never a message's
    text.  A client's protocol error is INFO too: it is not the server's."""
    caplog.set_level(logging.INFO, logger="wschat")
    server = start_server(forwarded_allow_ips=["127.0.0.1"])
    Chat(server)
    try:
        url = f"ws://127.0.0.1:{server.port}/chat"
        with connect(url, additional_headers={"X-Forwarded-For": "203.0.113.7"}) as ws:
            ws.recv(timeout=5)
            ws.send("a secret plan")
            ws.recv(timeout=5)
            ws.send(b"binary")  # refused with 1003
            with pytest.raises(ConnectionClosedError):
                ws.recv(timeout=5)
        with RawClient(server.port) as raw:
            raw.send_frame(Opcode.TEXT, b"\xff not UTF-8")
            assert raw.recv_close() == 1007
        wait_until(lambda: sum("Closed connection" in r.getMessage() for r in caplog.records) == 2)
    finally:
        server.stop()
    lines = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert not any("secret plan" in line for _, line in lines), lines
    joins = [line for _, line in lines if " joined room " in line]
    assert joins[0].endswith("from 203.0.113.7") and joins[1].endswith("from 127.0.0.1"), joins
    assert any("Errored" in line for _, line in lines) and all(level <= logging.INFO for level, _ in lines), lines


def test_log_lines_cannot_be_forged_or_flooded(make_chat, caplog):
    chat = make_chat(welcome="", limits=ChatLimits.off())
    caplog.set_level(logging.DEBUG, logger="wschat")
    with plain(chat) as ws:
        ws.send("hi\nFAKE ERROR server compromised" + "x" * 5000)
        ws.recv(timeout=5)
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Received message")]
    assert "\n" not in line and "\\nFAKE ERROR" in line and len(line) < 300


def test_binary_refused_with_1003(make_chat):
    chat = make_chat()
    with plain(chat) as ws:
        ws.recv(timeout=5)
        ws.send(b"\x00\x01")
        with pytest.raises(ConnectionClosedError) as info:
            ws.recv(timeout=5)
        assert info.value.rcvd.code == 1003


def test_echo_when_welcome_and_limits_are_off(make_chat):
    chat = make_chat(welcome="", limits=ChatLimits.off())
    with plain(chat) as ws:
        for message in ["a", "ü" * 5000, "x" * 100000] + [str(i) for i in range(100)]:
            ws.send(message)
            assert ws.recv(timeout=5) == message


def test_rooms_are_separate(make_chat):
    chat = make_chat(welcome="")
    with plain(chat, "/lobby") as lobby, plain(chat, "/games") as games, plain(chat) as main:
        lobby.send("in lobby")
        main.send("in main")
        games.send("in games")
        assert lobby.recv(timeout=5) == "in lobby"
        assert main.recv(timeout=5) == "in main"
        assert games.recv(timeout=5) == "in games"


def test_invalid_room_closed_1008(make_chat):
    chat = make_chat()
    with plain(chat, "/a%20b") as ws:
        with pytest.raises(ConnectionClosedError) as info:
            ws.recv(timeout=5)
        assert info.value.rcvd.code == 1008


# -- wschat.v1 -------------------------------------------------------------------


def test_structured_join_message_and_leave(make_chat):
    chat = make_chat(workers=2)
    with structured(chat, "/lobby", "alice") as alice:
        welcome = recv_json(alice)
        assert welcome == {"type": "welcome", "text": DEFAULT_WELCOME, "room": "lobby", "nick": "alice", "users": ["alice"],
                           "history": [], "epoch": chat.engine.rooms["lobby"].epoch}
        with structured(chat, "/lobby", "bob") as bob:
            assert recv_json(bob, "welcome")["users"] == ["alice", "bob"]
            assert recv_json(alice) == {"type": "join", "room": "lobby", "nick": "bob", "time": pytest.approx(0, abs=1e13)}
            bob.send(json.dumps({"type": "message", "text": "hi <b>alice</b>"}))
            for ws in (alice, bob):
                message = recv_json(ws, "message")
                assert message["nick"] == "bob" and message["text"] == "hi <b>alice</b>"
                assert message["room"] == "lobby" and message["seq"] == 1 and message["time"] > 1.7e12
            bob.send(json.dumps({"type": "users"}))
            assert recv_json(bob, "users") == {"type": "users", "room": "lobby", "users": ["alice", "bob"]}
        leave = recv_json(alice, "leave")
        assert leave["nick"] == "bob"
        assert chat.users("lobby") == ["alice"]  # the notice goes out once the room changed


def test_with_workers_only_what_asks_the_engine_leaves_the_loop_thread(make_chat):
    """A chat message is queued for the engine, which never waits: it is
    handled inline; a user list or a rename waits for the engine, on a worker."""
    chat = make_chat(workers=2, welcome="")
    on_worker = []
    handle = chat.resource.on_message
    chat.resource.on_message = lambda conn, message: (on_worker.append(json.loads(message)["type"]),
                                                      handle(conn, message))
    with structured(chat, "/lobby", "alice") as alice:
        recv_json(alice, "welcome")
        wait_until(lambda: chat.server.connections()[0].link.calls is None, what="the join to finish")
        for request in ({"type": "message", "text": "hi"}, {"type": "users"}, {"type": "nick", "nick": "ann"}):
            alice.send(json.dumps(request))
        assert recv_json(alice, "message")["text"] == "hi"
        assert recv_json(alice, "users")["users"] == ["alice"]
        assert recv_json(alice, "nick")["nick"] == "ann"
    assert on_worker == ["users", "nick"]


def test_plain_and_structured_clients_share_a_room(make_chat):
    chat = make_chat(welcome="")
    with plain(chat) as old, structured(chat, nick="carol") as new:
        recv_json(new, "welcome")
        old.send("from the seed page")
        message = recv_json(new, "message")
        assert message["text"] == "from the seed page" and message["nick"].startswith("guest-")
        new.send(json.dumps({"type": "message", "text": "from the new page"}))
        assert old.recv(timeout=5) == "from the seed page"
        assert old.recv(timeout=5) == "from the new page"  # plain clients see bare text


def test_history_replayed_to_newcomers_and_bounded(make_chat):
    chat = make_chat(history=3, limits=ChatLimits(rate=0))
    with structured(chat, nick="dave") as dave:
        recv_json(dave, "welcome")
        for i in range(5):
            dave.send(json.dumps({"type": "message", "text": f"m{i}"}))
        for i in range(5):
            assert recv_json(dave, "message")["text"] == f"m{i}"
        with structured(chat, nick="erin") as erin:
            history = recv_json(erin, "welcome")["history"]
            assert [m["text"] for m in history] == ["m2", "m3", "m4"]
            assert [m["seq"] for m in history] == [3, 4, 5]


def test_empty_rooms_keep_history_but_only_so_many(make_chat):
    chat = make_chat(welcome="", max_idle_rooms=2, limits=ChatLimits(rate=0))
    for name in ["a", "b", "c"]:
        with plain(chat, f"/{name}") as ws:
            ws.send(f"last words in {name}")
            ws.recv(timeout=5)
        assert chat.closed.acquire(timeout=5)
    assert sorted(chat.engine.rooms) == ["b", "c"]  # the oldest empty room went
    with structured(chat, "/c") as ws:
        assert [m["text"] for m in recv_json(ws, "welcome")["history"]] == ["last words in c"]
    with plain(chat, "/quiet"):
        pass
    assert chat.closed.acquire(timeout=5) and chat.closed.acquire(timeout=5)
    assert sorted(chat.engine.rooms) == ["b", "c"]  # an empty room without history is not kept


def test_nicknames_unique_validated_and_changeable(make_chat):
    chat = make_chat()
    with structured(chat, nick="frank") as frank, structured(chat, nick="frank") as other:
        recv_json(frank, "welcome")
        welcome = recv_json(other, "welcome")
        assert welcome["nick"].startswith("guest-")
        assert "taken" in recv_json(other, "error")["text"]
        other.send(json.dumps({"type": "nick", "nick": "grace"}))
        change = recv_json(frank, "nick")
        assert (change["old"], change["nick"]) == (welcome["nick"], "grace")
        for bad in ["", "a b", "<script>", "x" * 25, "frank"]:
            other.send(json.dumps({"type": "nick", "nick": bad}))
            assert recv_json(other, "error")["code"] == "nick_refused"
        assert chat.users() == ["frank", "grace"]
    with structured(chat, nick="bad%20nick") as ws:
        assert recv_json(ws, "welcome")["nick"].startswith("guest-")
        assert recv_json(ws)["code"] == "nick_refused"


def test_bad_requests_get_an_error(make_chat):
    chat = make_chat()
    with structured(chat, nick="henry") as ws:
        recv_json(ws, "welcome")
        for request in ["not json", "[1]", "{}", '{"type": "dance"}', '{"type": "message", "text": 5}']:
            ws.send(request)
            assert recv_json(ws)["code"] == "bad_request"


# -- abuse limits --------------------------------------------------------------------


def test_message_length_limit(make_chat):
    chat = make_chat(welcome="", limits=ChatLimits(max_length=10, rate=0))
    with plain(chat) as ws, structured(chat, nick="ivy") as ivy:
        recv_json(ivy, "welcome")
        ws.send("x" * 11)
        assert ws.recv(timeout=5).startswith("* message longer than 10")
        ivy.send(json.dumps({"type": "message", "text": "y" * 11}))
        assert recv_json(ivy)["code"] == "too_long"
        ws.send("x" * 10)
        assert ws.recv(timeout=5) == "x" * 10


def test_zero_burst_still_lets_the_rate_through():
    assert ChatLimits(rate=5, burst=0).burst == 1
    assert ChatLimits.off().burst == 0


def test_rate_limit_notice_then_close(make_chat):
    chat = make_chat(welcome="", limits=ChatLimits(rate=0.001, burst=3))
    with plain(chat) as ws:
        for i in range(3):  # the burst goes through
            ws.send(f"m{i}")
            assert ws.recv(timeout=5) == f"m{i}"
        ws.send("over")
        assert ws.recv(timeout=5).startswith("* more than 0.001 messages per second")
        with pytest.raises(ConnectionClosedError) as info:  # sending may already meet the close
            for _ in range(4):
                ws.send("flood")
            while True:
                ws.recv(timeout=5)
        assert info.value.rcvd.code == 1008


@pytest.mark.parametrize("workers", [0, 2])
def test_a_flood_past_the_rate_limit_is_closed_with_one_warning(make_chat, caplog, workers):
    """Frames already read when the 1008 goes out are not each a warning
    (6ddb637 logged one per frame: thousands for one flooder)."""
    chat = make_chat(welcome="", limits=ChatLimits(rate=0.001, burst=1), workers=workers)
    raw = RawClient(int(chat.url.split(":")[2].split("/")[0]))
    raw.sock.sendall(b"".join(encode_frame(Opcode.TEXT, b"flood", mask=os.urandom(4)) for _ in range(2000)))
    assert raw.recv_close() == 1008
    assert chat.closed.acquire(timeout=10)
    warnings = [r for r in caplog.records if "rate limit exceeded again" in r.getMessage()]
    assert len(warnings) == 1


def test_a_rate_of_one_is_one_message(make_chat):
    chat = make_chat(welcome="", limits=ChatLimits(rate=1, burst=1))
    with plain(chat) as ws:
        ws.send("first")
        assert ws.recv(timeout=5) == "first"
        ws.send("second, too soon")
        assert ws.recv(timeout=5) == "* more than 1 message per second; message dropped"


def test_guest_names_fit_a_short_nickname_limit(make_chat):
    """With --max-nick-length 3 a guest is g1, g2, ... (6ddb637: guest-1, a
    name the chat itself would refuse); when every short name is taken the
    newcomer is told to come back (1013), not kept waiting."""
    chat = make_chat(limits=ChatLimits(max_nick_length=2))
    with contextlib.ExitStack() as stack:
        clients = [stack.enter_context(structured(chat)) for _ in range(10)]
        nicks = {recv_json(ws, "welcome")["nick"] for ws in clients}
        assert nicks == {f"g{n}" for n in range(10)}
        with structured(chat) as eleventh:
            with pytest.raises(ConnectionClosedError) as info:
                eleventh.recv(timeout=5)
            assert info.value.rcvd.code == 1013 and "no guest nickname is free" in info.value.rcvd.reason


def test_server_broadcast_reaches_each_client_in_its_dialect(make_chat):
    """``Server.broadcast(text)`` to everyone: a wschat.v1 client gets a JSON
    message event (6ddb637 sent it bare text it cannot parse), a plain
    client the text, and another resource's client the text."""
    chat = make_chat(welcome="")
    chat.server.resource("/raw")
    with plain(chat) as seed, structured(chat, nick="kim") as kim, \
            connect(f"ws://127.0.0.1:{chat.server.port}/raw") as raw:
        recv_json(kim, "welcome")
        wait_until(lambda: len(chat.server.connections()) == 3)
        assert chat.server.broadcast("maintenance at noon") == 3
        event = recv_json(kim, "message")
        assert (event["nick"], event["text"]) == ("server", "maintenance at noon") and "seq" not in event
        assert seed.recv(timeout=5) == "maintenance at noon" and raw.recv(timeout=5) == "maintenance at noon"
        assert chat.server.broadcast(b"bytes go as they are", path="/raw") == 1
        assert raw.recv(timeout=5) == b"bytes go as they are"


def test_post_from_the_application(make_chat):
    chat = make_chat(welcome="")
    with plain(chat) as ws, structured(chat, nick="judy") as judy:
        recv_json(judy, "welcome")
        chat.post("deploy finished", nick="ci")
        assert ws.recv(timeout=5) == "deploy finished"
        message = recv_json(judy, "message")
        assert (message["nick"], message["text"]) == ("ci", "deploy finished")
    chat.post("for whoever comes", room="empty")  # no one there: it waits in the room's history
    with structured(chat, "/empty", nick="late") as late:
        assert [m["text"] for m in recv_json(late, "welcome")["history"]] == ["for whoever comes"]
    with pytest.raises(TypeError, match="text must be a str, not int"):
        chat.post(3)
    with pytest.raises(ValueError, match="a room name is 1 to 64"):
        chat.post("lost", room="no such/room")  # no client could join it: it would hold the text for no one
    assert chat.engine.history("no such/room").records == []


# -- hardening (issue 12) ---------------------------------------------------------------


def test_a_lone_surrogate_is_refused_and_never_poisons_the_room(make_chat):
    chat = make_chat()
    with structured(chat, nick="mallory") as mallory:
        recv_json(mallory, "welcome")
        mallory.send('{"type": "message", "text": "\\ud800"}')  # valid JSON, not valid Unicode
        error = recv_json(mallory, "error")
        assert error["code"] == "bad_request" and "surrogate" in error["text"]
        mallory.send(json.dumps({"type": "message", "text": "fine"}))
        assert recv_json(mallory, "message")["text"] == "fine"
    with structured(chat, nick="newcomer") as newcomer:  # the room still welcomes browsers
        assert [m["text"] for m in recv_json(newcomer, "welcome")["history"]] == ["fine"]
    with pytest.raises(ValueError):
        chat.post("\udfff")


@pytest.mark.parametrize("request_text, expected", [
    ("[" * 5000, "nested too deeply"),
    ('{"type": ' * 3000, "nested too deeply"),
    ("x" * 70000, "longer than"),
    ('{"type": "message"}', '"text" string'),
    ('{"type": "message", "text": ["list"]}', '"text" string'),
    ('{"type": "nick"}', '"nick" string'),
    ('{"type": "shout"}', "unknown request type 'shout'"),
    ("{", "not JSON"),
    ('{"type": "message", "text": "hi", "id": 7}', '"id" is a string of 1 to 64'),
    ('{"type": "message", "text": "hi", "id": ""}', '"id" is a string of 1 to 64'),
    ('{"type": "message", "text": "hi", "id": "%s"}' % ("x" * 65), '"id" is a string of 1 to 64'),
    ('{"type": "message", "text": "hi", "id": "\\udc00"}', '"id" is a string of 1 to 64'),
])
def test_bad_requests_say_what_was_wrong_and_never_log_a_traceback(make_chat, caplog, request_text, expected):
    chat = make_chat(limits=ChatLimits(max_length=10_000, rate=0))
    with structured(chat, nick="quinn") as ws:
        recv_json(ws, "welcome")
        ws.send(request_text)
        error = recv_json(ws, "error")
        assert error["code"] == "bad_request" and expected in error["text"]
        ws.send(json.dumps({"type": "users"}))  # and the connection goes on
        assert recv_json(ws, "users")["users"] == ["quinn"]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


def test_a_message_id_comes_back_with_the_message_and_in_the_history(make_chat):
    """A client names its message (``id``): it knows it by that in the echo
    and, after a reconnect, in the history (issue 19: nothing lost, nothing twice)."""
    chat = make_chat()
    with structured(chat, nick="ann") as ann, structured(chat, nick="ben") as ben:
        recv_json(ann, "welcome")
        recv_json(ben, "welcome")
        ann.send(json.dumps({"type": "message", "text": "hello", "id": "ann-1"}))
        for ws in (ann, ben):
            message = recv_json(ws, "message")
            assert (message["text"], message["id"], message["seq"]) == ("hello", "ann-1", 1)
        ann.send(json.dumps({"type": "message", "text": "no name"}))
        assert "id" not in recv_json(ben, "message")
    with structured(chat, nick="cat") as cat:
        assert [m.get("id") for m in recv_json(cat, "welcome")["history"]] == ["ann-1", None]


@pytest.mark.parametrize("impostor", ["admin", "ADMIN", "ａｄｍｉｎ", "Ａdmin"])
def test_nicknames_are_compared_normalized_and_case_folded(make_chat, impostor):
    chat = make_chat()
    with structured(chat, nick="Admin") as admin:
        recv_json(admin, "welcome")
        with structured(chat, nick=impostor) as other:
            welcome = recv_json(other, "welcome")
            assert welcome["nick"].startswith("guest-")
            assert "taken" in recv_json(other, "error")["text"]


def test_nicknames_mixing_scripts_are_refused(make_chat):
    chat = make_chat()
    with structured(chat, nick="\u0430dmin") as mixed:  # a Cyrillic а, then Latin
        assert recv_json(mixed, "welcome")["nick"].startswith("guest-")
        assert "one script" in recv_json(mixed, "error")["text"]
        for fine in ["админ", "Zoë", "日本語ひらがな", "정민수"]:
            mixed.send(json.dumps({"type": "nick", "nick": fine}))
            assert recv_json(mixed, "nick")["nick"] == fine


def test_a_member_may_change_the_case_of_their_own_nickname(make_chat):
    chat = make_chat()
    with structured(chat, nick="alice") as alice:
        recv_json(alice, "welcome")
        alice.send(json.dumps({"type": "nick", "nick": "Alice"}))
        assert recv_json(alice, "nick")["nick"] == "Alice"
        assert chat.users() == ["Alice"]


def test_unicode_room_names_from_the_url(make_chat):
    chat = make_chat(welcome="")
    with structured(chat, "/caf%C3%A9", nick="zoe") as ws:  # what a browser sends for /café
        assert recv_json(ws, "welcome")["room"] == "café"
        assert chat.users("café") == ["zoe"]
    with plain(chat, "/%ff") as bad:  # not UTF-8
        with pytest.raises(ConnectionClosedError) as info:
            bad.recv(timeout=5)
        assert info.value.rcvd.code == 1008


# -- identities from the app (Chat's authorize hook) -------------------------------------


def user_from_cookie(request):
    """The test app's session: a cookie names the user; no cookie, anonymous."""
    return request.cookies.get("user")


def as_user(chat, user, room="", nick=None):
    query = f"?nick={nick}" if nick else ""
    return connect(chat.url + room + query, subprotocols=["wschat.v1"], additional_headers={"Cookie": f"user={user}"})


@pytest.mark.parametrize("workers", [0, 2])
def test_the_app_user_is_the_nickname_and_cannot_be_changed(make_chat, workers):
    chat = make_chat(authorize=user_from_cookie, workers=workers)
    with as_user(chat, "ann", nick="someone_else") as ann:
        welcome = recv_json(ann, "welcome")
        assert (welcome["nick"], welcome["identified"]) == ("ann", True)
        ann.send(json.dumps({"type": "nick", "nick": "bob"}))
        assert "cannot change" in recv_json(ann, "error")["text"]
        ann.send(json.dumps({"type": "message", "text": "hi"}))
        assert recv_json(ann, "message")["nick"] == "ann"
        with structured(chat, nick="ann") as anonymous:  # the name is held: an anonymous client is a guest
            welcome = recv_json(anonymous, "welcome")
            assert welcome["nick"].startswith("guest-") and "identified" not in welcome
        assert chat.closed.acquire(timeout=5)  # the guest's leave is done (on a worker, with workers)
        assert chat.users() == ["ann"]


def test_an_anonymous_holder_gives_the_name_up_to_its_user(make_chat):
    chat = make_chat(authorize=user_from_cookie)
    with structured(chat, nick="ann") as squatter:
        assert recv_json(squatter, "welcome")["nick"] == "ann"
        with as_user(chat, "ann") as ann:
            assert recv_json(ann, "welcome")["nick"] == "ann"
            renamed = recv_json(squatter, "error")
            assert renamed["code"] == "renamed" and "you are now guest-" in renamed["text"]
            change = recv_json(squatter, "nick")
            assert change["old"] == "ann" and change["nick"].startswith("guest-")
            assert sorted(chat.users()) == sorted(["ann", change["nick"]])


def test_one_user_in_several_tabs_joins_once_and_leaves_once(make_chat):
    chat = make_chat(authorize=user_from_cookie)
    with structured(chat, nick="watcher") as watcher:
        recv_json(watcher, "welcome")
        with as_user(chat, "ann") as tab1:
            recv_json(tab1, "welcome")
            assert recv_json(watcher, "join")["nick"] == "ann"
            with as_user(chat, "ann") as tab2:
                assert recv_json(tab2, "welcome")["users"] == ["ann", "watcher"]
                tab1.send(json.dumps({"type": "message", "text": "from tab 1"}))
                assert recv_json(tab2, "message")["text"] == "from tab 1"  # every tab sees it
                assert recv_json(watcher, "message")["text"] == "from tab 1"
            assert chat.closed.acquire(timeout=5)
            assert chat.users() == ["ann", "watcher"]  # one tab is still there
            tab1.send(json.dumps({"type": "message", "text": "still here"}))
            event = recv_json(watcher)
            assert (event["type"], event["text"]) == ("message", "still here")  # no leave came before it
        assert recv_json(watcher, "leave")["nick"] == "ann"
        assert chat.users() == ["watcher"]


def test_two_users_cannot_share_a_nickname(make_chat):
    chat = make_chat(authorize=lambda request: request.cookies.get("user"), nick_of=str.lower)
    with as_user(chat, "Ann") as first:
        recv_json(first, "welcome")
        with as_user(chat, "ANN") as second:  # another app user, the same nickname
            with pytest.raises(ConnectionClosedError) as closed:
                second.recv(timeout=5)
            assert closed.value.rcvd.code == 1008 and "another user" in closed.value.rcvd.reason


def test_a_user_name_that_cannot_be_a_nickname_is_refused_at_the_handshake(make_chat, caplog):
    chat = make_chat(authorize=user_from_cookie)
    with pytest.raises(InvalidStatus) as refused:
        as_user(chat, "ann@example.com")
    assert refused.value.response.status_code == 403
    assert b"cannot be a nickname" in refused.value.response.body
    assert "cannot be a nickname" in caplog.text


def test_a_refusing_hook_keeps_anonymous_people_out(make_chat):
    def members_only(request):
        if "user" not in request.cookies:
            raise HandshakeError(401, "log in first")
        return request.cookies["user"]

    chat = make_chat(authorize=members_only)
    with pytest.raises(InvalidStatus) as refused:
        structured(chat, nick="ann")
    assert refused.value.response.status_code == 401 and refused.value.response.body == b"log in first\n"
    with as_user(chat, "ann") as ann:
        assert recv_json(ann, "welcome")["nick"] == "ann"
    assert chat.page_config("Ann")["user"] == "Ann" and chat.page_config()["user"] is None


# -- coming back (issue 10): exactly what was missed, with either engine ----------------------


def collect(ws, until_seq):
    """The sequence numbers of the messages ``ws`` receives, up to ``until_seq``."""
    seqs = []
    while not seqs or seqs[-1] < until_seq:
        seqs.append(recv_json(ws, "message")["seq"])
    return seqs


def check_gap_free_reconnect(sender_chat, returner_chat):
    """A client that comes back with ``?since=SEQ&epoch=`` gets exactly the
    messages it missed, then the live ones, with messages sent all along; one
    that comes back too late (rooms keep 50) or from another epoch is told."""
    total = 40
    with structured(sender_chat, nick="sender") as sender:
        recv_json(sender, "welcome")

        def say(numbers):
            for i in numbers:
                sender.send(json.dumps({"type": "message", "text": f"m{i}"}))

        # max_queue=None: the client leaves messages unread, and must still read our close
        with connect(returner_chat.url + "?nick=back", subprotocols=["wschat.v1"], max_queue=None) as first:
            epoch = recv_json(first, "welcome")["epoch"]
            sending = threading.Thread(target=say, args=(range(1, total + 1),))
            sending.start()
            seen = collect(first, 5)
        query = f"&since={seen[-1]}&epoch={epoch}"
        with connect(returner_chat.url + "?nick=back" + query, subprotocols=["wschat.v1"], max_queue=None) as again:
            welcome = recv_json(again, "welcome")
            assert welcome["epoch"] == epoch and welcome["missed"] is False
            caught_up = [record["seq"] for record in welcome["history"]]
            live = collect(again, total) if not caught_up or caught_up[-1] < total else []
        sending.join()
        assert seen == list(range(1, seen[-1] + 1))
        assert caught_up + live == list(range(seen[-1] + 1, total + 1))  # nothing missing, nothing twice

        say(range(total + 1, 71))
        collect(sender, 70)
    late = json.loads(connect_and_welcome(returner_chat, f"?nick=late&since=3&epoch={epoch}"))
    assert late["missed"] is True
    assert [record["seq"] for record in late["history"]] == list(range(21, 71))
    other = json.loads(connect_and_welcome(returner_chat, "?nick=other&since=3&epoch=another"))
    assert other["missed"] is True and len(other["history"]) == 50  # another epoch: all that is kept
    fresh = json.loads(connect_and_welcome(returner_chat, "?nick=fresh"))
    assert "missed" not in fresh and len(fresh["history"]) == 50


def connect_and_welcome(chat, query):
    with connect(chat.url + query, subprotocols=["wschat.v1"], max_queue=None) as ws:
        return ws.recv(timeout=5)


def test_gap_free_reconnect_with_the_memory_engine(make_chat):
    chat = make_chat(welcome="", limits=ChatLimits.off())
    check_gap_free_reconnect(chat, chat)


@pytest.mark.parametrize("history", [50, 0])
def test_a_plain_client_gets_what_was_said_while_it_joined(make_chat, history):
    """Its handshake answered, a client gets every later message, even one
    said while the chat was still joining it (on a worker, waiting for its
    engine), and even with no history kept (the room here holds it)."""

    class SlowToJoin(MemoryEngine):
        def __init__(self):
            super().__init__(history)
            self.joining, self.go_on = threading.Event(), threading.Event()

        def subscribe(self, room):
            self.joining.set()
            assert self.go_on.wait(5)

    chat = make_chat(welcome="", engine=SlowToJoin(), workers=2)
    with plain(chat) as ws:
        assert chat.engine.joining.wait(5)
        chat.post("said while joining", nick="ci")
        chat.engine.go_on.set()
        assert ws.recv(timeout=5) == "said while joining"
        chat.post("said after", nick="ci")
        assert ws.recv(timeout=5) == "said after"


def test_a_newcomer_whose_history_is_older_than_an_earlier_greeting_reads_it_again(make_chat):
    """Two newcomers join a room new here at once, and the one whose history
    was read first is greeted last, after the other's newer history set
    where the room stands and before the message between them is delivered
    here: it reads the history again rather than miss that message (as
    processes that a rolling restart starts see: wschat.v1 clients coming
    back all at once, with the other processes still publishing)."""

    class Staggered(MemoryEngine):
        def __init__(self):
            super().__init__()
            self.reads, self.first_read, self.go_on = 0, threading.Event(), threading.Event()
            self.held = None  # deliveries kept back, while a list

        def history(self, room, since=None, epoch=None):
            self.reads += 1
            history = super().history(room, since, epoch)
            if self.reads == 1:  # the first newcomer's, read before m2 is said
                self.first_read.set()
                assert self.go_on.wait(5)
            return history

        def start(self, deliver):
            super().start(lambda *delivery: deliver(*delivery) if self.held is None else self.held.append(delivery))

    chat = make_chat(welcome="", engine=Staggered(), workers=2)
    engine = chat.engine
    chat.post("m1", nick="ci")
    with structured(chat, nick="first") as first:
        assert engine.first_read.wait(5)
        engine.held = []
        chat.post("m2", nick="ci")  # in the history, not yet delivered here
        with structured(chat, nick="second") as second:
            assert [record["seq"] for record in recv_json(second, "welcome")["history"]] == [1, 2]
            engine.go_on.set()
            assert [record["seq"] for record in recv_json(first, "welcome")["history"]] == [1, 2]
            held, engine.held = engine.held, None
            for delivery in held:
                chat._deliver(*delivery)
            chat.post("m3", nick="ci")
            assert recv_json(first, "message")["seq"] == recv_json(second, "message")["seq"] == 3
        assert engine.reads == 3


def test_a_returning_client_whose_history_stays_too_old_is_told_it_missed_some(make_chat, caplog):
    """A history older than what the room here still holds, read three
    times over: the client is greeted with what there is, told it missed
    some, and the loss is logged."""

    class Frozen(MemoryEngine):
        frozen, reads = None, 0

        def history(self, room, since=None, epoch=None):
            self.reads += 1
            return self.frozen or super().history(room, since, epoch)

    chat = make_chat(welcome="", engine=Frozen(history=3), workers=2)
    with structured(chat, nick="stays") as stays:
        epoch = recv_json(stays, "welcome")["epoch"]
        for text in ("m1", "m2"):
            chat.post(text, nick="ci")
        chat.engine.frozen = chat.engine.history("main", 1, epoch)
        last = 2 + RECENT_FLOOR + 1  # one more than the room here keeps past the frozen history
        for seq in range(3, last + 1):
            chat.post(f"m{seq}", nick="ci")
        assert recv_json(stays, "message")["seq"] == 1 and collect(stays, last)[-1] == last
        chat.engine.reads = 0
        welcome = json.loads(connect_and_welcome(chat, f"?nick=back&since=1&epoch={epoch}"))
    assert [record["seq"] for record in welcome["history"]] == [2, *range(4, last + 1)]
    assert welcome["missed"] is True
    assert chat.engine.reads == 3
    assert "a newcomer's history ends at 2, before messages this process no longer holds" in caplog.text


def test_with_no_history_kept_a_newcomer_still_meets_the_live_messages_at_the_first_read(make_chat, caplog):
    """``--history 0``: what is delivered here while a newcomer reads where
    the room stands is still kept (``RECENT_FLOOR``), so its welcome and the
    live messages after it meet at the first read, even in a busy room where
    every read is overtaken by a message (without the floor: three reads, a
    warning, and the last of those messages lost to the newcomer)."""

    class Busy(MemoryEngine):
        chat, reads = None, 0

        def history(self, room, since=None, epoch=None):
            history = super().history(room, since, epoch)
            if self.chat is not None:  # a message is said just after each read
                self.reads += 1
                self.chat.post(f"said during read {self.reads}", nick="ci")
            return history

    chat = make_chat(welcome="", engine=Busy(history=0), workers=2)
    with structured(chat, nick="stays") as stays:
        recv_json(stays, "welcome")
        chat.post("m1", nick="ci")
        assert recv_json(stays, "message")["seq"] == 1
        chat.engine.chat = chat
        with structured(chat, nick="new") as new:
            welcome = recv_json(new, "welcome")
            chat.engine.chat = None
            chat.post("m3", nick="ci")
            assert [record["text"] for record in welcome["history"]] == ["said during read 1"]
            assert recv_json(new, "message")["text"] == "m3"
    assert chat.engine.reads == 1
    assert "misses some" not in caplog.text


def test_a_history_read_in_a_sequence_the_room_has_left_is_read_again(make_chat):
    """A newcomer's history read just before the engine lost the room (as a
    Redis without persistence restarting does), greeted after the room here
    followed the new sequence: it is read again, rather than take the room
    back to the old sequence (members would be told of two new epochs)."""

    class Stale(MemoryEngine):
        stale, reads = None, 0

        def history(self, room, since=None, epoch=None):
            self.reads += 1
            stale, self.stale = self.stale, None
            return stale or super().history(room, since, epoch)

    chat = make_chat(welcome="", engine=Stale(), workers=2)
    with structured(chat, nick="stays") as stays:
        epoch = recv_json(stays, "welcome")["epoch"]
        chat.post("m1", nick="ci")
        assert recv_json(stays, "message")["seq"] == 1
        chat.engine.stale, chat.engine.reads = History("left", 9, [], False), 0
        with structured(chat, nick="new") as new:
            welcome = recv_json(new, "welcome")
            # the join is published after the welcome, on the worker: wait for
            # it, or m2 may be said first (as another sender's message may)
            assert json.loads(stays.recv(timeout=5))["type"] == "join"
            chat.post("m2", nick="ci")
            assert recv_json(new, "message")["seq"] == 2
            event = json.loads(stays.recv(timeout=5))  # the very next: no notice of a new epoch
            assert (event["type"], event["seq"]) == ("message", 2)
    assert welcome["epoch"] == epoch and [record["seq"] for record in welcome["history"]] == [1]
    assert chat.engine.reads == 2


def test_a_client_back_soon_gets_what_it_missed_from_the_room_here_with_no_history_kept(make_chat):
    """``--history 0``: a wschat.v1 client that comes back to this process
    while the room still has members here gets the messages it missed from
    what the room holds, and is not told it missed any."""
    chat = make_chat(welcome="", engine=MemoryEngine(history=0))
    with structured(chat, nick="stays") as stays:
        epoch = recv_json(stays, "welcome")["epoch"]
        with structured(chat, nick="away") as away:
            recv_json(away, "welcome")
            chat.post("m1", nick="ci")
            assert recv_json(away, "message")["seq"] == 1
        for text in ("m2", "m3"):
            chat.post(text, nick="ci")
        welcome = json.loads(connect_and_welcome(chat, f"?nick=back&since=1&epoch={epoch}"))
        assert [record["text"] for record in welcome["history"]] == ["m2", "m3"] and welcome["missed"] is False
        gone = json.loads(connect_and_welcome(chat, "?nick=late&since=1&epoch=another"))
    assert gone["history"] == [] and gone["missed"] is True  # (a number of another sequence: nothing to fill)


# -- the memory engine delivers a loop pass's messages as one batch -----------------------


def on_a_loop(engine, *calls):
    """Run ``calls`` on a thread that is the engine's loop (``on_loop`` told it so)."""
    def run():
        engine.on_loop(False)
        for call in calls:
            call()

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(5)
    assert not thread.is_alive()


def test_a_refusal_that_arrives_after_its_sender_left_is_dropped_quietly(make_chat, caplog):
    """The engine tells a sender its message was refused on its own thread,
    later (Redis answers a batch): by then the sender may have gone.  Nothing
    is sent, nothing fails, nothing is logged as an error."""

    class Deferring(MemoryEngine):  # refuses every message, when told to
        def __init__(self):
            super().__init__()
            self.refusals = []

        def publish_message(self, room, record, failed=None):
            self.refusals.append(failed)

    chat = make_chat(engine=Deferring())
    with connect(chat.url, subprotocols=["wschat.v1"]) as ws:
        recv_json(ws, "welcome")
        ws.send(json.dumps({"type": "message", "text": "hello", "id": "m1"}))
        wait_until(lambda: chat.engine.refusals, what="the message handed to the engine")
    assert chat.closed.acquire(timeout=5)
    chat.engine.refusals[0](EngineUnavailable("refused"))  # as the engine's thread would
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]


def message(text):
    return {"type": "message", "nick": "n", "text": text}


def test_what_the_loop_publishes_is_delivered_once_a_pass_in_order():
    engine = MemoryEngine()
    delivered = []
    engine.start(lambda room, batch: delivered.append((room, batch)))
    join = {"type": "join", "room": "a", "nick": "n"}
    on_a_loop(engine, lambda: engine.publish_message("a", message("1")), lambda: engine.publish_message("b", message("x")),
              lambda: engine.publish_message("a", message("2")), lambda: engine.publish("a", join),
              lambda: engine.publish_message("a", message("3")))
    assert delivered == []  # until the pass ends...
    assert [record["text"] for record in engine.history("a").records] == ["1", "2", "3"]  # (numbered, kept)
    engine.on_loop(True)
    assert [room for room, _ in delivered] == ["a", "b"]
    first, event, last = delivered[0][1]
    assert (first.first, [record["text"] for record in first.items]) == (1, ["1", "2"])  # one run: framed once
    assert event is join and (last.first, last.items[0]["text"]) == (3, "3")
    engine.on_loop(True)
    assert len(delivered) == 2  # each once


def test_another_thread_s_event_comes_after_what_the_loop_published_before_it():
    engine = MemoryEngine()
    delivered = []
    engine.start(lambda room, batch: delivered.append((threading.current_thread(), batch)))
    on_a_loop(engine, lambda: engine.publish_message("a", message("by the loop")))
    engine.publish_message("a", message("by the app"))  # (this thread is not the loop)
    engine.on_loop(True)
    assert [(thread, batch[0].first) for thread, batch in delivered] == [
        (threading.current_thread(), 1), (threading.current_thread(), 2)]


def test_flush_delivers_what_the_loop_published_and_stop_drops_it():
    engine = MemoryEngine()
    delivered = []
    engine.start(lambda room, batch: delivered.append(batch))
    on_a_loop(engine, lambda: engine.publish_message("a", message("1")))
    engine.flush(1.0)  # (what a stopping server calls before it closes the clients)
    assert [batch[0].first for batch in delivered] == [1]
    on_a_loop(engine, lambda: engine.publish_message("a", message("2")))
    engine.stop()
    engine.on_loop(True)
    assert len(delivered) == 1


def test_a_burst_read_in_one_pass_reaches_every_member_in_one_batch(make_chat):
    chat = make_chat(welcome="", limits=ChatLimits.off())
    batches = []
    deliver = chat.engine._deliver
    chat.engine._deliver = lambda room, batch: (batches.extend(len(run) for run in batch if isinstance(run, Messages)),
                                                deliver(room, batch))
    with plain(chat) as listener, RawClient(chat.server.port) as sender:
        texts = [f"burst {index}" for index in range(20)]
        sender.sock.sendall(b"".join(encode_frame(Opcode.TEXT, text.encode(), mask=os.urandom(4)) for text in texts))
        assert [listener.recv(timeout=5) for _ in texts] == texts
        assert [sender.recv_frame().payload.decode() for _ in texts] == texts
    assert sum(batches) == 20 and len(batches) < 20  # (one, unless the kernel split the write)


@pytest.mark.parametrize("workers", [0, 2], ids=["inline", "pool"])
def test_a_client_gets_its_message_echoed_before_the_answers_to_its_later_requests(make_chat, workers):
    """Read in one pass, a chat message (delivered with the pass's batch)
    still comes back before the answers to the requests that follow it."""
    chat = make_chat(workers=workers, welcome="", limits=ChatLimits(max_length=10))
    with RawClient(chat.server.port, "/chat?nick=ann", headers=["Sec-WebSocket-Protocol: wschat.v1"]) as raw:
        assert json.loads(raw.recv_frame().payload)["type"] == "welcome"
        wait_until(lambda: chat.server.connections()[0].link.calls is None, what="the join to finish")
        requests = [{"type": "message", "text": "hi"}, {"type": "users"}, {"type": "message", "text": "x" * 11},
                    {"type": "message", "text": "again"}, "not JSON", {"type": "nick", "nick": "bob"}]
        raw.sock.sendall(b"".join(encode_frame(Opcode.TEXT, (r if isinstance(r, str) else json.dumps(r)).encode(),
                                               mask=os.urandom(4)) for r in requests))
        answers = []
        while len(answers) < 6:
            event = json.loads(raw.recv_frame().payload)
            answers.append(event["code"] if event["type"] == "error" else event.get("text", event["type"]))
    assert answers == ["hi", "users", "too_long", "again", "bad_request", "nick"]
