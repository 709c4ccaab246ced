"""A conformance echo server: every text and binary message goes back to its sender.

    python tools/echo_server.py --port 9001
    python tools/echo_server.py --port 9001 --max-message-size 16777216 --no-compression

The library's ``Server`` with one resource on every path, no pings and no
welcome: what conformance suites (such as Autobahn's fuzzingclient) talk to.
It is also the shortest way to embed wschat.  Ctrl-C or SIGTERM stops it.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from wschat import Server


def make_server(host: str = "127.0.0.1", port: int = 9001, *, max_message_size: int = 16 << 20,
                compression: bool = True) -> Server:
    server = Server(host, port, ping_interval=0, max_message_size=max_message_size,
                    max_queue=max(16 << 20, 2 * max_message_size), compression=compression)
    server.resource("/", on_message=lambda conn, message: conn.send(message))  # "/" serves every path
    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9001)
    parser.add_argument("--max-message-size", type=int, default=16 << 20, help="bytes (default 16 MiB)")
    parser.add_argument("--no-compression", action="store_true", help="decline permessage-deflate")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    server = make_server(args.host, args.port, max_message_size=args.max_message_size,
                         compression=not args.no_compression)
    try:
        server.bind()
    except OSError as exc:
        print(f"echo_server: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: server.stop())
    print(f"echoing on {server.url}/ (every path)", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
