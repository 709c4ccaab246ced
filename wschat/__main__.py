"""``python -m wschat``: run the chat server from the command line."""

from __future__ import annotations

import gc
import logging
import os
import signal
import sys
import threading
import time
from typing import Sequence

from .cli import (STOP_SIGNALS, SetupError, apply_scheduling, build, parse_args, raise_descriptor_limit, ready_line,
                  setting_problem)
from .osthread import named
from .supervisor import supervise


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    problem = setting_problem(args)
    if problem is not None:
        print(f"python -m wschat: error: {problem}", file=sys.stderr)
        return 2  # as argparse does for a bad option
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(message)s")
    raise_descriptor_limit()
    apply_scheduling(args.scheduling)  # first: every thread started from here on inherits it
    # SIGINT, SIGTERM and SIGHUP are blocked in every thread (those started
    # later inherit it) and taken by sigwait on this one (or the supervisor's
    # sigtimedwait): no handler runs in the middle of a lock held here, so
    # none can deadlock on it.
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS | {signal.SIGHUP})
    if args.processes != 1:
        return supervise(args, argv)
    try:
        server, chat = build(args)
    except SetupError as exc:
        print(f"wschat: {exc}", file=sys.stderr)
        return 1
    try:
        server.bind()
    except OSError as exc:
        chat.close()
        print(f"wschat: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    # The loop runs on its own thread; this one waits for a signal and stops it.
    if args.supervised_by is not None:
        watch_parent(args.supervised_by)
    # What start-up made lives as long as the process: frozen, the collector's
    # full passes no longer scan it (over Redis, where each batch read makes
    # containers, the collector's share of the CPU falls from 4-5% to 1.5%).
    gc.freeze()
    server.start()
    print(ready_line(str(server.url), args.path), flush=True)
    while signal.sigwait(STOP_SIGNALS | {signal.SIGHUP}) == signal.SIGHUP:  # (systemctl reload)
        logging.getLogger("wschat").warning("SIGHUP: one process cannot restart without closing its clients; "
                                            "run with --processes to restart them one at a time")
    server.stop(release_port=args.supervised_by is not None)  # the port's other processes take new clients at once
    chat.close()
    return 0


def watch_parent(parent: int) -> None:
    """A process of ``--processes`` stops when its supervisor is gone
    (killed without a chance to stop it)."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        logging.getLogger("wschat").warning("the supervising process %d is gone: stopping", parent)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=named(watch), name="wschat-parent-watch", daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())
