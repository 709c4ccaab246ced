"""Hostile peers against a live ``python -m wschat``: what they make it hold.

Starts the server on a free 127.0.0.1 port (with any ``--server-args``),
runs each scenario, and prints the server's resident memory growth, in all
and per hostile connection, read from /proc:

* ``stall``: N peers agree on permessage-deflate, each send the first
  fragment of a message that inflates to 900 KB (under 1 KB on the wire),
  and stall.  Then a newcomer must still chat.
* ``ping-flood``: N peers never read and send pings as fast as the server
  takes them; the pongs are all that is queued for them.
* ``history``: N peers, each alone in a room of its own, say M of the
  longest chat messages (2000 characters of 4 bytes each in UTF-8, the
  default ``--max-chat-length``): what the rooms' history keeps.

    python tools/hostile.py
    python tools/hostile.py --server-args "--max-buffered 32MiB"
    python tools/hostile.py --pythonpath /tmp/before     # another checkout, for before and after

Every loop is bounded in count and time; only loopback addresses are used.
"""

from __future__ import annotations

import argparse
import base64
import os
import shlex
import socket
import struct
import subprocess
import sys
import time
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 1 << 20


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def frame(opcode: int, payload: bytes, fin: bool = True, rsv1: bool = False) -> bytes:
    """A masked client frame (the zero mask: the payload goes as it is)."""
    first = (0x80 if fin else 0) | (0x40 if rsv1 else 0) | opcode
    length = len(payload)
    if length < 126:
        header = struct.pack("!BB", first, 0x80 | length)
    elif length < 1 << 16:
        header = struct.pack("!BBH", first, 0x80 | 126, length)
    else:
        header = struct.pack("!BBQ", first, 0x80 | 127, length)
    return header + b"\0\0\0\0" + payload


def connect(port: int, deflate: bool = False, rcvbuf: int | None = None, path: str = "/chat") -> socket.socket:
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    extension = "Sec-WebSocket-Extensions: permessage-deflate\r\n" if deflate else ""
    sock.sendall((f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{extension}\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)
        if not chunk:
            raise RuntimeError("closed during the handshake")
        head += chunk
    if not head.startswith(b"HTTP/1.1 101"):
        raise RuntimeError(head.split(b"\r\n", 1)[0].decode(errors="replace"))
    return sock


def newcomer_chats(port: int) -> bool:
    """A plain client joins, says something, and hears it back."""
    try:
        with connect(port) as sock:
            sock.sendall(frame(0x1, b"still chatting?"))
            deadline, data = time.monotonic() + 10, b""
            while b"still chatting?" not in data and time.monotonic() < deadline:
                chunk = sock.recv(65536)
                if not chunk:
                    return False
                data += chunk
            return b"still chatting?" in data
    except (OSError, RuntimeError):
        return False


def settle(pid: int, seconds: float = 1.0) -> int:
    """RSS once it stops moving (at most ``seconds``)."""
    last, end = rss(pid), time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(0.1)
        now = rss(pid)
        if now == last:
            return now
        last = now
    return last


def stall(port: int, pid: int, count: int) -> dict:
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = compressor.compress(bytes(900_000)) + compressor.flush(zlib.Z_SYNC_FLUSH)[:-4]
    before = settle(pid)
    peers, refused = [], 0
    for _ in range(count):
        try:
            sock = connect(port, deflate=True)
            sock.sendall(frame(0x2, first, fin=False, rsv1=True))
            peers.append(sock)
        except (OSError, RuntimeError):
            refused += 1
    time.sleep(0.5)  # let the server read the last fragments; nothing announces it
    after = settle(pid)
    chats = newcomer_chats(port)
    for sock in peers:
        sock.close()
    return {"sent": len(first) * len(peers), "growth": after - before, "per": (after - before) / max(1, count),
            "newcomer": chats, "refused": refused}


def ping_flood(port: int, pid: int, count: int, seconds: float, megabytes: int) -> dict:
    before = settle(pid)
    pings = frame(0x9, b"p" * 125) * 400  # 52 KB per write
    peers = [connect(port, rcvbuf=4096) for _ in range(count)]
    for sock in peers:
        sock.setblocking(False)
    sent = [0] * count
    closed = 0
    end = time.monotonic() + seconds
    peak = before
    while time.monotonic() < end and any(s < megabytes * MiB for s in sent):
        for index, sock in enumerate(peers):
            if sock is None or sent[index] >= megabytes * MiB:
                continue
            offset = sent[index] % len(pings)  # on from where the kernel stopped: frames stay whole
            try:
                sent[index] += sock.send(pings[offset:])
            except BlockingIOError:
                pass
            except OSError:  # the server closed it
                peers[index] = None
                closed += 1
        peak = max(peak, rss(pid))
    for sock in peers:
        if sock is not None:
            sock.close()
    return {"sent": sum(sent), "growth": peak - before, "per": (peak - before) / count, "closed": closed}


def history(port: int, pid: int, count: int, messages: int) -> dict:
    message = frame(0x1, ("\U0001d11e" * 2000).encode())
    alive = frame(0xA, b"")  # an unsolicited pong: the peers that said their piece stay (not timed out)
    before = settle(pid)
    peers: list[socket.socket] = []
    last_alive = time.monotonic()
    for index in range(count):
        if time.monotonic() - last_alive > 1:
            for sock in peers:
                sock.sendall(alive)
            last_alive = time.monotonic()
        sock = connect(port, path=f"/chat/hostile-{index}")
        peers.append(sock)
        unread = 0  # each hears its own messages back: read them (and the welcome), so that only the history holds them
        for _ in range(messages):
            sock.sendall(message)
            unread += len(message) - 4  # (the server's frame has no mask)
            while unread > 0:
                chunk = sock.recv(1 << 20)
                if not chunk:
                    raise RuntimeError("the server closed a hostile connection")
                unread -= len(chunk)
    after = settle(pid)
    chats = newcomer_chats(port)
    for sock in peers:
        sock.close()
    return {"sent": len(message) * messages * count, "growth": after - before, "per": (after - before) / count,
            "newcomer": chats}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server-args", default="", help="more arguments for python -m wschat")
    parser.add_argument("--pythonpath", help="run the wschat of this checkout instead")
    parser.add_argument("--scenarios", default="stall,ping-flood,history")
    parser.add_argument("--stallers", type=int, default=200)
    parser.add_argument("--flooders", type=int, default=10)
    parser.add_argument("--flood-seconds", type=float, default=20.0)
    parser.add_argument("--flood-megabytes", type=int, default=32, help="pings each flooder sends at most")
    parser.add_argument("--rooms", type=int, default=300, help="history: hostile peers, each in a room of its own")
    parser.add_argument("--room-messages", type=int, default=50, help="history: messages each says")
    args = parser.parse_args(argv)
    port = free_port()
    checkout = args.pythonpath or ROOT
    env = dict(os.environ, PYTHONPATH=checkout)
    command = [sys.executable, "-m", "wschat", "--port", str(port), "--log-level", "error", "--rate-limit", "0",
               *shlex.split(args.server_args)]
    # From the checkout's folder: ``-m`` puts the current folder first on the path, before PYTHONPATH.
    server = subprocess.Popen(command, env=env, cwd=checkout, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    try:
        server.stdout.readline()  # the line saying where it listens
        print(f"server: {' '.join(command[1:])} (pid {server.pid}, RSS {rss(server.pid) / MiB:.1f} MiB)")
        for scenario in args.scenarios.split(","):
            if scenario == "stall":
                result = stall(port, server.pid, args.stallers)
                print(f"stall: {args.stallers} stalled compressed messages, {result['sent'] / 1024:.0f} KiB sent: "
                      f"RSS +{result['growth'] / MiB:.1f} MiB ({result['per'] / 1024:.1f} KiB per connection); "
                      f"a newcomer {'chats' if result['newcomer'] else 'CANNOT chat'}")
            elif scenario == "ping-flood":
                result = ping_flood(port, server.pid, args.flooders, args.flood_seconds, args.flood_megabytes)
                print(f"ping-flood: {args.flooders} non-reading peers sent {result['sent'] / MiB:.0f} MiB of pings: "
                      f"RSS peak +{result['growth'] / MiB:.1f} MiB ({result['per'] / MiB:.2f} MiB per connection); "
                      f"{result['closed']} closed by the server")
            elif scenario == "history":
                result = history(port, server.pid, args.rooms, args.room_messages)
                print(f"history: {args.rooms} rooms of {args.room_messages} long messages, "
                      f"{result['sent'] / MiB:.0f} MiB said: RSS +{result['growth'] / MiB:.1f} MiB "
                      f"({result['per'] / 1024:.0f} KiB per connection); "
                      f"a newcomer {'chats' if result['newcomer'] else 'CANNOT chat'}")
            else:
                parser.error(f"unknown scenario {scenario!r}")
        return 0 if server.poll() is None else 1
    finally:
        server.terminate()
        server.wait(10)


if __name__ == "__main__":
    sys.exit(main())
