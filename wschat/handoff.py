"""What other threads hand the loop: connections with bytes to write,
calls to run on the loop thread, and the socketpair that wakes it.

Any thread may hand over; only the loop takes, once per pass
(``take``).  One wake-up byte is enough however many hand-overs come
before the loop takes them, and a hand-over from the loop thread itself
wakes nothing: the loop takes what is handed over before it sleeps.
"""

from __future__ import annotations

import socket
import threading
from typing import Any, Callable, Generic, Hashable, Iterable, TypeVar

from .metrics import Metrics

Item = TypeVar("Item", bound=Hashable)  # what is handed over to be written: the loop's connections
Call = tuple[Callable[..., object], tuple[Any, ...]]


class Handoff(Generic[Item]):
    """The loop's in-tray (see the module docstring)."""

    def __init__(self, metrics: Metrics, on_loop_thread: Callable[[], bool]):
        self._metrics = metrics
        self._on_loop_thread = on_loop_thread
        self._lock = threading.Lock()
        self._dirty: set[Item] = set()  # connections with bytes to write
        self._calls: list[Call] = []  # (callback, args)
        self._woken = False  # a wake-up byte is on its way
        self._ended = False  # the loop is gone: no more calls are taken
        self.reader, self._writer = socket.socketpair()  # the loop's selector watches ``reader``
        for sock in (self.reader, self._writer):
            sock.setblocking(False)

    def on_loop_thread(self) -> bool:
        """Whether the caller is the loop's thread (which must never block)."""
        return self._on_loop_thread()

    @property
    def has_dirty(self) -> bool:
        """Connections wait to be written (the loop must not sleep)."""
        return bool(self._dirty)

    def mark_dirty(self, conns: Iterable[Item], messages: int = 0) -> None:
        """``conns`` have bytes to write, ``messages`` new ones in all."""
        with self._lock:
            self._dirty.update(conns)
            self._metrics.messages_sent += messages  # one writer at a time: this lock's holder
            if self._woken or self._on_loop_thread():
                return
            self._woken = True
        self.wake()

    def call_soon(self, callback: Callable[..., object], *args: Any) -> bool:
        """Run ``callback(*args)`` on the loop thread, on its next pass;
        False once the loop has ended (it will not run)."""
        with self._lock:
            if self._ended:
                return False
            self._calls.append((callback, args))
        self.wake()
        return True

    def take(self) -> tuple[set[Item], list[Call]]:
        """On the loop thread: the dirty connections and the calls handed over since the last take."""
        with self._lock:
            dirty, self._dirty = self._dirty, set()
            calls, self._calls = self._calls, []
            self._woken = False
        return dirty, calls

    def end(self) -> None:
        """The loop is ending: calls handed over from now on are refused."""
        with self._lock:
            self._ended = True

    def wake(self) -> None:
        """Wake the loop from its select().  Takes no lock: a signal handler may call it."""
        try:
            self._writer.send(b"\0")
        except OSError:
            pass  # a byte is already waiting, or the loop is gone

    def drain(self) -> None:
        """On the loop thread, once woken: read the wake-up bytes."""
        try:
            while self.reader.recv(4096):
                pass
        except OSError:
            pass

    def close(self) -> None:
        self.reader.close()
        self._writer.close()
