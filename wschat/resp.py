"""A Redis connection at the level of the protocol (RESP2): commands packed
into one write, replies read in order by hiredis's parser.

redis-py sends one command and waits for its reply; the Redis engine's hot
paths need more: many commands in one write (``pack``), the replies to them
read back together, and pub/sub pushes from several nodes waited for in one
``select`` (``RespConnection.fileno``), and a write that never waits for a
thread that must not (``send_nowait``), over TCP or TLS.  This module is
that and no more: no retries, no threads, no state beyond the socket, its
parser and what a ``send_nowait`` left to write.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
from typing import Any, Iterable, Iterator

import hiredis

ReplyError = hiredis.ReplyError
READ_SIZE = 1 << 16  # what one read takes at most
DRAIN_SIZE = 1 << 20  # and a pending() at most, in reads one after another


def pack(*args: str | bytes | int) -> bytes:
    """One command in RESP: an array of bulk strings."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def pack_all(commands: Iterable[tuple[str | bytes | int, ...]]) -> bytes:
    return b"".join(pack(*command) for command in commands)


class RespConnection:
    """One TCP connection to one Redis node (blocking, with a timeout)."""

    def __init__(self, address: tuple[str, int], timeout: float, *, tls: bool = False, raw: bool = False):
        self.address = address
        sock = socket.create_connection(address, timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls:  # rediss://: the server's certificate is checked as redis-py does by default
            try:
                sock = ssl.create_default_context().wrap_socket(sock, server_hostname=address[0])
            except BaseException:
                sock.close()
                raise
        self.sock = sock
        self.tls = tls
        self.reader = hiredis.Reader() if raw else hiredis.Reader(encoding="utf-8")  # raw: bytes
        self.unsent = bytearray()  # what send_nowait could not write: it goes first with the next send

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, data: bytes) -> None:
        """Write ``data`` (after what ``send_nowait`` left), waiting up to the timeout."""
        if self.unsent:
            self.unsent += data
            self.sock.sendall(self.unsent)
            self.unsent = bytearray()
            return
        self.sock.sendall(data)

    def send_nowait(self, data: bytes) -> bool:
        """Write what the kernel takes at once, for a thread that must not
        wait; False when some is left in ``unsent``."""
        written = 0
        if not self.unsent:
            try:
                written = self._write_now(data)
            except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                pass  # (under TLS the next write must begin with the same bytes: unsent does)
        self.unsent += memoryview(data)[written:]  # (a bytearray: no copying of all a stalled Redis holds)
        return not self.unsent

    def _write_now(self, data: bytes) -> int:
        if not self.tls:  # (a socket with a timeout is non-blocking underneath: its sendall would wait, this does not)
            return os.write(self.sock.fileno(), data)
        with self._not_waiting():
            return self.sock.send(data)

    @contextlib.contextmanager
    def _not_waiting(self) -> Iterator[None]:
        """The TLS socket non-blocking for a moment (both the loop's thread
        and the engine's use it, one at a time: under the publisher's lock)."""
        timeout = self.sock.gettimeout()
        self.sock.settimeout(0)
        try:
            yield
        finally:
            self.sock.settimeout(timeout)

    def call(self, *args: str | bytes | int) -> Any:
        """One command and its reply; an error reply is raised."""
        self.send(pack(*args))
        while (reply := self.reader.gets()) is False:
            self._fill()
        if isinstance(reply, ReplyError):
            raise reply
        return reply

    def pending(self) -> list[Any]:
        """What the socket holds now (it is readable): every complete reply or push."""
        if self.tls:
            self._fill_tls()
        else:
            self._fill_now()
        found = []
        while (reply := self.reader.gets()) is not False:
            found.append(reply)
        return found

    def _fill(self) -> None:
        self._feed(self.sock.recv(READ_SIZE))

    def _fill_now(self) -> None:
        """Read what the kernel holds, up to ``DRAIN_SIZE``, without waiting:
        pushes that came while the last ones were handled are delivered with
        the next ones, as one batch, not one read after another.  (``os.read``:
        a socket with a timeout would wait in ``poll`` first.)"""
        fd = self.sock.fileno()
        taken = 0
        while taken < DRAIN_SIZE:
            try:
                data = os.read(fd, READ_SIZE)
            except BlockingIOError:
                return
            self._feed(data)
            if len(data) < READ_SIZE:
                return
            taken += READ_SIZE

    def _fill_tls(self) -> None:
        """Under TLS a readable socket may hold no data yet (a session ticket,
        part of a record), and the TLS layer may hold more than the socket
        shows: read without waiting, until it holds no more."""
        sock = self.sock
        assert isinstance(sock, ssl.SSLSocket)
        with self._not_waiting():
            while True:
                try:
                    self._feed(sock.recv(1 << 16))
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    return  # the rest of a record is still on its way
                if not sock.pending():
                    return

    def _feed(self, data: bytes) -> None:
        if not data:
            raise ConnectionError(f"Redis at {self.address[0]}:{self.address[1]} closed the connection")
        self.reader.feed(data)

    def close(self) -> None:
        self.sock.close()
