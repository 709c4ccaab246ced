"""The bytes on one socket: accepting, TLS handshake steps, reading, writing.

Non-blocking calls only, for a socket the selector says is ready; what to wait
for next is returned, never waited for.  The loop decides what happens then.
"""

from __future__ import annotations

import socket
import ssl

from .outbound import Outbox

READ_SIZE = 256 * 1024
READ_BUFFER_SIZE = READ_SIZE + 64 * 1024  # room for what one TLS record still holds (16 KiB at most)
IOV_MAX = 1024  # buffers per sendmsg call
WANTS_WRITE = object()  # what read() returns when TLS must write before it can read
_RETRY = (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


def prepare(sock: socket.socket, ssl_context: ssl.SSLContext | None) -> socket.socket:
    """An accepted socket made non-blocking, without Nagle's delay, wrapped
    for TLS when there is a context (the handshake is done by ``tls_handshake``)."""
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if ssl_context is None:
        return sock
    return ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)


def tls_handshake(sock: ssl.SSLSocket) -> bool | None:
    """One step of the TLS handshake: True when done, False while it waits
    to read, None while it waits to write.  Raises ``OSError`` on failure."""
    try:
        sock.do_handshake()
    except ssl.SSLWantReadError:
        return False
    except ssl.SSLWantWriteError:
        return None
    return True


def read_into(sock: socket.socket, buffer: memoryview, tls: bool):
    """Read what is there into ``buffer``: how many bytes (0 at EOF), None
    when nothing yet, ``WANTS_WRITE`` when TLS must write first.  Raises
    ``OSError`` when the connection is broken (a reset, a TLS error).

    One buffer serves every read of the loop: no read allocates, so no read
    costs fresh pages (a fresh 256 KiB allocation per read is an mmap whose
    pages fault in as the kernel fills them).  ``buffer`` holds ``READ_SIZE``
    and a TLS record more.
    """
    try:
        received = sock.recv_into(buffer, READ_SIZE)
        if tls and received:
            while pending := sock.pending():  # decrypted bytes select() cannot see
                received += sock.recv_into(buffer[received:], pending)
        return received
    except ssl.SSLWantWriteError:
        return WANTS_WRITE
    except _RETRY:
        return None


def write(sock: socket.socket, outbox: Outbox, tls: bool) -> None:
    """Write as much of ``outbox`` as the kernel takes.  Raises ``OSError``
    when the connection is broken.

    Plain sockets: one ``sendmsg`` for every queued buffer (``IOV_MAX`` at a
    time).  TLS writes a record at a time, small buffers joined.
    """
    while outbox.size:
        try:
            if tls:
                data = outbox.tls_chunk()
                attempted = len(data)
                sent = sock.send(data)
            else:
                buffers = outbox.pending(IOV_MAX)
                attempted = outbox.size if len(buffers) < IOV_MAX else sum(map(len, buffers))
                sent = sock.sendmsg(buffers)
        except _RETRY:
            return
        outbox.consume(sent)
        if sent < attempted:
            return


def shutdown_write(sock: socket.socket) -> bool:
    """Shut our write side (plain TCP, also under TLS: no close_notify); False if the socket is gone."""
    try:
        socket.socket.shutdown(sock, socket.SHUT_WR)
        return True
    except OSError:
        return False
