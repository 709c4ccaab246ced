"""The reference chat servers the benchmark compares wschat with.

Both are python-websockets (the ``bench`` extra) doing what the wschat chat
does with its limits off: every text message goes to every client, sender
included.  No pings, 2 MiB messages, like wschat in the bench; permessage-deflate
only with ``deflate`` (then as python-websockets ships it: a compression
context per connection, each message compressed once per recipient).

    python tools/bench_servers.py threading PORT [deflate]
    python tools/bench_servers.py asyncio PORT [deflate]
"""

from __future__ import annotations

import asyncio
import sys
import threading

MAX_SIZE = 2 << 20


def serve_threading(port: int, compression: str | None = None) -> None:
    """websockets.sync.server: a thread per connection, sends under its lock."""
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.server import serve

    clients: set = set()
    lock = threading.Lock()

    def handler(websocket):
        with lock:
            clients.add(websocket)
        try:
            for message in websocket:
                with lock:
                    targets = list(clients)
                for client in targets:
                    try:
                        client.send(message)
                    except ConnectionClosed:
                        pass
        finally:
            with lock:
                clients.discard(websocket)

    with serve(handler, "127.0.0.1", port, ping_interval=None, max_size=MAX_SIZE, compression=compression) as server:
        server.serve_forever()


def serve_asyncio(port: int, compression: str | None = None) -> None:
    """websockets.asyncio.server with its ``broadcast`` helper."""
    from websockets.asyncio.server import broadcast, serve

    async def main():
        clients: set = set()

        async def handler(websocket):
            clients.add(websocket)
            try:
                async for message in websocket:
                    broadcast(clients, message)
            finally:
                clients.discard(websocket)

        async with serve(handler, "127.0.0.1", port, ping_interval=None, max_size=MAX_SIZE,
                         compression=compression) as server:
            await server.serve_forever()

    asyncio.run(main())


if __name__ == "__main__":
    kind, port = sys.argv[1], int(sys.argv[2])
    compression = "deflate" if sys.argv[3:] == ["deflate"] else None
    {"threading": serve_threading, "asyncio": serve_asyncio}[kind](port, compression)
