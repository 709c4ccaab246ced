"""The Redis engine on a real Redis Cluster (issue 19): rooms sharded over the
masters with sharded pub/sub, and a master's failover survived.

The ``redis_cluster`` fixture starts six Debian redis-server nodes on free
127.0.0.1 ports (3 masters, 3 replicas, ``redis-cli --cluster create``); the
two chat servers of each test are separate engines pointed at different nodes.
"""

import contextlib
import json

import pytest
from websockets.sync.client import connect

from wschat.chat import Chat, ChatLimits

from .helpers import start_server, wait_until
from .test_chat import recv_json

ROOMS = [f"room{i}" for i in range(12)]


@pytest.fixture
def cluster_chats(redis_cluster):
    from wschat.redis_engine import RedisEngine

    made = []
    for port in redis_cluster.ports[:2]:  # two processes, as far as the chat can tell, on different nodes
        server = start_server(workers=2)
        chat = Chat(server, engine=RedisEngine(redis_cluster.url(port), presence_timeout=3),
                    limits=ChatLimits.off(), welcome="")
        chat.url = f"ws://127.0.0.1:{server.port}/chat"
        made.append(chat)
    yield made
    for chat in made:
        chat.server.stop()
        chat.close()


def join(chat, room, nick):
    return connect(f"{chat.url}/{room}?nick={nick}", subprotocols=["wschat.v1"], max_queue=None)


def say(ws, text):
    ws.send(json.dumps({"type": "message", "text": text}))


def receive(ws, expected):
    """Messages, as (seq, text), until ``expected`` of them; errors too, as (None, code)."""
    got = []
    while len(got) < expected:
        event = json.loads(ws.recv(timeout=10))
        if event["type"] == "message":
            got.append((event["seq"], event["text"]))
        elif event["type"] == "error":
            got.append((None, event["code"]))
    return got


def test_rooms_are_sharded_over_the_masters_and_survive_a_failover(redis_cluster, cluster_chats):
    a, b = cluster_chats
    assert a.engine.nodes.cluster and b.engine.nodes.cluster
    with contextlib.ExitStack() as stack:
        clients = {room: [stack.enter_context(join(chat, room, f"{side}-{room}")) for side, chat in (("a", a), ("b", b))]
                   for room in ROOMS}
        for pair in clients.values():
            for ws in pair:
                recv_json(ws, "welcome")

        # Every message in every room, delivered once and in order on both servers.
        for round_number in range(3):
            for room, pair in clients.items():
                for side, ws in zip("ab", pair):
                    say(ws, f"{room} {side}{round_number}")
        for room, pair in clients.items():
            seen = [receive(ws, 6) for ws in pair]
            assert seen[0] == seen[1]  # one order, everywhere
            assert [seq for seq, _ in seen[0]] == [1, 2, 3, 4, 5, 6]
            assert sorted(text for _, text in seen[0]) == sorted(f"{room} {s}{r}" for s in "ab" for r in range(3))

        # Keys and shard channels spread over the masters.
        masters = redis_cluster.masters()
        keys = {port: int(redis_cluster.cli(port, "DBSIZE")) for port in masters}
        channels = {port: redis_cluster.cli(port, "PUBSUB", "SHARDCHANNELS").split() for port in masters}
        assert sum(1 for count in keys.values() if count) >= 2, keys
        assert sum(1 for found in channels.values() if found) >= 2, channels
        assert sorted(channel for found in channels.values() for channel in found) == sorted(
            f"wschat:{{r:{room}}}:events" for room in ROOMS)

        # A master dies; its replica takes over; every room chats again on both servers.
        wait_until(redis_cluster.in_sync, what="the replicas to have everything")
        victim = max(masters, key=lambda port: len(channels[port]))
        victim_rooms = {channel.split("{r:")[1].split("}")[0] for channel in channels[victim]}
        redis_cluster.kill(victim)
        wait_until(lambda: victim not in redis_cluster.masters() and redis_cluster.ready(), timeout=30,
                   what="the replica to be promoted")
        wait_until(lambda: a.engine.reachable and b.engine.reachable, timeout=30, what="both engines back")

        # Both servers send in every room; a message refused during the
        # failover was told to its sender, and every other one arrived on both, in order.
        for room, pair in clients.items():
            for side, ws in zip("ab", pair):
                say(ws, f"{room} {side}-after")
        for room, pair in clients.items():
            seen = [receive(ws, 2) for ws in pair]
            assert seen[0] == seen[1], (room, seen)
            assert [seq for seq, _ in seen[0]] == [7, 8], (room, room in victim_rooms, seen)


def test_a_server_that_missed_messages_during_a_failover_fills_the_gap(redis_cluster, cluster_chats):
    """Messages published while one server was away from a room's master come
    from the history when it is back: its wschat.v1 clients miss nothing."""
    a, b = cluster_chats
    room = ROOMS[0]
    with join(a, room, "alice") as alice, join(b, room, "bob") as bob:
        recv_json(alice, "welcome")
        recv_json(bob, "welcome")
        say(alice, "1")
        assert receive(bob, 1) == [(1, "1")]
        # b's subscriptions drop (as when its link to a master breaks): b is away while alice talks.
        for port in redis_cluster.masters():
            redis_cluster.cli(port, "CLIENT", "KILL", "TYPE", "pubsub")
        for i in range(2, 6):
            say(alice, str(i))
        assert receive(alice, 5)[1:] == [(2, "2"), (3, "3"), (4, "4"), (5, "5")]
        assert receive(bob, 4) == [(2, "2"), (3, "3"), (4, "4"), (5, "5")]


def test_any_node_finds_the_masters_and_an_unreachable_one_is_refused(redis_cluster):
    from wschat.engine import EngineUnavailable
    from wschat.redis_engine import RedisEngine

    replica = next(port for port in redis_cluster.ports if port not in redis_cluster.masters())
    engine = RedisEngine(redis_cluster.url(replica))  # a replica's address is enough
    engine.start(lambda room, events: None)
    try:
        assert engine.nodes.cluster and sorted(port for _, port in engine.nodes.masters()) == redis_cluster.masters()
    finally:
        engine.stop()
    with pytest.raises(EngineUnavailable, match="cannot reach Redis at redis://127.0.0.1:1/0"):
        RedisEngine("redis://127.0.0.1:1/0", timeout=0.5).start(lambda room, events: None)
