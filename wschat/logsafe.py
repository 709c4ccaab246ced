"""Peer-controlled text made safe for a log line.

Request targets, header values, close reasons and messages come from the
network.  Logged raw, a newline in them forges a whole log line and a long one
floods the log, so every such value goes through ``quoted`` first.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

DEFAULT_LIMIT = 120


def quoted(value: str | bytes | None, limit: int = DEFAULT_LIMIT) -> str:
    """``value`` quoted and escaped like ``repr`` (line breaks, control and
    bidi characters become escapes), cut to ``limit`` characters with "…"."""
    if value is None:
        return "None"
    if isinstance(value, (bytes, bytearray, memoryview)):
        value = bytes(value).decode("utf-8", "backslashreplace")
    text = repr(value[:limit])
    return text + "…" if len(value) > limit else text


def address_text(address: object) -> str:
    """A socket address as ``host:port``."""
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{address[0]}:{address[1]}"
    return str(address)


def without_password(url: str) -> str:
    """A URL fit for a log line: its password, if any, replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
