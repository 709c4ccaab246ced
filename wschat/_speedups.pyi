"""The C accelerator's interface (``_speedups.c``), for type checkers."""

from typing import Callable

def apply_mask(data: bytes | bytearray | memoryview, mask: bytes) -> bytes:
    """``data`` XORed with the 4-byte ``mask`` repeated."""

def frame_texts(payloads: list[bytes], below: int = 0) -> bytes | None:
    """UTF-8 payloads as final text frames, unmasked, joined; None when one
    has ``below`` bytes or more (``below`` > 0)."""

def json_texts(lines: list[bytes], fallback: Callable[[bytes], bytes]) -> list[bytes]:
    """Each JSON line's text (``dialect.text_of``), ``fallback(line)`` where it must be decoded."""

def message_lines(batch: bytes) -> tuple[bytes, list[bytes]] | None:
    """A batch split at each ``\\nM``, or None when a ``\\nE`` is in it."""
