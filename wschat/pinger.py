"""Keepalive: a ``threading.Timer`` pings every open connection and closes the silent ones.

Each tick takes a snapshot of the socket map under its lock and works on the
snapshot outside it.  The ping is framed once for everyone; its payload is the
send time, so each pong gives that connection's round trip (``latency``).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Iterable

from .connection import Connection
from .frames import CloseCode, Opcode
from .osthread import named
from .outbound import PreparedMessage

log = logging.getLogger("wschat")


class Pinger:
    """Pings every ``interval`` seconds; a client silent for ``timeout``
    seconds (None: never) is closed with 1011."""

    def __init__(self, snapshot: Callable[[], list[Connection]],
                 send_many: Callable[[PreparedMessage, Iterable[Connection]], int],
                 interval: float, timeout: float | None):
        self._snapshot = snapshot
        self._send_many = send_many
        self.interval = interval
        self.timeout = timeout
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()
        self._stopped = False

    def start(self) -> None:
        self._schedule()

    def cancel(self) -> None:
        """No more ticks.  Takes no lock and waits for nothing: a signal
        handler may call it while its thread holds any lock."""
        self._stopped = True
        timer = self._timer
        if timer is not None:
            timer.cancel()

    def stop(self) -> None:
        """Cancel, and wait for a tick that is running (unless called from it)."""
        self.cancel()
        with self._lock:
            timer, self._timer = self._timer, None
        if timer is not None and timer is not threading.current_thread():
            timer.join()

    def is_timer_thread(self) -> bool:
        return self._timer is threading.current_thread()

    def _schedule(self) -> None:
        with self._lock:
            if self.interval <= 0 or self._stopped:
                return
            self._timer = threading.Timer(self.interval, named(self._tick))
            self._timer.name = "wschat-ping"
            self._timer.daemon = True
            self._timer.start()

    def _tick(self) -> None:
        try:
            now = time.monotonic()
            alive = []
            for conn in self._snapshot():
                if self.timeout and now - conn.last_seen > self.timeout:
                    log.warning("%s: no answer for %.0fs, closing", conn.key, now - conn.last_seen)
                    conn.close(CloseCode.INTERNAL_ERROR, "keepalive ping timeout")
                else:
                    alive.append(conn)
            ping = PreparedMessage(time.monotonic_ns().to_bytes(8, "big"), Opcode.PING)
            self._send_many(ping, alive)
        except Exception:
            log.exception("ping scheduler failed")
        finally:
            self._schedule()
