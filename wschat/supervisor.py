"""``python -m wschat --processes N``: N processes serve one port, one chat.

The parent holds the port (bound with SO_REUSEPORT, never listening, so it
gets no connections), starts N children of ``python -m wschat`` that listen on
it with SO_REUSEPORT (the kernel spreads new connections over them), and
restarts a child that dies.  Their chat is one through Redis (``--redis``).
SIGTERM or SIGINT stops every child, each closing its clients with 1001.

SIGHUP restarts them one at a time (to run new code, or new settings given
to the same command): a new child starts and listens, and only then is the
old one stopped; it lets go of the port at once, publishes what it was told,
and closes its clients with 1001, which come back to the others (wschat.v1
clients with ``since``, so they miss nothing).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from typing import IO

from .cli import SetupError, ready_line, redis_engine
from .logsafe import without_password

log = logging.getLogger("wschat")

RESTART_DELAY_MAX = 10.0  # seconds between restarts of a child that keeps dying at once


def reserve_port(host: str, port: int) -> socket.socket:
    """Bind (not listen on) ``host:port`` with SO_REUSEPORT: the children can
    bind it too, no one else can, and port 0 becomes one free port for all."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


class Child:
    """One ``python -m wschat`` serving the shared port."""

    def __init__(self, number: int, argv: list[str]):
        self.number = number
        self.process = subprocess.Popen(
            [sys.executable, "-m", "wschat", *argv], stdout=subprocess.PIPE, text=True,
            start_new_session=True,  # a terminal's Ctrl-C reaches the parent, which stops the children
        )
        assert self.process.stdout is not None  # a pipe was asked for
        self.output: IO[str] = self.process.stdout  # its ready line
        self.started = time.monotonic()

    def wait_ready(self) -> bool:
        """True once the child listens (its ready line); False if it exited."""
        return bool(self.output.readline())


def supervise(args: argparse.Namespace, argv: list[str]) -> int:
    count = args.processes or os.cpu_count() or 1
    grace = args.graceful_timeout  # what a child has to close its clients before it is killed
    try:  # one clear error here rather than one per child
        engine = redis_engine(args)
        engine.redis.ping()
        engine.redis.close()
    except SetupError as exc:
        print(f"wschat: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # redis-py's errors, without importing it here
        print(f"wschat: cannot reach Redis at {without_password(args.redis)}: {exc}", file=sys.stderr)
        return 1
    try:
        reserved = reserve_port(args.host, args.port)
    except OSError as exc:
        print(f"wschat: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    port = reserved.getsockname()[1]
    child_argv = [*argv, "--processes", "1", "--port", str(port), "--supervised-by", str(os.getpid())]
    signals = {signal.SIGINT, signal.SIGTERM}  # blocked by main() (SIGHUP too): taken here, with sigtimedwait

    children = [Child(number, child_argv) for number in range(1, count + 1)]
    for child in children:
        if not child.wait_ready():
            log.error("process %d could not start (exit code %s): stopping", child.number, child.process.wait())
            _stop_all(children, grace)
            return 1
    scheme = "wss" if args.certfile else "ws"
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(ready_line(f"{scheme}://{host}:{port}", args.path, count), flush=True)

    delays = {child.number: 0.0 for child in children}
    stopping = False
    while not stopping:
        received = signal.sigtimedwait(signals | {signal.SIGHUP}, 0.5)
        if received is not None and received.si_signo != signal.SIGHUP:
            break
        if received is not None:
            stopping = not _roll(children, child_argv, signals, grace)
            continue
        for index, child in enumerate(children):
            code = child.process.poll()
            if code is None:
                continue
            ran = time.monotonic() - child.started
            delay = delays[child.number] = 0.0 if ran > 60 else min(RESTART_DELAY_MAX, delays[child.number] * 2 or 0.5)
            log.warning("process %d (pid %d) exited with code %s after %.0f s: restarting it in %.1f s",
                        child.number, child.process.pid, code, ran, delay)
            if delay and signal.sigtimedwait(signals, delay) is not None:
                stopping = True
                break
            child.output.close()
            children[index] = replacement = Child(child.number, child_argv)
            if replacement.wait_ready():
                log.info("process %d restarted (pid %d)", child.number, replacement.process.pid)
    _stop_all(children, grace)
    reserved.close()
    return 0


def _roll(children: list[Child], argv: list[str], signals: set[signal.Signals], grace: float) -> bool:
    """Replace every child, one at a time, each new one listening before the
    old one stops; False when a stop signal came meanwhile (every child,
    old or new, is then stopped by the caller)."""
    log.info("SIGHUP: replacing the %d processes one at a time", len(children))
    for index, old in enumerate(list(children)):
        new = Child(old.number, argv)
        if not new.wait_ready():
            log.error("process %d: its replacement could not start (exit code %s); keeping the old processes",
                      old.number, new.process.wait())
            new.output.close()
            return True
        children[index] = new
        old.process.send_signal(signal.SIGTERM)  # it lets go of the port, then closes its clients with 1001
        deadline = time.monotonic() + grace
        while old.process.poll() is None:
            if signal.sigtimedwait(signals, 0.1) is not None:
                _stop_all([old], grace)
                return False
            if time.monotonic() > deadline:
                log.warning("process %d (pid %d) did not stop in time: killing it", old.number, old.process.pid)
                old.process.kill()
                old.process.wait()
        old.output.close()
        log.info("process %d replaced (pid %d -> %d)", old.number, old.process.pid, new.process.pid)
    log.info("SIGHUP: every process replaced")
    return True


def _stop_all(children: list[Child], grace: float) -> None:
    """SIGTERM every child (each closes its clients with 1001); kill the ones
    still there ``grace`` seconds later."""
    for child in children:
        if child.process.poll() is None:
            child.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for child in children:
        try:
            child.process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("process %d (pid %d) did not stop in time: killing it", child.number, child.process.pid)
            child.process.kill()
            child.process.wait()
        child.output.close()
