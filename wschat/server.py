"""The server: its configuration, its resources, its life cycle and its
thread-safe public API.  The work of each run happens in ``loop.Loop``.

Threading model (see DESIGN.md): the loop thread owns every socket; any
other thread (the application's, the ping Timer, handler workers) only queues
bytes under a connection's lock and wakes the loop.  So ``send``,
``broadcast``, ``close`` and ``stop`` are safe from any thread.  The socket
map (key -> open connection) is guarded by one lock; whoever iterates it
works on a snapshot.
"""

from __future__ import annotations

import logging
import signal
import socket
import ssl
import threading
from typing import Any, Callable, Collection, Iterable, Sequence

from . import checks
from .admission import Admission, Limits, Responder
from .budget import DEFAULT_MAX_BUFFERED
from .connection import Connection
from .deflate import PerMessageDeflate
from .files import DEFAULT_PAGE_POLICY
from .handshake import DEFAULT_MAX_HEADER_SIZE, Extension, Request, text_response
from .loop import Loop
from .metrics import Metrics
from .osthread import named
from .outbound import PreparedMessage
from .protocol import DEFAULT_MAX_MESSAGE_SIZE
from .resources import Resource
from .settings import Settings

log = logging.getLogger("wschat")


class Server:
    """A WebSocket server on a selectors loop.

    Use ``serve_forever()`` in the calling thread, or ``start()`` for a
    background thread and ``stop()`` (also as a context manager); a stopped
    server can be started again.  Port 0 picks a free port, readable from
    ``port`` once bound; port None opens none: the connections then come
    from another server through ``adopt`` (see ``wschat.wsgi``).
    ``reuse_port`` lets several processes listen on one port (SO_REUSEPORT:
    the kernel spreads new connections over them; ``python -m wschat
    --processes``).

    Limits: ``max_connections`` open WebSockets (503 past it);
    ``handshake_timeout`` for TLS and the request head; ``max_header_size``
    (431); ``max_message_size`` (1009); ``max_queue`` bytes in one client's
    outbound queue, past which a broadcast closes it with 1008 and ``send``
    from another thread waits up to ``send_timeout``.  ``ping_interval``
    seconds between pings (0 for none); a client silent for ``ping_timeout``
    seconds is closed with 1011.  ``workers`` > 0 runs handlers on a thread
    pool, one at a time per connection and in order; a connection with
    ``max_pending_calls`` handler calls waiting is not read until half are done.

    Above the per-connection limits, ``max_buffered`` bounds what all peers
    together make the server hold (request heads, unfinished frames and
    messages once inflated, inflaters, handler calls waiting): past it the
    connections holding the most are closed with 1013 until it is not
    (default: 64 MiB, or 4 x ``max_message_size`` if larger; 0: no bound).
    A message begun must end within ``message_timeout`` seconds, or its
    connection is closed with 1008 (0: no limit).

    ``compression`` is permessage-deflate (RFC 7692), on unless None: the
    settings are ``deflate.PerMessageDeflate``'s; a broadcast is compressed
    once, and an idle connection keeps no zlib state.

    Operating it: ``health_path`` answers 200 while serving and 503 while
    shutting down; ``metrics_path`` (off by default) serves ``metrics`` in the
    Prometheus text format.  Behind a reverse proxy, ``forwarded_allow_ips``
    names the proxies whose ``X-Forwarded-For`` gives the client's address
    (``"*"``: any), which logs and ``max_connections_per_ip`` (429 past it) use.
    Files from ``static_dir`` carry ``page_policy`` as their
    Content-Security-Policy (the default suits the bundled client; a page with
    inline scripts needs another, or None).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int | None = 1984,
        *,
        ssl_context: ssl.SSLContext | None = None,
        static_dir: str | None = None,
        allowed_origins: Iterable[str] | None = None,
        extensions: Sequence[Extension] = (),
        compression: PerMessageDeflate | bool | None = True,
        max_connections: int = 10000,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        max_header_size: int = DEFAULT_MAX_HEADER_SIZE,
        max_queue: int = 16 << 20,
        send_timeout: float = 10.0,
        handshake_timeout: float = 10.0,
        close_timeout: float = 5.0,
        ping_interval: float = 5.0,
        ping_timeout: float | None = 20.0,
        workers: int = 0,
        max_pending_calls: int = 16,
        max_buffered: int | None = None,
        message_timeout: float = 30.0,
        max_connections_per_ip: int = 0,
        forwarded_allow_ips: Iterable[str] = (),
        health_path: str | None = "/healthz",
        metrics_path: str | None = None,
        page_policy: str | None = DEFAULT_PAGE_POLICY,
        reuse_port: bool = False,
    ):
        checks.port("port", port)
        checks.folder("static_dir", static_dir)
        checks.whole("max_connections", max_connections, 1)
        checks.whole("max_message_size", max_message_size, 1)
        checks.whole("max_header_size", max_header_size, 64)
        checks.whole("max_queue", max_queue, 1)
        checks.seconds("send_timeout", send_timeout)
        checks.seconds("handshake_timeout", handshake_timeout, positive=True)
        checks.seconds("close_timeout", close_timeout)
        checks.seconds("ping_interval", ping_interval, meaning=" (0: no pings)")
        if ping_timeout is not None:
            checks.seconds("ping_timeout", ping_timeout, meaning=" (0: never)")
        checks.whole("workers", workers, 0, " (0: handlers on the loop thread)")
        checks.whole("max_pending_calls", max_pending_calls, 1)
        checks.whole("max_connections_per_ip", max_connections_per_ip, 0, " (0: no limit)")
        if max_buffered is not None:
            checks.whole("max_buffered", max_buffered, 0, " (0: no bound)")
            if 0 < max_buffered < max_message_size:
                raise checks.SettingError("max_buffered", f"0 (no bound) or at least the largest message size "
                                          f"({max_message_size}), which must fit", max_buffered)
        checks.seconds("message_timeout", message_timeout, meaning=" (0: no limit)")
        checks.instance("host", host, str, "an address or a host name, such as '127.0.0.1'")
        checks.instance("ssl_context", ssl_context, (ssl.SSLContext, type(None)), "an ssl.SSLContext (or None)")
        if allowed_origins is not None:
            allowed_origins = checks.strings("allowed_origins", allowed_origins, "['https://chat.example']")
        forwarded_allow_ips = checks.strings("forwarded_allow_ips", forwarded_allow_ips, "['127.0.0.1']")
        self.host = host
        self.requested_port = port
        self.reuse_port = reuse_port
        self.ssl_context = ssl_context
        self.static_dir = static_dir
        self.allowed_origins = list(allowed_origins) if allowed_origins is not None else None
        if compression is True:
            compression = PerMessageDeflate()
        self.compression: PerMessageDeflate | None = compression or None
        self.extensions: tuple[Extension, ...] = (*extensions, self.compression) if self.compression else tuple(extensions)
        self.max_connections = max_connections
        self.max_message_size = max_message_size
        self.max_header_size = max_header_size
        self.max_queue = max_queue
        self.send_timeout = send_timeout
        self.handshake_timeout = handshake_timeout
        self.close_timeout = close_timeout
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout or None
        self.workers = workers
        self.max_pending_calls = max_pending_calls
        self.max_buffered = max(DEFAULT_MAX_BUFFERED, 4 * max_message_size) if max_buffered is None else max_buffered
        self.message_timeout = message_timeout
        self.max_connections_per_ip = max_connections_per_ip
        self.forwarded_allow_ips = frozenset(forwarded_allow_ips)
        self.page_policy = page_policy
        self.metrics = Metrics()
        self._gauges: dict[str, tuple[str, Callable[[], float]]] = {}  # the application's (see add_gauge)
        self._admission = Admission(
            limits=Limits(max_connections, max_connections_per_ip), extensions=self.extensions,
            allowed_origins=self.allowed_origins, forwarded_allow_ips=self.forwarded_allow_ips,
            static_dir=static_dir, page_policy=page_policy)
        if health_path:
            self.http_route(health_path, self._health)
        if metrics_path:
            self.http_route(metrics_path, self._metrics)
        self._listener: socket.socket | None = None
        self._loop: Loop | None = None
        self._thread: threading.Thread | None = None
        self._run_lock = threading.Lock()
        self._idle_hooks: list[Callable[[bool], object]] = []  # every run's loop calls them (see on_idle)

    # -- resources --------------------------------------------------------------------

    def resource(self, path: str, **handlers: Any) -> Resource:
        """Publish a WebSocket endpoint at ``path`` (see ``Resource``); also while running."""
        resource = Resource(path, **handlers)
        self._admission.add_resource(resource)
        return resource

    @property
    def resources(self) -> tuple[Resource, ...]:
        """The endpoints, longest path first (the order of routing)."""
        return self._admission.resources

    def route(self, path: str) -> Resource | None:
        """The resource that serves ``path`` (longest match), or None."""
        return self._admission.route(path)

    def http_route(self, path: str, responder: Responder) -> None:
        """Answer plain HTTP GET and HEAD requests for exactly ``path`` with
        ``responder(request)``: the bytes of a whole response (``text_response``
        builds one).  It runs on the loop thread, so it must be quick."""
        self._admission.add_http_route(path, responder)

    def _health(self, request: Request) -> bytes:
        loop = self._loop
        if loop is None or loop.stopping:
            return text_response(503, b"shutting down\n", head_only=request.method == "HEAD")
        return text_response(200, b"ok\n", head_only=request.method == "HEAD")

    def add_gauge(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        """Show ``read()`` at ``/metrics`` as the gauge ``name`` (it is called
        on the loop thread, so it must be quick)."""
        self._gauges = {**self._gauges, name: (help_text, read)}

    def _metrics(self, request: Request) -> bytes:
        loop = self._loop
        gauges = loop.gauges() if loop is not None else {}
        gauges.update((name, (help_text, read())) for name, (help_text, read) in self._gauges.items())
        body = self.metrics.render(gauges)
        return text_response(200, body, "text/plain; version=0.0.4; charset=utf-8", head_only=request.method == "HEAD")

    def settings(self) -> Settings:
        """What a run of this server is given (one per start)."""
        return Settings(
            max_queue=self.max_queue, send_timeout=self.send_timeout, handshake_timeout=self.handshake_timeout,
            close_timeout=self.close_timeout, message_timeout=self.message_timeout,
            max_connections=self.max_connections, max_message_size=self.max_message_size,
            max_header_size=self.max_header_size, max_buffered=self.max_buffered, workers=self.workers,
            max_pending_calls=self.max_pending_calls, ping_interval=self.ping_interval,
            ping_timeout=self.ping_timeout, ssl_context=self.ssl_context)

    def on_idle(self, hook: Callable[[bool], object]) -> None:
        """Have the loop call ``hook(idle)`` on its thread, in this run and
        every later one: at the end of every pass (``idle`` False), and when
        it is about to sleep (True); and before it queues a closing frame
        behind messages it read in the pass (False).  For work that gathers
        what a pass's handlers did and is best done in one go, such as an
        engine's batch of publications (the memory engine delivers it, the
        Redis engine sends it).  It must be quick and never block."""
        with self._run_lock:
            self._idle_hooks.append(hook)
            loop = self._loop
        if loop is not None:
            loop.call_soon(loop.add_idle_hook, hook)

    def deliver_published(self) -> None:
        """On the loop thread, in a handler: run the ``on_idle`` hooks now, so
        that what this pass published (an engine's batch) is queued before a
        reply the handler sends next; a client then sees the echoes of its
        earlier messages before the answer to a later request.  Elsewhere,
        nothing (a worker's calls come after that already)."""
        loop = self._loop
        if loop is not None and loop.on_loop_thread():
            loop.deliver_published()

    def remove_idle_hook(self, hook: Callable[[bool], object]) -> None:
        """The loop calls ``hook`` no more (from its next pass)."""
        with self._run_lock:
            if hook in self._idle_hooks:
                self._idle_hooks.remove(hook)
            loop = self._loop
        if loop is not None:
            loop.call_soon(loop.remove_idle_hook, hook)

    # -- life cycle ------------------------------------------------------------------

    @property
    def port(self) -> int | None:
        listener = self._listener
        return self.requested_port if listener is None else listener.getsockname()[1]

    @property
    def url(self) -> str | None:
        """``ws://host:port`` (``wss`` with TLS); None without a port (or
        before ``start`` binds a port 0 asked for)."""
        if not self.port:
            return None
        scheme = "wss" if self.ssl_context else "ws"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}"

    @property
    def running(self) -> bool:
        loop = self._loop
        return loop is not None and not loop.stopping

    def bind(self) -> None:
        """Open the listening socket (done by ``start``; raises OSError when the port is taken)."""
        with self._run_lock:
            if self._listener is not None or self.requested_port is None:
                return
            family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
            listener = socket.socket(family, socket.SOCK_STREAM)
            try:
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if self.reuse_port:
                    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                listener.bind((self.host, self.requested_port))
                listener.listen(1024)
                listener.setblocking(False)
            except OSError:
                listener.close()
                raise
            self._listener = listener

    def start(self) -> Server:
        """Bind and run the loop in a background thread; returns at once.
        Starting a server that runs already does nothing."""
        loop = self._new_loop()
        if loop is not None:
            self._thread = threading.Thread(target=named(self._serve), args=(loop,), name="wschat-loop", daemon=True)
            self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Run the loop in the calling thread until ``stop()``.  In the main
        thread, unless the program handles SIGINT itself, Ctrl-C stops it as
        ``stop()`` does (clients get 1001) and it returns, rather than a
        KeyboardInterrupt cutting through the loop."""
        loop = self._new_loop()
        if loop is None:
            raise RuntimeError("the server is running already")
        interrupt = (threading.current_thread() is threading.main_thread()
                     and signal.getsignal(signal.SIGINT) is signal.default_int_handler)
        if interrupt:
            signal.signal(signal.SIGINT, lambda *_: self.stop())
        try:
            self._serve(loop)
        finally:
            if interrupt:
                signal.signal(signal.SIGINT, signal.default_int_handler)

    def _new_loop(self) -> Loop | None:
        self.bind()
        with self._run_lock:
            if self._loop is not None:
                return None
            loop = self._loop = Loop(self.settings(), self._admission, self.metrics, self._listener)
            for hook in self._idle_hooks:
                loop.add_idle_hook(hook)
            return loop

    def _serve(self, loop: Loop) -> None:
        log.debug("listening on %s", self.url or "no port: connections are handed over")
        try:
            loop.run()
        finally:
            with self._run_lock:
                if self._loop is loop:
                    self._loop = self._listener = None
            loop.stopped.set()

    def stop(self, timeout: float | None = None, *, release_port: bool = False) -> None:
        """Close every client with 1001, wait up to ``timeout`` (``close_timeout``)
        for the closing handshakes, then release every socket and thread.
        The port is listened on until the end (upgrades meanwhile get 503),
        or with ``release_port`` let go of at once: for a process that shares
        it (SO_REUSEPORT) with one that takes over, as in a rolling restart.

        Safe from any thread, a signal handler included: it takes no lock.
        From the loop's own threads (a handler, a worker, the ping timer) it
        starts the shutdown and returns without waiting, since the shutdown
        waits for them.
        """
        timeout = self.close_timeout if timeout is None else timeout
        loop = self._loop
        if loop is None:  # bound but never served, or not running
            listener, self._listener = self._listener, None
            if listener is not None:
                listener.close()
            return
        loop.request_stop(timeout, release_port)
        if loop.is_own_thread():
            return
        loop.stopped.wait(timeout + 5)
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout + 5)

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- the public, thread-safe API ----------------------------------------------------

    def adopt(self, sock: socket.socket, data: bytes = b"") -> None:
        """Serve a plain socket that another server accepted, ``data`` being
        what it read of it already (the request head, and any bytes behind
        it): wschat answers the request as if it had read it itself.  From any
        thread; the socket is wschat's from now on (while shutting down, the
        request gets a 503 like any other).  Raises RuntimeError when the
        server is not running, and ValueError for a TLS socket; the socket is
        then closed."""
        if isinstance(sock, ssl.SSLSocket):
            sock.close()
            raise ValueError("a TLS socket cannot be handed over (its session state stays behind)")
        try:
            address = sock.getpeername()
        except OSError:  # the client left already
            sock.close()
            return
        loop = self._loop
        if loop is None or not loop.call_soon(loop.adopt, sock, address, data):
            sock.close()
            raise RuntimeError("the wschat server is not running")

    def connections(self, path: str | None = None) -> list[Connection]:
        """A snapshot of the open connections (of the resource serving ``path``)."""
        loop = self._loop
        snapshot = loop.snapshot() if loop is not None else []
        if path is None:
            return snapshot
        resource = self.route(path)
        return [conn for conn in snapshot if conn.resource is resource]

    @staticmethod
    def prepare(message: str | bytes) -> PreparedMessage:
        """Frame a message once, to send it to many (``broadcast``, ``Connection.send``)."""
        return PreparedMessage(message)

    def broadcast(
        self,
        message: str | bytes | PreparedMessage,
        *,
        path: str | None = None,
        exclude: Connection | Collection[Connection] | None = None,
        connections: Iterable[Connection] | None = None,
    ) -> int:
        """Send ``message`` to every open connection (of ``path``'s resource,
        or of ``connections``), except ``exclude`` (one or several).  Never
        blocks: a client whose queue is full is closed with 1008.  Returns
        how many it was queued for.

        Text sent to every connection (no ``connections`` given) reaches a
        client whose subprotocol is one of its resource's ``dialects`` in
        that dialect's terms: a chat client gets a chat message from "server"."""
        loop = self._loop
        if loop is None:
            return 0
        targets = self.connections(path) if connections is None else connections
        if exclude is not None:
            skip = {exclude} if isinstance(exclude, Connection) else set(exclude)
            targets = [conn for conn in targets if conn not in skip]
        if connections is None and isinstance(message, str):
            return self._broadcast_text(loop, message, targets)
        prepared = message if isinstance(message, PreparedMessage) else PreparedMessage(message)
        return loop.send_many(prepared, targets)

    @staticmethod
    def _broadcast_text(loop: Loop, text: str, targets: Iterable[Connection]) -> int:
        """``text`` to each of ``targets`` in its resource's dialect (if any),
        framed once per dialect."""
        groups: dict[Callable[[str], str] | None, list[Connection]] = {}
        for conn in targets:
            resource = conn.resource
            dialect = resource.dialects.get(conn.subprotocol or "") if resource is not None else None
            groups.setdefault(dialect, []).append(conn)
        return sum(loop.send_many(PreparedMessage(text if dialect is None else dialect(text)), conns)
                   for dialect, conns in groups.items())
