"""The server's record of one accepted socket.

A ``Connection`` (``connection.py``) is the handle that applications hold;
its ``link`` is what the loop, the dispatcher and the handshake work on
besides.  The link never points back at its handle, so that a connection
is freed as soon as the last reference to it goes.  Who owns what:

- the handshake: ``head``, the raw request head, once upgraded;
- the loop thread: ``sock``, ``tls``, ``deadline``, ``events``, ``ending``,
  ``lingering``, ``held``;
- the dispatcher, under ``lock``: ``calls``, ``running``, ``paused``;
- any thread, under ``lock``: the protocol (its state and outbound queue),
  ``space`` (where senders wait for the queue to go down) and ``gone``.
"""

from __future__ import annotations

import socket
import threading
from collections import deque
from typing import Any, Callable

from .protocol import ServerProtocol
from .transport import TLS

HandlerCall = tuple[Callable[..., Any], tuple[Any, ...], int]  # a handler, its arguments, what it holds of the budget


class Link:
    """One socket and its protocol, as the server keeps them (see the module docstring)."""

    __slots__ = (
        "protocol", "lock", "head", "sock", "tls", "deadline", "events", "ending", "lingering", "held",
        "calls", "running", "paused", "space", "gone",
    )

    def __init__(self, sock: socket.socket, protocol: ServerProtocol, tls: TLS | None):
        self.protocol = protocol
        self.lock = threading.Lock()
        self.head = b""
        self.sock: socket.socket | None = sock  # None once closed
        self.tls = tls
        self.deadline: float | None = None
        self.events = 0  # what the selector watches it for
        self.ending = False  # the close deadline is set
        self.lingering = False  # our write side is shut; waiting for the peer's EOF
        self.held = 0  # what its protocol held when the budget last counted it
        self.calls: deque[HandlerCall] | None = None  # handler calls waiting for a worker
        self.running = False  # a worker runs its calls
        self.paused = False  # not read: its handler calls pile up, or its authorize hook runs
        self.space: threading.Condition | None = None  # made when a sender must wait for space in the queue
        self.gone: threading.Event | None = None  # made when someone waits for the end
