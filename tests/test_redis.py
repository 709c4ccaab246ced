"""The Redis engine against a real redis-server (issue 10): several servers, one chat.

Each test starts its own redis-server on a free 127.0.0.1 port (the
``redis_server`` fixture: skipped where Debian's redis-server or redis-py is
missing, a failure in CI).  Servers of the same test are separate processes
as far as the chat can tell: each has its own engine, process id, connections
and subscriptions, and all they share is Redis.
"""

import contextlib
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading

import pytest
from websockets.exceptions import ConnectionClosedError
from websockets.sync.client import connect

from wschat.chat import Chat, ChatLimits

from .helpers import start_server, wait_until
from .test_chat import check_gap_free_reconnect, collect, recv_json
from .test_delivery import AWKWARD


@pytest.fixture
def chats(request):
    """Chat servers on one Redis: the ``redis_server`` fixture's, unless ``url`` names another."""
    from wschat.redis_engine import RedisEngine

    made = []

    def make(presence_timeout=10.0, timeout=2.0, url=None, metrics_path=None, **kwargs):
        server = start_server(workers=2, metrics_path=metrics_path)
        url = url or request.getfixturevalue("redis_server").url
        engine = RedisEngine(url, presence_timeout=presence_timeout, timeout=timeout)
        kwargs.setdefault("welcome", "")
        chat = Chat(server, engine=engine, limits=ChatLimits.off(), **kwargs)
        chat.closed = threading.Semaphore(0)  # released after each on_close: tests wait on it
        chat.resource.on_close = lambda *args: (chat.on_close(*args), chat.closed.release())
        chat.url = f"ws://127.0.0.1:{server.port}/chat"
        made.append(chat)
        return chat

    yield make
    for chat in made:
        chat.server.stop()
        chat.close()


def join(chat, nick, query=""):
    return connect(f"{chat.url}?nick={nick}{query}", subprotocols=["wschat.v1"], max_queue=None)


@contextlib.contextmanager
def alice_and_bob(a, b):
    """alice on chat ``a`` and bob on chat ``b``, both welcomed."""
    with join(a, "alice") as alice, join(b, "bob") as bob:
        recv_json(alice, "welcome")
        recv_json(bob, "welcome")
        yield alice, bob


def say(ws, text):
    ws.send(json.dumps({"type": "message", "text": text}))


def test_two_servers_are_one_chat(chats):
    a, b = chats(), chats()
    with join(a, "alice") as alice:
        assert recv_json(alice, "welcome")["users"] == ["alice"]
        with join(b, "bob") as bob:
            assert recv_json(bob, "welcome")["users"] == ["alice", "bob"]
            assert recv_json(alice, "join")["nick"] == "bob"
            say(alice, "hi bob")
            for ws in (alice, bob):
                message = recv_json(ws, "message")
                assert (message["nick"], message["text"], message["seq"]) == ("alice", "hi bob", 1)

            with join(b, "ALICE") as other:  # taken on the other server: refused here too
                welcome = recv_json(other, "welcome")
                assert welcome["nick"].startswith("guest-") and welcome["users"] == sorted(["alice", "bob", welcome["nick"]])
                assert "taken" in recv_json(other, "error")["text"]
                other.send(json.dumps({"type": "nick", "nick": "Bob"}))
                assert recv_json(other, "error")["code"] == "nick_refused"
                other.send(json.dumps({"type": "nick", "nick": "carol"}))
                assert recv_json(alice, "nick") == {**recv_json(bob, "nick"), "old": welcome["nick"], "nick": "carol"}
                alice.send(json.dumps({"type": "users"}))
                assert recv_json(alice, "users")["users"] == ["alice", "bob", "carol"]
                with connect(b.url) as plain:  # the seed's dialect, on the other server
                    plain_nick = recv_json(alice, "join")["nick"]
                    say(other, "to plain too")
                    assert plain.recv(timeout=5) == "to plain too"
                assert recv_json(alice, "leave")["nick"] == plain_nick
            assert recv_json(alice, "leave")["nick"] == "carol"
        assert recv_json(alice, "leave")["nick"] == "bob"
        assert a.users() == b.users() == ["alice"]


def test_concurrent_senders_on_both_servers_make_one_order(chats):
    a, b = chats(), chats()
    per_sender, senders = 100, [(a, "a1"), (a, "a2"), (b, "b1"), (b, "b2")]
    with join(a, "watch_a") as watch_a, join(b, "watch_b") as watch_b, contextlib.ExitStack() as stack:
        recv_json(watch_a, "welcome")
        recv_json(watch_b, "welcome")
        clients = [stack.enter_context(join(chat, nick)) for chat, nick in senders]
        for ws in clients:
            recv_json(ws, "welcome")

        def send_all(ws, nick):
            for i in range(per_sender):
                say(ws, f"{nick}:{i}")

        threads = [threading.Thread(target=send_all, args=(ws, nick)) for ws, (_, nick) in zip(clients, senders)]
        for thread in threads:
            thread.start()
        total = per_sender * len(senders)
        seen = {}
        for name, ws in (("a", watch_a), ("b", watch_b)):
            seen[name] = [(m["seq"], m["text"]) for m in (recv_json(ws, "message") for _ in range(total))]
        for thread in threads:
            thread.join()
    assert seen["a"] == seen["b"]  # one order for everyone
    assert [seq for seq, _ in seen["a"]] == list(range(1, total + 1))  # once each, numbered by Redis
    texts = [text for _, text in seen["a"]]
    assert sorted(texts) == sorted(f"{nick}:{i}" for _, nick in senders for i in range(per_sender))
    for _, nick in senders:  # and each sender's own order kept
        mine = [text for text in texts if text.startswith(nick + ":")]
        assert mine == [f"{nick}:{i}" for i in range(per_sender)]


def test_gap_free_reconnect_with_the_redis_engine(chats):
    check_gap_free_reconnect(chats(), chats())


def test_history_outlives_every_process(chats):
    first = chats()
    with join(first, "ann") as ann:
        epoch = recv_json(ann, "welcome")["epoch"]
        for i in range(1, 4):
            say(ann, f"before restart {i}")
        collect(ann, 3)
    first.server.stop()
    first.close()

    second = chats()
    with join(second, "ann", f"&since=1&epoch={epoch}") as ann:
        welcome = recv_json(ann, "welcome")
        assert welcome["epoch"] == epoch and welcome["missed"] is False and welcome["users"] == ["ann"]
        assert [(m["seq"], m["text"]) for m in welcome["history"]] == [(2, "before restart 2"), (3, "before restart 3")]
        say(ann, "after restart")
        assert recv_json(ann, "message")["seq"] == 4


def test_the_members_of_a_killed_process_leave(chats, redis_server):
    process = subprocess.Popen(
        [sys.executable, "-m", "wschat", "--port", "0", "--redis", redis_server.url, "--presence-timeout", "1",
         "--log-level", "warning"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        port = int(re.search(r":(\d+)/chat", process.stdout.readline()).group(1))
        b = chats(presence_timeout=1)
        with connect(f"ws://127.0.0.1:{port}/chat?nick=carol", subprotocols=["wschat.v1"]) as carol:
            recv_json(carol, "welcome")
            with join(b, "dave") as dave:
                assert recv_json(dave, "welcome")["users"] == ["carol", "dave"]
                process.kill()  # no clean shutdown: carol's claim stays in Redis
                process.wait()
                leave = recv_json(dave, "leave")  # within presence_timeout and a third of it
                assert leave["nick"] == "carol" and leave["room"] == "main"
                assert b.users() == ["dave"]
                with join(b, "carol") as again:  # the nickname is free again
                    assert recv_json(again, "welcome")["nick"] == "carol"
    finally:
        process.kill()
        process.communicate()


def test_redis_killed_and_restarted_mid_chat(chats, redis_server, caplog):
    a, b = chats(welcome="hello"), chats()
    with join(a, "alice") as alice, join(b, "bob") as bob, connect(a.url) as plain, join(b, "carol") as carol:
        assert plain.recv(timeout=5) == "hello"
        recv_json(alice, "welcome")
        recv_json(bob, "welcome")
        recv_json(carol, "welcome")
        present = a.users()  # alice, bob and the plain client's guest name
        say(alice, "before")
        assert recv_json(bob, "message")["text"] == "before"
        assert plain.recv(timeout=5) == "before"

        redis_server.kill()
        for i in range(5):  # each sender is told, in its dialect, which one; nothing is silently lost
            alice.send(json.dumps({"type": "message", "text": f"lost {i}", "id": f"lost-{i}"}))
            error = recv_json(alice, "error")
            assert (error["code"], error["id"]) == ("not_sent", f"lost-{i}")
        plain.send("plain lost")
        assert "message not sent" in plain.recv(timeout=5)
        alice.send(json.dumps({"type": "users"}))
        assert recv_json(alice, "error")["code"] == "unavailable"
        with pytest.raises(ConnectionClosedError) as refused, join(a, "newcomer") as newcomer:
            newcomer.recv(timeout=5)
        assert refused.value.rcvd.code == 1013
        carol.close()  # leaves while Redis is down: announced when it is back
        assert b.closed.acquire(timeout=5)
        outages = [r for r in caplog.records if r.getMessage().startswith("Redis at") and "unreachable" in r.getMessage()]
        assert 1 <= len(outages) <= 2  # once per server, not once per message

        redis_server.start()  # the same port; its append-only file kept everything
        wait_until(lambda: a.engine.reachable and b.engine.reachable, what="reconnecting")
        assert "carol" not in follow_users(alice, set(present), lambda users: "carol" not in users)
        present.remove("carol")
        say(bob, "after")
        for ws in (alice, bob):
            message = recv_json(ws, "message")
            assert (message["text"], message["seq"]) == ("after", 2)  # the sequence goes on, no gap
        assert plain.recv(timeout=5) == "after"
        with join(a, "newcomer") as newcomer:
            welcome = recv_json(newcomer, "welcome")
            assert welcome["users"] == sorted([*present, "newcomer"])  # presence came through
            assert [m["text"] for m in welcome["history"]] == ["before", "after"]
    assert [r for r in caplog.records if "reachable again" in r.getMessage()]


def test_a_redis_out_of_memory_refuses_messages_and_is_retried_with_backoff(chats, caplog):
    """A Redis out of memory (``maxmemory`` with ``noeviction``) answers but
    refuses every write.  A refused heartbeat is said once and serving goes
    on: senders are told their messages were refused.  What serving cannot
    do without writing (filling a gap from the history, after a dropped
    subscription) is tried again backing off, with one warning (before, the
    engine reconnected thousands of times a second, logging each, and
    senders heard nothing).  Once Redis takes writes again the room chats on."""
    import time

    caplog.set_level(logging.INFO, logger="wschat")
    a = chats(presence_timeout=0.6)  # a heartbeat every 0.2 s
    with join(a, "alice") as alice:
        recv_json(alice, "welcome")
        say(alice, "before")
        assert recv_json(alice, "message")["seq"] == 1
        admin = a.engine.redis
        admin.set("ballast", "x" * 1_000_000)
        admin.config_set("maxmemory-policy", "noeviction")
        admin.config_set("maxmemory", admin.info("memory")["used_memory"] // 2)
        try:
            wait_until(lambda: "refused this process's heartbeat" in caplog.text, what="the heartbeat's warning")
            alice.send(json.dumps({"type": "message", "text": "while full", "id": "full"}))
            error = recv_json(alice, "error")
            assert (error["code"], error["id"]) == ("not_sent", "full")
            admin.client_kill_filter(_type="pubsub")  # resubscribing fills from the history: a write
            wait_until(lambda: "refuses what this process needs" in caplog.text, what="the backoff's warning")
            connections = admin.info("stats")["total_connections_received"]
            time.sleep(1.0)  # (no event says that nothing happens: a window to count retries in)
            retried = admin.info("stats")["total_connections_received"] - connections
            assert retried < 40, retried  # backing off: 0.2, 0.4, 0.8 s... (a tight loop made thousands)
            warnings = [r for r in caplog.records if r.levelno >= logging.WARNING and "Redis" in r.getMessage()]
            assert len(warnings) == 2, [r.getMessage() for r in warnings]
        finally:
            admin.config_set("maxmemory", 0)
        wait_until(lambda: "heartbeat again" in caplog.text, what="the heartbeat taken again")
        say(alice, "after")  # (delivered once subscribed again, or filled from the history then)
        assert recv_json(alice, "message")["text"] == "after"


def test_members_swept_while_redis_was_full_are_claimed_again(chats, caplog):
    """Out of memory, no process can say it is alive.  Once Redis takes
    writes again, another process may sweep this one's members before this
    one's next heartbeat: that heartbeat claims them again, and the others
    hear them join, so the user list is whole again."""
    caplog.set_level(logging.INFO, logger="wschat")
    a = chats(presence_timeout=3.0)  # a heartbeat every second
    b = chats(presence_timeout=0.6)  # a heartbeat, and a sweep, every 0.2 s: b most likely sweeps first
    with alice_and_bob(a, b) as (alice, bob):
        admin = a.engine.redis
        alive = a.engine.store.process_key("alive", a.engine.process_id)
        admin.set("ballast", "x" * 1_000_000)
        admin.config_set("maxmemory-policy", "noeviction")
        admin.config_set("maxmemory", admin.info("memory")["used_memory"] // 2)
        try:
            wait_until(lambda: not admin.exists(alive), timeout=15, what="a's heartbeat to lapse")
        finally:
            admin.config_set("maxmemory", 0)
        wait_until(lambda: "heartbeat again" in caplog.text and a.users() == ["alice", "bob"], timeout=15,
                   what="alice claimed again")
        if any(a.engine.process_id in r.getMessage() for r in caplog.records if "stopped answering" in r.getMessage()):
            while (event := recv_json(bob))["type"] != "join" or event["nick"] != "alice":  # b swept her first:
                pass  # bob heard her leave, and then join again
        assert b.users() == ["alice", "bob"]


def follow_users(ws, users, until):
    """The user list as ``ws`` sees it (``users`` events, joins and leaves), until ``until(users)``."""
    while not until(users):
        event = json.loads(ws.recv(timeout=5))
        if event["type"] == "users":
            users = set(event["users"])
        elif event["type"] in ("join", "leave"):
            (users.add if event["type"] == "join" else users.discard)(event["nick"])
    return users


def test_redis_restarted_empty_starts_a_new_epoch(chats, redis_server):
    a, b = chats(), chats()
    with join(a, "alice") as alice, join(b, "bob") as bob:
        epoch = recv_json(alice, "welcome")["epoch"]
        recv_json(bob, "welcome")
        say(alice, "one")
        say(alice, "two")
        assert collect(bob, 2) == [1, 2]
        redis_server.kill()
        for name in os.listdir(redis_server.directory):  # as if Redis kept nothing
            subprocess.run(["rm", "-rf", os.path.join(redis_server.directory, name)], check=True)
        redis_server.start()
        wait_until(lambda: a.engine.reachable and b.engine.reachable, what="reconnecting")
        wait_until(lambda: a.users() == ["alice", "bob"], what="the members claimed again")
        say(bob, "three")
        for ws in (alice, bob):
            notice = recv_json(ws, "epoch")
            assert notice["epoch"] != epoch
            message = recv_json(ws, "message")
            assert (message["text"], message["seq"]) == ("three", 1)


def test_numbering_never_goes_back_after_redis_lost_the_last_messages(chats, redis_server, caplog):
    """A failover (or a restart with appendfsync everysec) may lose the last
    messages; the next ones must not take their numbers, or members who saw
    them would drop the new ones as repeats."""
    a, b = chats(), chats()
    with alice_and_bob(a, b) as (alice, bob):
        for i in range(1, 4):
            say(alice, str(i))
        assert collect(bob, 3) == [1, 2, 3] and collect(alice, 3) == [1, 2, 3]
        wait_until(lambda: b.engine.backlog() == 0 and a.engine.backlog() == 0, what="all kept")
        a.engine.redis.set("wschat:{r:main}:seq", 1, keepttl=True)  # as if 2 and 3 were lost with a master
        redis_server.kill()
        redis_server.start()  # its append-only file has what the seq was set to
        wait_until(lambda: a.engine.reachable and b.engine.reachable, what="both back")
        say(bob, "after")
        for ws in (alice, bob):
            message = recv_json(ws, "message")
            assert (message["text"], message["seq"]) == ("after", 4)
    assert [r for r in caplog.records if "numbering goes on" in r.getMessage()]


def test_any_text_crosses_redis_as_sent_and_a_foreign_publication_is_ignored(chats, caplog):
    """A process reads the texts of the messages others publish without
    decoding their JSON: quotes, backslashes, line breaks and any Unicode
    still reach both dialects exactly; what another program publishes on a
    room's channel is logged and dropped, and the chat goes on."""
    a, b = chats(), chats()
    with join(a, "alice") as alice, join(b, "bob") as bob, connect(b.url) as plain:
        recv_json(alice, "welcome")
        recv_json(bob, "welcome")
        recv_json(alice, "join")  # the plain client's: b is subscribed to the room
        channel = b.engine.store.channel("main")
        a.engine.redis.publish(channel, "not a batch\nM{}")
        a.engine.redis.publish(channel, "e\nM{\"type\":\"message\"}")  # no seq
        for text in AWKWARD:
            say(alice, text)
        assert [plain.recv(timeout=5) for _ in AWKWARD] == AWKWARD
        assert [recv_json(bob, "message")["text"] for _ in AWKWARD] == AWKWARD
    assert caplog.text.count("ignored a publication on its channel that is not wschat's") >= 2


def test_a_history_since_reads_only_the_newest_entries(chats):
    """A join reads the history after what its client saw (a plain client:
    after its handshake), never the whole history: an older entry is not
    even read (here, one no JSON parser could read)."""
    a = chats(history=10)
    for i in range(1, 7):
        a.post(f"m{i}")
    store = a.engine.store
    epoch, seq = store.position("main")
    store.redis.lpush(store.key("history", "main"), "not JSON")  # the oldest entry
    with pytest.raises(ValueError):
        store.history("main")  # the whole history: every entry decoded
    history = store.history("main", 3, epoch)
    assert [record["text"] for record in history.records] == ["m4", "m5", "m6"] and not history.missed
    assert store.history("main", seq, epoch).records == []
    with pytest.raises(ValueError):
        store.history("main", 3, "another epoch")  # another sequence: the whole history, read again
    with connect(a.url) as plain:  # a plain client's join reads only what was said since its handshake
        a.post("m7")
        assert plain.recv(timeout=5) == "m7"


def test_a_batch_longer_than_the_history_keeps_its_newest_messages_in_order(chats):
    from wschat.dialect import message_record
    from wschat.redis_store import RedisStore, message_item

    a = chats()
    a.post("m0")  # (its publisher has loaded the script)
    store = RedisStore(a.engine.redis, "batch-test:", "test", history=5, room_ttl=60, presence_timeout=10)

    def publish_batch(texts):
        items = [message_item(message_record("main", "n", text)) for text in texts]
        return store.redis.execute_command(*store.batch("main", items))

    assert publish_batch([f"b{i}" for i in range(12)]) == 1
    assert [(record["seq"], record["text"]) for record in store.history("main").records] == [
        (8, "b7"), (9, "b8"), (10, "b9"), (11, "b10"), (12, "b11")]
    assert publish_batch(["c0", "c1", "c2"]) == 13
    assert [record["text"] for record in store.history("main").records] == ["b10", "b11", "c0", "c1", "c2"]


def test_a_room_keeps_no_more_history_than_max_history_bytes(chats):
    """However long its messages, a room's history in Redis weighs no more
    than ``max_history_bytes`` (the newest entries), and its weight key
    says what it weighs, batch after batch, whatever goes."""
    from wschat.dialect import message_record
    from wschat.redis_store import RedisStore, message_item

    a = chats()
    a.post("m0")  # (its publisher has loaded the script)
    store = RedisStore(a.engine.redis, "bytes-test:", "test", history=6, room_ttl=60, presence_timeout=10,
                       max_history_bytes=1000)

    def publish_batch(texts):
        items = [message_item(message_record("main", "n", text)) for text in texts]
        store.redis.execute_command(*store.batch("main", items))
        entries = store.redis.lrange(store.key("history", "main"), 0, -1)
        assert int(store.redis.get(store.key("weight", "main"))) == sum(map(len, entries)) <= 1000
        return [record["text"][:2] for record in store.history("main").records]

    assert publish_batch([f"s{i}" for i in range(5)]) == ["s0", "s1", "s2", "s3", "s4"]  # short: all fit
    assert publish_batch([f"L{i}" + "x" * 200 for i in range(3)]) == ["s4", "L0", "L1", "L2"]  # by weight
    assert publish_batch([f"t{i}" for i in range(10)]) == ["t4", "t5", "t6", "t7", "t8", "t9"]  # by count
    assert publish_batch([f"W{i}" + "x" * 300 for i in range(7)]) == ["W5", "W6"]  # a whole history's worth
    assert publish_batch([f"X{i}" + "x" * 1000 for i in range(6)]) == []  # each heavier than the bound
    assert publish_batch(["H" + "y" * 2000]) == []  # heavier than the bound: none kept
    assert publish_batch(["u0"]) == ["u0"]
    unbounded = RedisStore(a.engine.redis, "bytes-test:", "old", history=6, room_ttl=60, presence_timeout=10)
    store.redis.delete(store.key("weight", "main"))  # as an older wschat left it: entries, and no weight
    for text in ("O1" + "z" * 400, "O2" + "z" * 400):
        store.redis.execute_command(*unbounded.batch("main", [message_item(message_record("main", "n", text))]))
    assert publish_batch(["v0"]) == ["O2", "v0"]  # weighed once, then cut to the bound
    store.redis.execute_command(*unbounded.batch("main", [message_item(message_record("main", "n", "P" * 400))]))
    assert store.redis.get(store.key("weight", "main")) is None  # a writer with no bound leaves no stale weight
    assert publish_batch(["w0"]) == ["v0", "PP", "w0"]  # and the next bounded one weighs it afresh, and cuts


def test_what_a_batch_publishes_and_keeps_is_what_every_version_reads(chats):
    """The published lines and the history entries, byte for byte as the
    processes of earlier versions wrote and read them: in a rolling restart
    old and new processes share one Redis."""
    from wschat.redis_store import RedisStore, event_item, message_item

    a = chats()
    a.post("m0")  # (its publisher has loaded the script)
    store = RedisStore(a.engine.redis, "format-test:", "test", history=3, room_ttl=60, presence_timeout=10)
    store._new_epoch = lambda: "EPOCH"
    listener = store.redis.pubsub()
    listener.subscribe(store.channel("main"))
    assert listener.get_message(timeout=5)["type"] == "subscribe"

    def record(text, **extra):
        return {"type": "message", "room": "main", "nick": 'n"é', "text": text, "time": 1700000000000, **extra}

    join = event_item({"type": "join", "room": "main", "nick": "x", "time": 1})
    items = [message_item(record("a}")), join, message_item(record('b\n"', id="i1")), message_item(record("🎉"))]
    published = []
    for batch in (items, [join], items[:1]):
        first = store.redis.execute_command(*store.batch("main", batch))
        published.append((first, listener.get_message(timeout=5)["data"]))
    listener.close()
    head = '{"type":"message","room":"main","nick":"n\\"é","text":'
    a_line = head + '"a}","time":1700000000000,"seq":%d}'
    b_line = head + '"b\\n\\"","time":1700000000000,"id":"i1","seq":2}'
    party_line = head + '"🎉","time":1700000000000,"seq":3}'
    join_line = 'E{"type":"join","room":"main","nick":"x","time":1}'
    assert published == [
        (1, "EPOCH\nM" + a_line % 1 + "\n" + join_line + "\nM" + b_line + "\nM" + party_line),
        (0, "\n" + join_line),
        (4, "EPOCH\nM" + a_line % 4)]
    assert store.redis.lrange(store.key("history", "main"), 0, -1) == [b_line, party_line, a_line % 4]


def test_a_room_subscribed_again_gets_what_was_published_while_it_was_not(redis_server):
    """The last member here leaves: the room is unsubscribed, but a batch
    Redis sent before the unsubscription took effect is delivered here
    after it (its number is the last this process saw).  Messages published
    next reach no one here; when a member comes back, the subscription
    first delivers them from the history, not only when the room's next
    message shows the gap (before, a joiner's history stopped at that batch)."""
    from wschat.redis_engine import RedisEngine

    delivered = []
    engine = RedisEngine(redis_server.url)
    engine.start(lambda room, batch: delivered.extend(seq for run in batch if hasattr(run, "kept")
                                                      for seq, _ in run.kept()))
    try:
        engine.subscribe("r")
        for text in ("1", "2"):
            engine.publish_message("r", {"type": "message", "room": "r", "nick": "n", "text": text, "time": 1})
        wait_until(lambda: delivered == [1, 2], what="the first two messages")
        epoch, _ = engine.position("r")
        engine.unsubscribe("r")
        channel = engine.store.channel("r")
        wait_until(lambda: "r" not in engine._confirmed and engine.redis.pubsub_numsub(channel)[0][1] == 0,
                   what="the unsubscription")
        engine._last["r"] = (epoch, 2)  # the batch read after the unsubscription was sent (see the docstring)
        for text in ("3", "4", "5"):
            engine.publish_message("r", {"type": "message", "room": "r", "nick": "n", "text": text, "time": 1})
        assert delivered == [1, 2]
        engine.subscribe("r")  # returns once subscribed: what was missed is delivered by then
        assert delivered == [1, 2, 3, 4, 5]
    finally:
        engine.stop()


def test_an_engine_built_with_its_defaults_keeps_a_room_within_the_chats_bound(redis_server):
    """An embedder's ``RedisEngine(url)`` bounds what a room keeps in Redis
    in bytes (the chat's default), not only in messages."""
    from wschat.engine import DEFAULT_MAX_HISTORY_BYTES
    from wschat.redis_engine import RedisEngine

    engine = RedisEngine(redis_server.url)
    engine.start(lambda room, batch: None)
    try:
        for _ in range(50):
            engine.publish_message("r", {"type": "message", "room": "r", "nick": "n", "text": "x" * 6000, "time": 1})
        entries = engine.redis.lrange(engine.store.key("history", "r"), 0, -1)
        assert len(entries) == 5 and sum(map(len, entries)) <= DEFAULT_MAX_HISTORY_BYTES  # (6 would not fit)
    finally:
        engine.stop()


def test_a_subscriber_that_missed_messages_fills_the_gap(chats):
    """Messages published while a process was not subscribed (its subscription
    connection dropped) are delivered from the history, in order, once."""
    a, b = chats(), chats()
    with alice_and_bob(a, b) as (alice, bob):
        say(alice, "1")
        assert collect(bob, 1) == [1]
        b.engine.redis.execute_command("CLIENT", "KILL", "TYPE", "pubsub")  # every subscriber drops
        for i in range(2, 6):
            say(alice, str(i))
        assert collect(bob, 5) == [2, 3, 4, 5]
        assert collect(alice, 5) == [1, 2, 3, 4, 5]


def test_the_backlog_counts_what_redis_has_not_confirmed_and_flush_waits_for_it(chats, redis_server):
    a, b = chats(), chats()
    with alice_and_bob(a, b) as (alice, bob):
        wait_until(lambda: a.engine.backlog() == 0, what="the joins to be published")
        a.engine.redis.execute_command("CLIENT", "PAUSE", "1000", "WRITE")  # Redis holds every write a second
        for i in range(5):
            say(alice, str(i))
        wait_until(lambda: a.engine.backlog() >= 5, what="the messages to wait for Redis")  # (and maybe a join)
        a.engine.flush(10)  # what Server.stop does before its 1001 (Resource.on_drain)
        assert a.engine.backlog() == 0
        assert collect(bob, 5) == [1, 2, 3, 4, 5]


def test_metrics_show_the_backlog_in_events_and_in_bytes(chats):
    from .test_operations import metrics

    chat = chats(metrics_path="/metrics")
    with join(chat, "alice") as alice:
        recv_json(alice, "welcome")
        wait_until(lambda: chat.engine.backlog() == 0, what="the join to be published")
        chat.engine.redis.execute_command("CLIENT", "PAUSE", "1000", "WRITE")
        for _ in range(5):
            say(alice, "é" * 1000)
        wait_until(lambda: chat.engine.backlog() >= 5, what="the messages to wait for Redis")
        during = metrics(chat.server.port)
        assert during[("wschat_engine_backlog", ())] >= 5
        assert during[("wschat_engine_backlog_bytes", ())] >= 5 * 2000  # UTF-8: two bytes each
        chat.engine.flush(10)
        after = metrics(chat.server.port)
        assert after[("wschat_engine_backlog", ())] == after[("wschat_engine_backlog_bytes", ())] == 0


def test_the_loop_sends_what_its_handlers_published_before_it_sleeps(chats, monkeypatch):
    """Chat messages are handled on the loop; it sends them to Redis itself,
    all those of its passes in one batch, without waking the engine's thread
    (which sends what other threads publish, such as joins)."""
    from wschat.redis_publisher import Publisher

    senders = []
    send = Publisher.send

    def recorded(publisher, wait=True):
        senders.append((threading.current_thread().name, wait, publisher.queued))
        return send(publisher, wait)

    monkeypatch.setattr(Publisher, "send", recorded)
    a, b = chats(), chats()
    with alice_and_bob(a, b) as (alice, bob):
        for i in range(1, 31):
            say(alice, str(i))
        assert collect(bob, 30) == list(range(1, 31))
    assert any(thread == "wschat-loop" and queued for thread, _, queued in senders)
    assert all(not wait for thread, wait, _ in senders if thread == "wschat-loop")  # the loop never waits


def test_a_busy_loop_holds_at_most_a_mebibyte_of_its_publications(redis_server, monkeypatch):
    """A loop that never sleeps sends what it published once 500 events or
    ``LOOP_BATCH_BYTES`` wait, not only when it is about to sleep."""
    from wschat.redis_engine import LOOP_BATCH_BYTES, RedisEngine
    from wschat.redis_publisher import Publisher

    sends = []
    send = Publisher.send

    def recorded(publisher, wait=True):
        if threading.current_thread() is threading.main_thread():
            sends.append((wait, publisher.queued_bytes))
        return send(publisher, wait)

    monkeypatch.setattr(Publisher, "send", recorded)
    engine = RedisEngine(redis_server.url, max_history_bytes=0)  # (a mebibyte kept, to be read back)
    engine.start(lambda room, deliveries: None)
    failures = []
    try:
        engine.on_loop(False)  # this thread is the loop's now: what it publishes waits for it
        for size in (1000, 1000, LOOP_BATCH_BYTES):
            engine.publish_message("r", {"type": "message", "text": "x" * size}, failures.append)
            engine.on_loop(False)
        assert [wait for wait, _ in sends] == [False]  # sent once, on the loop, when past the mark
        assert sends[0][1] > LOOP_BATCH_BYTES
        engine.flush(5)
        assert [len(record["text"]) for record in engine.history("r").records] == [1000, 1000, LOOP_BATCH_BYTES]
        assert not failures
    finally:
        engine.stop()


def test_a_publisher_that_cannot_reach_redis_tells_every_sender_and_holds_nothing(redis_server, caplog):
    """Events meant for a Redis that is gone each fail (a waiting sender
    wakes with the error; each callback is called, and one that raises is
    logged while the others are still told), and none of them still counts
    against the backlog: else every later message would be refused as
    Redis "not keeping up", even once it is back."""
    import selectors

    import redis

    from wschat.dialect import message_record
    from wschat.engine import EngineUnavailable
    from wschat.redis_nodes import Nodes
    from wschat.redis_publisher import Publisher, Waiter
    from wschat.redis_store import RedisStore, message_item

    caplog.set_level(logging.INFO, logger="wschat")
    store = RedisStore(redis.Redis.from_url(redis_server.url), "wschat", "p1", history=5, room_ttl=60,
                       presence_timeout=10)
    selector = selectors.DefaultSelector()
    publisher = Publisher(Nodes(redis_server.url, 2.0), store, lambda: None, 2.0, selector, 100, 1 << 20)

    def put(room, text, failed=None, waiter=None):
        item = message_item(message_record(room, "ann", text))
        publisher.put((room, item, failed, waiter, len(item)))

    answered = Waiter()
    put("a", "first", waiter=answered)
    publisher.send()
    while not answered.is_set():  # (the engine's thread does this: here, this test's)
        for key, _ in selector.select(5):
            key.data()
    assert answered.error is None and store.history("a").records[0]["text"] == "first"
    redis_server.kill()
    for key, _ in selector.select(5):  # the end of the connection
        key.data()
    assert "a publishing connection dropped" in caplog.text

    def raising(error):
        raise RuntimeError("a broken callback")

    told, waiting = [], Waiter()
    put("a", "second", told.append)
    put("a", "third", raising)
    put("b", "fourth", waiter=waiting)
    put("b", "fifth", told.append)
    assert publisher.unsettled == 4 and publisher.unsettled_bytes > 0
    with pytest.raises(OSError):
        publisher.send()  # (the engine's thread then reconnects, with backoff)
    assert [type(error) for error in told] == [EngineUnavailable, EngineUnavailable]
    assert isinstance(waiting.error, EngineUnavailable) and "unreachable" in str(waiting.error)
    assert "a publishing failure's callback failed" in caplog.text
    assert (publisher.unsettled, publisher.unsettled_bytes, publisher.queued) == (0, 0, 0)


def test_a_published_batch_is_delivered_once_whatever_a_gap_fill_delivered_before_it(redis_server):
    """The subscription may bring a batch that a gap fill (read from the
    history) delivered already, in whole or in part, or one that comes after
    messages this process missed: each message is delivered once, in order,
    the missed ones read from the history first; a batch of a new epoch is
    taken as it is."""
    import redis

    from wschat.dialect import message_record
    from wschat.engine import record_of
    from wschat.redis_engine import RedisEngine
    from wschat.redis_store import message_item

    engine = RedisEngine(redis_server.url, presence_timeout=60)
    engine.start(lambda room, deliveries: None)
    listener = redis.Redis.from_url(redis_server.url).pubsub(ignore_subscribe_messages=True)
    listener.subscribe(engine.store.channel("r"))
    try:
        records = [message_record("r", "ann", f"m{i}") for i in range(1, 7)]
        for record in records:
            engine.publish_message("r", record)  # (waits for Redis: six batches of one)
        epoch, last = engine.position("r")
        assert last == 6

        def batch(first, last, epoch=epoch):  # what PUBLISH_BATCH publishes for these messages
            return "".join([epoch, *(f'\nM{message_item(records[seq - 1])},"seq":{seq}}}'
                                     for seq in range(first, last + 1))]).encode()

        published = None
        while published is None:
            published = listener.get_message(timeout=5)
        assert published["data"] == batch(1, 1)  # (this test's batches are the script's)

        def received(data, seen):
            engine._last["r"] = seen
            deliveries = []
            engine._received("r", data, deliveries)
            return ([(type(run).__name__, [(seq, record_of(kept)["text"]) for seq, kept in run.kept()])
                     for run in deliveries], engine._last["r"])

        assert received(batch(5, 6), (epoch, 6)) == ([], (epoch, 6))  # a gap fill had both
        assert received(batch(5, 6), (epoch, 5)) == ([("Lines", [(6, "m6")])], (epoch, 6))  # and one of them
        assert received(batch(5, 6), (epoch, 2)) == (  # 3 and 4 were missed: read from the history first
            [("Records", [(3, "m3"), (4, "m4")]), ("Lines", [(5, "m5"), (6, "m6")])], (epoch, 6))
        assert received(batch(3, 4), (epoch, 2)) == ([("Lines", [(3, "m3"), (4, "m4")])], (epoch, 4))
        assert received(batch(5, 6, "another"), (epoch, 6)) == (
            [("Lines", [(5, "m5"), (6, "m6")])], ("another", 6))
    finally:
        listener.close()
        engine.stop()


@pytest.mark.parametrize("redis", ["redis_server", "tls_redis_server"])
def test_a_redis_that_stops_reading_never_stalls_the_loop(chats, redis, request, monkeypatch):
    """What the kernel does not take at once for a Redis that stopped reading
    is left to the engine's thread: the loop goes on serving meanwhile, and
    every message arrives once Redis reads again.  Over TLS too, where the
    engine's thread must write again what the loop's write began."""
    redis_server = request.getfixturevalue(redis)
    from wschat.resp import RespConnection

    left, wrote = [], []  # per call: whether some was left in unsent, and how many bytes went
    send_nowait = RespConnection.send_nowait

    def recorded(conn, data):
        before = len(conn.unsent)
        done = send_nowait(conn, data)
        left.append(not done)
        wrote.append(before + len(data) - len(conn.unsent))
        return done

    monkeypatch.setattr(RespConnection, "send_nowait", recorded)
    a, b = (chats(presence_timeout=60, timeout=20, url=redis_server.url) for _ in range(2))  # not an outage yet
    with alice_and_bob(a, b) as (alice, bob):
        wait_until(lambda: a.engine.backlog() == 0, what="the joins to be published")
        os.kill(redis_server.process.pid, signal.SIGSTOP)  # (briefly: past the engine's timeout it is an outage)
        try:
            for _ in range(250):  # 15 MB: more than the kernel holds for a reader that stopped, within max_backlog_bytes
                say(alice, "x" * 60_000)
            wait_until(lambda: any(left), what="the kernel to push back")
            assert any(wrote)  # the loop wrote its publications itself, what the kernel took
            with socket.create_connection(("127.0.0.1", a.server.port), timeout=5) as probe:
                probe.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                assert probe.recv(100).startswith(b"HTTP/1.1 200")  # the loop answers
        finally:
            os.kill(redis_server.process.pid, signal.SIGCONT)
        assert collect(bob, 250) == list(range(1, 251))


def test_one_read_of_the_subscriptions_takes_all_the_kernel_holds(redis_server, monkeypatch):
    """Pushes that came while the last ones were handled are read together
    (one batch for the room, not a read each), without waiting for more,
    and a connection Redis closed says so."""
    from wschat import resp

    monkeypatch.setattr(resp, "READ_SIZE", 1024)  # each push is 3 reads
    subscriber, publisher = (resp.RespConnection(("127.0.0.1", redis_server.port), 5, raw=True) for _ in range(2))
    try:
        subscriber.call("SUBSCRIBE", "room")
        texts = [bytes([ord("a") + n]) * 3000 for n in range(3)]
        for text in texts:
            assert publisher.call("PUBLISH", "room", text) == 1
        # Redis writes a pass's replies and pushes together, a publisher's reply
        # maybe first: this PING is answered a pass later, when all three wait here.
        assert publisher.call("PING") == b"PONG"
        assert subscriber.pending() == [[b"message", b"room", text] for text in texts]
        assert subscriber.pending() == []  # nothing more: it does not wait
        redis_server.kill()
        with pytest.raises(OSError):  # (ConnectionError: b"" read, or reset)
            subscriber.pending()
    finally:
        subscriber.close()
        publisher.close()


def test_a_server_that_stops_publishes_what_its_loop_took_in(chats, caplog):
    """Stopping drains on the loop thread (Resource.on_drain: the engine's
    flush, which wakes the engine's thread for what the loop has not sent):
    every message is confirmed before the clients are closed."""
    a, b = chats(), chats()
    with alice_and_bob(a, b) as (alice, bob):
        wait_until(lambda: a.engine.backlog() == 0, what="the joins to be published")
        a.engine.redis.execute_command("CLIENT", "PAUSE", "300", "WRITE")
        for i in range(5):
            say(alice, str(i))
        wait_until(lambda: a.engine.backlog() >= 5, what="the messages to wait for Redis")
        a.server.stop(timeout=1)
        assert collect(bob, 5) == [1, 2, 3, 4, 5]
    assert "not confirmed" not in caplog.text


def test_over_tls(chats, tls_redis_server, caplog):
    """``rediss://``: the engine's own connections (pub/sub and publishing)
    read only what is there, never waiting on a TLS record with no data in
    it, such as the session tickets TLS 1.3 sends after the handshake."""
    caplog.set_level(logging.INFO, logger="wschat")
    a, b = chats(url=tls_redis_server.url), chats(url=tls_redis_server.url)
    with alice_and_bob(a, b) as (alice, bob):
        for i in range(1, 31):
            say(alice, str(i))
        assert collect(bob, 30) == collect(alice, 30) == list(range(1, 31))
        say(bob, "back")
        assert recv_json(alice, "message")["text"] == "back"
    assert "dropped" not in caplog.text and "unreachable" not in caplog.text


def test_a_redis_with_a_password_and_another_database(tmp_path):
    """What the URL says (docs/deploying.rst: ``redis://:PASSWORD@HOST:6379/0``)
    holds for every connection of the engine, its own pipelined ones included."""
    import redis

    from wschat.engine import EngineUnavailable
    from wschat.redis_engine import RedisEngine

    from .helpers import RedisServer

    if not os.path.exists(RedisServer.BINARY) and not os.environ.get("WSCHAT_REQUIRE_SERVICES"):
        pytest.skip(f"redis-server is not installed at {RedisServer.BINARY}")
    server = RedisServer(tmp_path, persistent=False, password="s3cr/t").start()
    chats = []
    try:
        url = f"redis://:s3cr%2Ft@127.0.0.1:{server.port}/3"
        for _ in range(2):
            chat = Chat(start_server(workers=2), engine=RedisEngine(url), limits=ChatLimits.off(), welcome="")
            chat.url = f"ws://127.0.0.1:{chat.server.port}/chat"
            chats.append(chat)
        with join(chats[0], "alice") as alice, join(chats[1], "bob") as bob:
            recv_json(alice, "welcome")
            recv_json(bob, "welcome")
            say(alice, "over a password")
            assert recv_json(bob, "message")["text"] == "over a password"
        client = redis.Redis(port=server.port, password="s3cr/t", db=3, decode_responses=True)
        assert json.loads(client.lrange("wschat:{r:main}:history", 0, -1)[0])["text"] == "over a password"
        assert not redis.Redis(port=server.port, password="s3cr/t", db=0).keys("wschat:{r:*")
        with pytest.raises(EngineUnavailable, match="refused: WRONGPASS") as refused:  # one error at start
            RedisEngine(f"redis://:wrong@127.0.0.1:{server.port}/3").start(lambda room, events: None)
        assert "wrong" not in str(refused.value) and ":***@" in str(refused.value)  # no password in a message
    finally:
        for chat in chats:
            chat.server.stop()
            chat.close()
        server.kill()


@pytest.mark.parametrize("bound, filler, waiting", [
    ("max_unsettled", "", (4, 5)),  # five events: alice's join may be one of them
    ("max_unsettled_bytes", "é" * 500, (3,)),  # 3500 bytes: three messages of 1000 in UTF-8 (and the join)
])
def test_what_waits_for_a_stalled_redis_is_bounded_and_the_senders_are_told(chats, bound, filler, waiting):
    a = chats()
    setattr(a.engine.publisher, bound, 5 if bound == "max_unsettled" else 3500)
    texts = [str(i) + filler for i in range(8)]
    with join(a, "alice") as alice:
        recv_json(alice, "welcome")
        wait_until(lambda: a.engine.backlog() == 0, what="the join to be published")
        a.engine.redis.execute_command("CLIENT", "PAUSE", "1500", "WRITE")
        for i, text in enumerate(texts):
            alice.send(json.dumps({"type": "message", "text": text, "id": str(i)}))
        delivered, refused = [], []
        while len(delivered) + len(refused) < 8:  # each message's outcome: refused at once, or delivered later
            event = json.loads(alice.recv(timeout=10))
            if event["type"] == "message":
                delivered.append(event["text"])
            elif event["type"] == "error":
                assert event["code"] == "not_sent"
                refused.append(texts[int(event["id"])])
        # The first ones wait for Redis; the rest are refused at once, and told which.
        assert len(delivered) in waiting and delivered + refused == texts
        wait_until(lambda: a.engine.backlog() == 0, what="Redis to answer")
        alice.send(json.dumps({"type": "message", "text": texts[0]}))  # what was counted is counted no more
        assert recv_json(alice, "message")["text"] == texts[0]


def test_an_event_larger_than_max_backlog_bytes_goes_when_nothing_waits(redis_server):
    """The byte bound refuses what would pile up, never a message for its size alone."""
    from wschat.redis_engine import RedisEngine

    engine = RedisEngine(redis_server.url, max_backlog_bytes=100)
    engine.start(lambda room, deliveries: None)
    try:
        engine.publish_message("r", {"type": "message", "text": "x" * 1000})  # (waits for Redis: raises if refused)
        assert [record["text"] for record in engine.history("r").records] == ["x" * 1000]
    finally:
        engine.stop()


# -- the command line ------------------------------------------------------------------


def children_of(pid):
    with open(f"/proc/{pid}/task/{pid}/children") as listing:
        return [int(child) for child in listing.read().split()]


def clients_of(pid, port):
    """How many TCP connections process ``pid`` has accepted on ``port``."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    with open(f"/proc/{pid}/net/tcp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            local_port, state, inode = int(fields[1].split(":")[1], 16), fields[3], fields[9]
            count += local_port == port and state == "01" and inode in inodes  # 01: established
    return count


def test_processes_serve_one_port_as_one_chat(redis_server):
    parent = subprocess.Popen(
        [sys.executable, "-m", "wschat", "--port", "0", "--redis", redis_server.url, "--processes", "2",
         "--presence-timeout", "1", "--rate-limit", "0", "--log-level", "info"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = parent.stdout.readline()
        assert "(2 processes)" in line, line + parent.stderr.read()
        port = int(re.search(r":(\d+)/chat", line).group(1))
        url = f"ws://127.0.0.1:{port}/chat"
        first = children_of(parent.pid)
        assert len(first) == 2
        stack = contextlib.ExitStack()
        clients = []
        while len(clients) < 8 or not all(clients_of(child, port) for child in first):  # on both children
            assert len(clients) < 64, "the kernel put every client on one process"
            clients.append(stack.enter_context(
                connect(f"{url}?nick=user{len(clients)}", subprotocols=["wschat.v1"], max_queue=None)))
            recv_json(clients[-1], "welcome")
        say(clients[0], "to everyone")
        for ws in clients:  # wherever the kernel put them
            assert recv_json(ws, "message")["text"] == "to everyone"

        os.kill(first[0], signal.SIGKILL)  # a child dies: the parent starts another
        wait_until(lambda: len(children_of(parent.pid)) == 2 and first[0] not in children_of(parent.pid),
                   what="the child restarted")
        survivors = []
        for ws in clients:
            try:
                say(ws, "still here")
                survivors.append(ws)
            except Exception:  # served by the killed child
                pass
        assert survivors

        parent.send_signal(signal.SIGTERM)  # everyone is closed with 1001
        for ws in survivors:
            with pytest.raises(Exception) as closed:
                while True:
                    ws.recv(timeout=10)
            assert getattr(closed.value, "rcvd", None) is not None and closed.value.rcvd.code == 1001
        assert parent.wait(20) == 0
        errors = parent.stderr.read()
        assert "exited with code -9" in errors and "restarted" in errors, errors
        stack.close()
    finally:
        parent.kill()
        parent.communicate()


def run_cli(*args, code=None):
    return subprocess.run([sys.executable, *(["-c", code] if code else ["-m", "wschat"]), *args],
                          capture_output=True, text=True, timeout=30)


def test_processes_without_redis_is_an_error():
    result = run_cli("--processes", "2")
    assert result.returncode == 2 and "--processes needs --redis" in result.stderr


def test_an_unreachable_redis_is_one_line_and_exit_1():
    from .helpers import free_port

    result = run_cli("--port", "0", "--redis", f"redis://127.0.0.1:{free_port()}/0")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and "cannot reach Redis at redis://127.0.0.1:" in result.stderr


def test_redis_without_redis_py_is_one_line_and_exit_1():
    code = ("import sys; sys.modules['redis'] = None; from wschat.__main__ import main; "
            "sys.exit(main(sys.argv[1:]))")
    result = run_cli("--port", "0", "--redis", "redis://127.0.0.1:6379/0", code=code)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == "wschat: --redis needs redis-py: pip install 'wschat[redis]'"
