"""Micro-benchmark of the protocol core: frames parsed and encoded per second,
and unmasking throughput, on the pure-Python path and the C accelerator.

    python tools/microbench.py [--seconds 0.5]

Each figure is the best of three timed runs of about ``--seconds`` each; the
last column is C / Python measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import time

from wschat import frames
from wschat.protocol import RequestReceived, ServerProtocol

try:
    from wschat import _speedups
except ImportError:
    _speedups = None

PATHS = {"python": frames.apply_mask_python}
if _speedups is not None:
    PATHS["c"] = _speedups.apply_mask
MASK = b"\x01\x02\x03\x04"
REQUEST = (b"GET /chat HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")


def open_protocol(max_message_size: int) -> ServerProtocol:
    """A server protocol past its handshake, ready for frames."""
    protocol = ServerProtocol(max_message_size=max_message_size)
    protocol.receive_data(REQUEST)
    assert isinstance(protocol.next_event(), RequestReceived)
    protocol.accept(b"")
    return protocol


def rate(function, units: float, seconds: float) -> float:
    """Units per second of ``function``, best of three runs."""
    best = 0.0
    for _ in range(3):
        count, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds:
            function()
            count += 1
        best = max(best, count * units / elapsed)
    return best


def cases(seconds: float):
    for size in (64, 65536, 1 << 20):
        payload = os.urandom(size)
        batch = max(1, (1 << 20) // size)  # about 1 MiB of frames per call
        stream = frames.encode_frame(frames.Opcode.BINARY, payload, mask=MASK) * batch

        def parse(stream=stream, batch=batch):
            protocol = open_protocol(2 << 20)
            protocol.receive_data(stream)
            count = 0
            while protocol.next_event() is not None:
                count += 1
            assert count == batch

        def encode_masked(payload=payload, batch=batch):
            for _ in range(batch):
                frames.encode_frame(frames.Opcode.BINARY, payload, mask=MASK)

        def encode_server(payload=payload, batch=batch):
            for _ in range(batch):
                frames.encode_frame(frames.Opcode.BINARY, payload)

        label = f"{size} B" if size < 1024 else f"{size >> 10} KiB"
        yield f"parse client frames, {label}", "frames/s", parse, batch
        yield f"encode client frames, {label}", "frames/s", encode_masked, batch
        yield f"encode server frames, {label}", "frames/s", encode_server, batch
    data = os.urandom(1 << 20)
    yield "unmask 1 MiB", "MB/s", lambda: frames.apply_mask(data, MASK), 1.048576


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=0.5, help="length of one timed run")
    args = parser.parse_args()
    names = list(PATHS)
    print(f"{'case':34} {'unit':9}" + "".join(f"{name:>14}" for name in names) + ("   C/Python" if "c" in PATHS else ""))
    original = frames.apply_mask
    try:
        for label, unit, function, units in cases(args.seconds):
            results = {}
            for name in names:
                frames.apply_mask = PATHS[name]
                results[name] = rate(function, units, args.seconds)
            line = f"{label:34} {unit:9}" + "".join(f"{results[n]:14,.0f}" for n in names)
            if "c" in results:
                line += f"   {results['c'] / results['python']:8.2f}x"
            print(line)
    finally:
        frames.apply_mask = original


if __name__ == "__main__":
    main()
