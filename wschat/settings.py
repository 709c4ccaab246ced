"""What one run of a server is given: its settings, fixed for the run.

``Server`` checks its arguments and builds one ``Settings`` per start; the
loop, the connections, the dispatcher and the pinger read this, never the
``Server`` (which may be reconfigured for its next run meanwhile).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass


@dataclass(frozen=True)
class Settings:
    """See ``Server`` for what each one means."""

    max_queue: int
    send_timeout: float
    handshake_timeout: float
    close_timeout: float
    message_timeout: float
    max_connections: int
    max_message_size: int
    max_header_size: int
    max_buffered: int
    workers: int
    max_pending_calls: int
    ping_interval: float
    ping_timeout: float | None
    ssl_context: ssl.SSLContext | None = None
