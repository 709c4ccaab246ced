"""The bytes on one socket: accepting, reading, writing, and TLS in between.

Non-blocking calls only, for a socket the selector says is ready; what to wait
for next is returned or left in plain sight, never waited for.

TLS runs over memory BIOs (``SSLContext.wrap_bio``): the loop moves every
byte between the socket and OpenSSL itself.  Over a socket BIO, OpenSSL reads
the socket on its own, and after a TLS 1.3 post-handshake message it can keep
an application record it already took from the socket while answering "want
read" (openssl/openssl#6234): the record is then where select() cannot see it
and ``pending()`` does not count it, and the connection stalls.  Here nothing
is ever read that the loop does not hand over, and decrypting goes on until
OpenSSL's input is empty.
"""

from __future__ import annotations

import errno
import logging
import selectors
import socket
import ssl
import time
from typing import Callable

from .outbound import Outbox

log = logging.getLogger("wschat")

READ_SIZE = 256 * 1024
READ_BUFFER_SIZE = READ_SIZE + 64 * 1024  # plaintext of one read of ciphertext, and a record it completed
IOV_MAX = 1024  # buffers per sendmsg call
TLS_BATCH = 64 * 1024  # plaintext encrypted at a time: what waits encrypted stays this small
_RETRY = (BlockingIOError, InterruptedError)
ACCEPT_BATCH = 128  # accepted at a time: a connection storm cannot starve the connections open
ACCEPT_PAUSE = 0.5  # seconds without accepting after running out of descriptors
RESOURCE_ERRORS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


class Acceptor:
    """The listening socket in the loop's selector.  Out of descriptors it
    stops listening for ``ACCEPT_PAUSE`` rather than spin on ``accept()``
    (the pending connection stays ready, and select() would return at once)."""

    def __init__(self, listener: socket.socket, selector: selectors.BaseSelector):
        self.listener = listener
        self._selector = selector
        self._resume_at = 0.0  # when listening resumes after a pause; 0 when not paused
        selector.register(listener, selectors.EVENT_READ, None)

    def accept(self, take: Callable[[socket.socket, object], object]) -> None:
        """Accept what is waiting, ``ACCEPT_BATCH`` at most, each given to ``take(sock, address)``."""
        for _ in range(ACCEPT_BATCH):
            try:
                sock, address = self.listener.accept()
            except _RETRY:
                return
            except OSError as exc:
                if exc.errno in RESOURCE_ERRORS:
                    log.error("accept failed (%s); pausing accepts for %.1fs", exc.strerror, ACCEPT_PAUSE)
                    self._selector.unregister(self.listener)
                    self._resume_at = time.monotonic() + ACCEPT_PAUSE
                else:  # the client left before we took it
                    log.debug("accept failed: %s", exc)
                return
            take(sock, address)

    def resume_if_due(self, now: float) -> None:
        """Listen again once a pause is over."""
        if self._resume_at and now >= self._resume_at:
            self._resume_at = 0.0
            self._selector.register(self.listener, selectors.EVENT_READ, None)

    def close(self) -> None:
        """Stop listening: the port is free for others (the supervisor's other processes)."""
        if not self._resume_at:  # registered (not paused)
            self._selector.unregister(self.listener)
        self.listener.close()


class TLS:
    """One server-side TLS session whose bytes the loop carries."""

    __slots__ = ("session", "incoming", "outgoing", "unsent", "handshaking", "closed")

    def __init__(self, context: ssl.SSLContext):
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.session = context.wrap_bio(self.incoming, self.outgoing, server_side=True)
        self.unsent: bytes | memoryview = b""  # encrypted bytes the socket has not taken yet
        self.handshaking = True
        self.closed = False  # our close_notify is queued

    @property
    def has_output(self) -> bool:
        """Encrypted bytes wait to be written (handshake messages, tickets, alerts, data)."""
        return bool(self.unsent) or self.outgoing.pending > 0

    def decrypt(self, ciphertext: memoryview, plaintext: memoryview) -> int:
        """Feed ``ciphertext``; decrypt what it completes into ``plaintext``.
        Returns the plaintext bytes (0 while handshaking or mid-record), or
        -1 once the peer sent close_notify.  Raises ``ssl.SSLError``."""
        self.incoming.write(ciphertext)
        if self.handshaking:
            try:
                self.session.do_handshake()
            except ssl.SSLWantReadError:
                return 0
            self.handshaking = False
        received, left = 0, -1
        while True:
            try:
                # Into a buffer, read returns a count (typeshed says bytes).
                received += self.session.read(  # type: ignore[operator]
                    len(plaintext) - received, plaintext[received:])
            except ssl.SSLWantReadError:
                # After a post-handshake record OpenSSL asks for more although
                # more records may be in: go on while it still takes bytes in.
                if self.incoming.pending in (0, left):
                    return received
                left = self.incoming.pending
            except ssl.SSLZeroReturnError:
                return received or -1

    def close_notify(self) -> None:
        """Queue our close_notify (the peer's is not waited for)."""
        self.closed = True
        try:
            self.session.unwrap()
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLError:
            pass  # the session is broken already: nothing more to say


def prepare(sock: socket.socket, ssl_context: ssl.SSLContext | None) -> TLS | None:
    """Make an accepted socket non-blocking and without Nagle's delay; its
    TLS session when there is a context (the handshake comes with the bytes)."""
    sock.setblocking(False)
    if sock.family != socket.AF_UNIX:  # a WSGI server's socket may be a Unix one
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return TLS(ssl_context) if ssl_context is not None else None


def read_into(sock: socket.socket, buffer: memoryview, tls: TLS | None, spare: memoryview) -> int | None:
    """Read what is there: the count of plaintext bytes now in ``buffer``
    (TLS decrypts from ``spare``), 0 at EOF, None when nothing to hand over
    yet.  Raises ``OSError`` (``ssl.SSLError`` included) when the connection
    is broken.

    One buffer serves every read of the loop: no read allocates, so no read
    costs fresh pages (a fresh 256 KiB allocation per read is an mmap whose
    pages fault in as the kernel fills them).
    """
    try:
        received = sock.recv_into(spare if tls is not None else buffer, READ_SIZE)
    except _RETRY:
        return None
    if tls is None or not received:
        return received
    plaintext = tls.decrypt(spare[:received], buffer)
    if plaintext < 0:
        return 0
    return plaintext or None


def write(sock: socket.socket, outbox: Outbox, tls: TLS | None) -> None:
    """Write as much of ``outbox`` as the kernel takes.  Raises ``OSError``
    when the connection is broken.

    Plain sockets: one ``sendmsg`` for every queued buffer (``IOV_MAX`` at a
    time).  TLS: the outbox is encrypted ``TLS_BATCH`` at a time, and what the
    socket does not take waits encrypted in ``tls.unsent``.
    """
    if tls is not None:
        _write_tls(sock, outbox, tls)
        return
    while outbox.size:
        buffers = outbox.pending(IOV_MAX)
        attempted = outbox.size if len(buffers) < IOV_MAX else sum(map(len, buffers))
        try:
            sent = sock.sendmsg(buffers)
        except _RETRY:
            return
        outbox.consume(sent)
        if sent < attempted:
            return


def _write_tls(sock: socket.socket, outbox: Outbox, tls: TLS) -> None:
    while True:
        if not tls.unsent:
            if tls.outgoing.pending == 0 and outbox.size and not tls.handshaking:
                _encrypt(outbox, tls)
            tls.unsent = tls.outgoing.read()
            if not tls.unsent:
                return
        try:
            sent = sock.send(tls.unsent)
        except _RETRY:
            return
        tls.unsent = memoryview(tls.unsent)[sent:] if sent < len(tls.unsent) else b""
        if tls.unsent:
            return


def _encrypt(outbox: Outbox, tls: TLS) -> None:
    """Encrypt up to ``TLS_BATCH`` bytes from the front of the outbox."""
    taken = 0
    while outbox.size and taken < TLS_BATCH:
        buffer = outbox.buffers[outbox.start]
        tls.session.write(buffer)
        outbox.consume(len(buffer))
        taken += len(buffer)


def shutdown_write(sock: socket.socket) -> bool:
    """Shut our write side; False if the socket is gone."""
    try:
        sock.shutdown(socket.SHUT_WR)
        return True
    except OSError:
        return False
