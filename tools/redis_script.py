"""What a chat message costs Redis in ``PUBLISH_BATCH``, the script that
numbers a room's messages, keeps them in its history and publishes them, at
each batch size given: redis-server's CPU (user + system, from /proc) per message.

    python tools/redis_script.py [--sizes 500,250,60] [--messages 300000] [--subscribers 2]
    python tools/redis_script.py --pythonpath /tmp/before    # another checkout's script

It starts a redis-server of its own (on a free 127.0.0.1 port, pinned to CPU 0
where there are two) with ``--subscribers`` connections subscribed to the room,
as processes with members there are, and sends the batches pipelined (20 in
flight), so that Redis is the bottleneck.  The room keeps 50 messages, at most
32 KiB of them (``--history 50 --max-history-bytes 32KiB``, the defaults).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import threading
import time

TOOLS = os.path.dirname(os.path.abspath(__file__))
IN_FLIGHT = 20


def measure(redis, store, item: str, size: int, messages: int) -> float:
    """redis-server's CPU seconds per message for ``messages`` in batches of ``size``
    (``redis`` is a ``bench.BenchRedis``)."""
    from bench import cpu_seconds
    from wschat.resp import pack_all

    command = pack_all([store.batch("lobby", [item] * size)])
    batches = max(1, messages // size)
    with socket.create_connection(("127.0.0.1", redis.port)) as sock:
        before = cpu_seconds(redis.process.pid)
        sent = answered = 0
        tail = b""
        while answered < batches:
            while sent < batches and sent - answered < IN_FLIGHT:
                sock.sendall(command)
                sent += 1
            data = tail + sock.recv(65536)
            if not data:
                raise RuntimeError("redis-server closed the connection")
            if data.startswith(b"-") or b"\n-" in data:  # an error reply (the others are ":N")
                raise RuntimeError(data.decode(errors="replace").strip())
            answered += data.count(b"\r\n")  # each reply is one integer (":N\r\n")
            tail = data[data.rfind(b"\n") + 1:]
        return (cpu_seconds(redis.process.pid) - before) / (batches * size)


def subscribe(port: int, channel: str, stop: threading.Event) -> None:
    """A subscriber that reads all it is sent until ``stop``, as a wschat process does."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(f"SUBSCRIBE {channel}\r\n".encode())
        sock.settimeout(0.2)
        while not stop.is_set():
            try:
                if not sock.recv(1 << 20):
                    return
            except socket.timeout:
                pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="500,250,60", help="batch sizes, in messages")
    parser.add_argument("--messages", type=int, default=300_000, help="messages at each size")
    parser.add_argument("--subscribers", type=int, default=2)
    parser.add_argument("--pythonpath", help="measure the script of this checkout instead")
    args = parser.parse_args()
    if args.pythonpath:
        sys.path.insert(0, args.pythonpath)
        import wschat  # first: then bench, which puts this checkout first on the path, imports it from there

        print(f"wschat from {os.path.dirname(wschat.__file__)}")
    sys.path.insert(1, TOOLS)
    import redis
    from bench import BenchRedis

    from wschat.dialect import message_record
    from wschat.redis_store import PUBLISH_BATCH, RedisStore, message_item

    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {1})  # (redis-server has CPU 0)
    server = BenchRedis()
    stop = threading.Event()
    try:
        client = redis.Redis(port=server.port, decode_responses=True)
        client.script_load(PUBLISH_BATCH)
        store = RedisStore(client, "wschat:", "tool", history=50, room_ttl=86400, presence_timeout=10,
                           max_history_bytes=32 << 10)
        channel = store.channel("lobby")
        for _ in range(args.subscribers):
            threading.Thread(target=subscribe, args=(server.port, channel, stop), daemon=True).start()
        deadline = time.monotonic() + 10
        while client.pubsub_numsub(channel)[0][1] < args.subscribers:
            if time.monotonic() > deadline:
                raise RuntimeError("the subscribers did not subscribe")
            time.sleep(0.01)
        item = message_item(message_record("lobby", "someone", "x" * 64))
        measure(server, store, item, 100, 10_000)  # (warming up)
        print(f"{'batch':>6}  redis-server CPU per message")
        for size in map(int, args.sizes.split(",")):
            print(f"{size:6d}  {measure(server, store, item, size, args.messages) * 1e6:.2f} us", flush=True)
    finally:
        stop.set()
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
