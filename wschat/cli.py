"""The command line's pieces: its options, the server and chat they build,
and the lines it prints; shared by ``python -m wschat`` (``__main__``) and
the ``--processes`` supervisor."""

from __future__ import annotations

import argparse
import logging
import os
import resource
import signal
import ssl
from typing import TYPE_CHECKING, Sequence

from . import __version__, checks
from .accelerator import IMPLEMENTATION
from .chat import DEFAULT_WELCOME, Chat
from .engine import DEFAULT_MAX_HISTORY_BYTES, DEFAULT_MAX_HISTORY_TOTAL, EngineUnavailable
from .files import DEFAULT_PAGE_POLICY
from .logsafe import without_password
from .rooms import ChatLimits
from .server import Server

if TYPE_CHECKING:
    from .redis_engine import RedisEngine

log = logging.getLogger("wschat")

STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}
STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")


def version_text() -> str:
    return f"wschat {__version__} (frames: {IMPLEMENTATION}; C accelerator {'in use' if IMPLEMENTATION == 'C' else 'not in use'})"


_UNITS = {"": 1, "k": 1000, "kb": 1000, "kib": 1 << 10, "m": 1000**2, "mb": 1000**2, "mib": 1 << 20,
          "g": 1000**3, "gb": 1000**3, "gib": 1 << 30}


def byte_size(text: str) -> int:
    """A number of bytes: ``1048576``, ``1MiB``, ``32 MiB``, ``64M`` (K, M, G: powers of 1000; KiB, MiB, GiB: of 1024)."""
    number = text.strip().rstrip("BbIiKkMmGg ")
    unit = text.strip()[len(number):].strip().lower()
    try:
        value = float(number) * _UNITS[unit]
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a size in bytes (such as 1048576, 64KiB, 16MiB)") from None
    if not 0 <= value < 1 << 62 or value != int(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole, non-negative number of bytes")
    return int(value)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m wschat",
        description="A WebSocket (RFC 6455) chat server, with its browser client at /.",
    )
    add = parser.add_argument
    add("--version", action="version", version=version_text())
    add("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)")
    add("--port", type=int, default=1984, help="TCP port (default 1984)")
    add("--path", default="/chat", help="the chat's WebSocket path (default /chat; /chat/NAME is room NAME)")
    add("--ping-interval", type=float, default=5.0, help="seconds between pings to every client (default 5; 0: none)")
    add("--ping-timeout", type=float, default=20.0, help="close a client silent this long (default 20; 0: never)")
    add("--max-message-size", type=byte_size, default=1 << 20, metavar="BYTES",
        help="largest WebSocket message in bytes (default 1MiB)")
    add("--message-timeout", type=float, default=30.0, metavar="SECONDS",
        help="a message begun must end within this (1008 past it; default 30; 0: no limit)")
    add("--max-buffered", type=byte_size, default=None, metavar="BYTES",
        help="what all peers together may make the server hold (unfinished messages, inflated; request heads; "
             "handler calls waiting): past it the connections holding the most are closed with 1013 "
             "(default 64MiB, or 4 x --max-message-size if larger; 0: no bound)")
    add("--max-connections", type=int, default=10000, help="open WebSockets at most (default 10000)")
    add("--max-queue", type=byte_size, default=16 << 20, metavar="BYTES",
        help="bytes queued for one client before it is closed as too slow (1008; default 16MiB)")
    add("--allowed-origin", action="append", dest="allowed_origins", metavar="ORIGIN",
        help="accept browsers from this Origin only (repeatable; default: any)")
    add("--no-compression", action="store_true", help="decline permessage-deflate (RFC 7692; on by default)")
    add("--certfile", help="PEM certificate: serve wss:// and https://")
    add("--keyfile", help="PEM private key for --certfile")
    add("--workers", type=int, default=None,
        help="run handlers on this many threads (default 0: on the loop; 4 with --redis: joining waits for Redis)")
    add("--history", type=int, default=50,
        help="messages kept per room and replayed to wschat.v1 clients as they join (default 50; "
             "plain clients, like the seed's page, get live messages only)")
    add("--max-history-bytes", type=byte_size, default=DEFAULT_MAX_HISTORY_BYTES, metavar="BYTES",
        help="history a welcome carries at most, and a room keeps: the newest messages that fit "
             "(default 32KiB; 0: no bound)")
    add("--max-history-total", type=byte_size, default=DEFAULT_MAX_HISTORY_TOTAL, metavar="BYTES",
        help="history all rooms keep in this process at most: past it the heaviest rooms' goes first "
             "(default 64MiB; 0: no bound)")
    add("--welcome", default=DEFAULT_WELCOME, help=f"welcome text ('' for none; default {DEFAULT_WELCOME!r})")
    add("--max-chat-length", type=int, default=2000, help="characters per chat message (default 2000; 0: no limit)")
    add("--rate-limit", type=float, default=5.0, help="messages per second per client (default 5; 0: no limit)")
    add("--rate-burst", type=int, default=10, help="messages a client may send at once (default 10)")
    add("--max-nick-length", type=int, default=24, help="characters per nickname (default 24; 0: no limit)")
    add("--static-dir", default=STATIC_DIR, help="folder served over plain HTTP (default: the browser client)")
    add("--page-policy", default=DEFAULT_PAGE_POLICY, metavar="POLICY",
        help="Content-Security-Policy of the files served ('' for none; the default suits the bundled client)")
    add("--metrics", action="store_true", help="serve Prometheus metrics at /metrics (GET /healthz is always there)")
    add("--forwarded-allow-ip", action="append", dest="forwarded_allow_ips", default=[], metavar="IP",
        help="a reverse proxy whose X-Forwarded-For gives the client's address (repeatable; '*': any)")
    add("--max-connections-per-ip", type=int, default=0,
        help="open WebSockets per client address (429 past it; default 0: no limit)")
    add("--redis", metavar="URL",
        help="keep rooms, history and presence in Redis (redis://HOST:PORT/DB): several processes, "
             "on one machine or many, are one chat (needs pip install 'wschat[redis]')")
    add("--presence-timeout", type=float, default=10.0,
        help="with --redis: the members of a process that stops answering leave after this many seconds (default 10)")
    add("--processes", type=int, default=1,
        help="serve the port from N processes (0: one per core), restarted when they die; needs --redis (default 1)")
    add("--graceful-timeout", type=float, default=15.0, metavar="SECONDS",
        help="with --processes: a process stopped or replaced that has not closed its clients after this many "
             "seconds is killed (default 15)")
    add("--scheduling", choices=["batch", "normal"], default="batch",
        help="how Linux schedules the server's threads: batch (default) lets a thread woken while the CPU is busy "
             "wait for the tick rather than preempt the running one, so under load work passes between threads "
             "in fewer, larger batches (more messages per second, a few ms more latency); normal: the system's default")
    add("--supervised-by", type=int, help=argparse.SUPPRESS)  # set by --processes for its children
    add("--log-level", default="info", type=str.lower, choices=["debug", "info", "warning", "error"],
        help="default info (any case: DEBUG too)")
    args = parser.parse_args(argv)
    if bool(args.certfile) != bool(args.keyfile):
        parser.error("--certfile and --keyfile go together")
    if args.processes != 1 and not args.redis:
        parser.error("--processes needs --redis: separate processes share their chat through Redis")
    if args.processes < 0:
        parser.error("--processes is a number of processes (0: one per core)")
    if args.workers is None:
        args.workers = 4 if args.redis else 0
    return args


class SetupError(Exception):
    """A setting that cannot work: one line for the user, exit code 1."""


def tls_context(certfile: str, keyfile: str) -> ssl.SSLContext:
    for path in (certfile, keyfile):  # OpenSSL's own errors do not say which file
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise SetupError(f"cannot read {path}: {exc.strerror or exc}") from None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(certfile, keyfile)
    except (ssl.SSLError, OSError) as exc:
        raise SetupError(f"cannot use {certfile} and {keyfile} as certificate and key: {exc}") from None
    return context


def redis_engine(args: argparse.Namespace) -> RedisEngine:
    """The Redis engine ``--redis`` asks for, connected.  Raises ``SetupError``
    without redis-py, or when Redis cannot be reached."""
    try:
        from .redis_engine import RedisEngine
    except ImportError:
        raise SetupError("--redis needs redis-py: pip install 'wschat[redis]'") from None
    try:
        return RedisEngine(args.redis, history=args.history, max_history_bytes=args.max_history_bytes,
                           presence_timeout=args.presence_timeout)
    except ValueError as exc:  # not a redis:// URL
        raise SetupError(f"--redis {without_password(args.redis)}: {exc}") from None


# Settings whose option is not named after them (the rest: --max-queue for max_queue, ...).
OPTIONS = {"max_length": "--max-chat-length", "rate": "--rate-limit", "burst": "--rate-burst",
           "allowed_origins": "--allowed-origin", "forwarded_allow_ips": "--forwarded-allow-ip"}


def setting_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with the arguments' values, naming the option, or None.
    Everything is built once, binding, reading and connecting nothing, so
    that each value meets the check its class makes (as from Python)."""
    try:
        if args.redis:
            checks.seconds("presence_timeout", args.presence_timeout, positive=True)
        if args.processes != 1:
            checks.seconds("graceful_timeout", args.graceful_timeout, positive=True)
        build(args, dry_run=True)
    except checks.SettingError as error:
        option = OPTIONS.get(error.name, "--" + error.name.replace("_", "-"))
        return f"{option} must be {error.accepts}, not {error.value!r}"
    return None


def build(args: argparse.Namespace, *, dry_run: bool = False) -> tuple[Server, Chat]:
    """The server and chat that the arguments describe (not yet listening).
    Raises ``SetupError`` for a certificate or key that cannot be used, or a
    Redis that cannot be reached; ``SettingError`` for a bad value.  A
    ``dry_run`` reads no certificate and uses no Redis: it only checks."""
    context = tls_context(args.certfile, args.keyfile) if args.certfile and not dry_run else None
    engine = redis_engine(args) if args.redis and not dry_run else None
    server = Server(
        args.host,
        args.port,
        ssl_context=context,
        static_dir=args.static_dir,
        allowed_origins=args.allowed_origins,
        max_connections=args.max_connections,
        max_message_size=args.max_message_size,
        max_queue=args.max_queue,
        max_buffered=args.max_buffered,
        message_timeout=args.message_timeout,
        ping_interval=args.ping_interval,
        ping_timeout=args.ping_timeout or None,
        workers=args.workers,
        max_connections_per_ip=args.max_connections_per_ip,
        forwarded_allow_ips=args.forwarded_allow_ips,
        metrics_path="/metrics" if args.metrics else None,
        compression=not args.no_compression,
        page_policy=args.page_policy or None,
        reuse_port=args.supervised_by is not None,
    )
    limits = ChatLimits(args.max_chat_length, args.rate_limit, args.rate_burst, args.max_nick_length)
    try:
        chat = Chat(server, args.path, welcome=args.welcome, history=args.history,
                    max_history_bytes=args.max_history_bytes, max_history_total=args.max_history_total,
                    limits=limits, engine=engine)
    except EngineUnavailable as exc:
        raise SetupError(str(exc)) from None
    return server, chat


def apply_scheduling(policy: str) -> None:
    """Put this thread, and the threads it starts from now on, under
    ``--scheduling``'s ``policy``: Linux's SCHED_BATCH, where the system has
    it, for "batch".  A chat server's threads hand each message on (loop,
    handler, engine, loop); a woken thread that preempts the running one at
    every hand-over makes many small batches and a context switch each."""
    if policy == "batch" and hasattr(os, "SCHED_BATCH"):
        try:
            os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
        except OSError as exc:  # not allowed here (a seccomp filter): the default policy stays
            log.info("--scheduling batch: not available here (%s)", exc.strerror or exc)


def raise_descriptor_limit() -> None:
    """Let the process use every file descriptor it may: one per client."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def ready_line(url: str, path: str, processes: int = 1) -> str:
    """The line printed once serving: where, and the page's address for a
    browser here (on the loopback where every address is listened on:
    0.0.0.0 names no host, and some browsers refuse it)."""
    web = url.replace("ws", "http", 1).replace("//0.0.0.0:", "//127.0.0.1:", 1).replace("//[::]:", "//[::1]:", 1)
    each = f" ({processes} processes)" if processes > 1 else ""
    return f"wschat listening on {url}{path} - open {web}/ in a browser{each}"
