"""Load benchmark: wschat's chat side by side with python-websockets chat servers.

    python tools/bench.py                                  # all scenarios, 3 rounds
    python tools/bench.py --rounds 5 --scenarios fanout,large-64k
    python tools/bench.py --servers wschat,wschat-pure --quick
    python tools/bench.py --servers wschat,wschat-redis,wschat-redis-2p --scenarios fanout --reference wschat
    python tools/bench.py --servers wschat-redis,wschat-redis-normal --scenarios fanout --reference wschat-redis-normal

Each round starts every server under test afresh for every scenario, in turn
(A B C A B C ...), the server pinned to CPU 0 and this load generator to CPU 1.
The table gives medians over the rounds and each figure as a ratio to the
python-websockets threading server measured in the same run.  The Redis
variants (``--redis``, one process or ``--processes 2``, and
``wschat-redis-tls`` over ``rediss://``) use a redis-server
that the benchmark starts on a free port (Debian's /usr/bin/redis-server, no
persistence), emptied before each server starts; it and every server process
share the server's CPU.

The load generator is built to cost far less per message than a server: raw
non-blocking sockets, the handshake by hand, client frames masked once before
the clock starts and sent in batches, and received bytes checked in bulk
(fixed-size messages make every server frame the same length).  After each run
every stream is verified: every client got every message of every sender
exactly once and in each sender's order, or the run fails loudly.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import resource
import select
import selectors
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from collections import deque
from typing import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from wschat.accelerator import IMPLEMENTATION  # noqa: E402
from wschat.frames import Opcode, apply_mask, encode_frame  # noqa: E402

HANDSHAKE = (
    b"GET /chat HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)
# What Chrome offers: permessage-deflate, letting the server choose the client's window.
HANDSHAKE_DEFLATE = HANDSHAKE[:-2] + b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\r\n"
DEFLATE_TAIL = b"\x00\x00\xff\xff"
TAG_SIZE = 14  # six digits of sender, eight of sequence number, at the start of each payload


class BenchError(Exception):
    """A server lost, duplicated or reordered messages, or stopped answering."""


# -- frames ----------------------------------------------------------------------


def payload(sender: int, seq: int, size: int) -> bytes:
    return f"{sender:06d}{seq:08d}".encode().ljust(size, b"x")


def client_frame(data: bytes, opcode: int = Opcode.TEXT) -> bytes:
    return encode_frame(opcode, data, mask=os.urandom(4))


class FrameMaker:
    """One sender's masked frames, built before the clock starts.

    Frames differ only in their first 16 payload bytes (the tag, padded), so
    each gets a small masked head, and the masked filler after it, which
    starts at a multiple of 4 and so masks the same way for every message,
    is shared: joining the two is a memcpy.
    """

    def __init__(self, sender: int, size: int, messages: int):
        mask = os.urandom(4)
        prefix = encode_frame(Opcode.TEXT, bytes(size), mask=mask)[: len(server_header(size)) + 4]
        self.heads = [prefix + apply_mask(payload(sender, seq, 16), mask) for seq in range(messages)]
        self.filler = apply_mask(payload(sender, 0, size)[16:], mask)

    def frames(self, start: int, stop: int) -> bytes:
        filler = self.filler
        return b"".join(part for seq in range(start, stop) for part in (self.heads[seq], filler))


class CompressedFrameMaker:
    """One sender's frames for a permessage-deflate connection: each message
    compressed on its own (as any client may) and masked before the clock starts."""

    def __init__(self, sender: int, size: int, messages: int, wbits: int):
        self._frames = []
        for seq in range(messages):
            compressor = zlib.compressobj(6, zlib.DEFLATED, -wbits)
            data = compressor.compress(payload(sender, seq, size)) + compressor.flush(zlib.Z_SYNC_FLUSH)
            self._frames.append(encode_frame(Opcode.TEXT, data[:-4], rsv=0b100, mask=os.urandom(4)))

    def frames(self, start: int, stop: int) -> bytes:
        return b"".join(self._frames[start:stop])


def server_header(size: int) -> bytes:
    """The header every server puts on an unmasked text frame of ``size`` bytes."""
    return encode_frame(Opcode.TEXT, bytes(size))[: 2 if size < 126 else 4 if size < 65536 else 10]


CLOSE_FRAME = client_frame(b"\x03\xe8", Opcode.CLOSE)


def tags_of(stream: bytes, size: int, client: int = 0) -> list[bytes]:
    """The header and tag of every frame of a stream of ``size``-byte text
    messages, checked in bulk: whole frames, each with the same header."""
    header = server_header(size)
    frame_len = len(header) + size
    if len(stream) % frame_len:
        raise BenchError(f"client {client}: {len(stream)} bytes is not a whole number of {frame_len}-byte frames")
    count = len(stream) // frame_len
    for offset, byte in enumerate(header):
        if stream[offset::frame_len].count(byte) != count:
            raise BenchError(f"client {client}: a frame that is not a {size}-byte text message")
    head = len(header) + TAG_SIZE
    return [stream[start : start + head] for start in range(0, len(stream), frame_len)]


def verify_tags(client: int, tags: list[bytes], size: int, senders: int, messages: int) -> None:
    """Check that one client got every sender's messages once, in order."""
    header = server_header(size)
    seen: dict[int, list[int]] = {sender: [] for sender in range(senders)}
    for tag in tags:
        if not tag.startswith(header):
            raise BenchError(f"client {client}: a frame that is not a {size}-byte text message")
        sender = int(tag[len(header) : len(header) + 6])
        if sender not in seen:
            raise BenchError(f"client {client}: message from unknown sender {tag!r}")
        seen[sender].append(int(tag[len(header) + 6 :]))
    for sender, seqs in seen.items():
        if seqs != list(range(messages)):
            lost = sorted(set(range(messages)) - set(seqs))
            duplicated = len(seqs) - len(set(seqs))
            problem = (f"lost {lost[:5]}{'...' if len(lost) > 5 else ''}" if lost
                       else f"{duplicated} duplicated" if duplicated else "reordered")
            raise BenchError(f"client {client}, messages of sender {sender}: {problem}")


def verify(streams: list[bytes], size: int, senders: int, messages: int) -> None:
    """Check whole received streams (see ``verify_tags``)."""
    for client, stream in enumerate(streams):
        verify_tags(client, tags_of(stream, size, client), size, senders, messages)


# -- clients -----------------------------------------------------------------------


class Deflate:
    """What a load-generator client agreed on with the server (permessage-deflate)."""

    def __init__(self, response: str):
        params = {p.strip().split("=")[0]: p.strip().partition("=")[2] for p in response.split(";")[1:]}
        self.shared = "server_no_context_takeover" in params  # each message inflates alone: cacheable
        self.client_wbits = int(params.get("client_max_window_bits") or 15)
        self.inflater = zlib.decompressobj(-15)  # for a server that keeps its context


class Client:
    __slots__ = ("sock", "index", "head", "chunks", "received", "carry", "sent", "echoed", "times", "out", "done",
                 "stage", "offset", "tags", "deflate", "frames")

    def __init__(self, sock: socket.socket, index: int):
        self.sock = sock
        self.index = index
        self.head = bytearray()
        self.chunks: list[bytes] = []
        self.received = 0
        self.carry = b""
        self.sent = 0
        self.echoed = 0
        self.times: deque = deque()
        self.out = b""
        self.done = False
        self.stage = ""
        self.offset = 0  # position in the current frame (framed reading)
        self.tags: list[bytes] = []
        self.deflate: Deflate | None = None
        self.frames = 0  # frames read (compressed reading)

    def queue(self, data: bytes) -> None:
        self.out = memoryview(bytes(self.out) + data if self.out else data)

    def flush(self) -> bool:
        """Send what is queued; True when all of it left."""
        if self.out:
            sent = self.sock.send(self.out)
            self.out = self.out[sent:]  # a memoryview: no copy of the rest
        return not self.out


def new_socket(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.connect_ex(("127.0.0.1", port))
    return sock


def handshake_done(client: Client, data: bytes) -> bool:
    """Feed handshake bytes; True once the 101 arrived (what follows goes to chunks)."""
    client.head += data
    end = client.head.find(b"\r\n\r\n")
    if end < 0:
        return False
    if not client.head.startswith(b"HTTP/1.1 101"):
        raise BenchError(f"handshake refused: {bytes(client.head[:60])!r}")
    for line in bytes(client.head[:end]).decode("latin-1").split("\r\n"):
        name, _, value = line.partition(":")
        if name.lower() == "sec-websocket-extensions" and value.strip().startswith("permessage-deflate"):
            client.deflate = Deflate(value.strip())
    rest = bytes(client.head[end + 4 :])
    client.head = None
    if rest:
        client.chunks.append(rest)
        client.received += len(rest)
    return True


def open_clients(port: int, count: int, *, concurrency: int = 50, timeout: float = 120.0,
                 deflate: bool = False) -> tuple[list[Client], float]:
    """Open and upgrade ``count`` connections, ``concurrency`` at a time
    (offering permessage-deflate with ``deflate``).

    Returns the clients and the handshakes per second.  ``concurrency`` stays
    under every server's listen backlog so that none is slowed by SYN retries.
    """
    selector = selectors.DefaultSelector()
    clients: list[Client] = []
    started = pending = 0
    start = time.perf_counter()
    try:
        while len(clients) < count:
            while started < count and pending < concurrency:
                client = Client(new_socket(port), started)
                selector.register(client.sock, selectors.EVENT_WRITE, client)
                started += 1
                pending += 1
            events = selector.select(1.0)
            if time.perf_counter() - start > timeout:
                raise BenchError(f"handshakes timed out: {len(clients)} of {count} done")
            for key, mask in events:
                client = key.data
                if mask & selectors.EVENT_WRITE:
                    error = client.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if error:
                        raise BenchError(f"connect failed: {os.strerror(error)}")
                    client.sock.send(HANDSHAKE_DEFLATE if deflate else HANDSHAKE)  # small: fits an empty buffer
                    selector.modify(client.sock, selectors.EVENT_READ, client)
                    continue
                data = client.sock.recv(65536)
                if not data:
                    raise BenchError("server closed a connection during the handshake")
                if handshake_done(client, data):
                    selector.unregister(client.sock)
                    pending -= 1
                    clients.append(client)
        rate = count / (time.perf_counter() - start)
    finally:
        selector.close()
    clients.sort(key=lambda c: c.index)
    return clients, rate


def warm_up(peers: list[Client], size: int, timeout: float = 30.0) -> None:
    """One message from the first client, read by every client, then dropped:
    the clock starts once every client is in the chat.  (wschat answers the
    handshake, then joins the client, on a worker thread with ``--redis``: a
    message said meanwhile reaches a plain client only from the room's history.)"""
    peers[0].sock.send(client_frame(payload(999999, 0, size)))  # fits an empty socket buffer
    frame_len = len(server_header(size)) + size
    deadline = time.monotonic() + timeout
    for peer in peers:
        got = 0
        while got < frame_len:
            if not select.select([peer.sock], [], [], max(0.0, deadline - time.monotonic()))[0]:
                raise BenchError(f"client {peer.index}: the warm-up message did not arrive")
            data = peer.sock.recv(frame_len - got)
            if not data:
                raise BenchError(f"client {peer.index}: the server closed the connection")
            got += len(data)


def close_clients(clients: list[Client]) -> None:
    for client in clients:
        client.sock.close()


# -- scenarios -------------------------------------------------------------------------


def run_fanout(port: int, clients: int = 50, messages: int = 200, size: int = 64, window: int = 10,
               stall: float = 10.0, pid: int | None = None, deflate: bool = False, broker: int | None = None,
               publishes: Callable[[], int] | None = None) -> dict:
    """Every client sends ``messages`` messages, at most ``window`` not yet
    echoed back to it; every message goes to every client.  With ``deflate``
    the clients offer permessage-deflate, compress what they send, and inflate
    every frame they read to check it.  The CPU time of ``pid`` (and its
    children) and of the ``broker`` process (redis-server) gives the CPU per
    delivery, and ``publishes`` (its PUBLISH count) the messages a batch."""
    peers, _ = open_clients(port, clients, deflate=deflate)
    header = server_header(size)
    frame_len = len(header) + size
    if not deflate:
        warm_up(peers, size)
    if deflate:
        if any(peer.deflate is None for peer in peers):
            raise BenchError("the server declined permessage-deflate")
        wbits = max(9, peers[0].deflate.client_wbits)
        makers = [CompressedFrameMaker(i, size, messages, wbits) for i in range(clients)]
    else:
        makers = [FrameMaker(i, size, messages) for i in range(clients)]
    tags = [header + f"{i:06d}".encode() for i in range(clients)]
    expected = clients * messages * frame_len
    latencies: list[float] = []
    selector = selectors.DefaultSelector()
    scratch = memoryview(bytearray(1 << 20))
    frame_head = len(header) + TAG_SIZE

    def read_bulk(peer: Client) -> int:
        """Small frames: keep the bytes, count own echoes in bulk. A tag
        starts with 0x81, which no ASCII payload holds: count in place, plus
        across the chunk boundary."""
        size_read = peer.sock.recv_into(scratch)
        if not size_read:
            raise BenchError(f"client {peer.index}: the server closed the connection")
        data = scratch[:size_read].tobytes()
        peer.chunks.append(data)
        peer.received += size_read
        tag = tags[peer.index]
        own = data.count(tag) + (peer.carry + data[: len(tag) - 1]).count(tag)
        peer.carry = data[1 - len(tag) :]
        return own

    def read_framed(peer: Client) -> int:
        """Large frames: read each frame's header and tag; let the kernel
        drop the rest of the payload (MSG_TRUNC: no copy to user space)."""
        own, progress = 0, False
        while True:
            try:
                if peer.offset < frame_head:
                    data = peer.sock.recv(frame_head - peer.offset)
                    size_read = len(data)
                    if data:
                        peer.carry += data
                        if len(peer.carry) == frame_head:
                            peer.tags.append(peer.carry)
                            own += peer.carry.startswith(tags[peer.index])
                            peer.carry = b""
                else:
                    size_read = peer.sock.recv_into(scratch, frame_len - peer.offset, socket.MSG_TRUNC)
            except BlockingIOError:
                return own if progress else -1
            if not size_read:
                raise BenchError(f"client {peer.index}: the server closed the connection")
            progress = True
            peer.received += size_read
            peer.offset = (peer.offset + size_read) % frame_len

    cache: dict[bytes, bytes] = {}  # compressed payload -> tag, where each message inflates alone
    owners = [f"{i:06d}".encode() for i in range(clients)]

    def read_deflated(peer: Client) -> int:
        """Any frames: parse each, inflate the compressed ones, keep the tag."""
        size_read = peer.sock.recv_into(scratch)
        if not size_read:
            raise BenchError(f"client {peer.index}: the server closed the connection")
        peer.received += size_read
        buffer = peer.carry
        buffer += scratch[:size_read]
        position, own, end = 0, 0, len(buffer)
        while end - position >= 2:
            length, head = buffer[position + 1], 2
            if length >= 126:
                head = 4 if length == 126 else 10
                if end - position < head:
                    break
                length = int.from_bytes(buffer[position + 2 : position + head], "big")
            stop = position + head + length
            if stop > end:
                break
            body = bytes(buffer[position + head : stop])
            if buffer[position] & 0x40:  # RSV1: compressed
                if peer.deflate.shared:
                    tag = cache.get(body)
                    if tag is None:
                        tag = cache[body] = zlib.decompressobj(-15).decompress(body + DEFLATE_TAIL, TAG_SIZE)
                else:  # the server's context carries over: inflate all of it, in order
                    tag = peer.deflate.inflater.decompress(body + DEFLATE_TAIL)[:TAG_SIZE]
            else:
                tag = body[:TAG_SIZE]
            peer.tags.append(header + tag)
            own += tag.startswith(owners[peer.index])
            peer.frames += 1
            position = stop
        del buffer[:position]
        return own

    read = read_deflated if deflate else read_bulk if size < 4096 else read_framed
    if deflate:
        for peer in peers:
            peer.carry = bytearray()

    def pump(peer: Client, now: float) -> None:
        allowed = min(messages, peer.echoed + window)
        if allowed > peer.sent:
            peer.queue(makers[peer.index].frames(peer.sent, allowed))
            peer.times.extend([now] * (allowed - peer.sent))
            peer.sent = allowed
            if not peer.flush():
                selector.modify(peer.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, peer)

    try:
        for peer in peers:
            selector.register(peer.sock, selectors.EVENT_READ, peer)
        start = last = time.perf_counter()
        cpu_start, server_start, broker_start = time.process_time(), cpu_times(pid), cpu_seconds(broker)
        publishes_start = publishes() if publishes else 0
        threads_start = thread_cpu(pid)
        for peer in peers:
            pump(peer, start)
        remaining = len(peers)
        while remaining:
            events = selector.select(1.0)
            now = time.perf_counter()
            if not events and now - last > stall:
                break  # the verification below says what went missing
            for key, mask in events:
                peer = key.data
                if mask & selectors.EVENT_WRITE and peer.flush():
                    selector.modify(peer.sock, selectors.EVENT_READ, peer)
                if not mask & selectors.EVENT_READ:
                    continue
                own = read(peer)
                if own < 0:
                    continue
                last = now
                if own:
                    if own > len(peer.times):
                        raise BenchError(f"client {peer.index}: more echoes than messages sent")
                    peer.echoed += own
                    latencies.extend(now - peer.times.popleft() for _ in range(own))
                    pump(peer, now)
                if not peer.done and (peer.frames >= clients * messages if deflate else peer.received >= expected):
                    peer.done = True
                    remaining -= 1
        elapsed = last - start
        loadgen_cpu = time.process_time() - cpu_start
        server_user, server_system = (after - before for after, before in zip(cpu_times(pid), server_start))
        server_cpu = server_user + server_system
        broker_cpu = cpu_seconds(broker) - broker_start
        published = publishes() - publishes_start if publishes else 0
        threads = {name: seconds - threads_start.get(name, 0.0) for name, seconds in thread_cpu(pid).items()}
        for peer in peers:
            tags_seen = peer.tags if read is not read_bulk else tags_of(b"".join(peer.chunks), size, peer.index)
            verify_tags(peer.index, tags_seen, size, clients, messages)
    finally:
        selector.close()
        close_clients(peers)
    latencies.sort()
    deliveries = clients * clients * messages
    figures = {
        "deliveries/s": deliveries / elapsed,
        "MB/s": deliveries * size / elapsed / 1e6,
        "p50 ms": 1000 * latencies[len(latencies) // 2],
        "p99 ms": 1000 * latencies[int(len(latencies) * 0.99)],
        "server CPU %": 100 * server_cpu / elapsed,
        # In the kernel (system calls, TCP); the rest is the server's own code, Python or C.
        "server sys %": 100 * server_system / server_cpu if server_cpu else 0.0,
    }
    if broker is not None:
        figures["redis CPU %"] = 100 * broker_cpu / elapsed
        # The server's CPU per unit of redis-server's: the host's speed, which
        # moves deliveries/s by a third from round to round here, cancels out.
        figures["CPU/redis CPU"] = server_cpu / broker_cpu if broker_cpu else 0.0
    if published:  # a process batches at most what its own clients have in flight (see --fanout-window)
        figures["msgs/publish"] = clients * messages / published
    figures["CPU us/deliv"] = 1e6 * (server_cpu + broker_cpu) / deliveries  # the server's and its broker's
    figures["loadgen CPU %"] = 100 * loadgen_cpu / elapsed
    for name, seconds in threads.items():  # where a message's CPU goes: see print_costs
        figures[THREAD + name] = 1e6 * seconds / (clients * messages)
    return figures


def cpu_times(pid: int | None) -> tuple[float, float]:
    """User and system CPU seconds of process ``pid`` and its running
    children (``--processes``) so far (0 without one)."""
    user = system = 0
    for process in process_tree(pid):
        with open(f"/proc/{process}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        user += int(fields[11])
        system += int(fields[12])
    tick = os.sysconf("SC_CLK_TCK")
    return user / tick, system / tick


def cpu_seconds(pid: int | None) -> float:
    """``cpu_times``, user and system together."""
    return sum(cpu_times(pid))


def process_tree(pid: int | None) -> list[int]:
    """``pid`` and its running children, theirs and so on (none without ``pid``)."""
    if pid is None:
        return []
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as listing:
            children = [int(child) for child in listing.read().split()]
    except OSError:
        children = []
    return [pid] + [process for child in children for process in process_tree(child)]


THREAD = "thread "  # the figures of one kind of thread: CPU us a message


def thread_cpu(pid: int | None) -> dict[str, float]:
    """CPU seconds so far of each kind of thread of process ``pid`` and its
    children, by the name the system shows (wschat names the threads it
    starts: ``wschat-loop``, ``wschat-redis``, ``wschat-handler_3`` counted as
    ``wschat-handler``...; a main thread shows the program's name)."""
    found: dict[str, float] = {}
    for process in process_tree(pid):
        try:
            tasks = os.listdir(f"/proc/{process}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{process}/task/{task}/comm") as comm:
                    name = comm.read().strip().rstrip("_0123456789") or "?"
                with open(f"/proc/{process}/task/{task}/schedstat") as schedstat:
                    seconds = int(schedstat.read().split()[0]) / 1e9
            except (OSError, ValueError, IndexError):
                continue  # (ended meanwhile, or a kernel without schedstat)
            found[name] = found.get(name, 0.0) + seconds
    return found


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise BenchError("no VmRSS")


def run_idle(port: int, count: int, pid: int, deflate: bool = False) -> dict:
    """Hold ``count`` idle connections (that agreed on permessage-deflate, with
    ``deflate``); then one message to all of them."""
    before = rss_kib(pid)
    peers, rate = open_clients(port, count, deflate=deflate)
    if deflate and any(peer.deflate is None for peer in peers):
        raise BenchError("the server declined permessage-deflate")
    selector = selectors.DefaultSelector()
    try:
        after = rss_kib(pid)
        size = 64
        expected = len(server_header(size)) + size
        for peer in peers:
            selector.register(peer.sock, selectors.EVENT_READ, peer)
        start = time.perf_counter()
        peers[0].sock.sendall(client_frame(payload(0, 0, size)))
        waiting = count
        while waiting:
            events = selector.select(10.0)
            if not events:
                raise BenchError(f"broadcast to idle connections: {waiting} of {count} got nothing")
            for key, _ in events:
                peer = key.data
                data = peer.sock.recv(65536)
                if not data:
                    raise BenchError(f"client {peer.index}: closed while idle")
                peer.chunks.append(data)
                peer.received += len(data)
                whole = b"".join(peer.chunks)
                if peer.received >= (2 + (whole[1] & 0x7F) if deflate and len(whole) >= 2 else expected):
                    selector.unregister(peer.sock)
                    waiting -= 1
        elapsed = time.perf_counter() - start
        if deflate:  # one compressed frame each: the broadcast's tag, inflated
            for peer in peers:
                frame = b"".join(peer.chunks)
                body = frame[2:]
                text = zlib.decompressobj(-15).decompress(body + DEFLATE_TAIL) if frame[0] & 0x40 else body
                if text != payload(0, 0, size):
                    raise BenchError(f"client {peer.index}: the broadcast came out wrong")
        else:
            verify([b"".join(p.chunks) for p in peers], size, 1, 1)
    finally:
        selector.close()
        close_clients(peers)
    return {"handshakes/s": rate, "KiB/conn": (after - before) / count, "broadcast ms": elapsed * 1000}


def run_churn(port: int, total: int = 1000, concurrency: int = 20, size: int = 64) -> dict:
    """Connect, send one message, wait for its echo, close; ``concurrency`` at a time."""
    selector = selectors.DefaultSelector()
    header = server_header(size)
    started = finished = live = 0
    start = time.perf_counter()
    try:
        while finished < total:
            while started < total and live < concurrency:
                client = Client(new_socket(port), started)
                client.stage = "connect"
                selector.register(client.sock, selectors.EVENT_WRITE, client)
                started += 1
                live += 1
            events = selector.select(10.0)
            if not events:
                raise BenchError(f"churn stalled after {finished} connections")
            for key, _ in events:
                client = key.data
                if client.stage == "connect":
                    client.sock.send(HANDSHAKE)
                    selector.modify(client.sock, selectors.EVENT_READ, client)
                    client.stage = "handshake"
                    continue
                data = client.sock.recv(65536)
                if client.stage == "closing":
                    if not data:  # the server's EOF ends the closing handshake
                        selector.unregister(client.sock)
                        client.sock.close()
                        live -= 1
                        finished += 1
                    continue
                if not data:
                    raise BenchError(f"client {client.index}: closed during the {client.stage}")
                if client.stage == "handshake":
                    if not handshake_done(client, data):
                        continue
                    client.stage = "echo"
                    client.sock.sendall(client_frame(payload(client.index, 0, size)))
                else:
                    client.chunks.append(data)
                if header + f"{client.index:06d}".encode() in b"".join(client.chunks):
                    client.stage = "closing"
                    client.sock.sendall(CLOSE_FRAME)
        elapsed = time.perf_counter() - start
    finally:
        selector.close()
    return {"connections/s": total / elapsed}


# -- servers under test ------------------------------------------------------------------

WSCHAT = [sys.executable, "-m", "wschat", "--welcome", "", "--max-chat-length", "0", "--rate-limit", "0",
          "--ping-interval", "0", "--ping-timeout", "0", "--log-level", "warning",
          "--max-message-size", str(2 << 20), "--max-connections", "20000"]
SERVERS = {
    "wschat": (WSCHAT + ["--port", "{port}"], {}),
    "wschat-pure": (WSCHAT + ["--port", "{port}"], {"WSCHAT_NO_SPEEDUPS": "1"}),
    "wschat-redis": (WSCHAT + ["--port", "{port}", "--redis", "{redis}"], {}),
    "wschat-redis-2p": (WSCHAT + ["--port", "{port}", "--redis", "{redis}", "--processes", "2"], {}),
    "wschat-redis-tls": (WSCHAT + ["--port", "{port}", "--redis", "{rediss}"], {}),  # rediss://, the same Redis
    "ws-threading": ([sys.executable, os.path.join(HERE, "bench_servers.py"), "threading", "{port}"], {}),
    "ws-asyncio": ([sys.executable, os.path.join(HERE, "bench_servers.py"), "asyncio", "{port}"], {}),
}
VARIED = ("wschat", "wschat-redis", "wschat-redis-2p")  # the wschat servers that have variants:
for _name in VARIED:  # the same under the system's scheduling policy (not SCHED_BATCH), and --baseline's
    SERVERS[_name + "-normal"] = (SERVERS[_name][0] + ["--scheduling", "normal"], {})
REFERENCE = "ws-threading"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _server_process_setup() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hasattr(os, "sched_setaffinity") and os.cpu_count() > 1:
        os.sched_setaffinity(0, {0})


class BenchRedis:
    """A redis-server of the benchmark's own, for the ``--redis`` variants:
    on a plain port (``url``) and, where openssl can make it a certificate,
    on a TLS port too (``tls_url``; its clients trust ``certificate``)."""

    BINARY = "/usr/bin/redis-server"

    def __init__(self):
        if not os.path.exists(self.BINARY):
            raise BenchError(f"the Redis variants need {self.BINARY} (apt-get install redis-server)")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._folder = tempfile.TemporaryDirectory()
        self.certificate = os.path.join(self._folder.name, "redis.crt")
        key = os.path.join(self._folder.name, "redis.key")
        try:
            subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                            "-keyout", key, "-out", self.certificate], check=True, capture_output=True)
        except (OSError, subprocess.CalledProcessError):
            self.tls_url, tls = None, []
        else:
            tls_port = free_port()
            self.tls_url = f"rediss://127.0.0.1:{tls_port}/0"
            tls = ["--tls-port", str(tls_port), "--tls-cert-file", self.certificate, "--tls-key-file", key,
                   "--tls-ca-cert-file", self.certificate, "--tls-auth-clients", "no"]
        self.process = subprocess.Popen(
            [self.BINARY, "--port", str(self.port), *tls, "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no"],
            preexec_fn=_server_process_setup, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while not self.flush():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise BenchError("redis-server did not start")
            time.sleep(0.05)

    def flush(self) -> bool:
        """Empty it (FLUSHALL, in Redis's inline protocol); False if it does not answer."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
                sock.sendall(b"FLUSHALL\r\n")
                return sock.recv(16).startswith(b"+OK")
        except OSError:
            return False

    def publishes(self) -> int:
        """The PUBLISH commands it ran so far (wschat's script runs one for
        each batch a process sends; INFO commandstats counts it)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            sock.sendall(b"INFO commandstats\r\n")
            head, _, text = sock.recv(65536).partition(b"\r\n")  # "$LENGTH", then the text
            while len(text) < int(head[1:]):
                text += sock.recv(65536)
        found = re.search(rb"cmdstat_publish:calls=(\d+)", text)
        return int(found.group(1)) if found else 0

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)
        self._folder.cleanup()


REDIS: BenchRedis | None = None


class RunningServer:
    def __init__(self, name: str, deflate: bool = False):
        command, env, *cwd = SERVERS[name]
        self.broker: int | None = None  # the redis-server it uses, whose CPU counts as its own
        self.publishes: Callable[[], int] | None = None  # and what counts the batches it publishes there
        if "{redis}" in command or "{rediss}" in command:
            global REDIS
            REDIS = REDIS or BenchRedis()
            REDIS.flush()
            if "{rediss}" in command:
                if REDIS.tls_url is None:
                    raise BenchError(f"{name} needs openssl, to make redis-server a certificate")
                command = [part.replace("{rediss}", REDIS.tls_url) for part in command]
                env = {**env, "SSL_CERT_FILE": REDIS.certificate}
            command = [part.replace("{redis}", REDIS.url) for part in command]
            self.broker = REDIS.process.pid
            self.publishes = REDIS.publishes
        if deflate and name.startswith("ws-"):
            command = [*command, "deflate"]  # python-websockets compresses only when told to
        self.name = name
        self.port = free_port()
        self.log = tempfile.TemporaryFile()  # a file, not a pipe: a chatty server never blocks on it
        wschat = command[:3] == WSCHAT[:3]  # it prints one line on stdout once all its processes listen
        self.process = subprocess.Popen(
            [part.replace("{port}", str(self.port)) for part in command],
            cwd=cwd[0] if cwd else ROOT, env={**os.environ, **env}, preexec_fn=_server_process_setup,
            stdout=subprocess.PIPE if wschat else subprocess.DEVNULL, stderr=self.log,
        )
        try:
            self._wait_ready(wschat)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, wschat: bool) -> None:
        deadline = time.monotonic() + 20
        if wschat:  # (the port accepts as soon as one of --processes listens: clients would all go to it)
            assert self.process.stdout is not None
            ready = select.select([self.process.stdout], [], [], 20)[0] and self.process.stdout.readline()
            if not ready:
                raise BenchError(f"{self.name} did not start: {self.log_tail()}")
        while True:  # wait until it accepts connections
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise BenchError(f"{self.name} did not start: {self.log_tail()}")
                time.sleep(0.05)

    def log_tail(self, size: int = 600) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-size:]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()
        self.log.close()


def scenarios(quick: bool, fanout_messages: int = 200, window: int = 10) -> dict:
    scale = 0.1 if quick else 1
    return {
        "fanout": lambda s: run_fanout(s.port, 50, max(10, int(fanout_messages * scale)), 64, window=window,
                                       pid=s.process.pid, broker=s.broker, publishes=s.publishes),
        "large-64k": lambda s: run_fanout(s.port, 4, int(1000 * scale), 65536, window=2, pid=s.process.pid,
                                          broker=s.broker, publishes=s.publishes),
        "large-1m": lambda s: run_fanout(s.port, 4, int(100 * scale), 1 << 20, window=1, pid=s.process.pid,
                                         broker=s.broker, publishes=s.publishes),
        "idle": lambda s: run_idle(s.port, 200 if quick else 2000, s.process.pid),
        "idle-10k": lambda s: run_idle(s.port, 1000 if quick else 10000, s.process.pid),
        "churn": lambda s: run_churn(s.port, total=100 if quick else 1000),
        # The same messages to a fifth of the members: with fanout, CPU per message and per delivery apart.
        "fanout-10": lambda s: run_fanout(s.port, 10, max(10, int(5 * fanout_messages * scale)), 64, window=window,
                                          pid=s.process.pid, broker=s.broker, publishes=s.publishes),
        # permessage-deflate offered by the clients, as browsers do (and on in every server):
        "fanout-deflate": lambda s: run_fanout(s.port, 50, max(10, int(200 * scale)), 64, window=window,
                                               pid=s.process.pid, deflate=True),
        "large-64k-deflate": lambda s: run_fanout(s.port, 4, int(1000 * scale), 65536, window=2, pid=s.process.pid,
                                                  deflate=True),
        "idle-deflate": lambda s: run_idle(s.port, 200 if quick else 2000, s.process.pid, deflate=True),
        "idle-10k-deflate": lambda s: run_idle(s.port, 1000 if quick else 10000, s.process.pid, deflate=True),
    }


def machine() -> str:
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as info:
            model = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} CPUs, Python {platform.python_version()}, wschat frames: {IMPLEMENTATION}"


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--servers", default="wschat,ws-threading,ws-asyncio", help=f"from {', '.join(SERVERS)}")
    parser.add_argument("--scenarios", default="fanout,large-64k,large-1m,idle,churn",
                        help="from fanout, fanout-10, large-64k, large-1m, idle, idle-10k, churn, and with permessage-deflate "
                             "fanout-deflate, large-64k-deflate, idle-deflate, idle-10k-deflate")
    parser.add_argument("--quick", action="store_true", help="small counts: a smoke run")
    parser.add_argument("--fanout-messages", type=int, default=200, metavar="N",
                        help="messages each of fanout's 50 clients sends (default 200; more: a longer, steadier run)")
    parser.add_argument("--fanout-window", type=int, default=10, metavar="N",
                        help="messages each fanout client keeps sent and not yet echoed back to it (default 10); "
                             "a server's batch holds at most what its own clients keep in flight")
    parser.add_argument("--baseline", metavar="DIR", action="append", default=[],
                        help="also offer the wschat of another checkout (e.g. a git worktree of an older commit) "
                             "as the servers 'wschat-base' (and -redis, -redis-2p): before and after in the same run; "
                             "given again, as 'wschat-base2' and so on (the same DIR twice: the noise between two "
                             "servers of one commit)")
    parser.add_argument("--reference", default=REFERENCE, help=f"the server ratios are given against (default {REFERENCE})")
    return parser


def measure(name: str, scenario: str, run: Callable[[RunningServer], dict]) -> dict | None:
    """``name`` started afresh and put through ``scenario``: its figures, or
    None when it failed (said on stderr, with the end of its log)."""
    server = None
    try:
        server = RunningServer(name, deflate=scenario.endswith("-deflate"))
        return run(server)
    except (BenchError, OSError) as error:  # (one that did not start has its log's tail in error)
        tail = "" if server is None else "\n" + server.log_tail()
        print(f"FAILED: {name} {scenario}: {error}{tail}", file=sys.stderr)
        return None
    finally:
        if server is not None:
            server.stop()


def main(argv=None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    for number, baseline in enumerate(args.baseline, 1):
        for name in VARIED:
            command, env = SERVERS[name][:2]
            base = "wschat-base" if number == 1 else f"wschat-base{number}"
            SERVERS[name.replace("wschat", base, 1)] = (command, env, os.path.abspath(baseline))
    servers = args.servers.split(",")
    chosen = args.scenarios.split(",")
    if args.fanout_window < 1:
        parser.error("--fanout-window must be 1 or more")
    table = scenarios(args.quick, args.fanout_messages, args.fanout_window)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hasattr(os, "sched_setaffinity") and os.cpu_count() > 1:
        os.sched_setaffinity(0, {1})
    print(machine())
    print(f"command: python tools/bench.py {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip())
    results: dict = {}
    failed: set = set()
    global REDIS
    try:  # (a redis-server of its own is stopped however the run ends: Ctrl-C, or a bug)
        for round_number in range(args.rounds):
            order = servers if round_number % 2 == 0 else servers[::-1]  # A B C, C B A, ...: drift in a round cancels
            for scenario in chosen:
                for name in order:
                    if (scenario, name) in failed:
                        continue
                    figures = measure(name, scenario, table[scenario])
                    if figures is None:
                        failed.add((scenario, name))
                        continue
                    for figure, value in figures.items():
                        results.setdefault((scenario, figure), {}).setdefault(name, []).append(value)
                    print(f"round {round_number + 1}: {scenario:10} {name:13} " +
                          "  ".join(f"{k} {v:,.{2 if v < 10 else 1}f}" for k, v in figures.items()
                                    if not k.startswith(THREAD)), file=sys.stderr, flush=True)
    finally:
        if REDIS is not None:
            REDIS.stop()
            REDIS = None
    print_table(results, servers, failed, args.reference)
    print_costs(results, servers)
    return 1 if any(name.startswith("wschat") for _, name in failed) else 0


def print_table(results: dict, servers: list[str], failed: set, reference: str = REFERENCE) -> None:
    reference = reference if reference in servers else None
    others = [s for s in servers if s != reference]
    width = {s: max(14, len(s) + 2) for s in servers}
    header = f"{'scenario':10} {'figure':13}" + "".join(f"{s:>{width[s]}}" for s in servers)
    if reference:
        header += "".join(f"{s + '/ref':>{width[s] + 4}}" for s in others)
    print(header)
    for (scenario, figure), by_server in results.items():
        if figure.startswith(THREAD):
            continue  # (print_costs gives them)
        medians = {s: statistics.median(v) for s, v in by_server.items() if (scenario, s) not in failed}
        line = f"{scenario:10} {figure:13}" + "".join(
            f"{medians[s]:{width[s]},.{2 if medians[s] < 10 else 1}f}" if s in medians
            else f"{'failed' if (scenario, s) in failed else '-':>{width[s]}}" for s in servers)
        if reference in medians:
            ratios = {s: paired_ratio(by_server[s], by_server[reference]) for s in others if s in medians}
            line += "".join(f"{ratios[s]:{width[s] + 3}.2f}x" if ratios.get(s) is not None
                            else " " * (width[s] + 4) for s in others)
        print(line)
    if reference:
        print(f"(medians; each ratio is the median of the rounds' own ratios to ref = {reference}; "
              "for ms, KiB/conn and CPU, lower is better)")


def paired_ratio(values: list[float], reference: list[float]) -> float | None:
    """The median of each round's ratio of ``values`` to ``reference``: the
    servers of a round run back to back, so a change in the machine's load
    between rounds cancels out (the ``values`` of a server that failed stop
    at the round before: rounds pair up from the first)."""
    ratios = [value / base for value, base in zip(values, reference) if base]
    return statistics.median(ratios) if ratios else None


def print_costs(results: dict, servers: list[str]) -> None:
    """CPU per message, the server's and redis-server's apart, from fanout (50
    members) and fanout-10 (10 members, as many messages): the inputs of the
    scaling model in README.rst; and where the server's goes, thread by thread."""
    rows = []
    for name in servers:
        for scenario, members in (("fanout", 50), ("fanout-10", 10)):
            try:
                total = statistics.median(results[scenario, "CPU us/deliv"][name]) * members
                rate = statistics.median(results[scenario, "deliveries/s"][name]) / members
            except KeyError:
                continue
            broker = statistics.median(results.get((scenario, "redis CPU %"), {}).get(name, [0])) * 1e4 / rate
            threads = sorted(((statistics.median(values[name]), figure[len(THREAD):])
                              for (row_scenario, figure), values in results.items()
                              if row_scenario == scenario and figure.startswith(THREAD) and name in values),
                             reverse=True)
            where = ", ".join(f"{thread} {cost:.2f}" for cost, thread in threads if cost >= 0.005)
            rows.append(f"{name:20} {scenario:9}  server {total - broker:5.1f}, redis-server {broker:4.1f}"
                        + (f"   (by thread: {where})" if where else ""))
    if rows:
        print("\nCPU per message, in us (all its deliveries included):")
        print("\n".join(rows))


if __name__ == "__main__":
    sys.exit(main())
