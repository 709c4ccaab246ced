"""The C accelerator's interface (``_speedups.c``), for type checkers."""

def apply_mask(data: bytes | bytearray | memoryview, mask: bytes) -> bytes:
    """``data`` XORed with the 4-byte ``mask`` repeated."""
