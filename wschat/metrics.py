"""What an operator watches and alerts on, in the Prometheus text format (0.0.4).

Counters with one writer (the loop thread, or whoever holds the loop's dirty
lock) are plain integers; those any thread may update (a slow client closed
from a broadcast, a handler that failed on a worker) and the labelled ones go
through ``add`` and ``count``, under a lock.  Gauges are read when rendered.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter

_COUNTERS = (
    # attribute, metric name, help, label (for the Counter ones)
    ("handshakes", "wschat_http_requests_total", "HTTP requests answered, by status (101: upgraded to WebSocket).", "status"),
    ("closes", "wschat_closes_total", "WebSocket connections closed, by close code (1006: lost without a close frame).", "code"),
    ("failures", "wschat_protocol_failures_total", "Connections failed for breaking RFC 6455, by close code sent.", "code"),
    ("messages_received", "wschat_messages_received_total", "WebSocket messages received.", None),
    ("messages_sent", "wschat_messages_sent_total", "WebSocket messages queued for clients (a broadcast counts each recipient).", None),
    ("bytes_received", "wschat_received_bytes_total", "Bytes received from clients (after TLS).", None),
    ("bytes_sent", "wschat_sent_bytes_total", "Bytes written to clients (before TLS).", None),
    ("slow_clients", "wschat_slow_client_closes_total", "Clients closed with 1008 for not reading (outbound queue over max_queue).", None),
    ("handler_errors", "wschat_handler_errors_total", "Handler calls that raised.", None),
    ("budget_closes", "wschat_budget_closes_total",
     "Connections closed with 1013 because peers made the server hold more than max_buffered.", None),
)


class Metrics:
    """The server's counters, kept across restarts of the server."""

    def __init__(self) -> None:
        self.started = time.time()
        self.handshakes: Counter[int] = Counter()
        self.closes: Counter[int] = Counter()
        self.failures: Counter[int] = Counter()
        self.messages_received = 0
        self.messages_sent = 0
        self.bytes_received = 0
        self.bytes_sent = 0
        self.slow_clients = 0
        self.handler_errors = 0
        self.budget_closes = 0
        self._lock = threading.Lock()

    def add(self, name: str, amount: int = 1) -> None:
        """Add to a plain counter from any thread."""
        with self._lock:
            setattr(self, name, getattr(self, name) + amount)

    def count(self, name: str, label: int) -> None:
        """Count one under ``label`` in a labelled counter (from any thread)."""
        with self._lock:
            getattr(self, name)[label] += 1

    def render(self, gauges: dict[str, tuple[str, float]]) -> bytes:
        """The exposition text: ``gauges`` maps a name to (help, value)."""
        lines: list[str] = []
        for name, (help_text, value) in gauges.items():
            sample = value if isinstance(value, int) else f"{value:g}"  # :g would round large integers
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name} {sample}"]
        for attribute, name, help_text, label in _COUNTERS:
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} counter"]
            if label is None:
                lines.append(f"{name} {getattr(self, attribute)}")
            else:
                with self._lock:
                    samples = sorted(getattr(self, attribute).items())
                lines += [f'{name}{{{label}="{key}"}} {count}' for key, count in samples]
        lines += ["# HELP process_start_time_seconds When the server's metrics began, in seconds since the epoch.",
                  "# TYPE process_start_time_seconds gauge", f"process_start_time_seconds {self.started:.3f}"]
        rss = _resident_bytes()
        if rss is not None:
            lines += ["# HELP process_resident_memory_bytes Resident memory of the process.",
                      "# TYPE process_resident_memory_bytes gauge", f"process_resident_memory_bytes {rss}"]
        return ("\n".join(lines) + "\n").encode("utf-8")


def _resident_bytes() -> int | None:
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None
