"""One server-wide bound on what peers make the server hold.

Each connection is bounded on its own (``max_message_size``,
``max_header_size``, ``max_pending_calls``), but N connections can still hold
N times those limits, and with permessage-deflate a few bytes on the wire
inflate a thousandfold.  The budget adds up, across every connection, what a
peer's bytes hold in memory: request heads in progress, bytes waiting for the
rest of their frame, unfinished messages (inflated), inflaters, and handler
calls waiting for a worker.  When it runs over, the loop closes the
connections that hold the most until it is under again; everyone else is
served on.

It is kept per connection so that the largest is known, and under a lock
because handler calls finish on worker threads.  The loop thread alone adds;
workers only give back.
"""

from __future__ import annotations

import threading
from typing import Hashable

DEFAULT_MAX_BUFFERED = 64 << 20


class Budget:
    """What each connection holds, and the total against ``limit`` (0: no limit)."""

    __slots__ = ("limit", "total", "_held", "_lock")

    def __init__(self, limit: int):
        self.limit = limit
        self.total = 0
        self._held: dict[Hashable, int] = {}  # only connections that hold something
        self._lock = threading.Lock()

    def change(self, owner: Hashable, amount: int) -> None:
        """``owner`` holds ``amount`` bytes more (or fewer, when negative)."""
        with self._lock:
            held = self._held.get(owner, 0) + amount
            if held > 0:
                self._held[owner] = held
            else:
                self._held.pop(owner, None)
            self.total += amount

    def held(self, owner: Hashable) -> int:
        return self._held.get(owner, 0)

    @property
    def over(self) -> bool:
        return bool(self.limit) and self.total > self.limit

    def largest(self, skip: set[Hashable]) -> Hashable | None:
        """The owner holding the most, ``skip`` aside (None: no one else holds anything)."""
        with self._lock:
            candidates = [(held, owner) for owner, held in self._held.items() if owner not in skip]
        return max(candidates, key=lambda pair: pair[0])[1] if candidates else None
