"""Test helpers: a server on a free port, and a raw client for bad input.

The raw client exists to send what well-behaved libraries refuse to send
(unmasked frames, bad UTF-8, dribbled headers); behaviour is otherwise tested
with python-websockets as the independent client.
"""

from __future__ import annotations

import base64
import os
import queue
import signal
import socket
import struct
import subprocess
import sys
import time

from wschat.frames import FrameParser, Opcode, encode_frame
from wschat.protocol import CloseReceived, ConnectionFailed, RequestReceived, ServerProtocol
from wschat.server import Server

REQUEST = (b"GET /chat HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")


def open_protocol(**kwargs) -> ServerProtocol:
    """A server protocol past its handshake (the 101 itself left out)."""
    protocol = ServerProtocol(**kwargs)
    protocol.receive_data(REQUEST)
    assert isinstance(protocol.next_event(), RequestReceived)
    protocol.accept(b"")
    return protocol


def pull(protocol: ServerProtocol, data: bytes = b"", *, answer: bool = True) -> list:
    """Feed ``data`` and pull every event; like the server, answer a peer's
    close and fail the connection on an error (unless ``answer`` is false)."""
    protocol.receive_data(data)
    events = []
    while (event := protocol.next_event()) is not None:
        events.append(event)
        if answer and isinstance(event, CloseReceived):
            protocol.acknowledge_close()
        elif answer and isinstance(event, ConnectionFailed):
            protocol.fail(event.error)
    return events


def self_signed(certificate: str, key: str) -> None:
    """A certificate and key for 127.0.0.1 and localhost, valid for a day (raises
    ``OSError`` or ``CalledProcessError`` where openssl cannot make one)."""
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", key, "-out", certificate],
                   check=True, capture_output=True)


def certificate_in(folder) -> tuple[str, str]:
    """``self_signed`` into ``folder`` (a ``pathlib.Path``): the certificate's
    and the key's paths; the test is skipped where openssl cannot make them."""
    import pytest

    cert, key = folder / "cert.pem", folder / "key.pem"
    try:
        self_signed(str(cert), str(key))
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"openssl cannot make a certificate here: {exc}")
    return str(cert), str(key)


def start_server(**kwargs) -> Server:
    kwargs.setdefault("ping_interval", 0)
    server = Server("127.0.0.1", 0, **kwargs)
    return server.start()


class RawClient:
    def __init__(self, port: int, path: str = "/chat", *, headers=(), rcvbuf: int | None = None, handshake=True,
                 ssl_context=None):
        self.sock = socket.socket()
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(10)
        self.sock.connect(("127.0.0.1", port))
        if ssl_context is not None:
            self.sock = ssl_context.wrap_socket(self.sock, server_hostname="localhost")
        self.parser = FrameParser(require_mask=False, max_payload=1 << 30)
        self.response = b""
        if handshake:
            self.handshake(path, headers)

    def handshake(self, path="/chat", headers=(), version="13"):
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [f"GET {path} HTTP/1.1", "Host: 127.0.0.1", "Upgrade: websocket", "Connection: Upgrade",
                 f"Sec-WebSocket-Key: {key}", f"Sec-WebSocket-Version: {version}", *headers]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        self.response = self.read_head()
        return self.response

    def read_head(self) -> bytes:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = self.sock.recv(4096)
            if not chunk:
                break
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        self.parser.feed(rest)
        return head

    @property
    def status(self) -> int:
        return int(self.response.split()[1])

    def send_frame(self, opcode, payload=b"", fin=True, mask=True):
        self.sock.sendall(encode_frame(opcode, payload, fin=fin, mask=os.urandom(4) if mask else None))

    def recv_frame(self):
        while (frame := self.parser.next_frame()) is None:
            data = self.sock.recv(65536)
            if not data:
                return None
            self.parser.feed(data)
        return frame

    def recv_close(self):
        """Read frames until the close; return its code (None at EOF without one)."""
        while (frame := self.recv_frame()) is not None:
            if frame.opcode == Opcode.CLOSE:
                return struct.unpack("!H", frame.payload[:2])[0] if frame.payload else 1005
        return None

    def at_eof(self) -> bool:
        """Whether the server closed the TCP connection (reads until it does)."""
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return True
        except ConnectionResetError:
            return True

    def close(self):
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


class Recorder:
    """Handlers that record events in a queue, for tests to wait on."""

    def __init__(self):
        self.events = queue.Queue()

    def on_open(self, conn):
        self.events.put(("open", conn))

    def on_message(self, conn, message):
        self.events.put(("message", conn, message))

    def on_close(self, conn, code, reason):
        self.events.put(("close", conn, code, reason))

    def on_error(self, conn, error):
        self.events.put(("error", conn, error))

    def handlers(self):
        return dict(on_open=self.on_open, on_message=self.on_message, on_close=self.on_close, on_error=self.on_error)

    def wait(self, kind, timeout=10, conn=None):
        """The next event of ``kind`` (for ``conn``, when given); others are dropped."""
        while True:
            event = self.events.get(timeout=timeout)
            if event[0] == kind and (conn is None or event[1] is conn):
                return event


def wait_until(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    """Poll ``predicate`` until true, for states that no event announces
    (a thread blocked inside a call, a counter reaching a value)."""
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.002)


def blocked_in(thread, function: str) -> bool:
    """Whether ``thread`` is inside a call to a function named ``function``."""
    frame = sys._current_frames().get(thread.ident)
    while frame is not None:
        if frame.f_code.co_name == function:
            return True
        frame = frame.f_back
    return False


def server_with_slow_client(max_queue, **kwargs):
    """A server, its recorder, and a client that connected and never reads."""
    recorder = Recorder()
    server = start_server(max_queue=max_queue, close_timeout=kwargs.pop("close_timeout", 0.5), **kwargs)
    server.resource("/chat", **recorder.handlers())
    slow = RawClient(server.port, rcvbuf=4096)
    _, slow_conn = recorder.wait("open")
    return server, recorder, slow, slow_conn


def wait_for_port(port: int, process: subprocess.Popen) -> None:
    """Wait until something listens on 127.0.0.1:``port``, while ``process`` lives (20 s at most)."""
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
            time.sleep(0.05)


def stop_process(process: subprocess.Popen, signum: int = signal.SIGTERM, timeout: float = 20) -> tuple[int, str]:
    """Send ``signum``, wait (killing it past ``timeout``): its exit code and standard error."""
    process.send_signal(signum)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
    _, err = process.communicate()
    return process.returncode, err or ""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """Debian's redis-server on a free 127.0.0.1 port, in ``directory``; an
    append-only file written at every command keeps its data across ``kill``."""

    BINARY = "/usr/bin/redis-server"

    def __init__(self, directory, persistent: bool = True, password: str | None = None, tls: bool = False):
        self.port = free_port()
        self.directory = directory
        self.persistent = persistent
        self.password = password  # requirepass
        self.certificate = os.path.join(directory, "redis.crt") if tls else None  # self-signed, for 127.0.0.1
        self.process = None

    @property
    def url(self) -> str:
        scheme = "rediss" if self.certificate else "redis"
        return f"{scheme}://{f':{self.password}@' if self.password else ''}127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        import subprocess

        import redis

        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if self.persistent else ["--appendonly", "no"]
        listen = ["--port", str(self.port)]
        if self.certificate:  # TLS only (rediss://), with a certificate made here
            key = os.path.join(self.directory, "redis.key")
            self_signed(self.certificate, key)
            listen = ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", self.certificate,
                      "--tls-key-file", key, "--tls-ca-cert-file", self.certificate, "--tls-auth-clients", "no"]
        self.process = subprocess.Popen(
            [self.BINARY, *listen, "--bind", "127.0.0.1", "--save", "", *persistence,
             "--dir", str(self.directory), "--protected-mode", "no",
             *(["--requirepass", self.password] if self.password else [])],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=1, password=self.password,
                             ssl=bool(self.certificate), ssl_ca_certs=self.certificate)
        try:
            wait_until(lambda: self._answers(client), what="redis-server to answer")
        except BaseException:
            self.kill()  # (the fixture that started it never gets to)
            raise
        finally:
            client.close()
        return self

    def _answers(self, client) -> bool:
        assert self.process.poll() is None, "redis-server exited"
        try:
            return client.ping()
        except Exception:  # not listening yet
            return False

    def kill(self) -> None:
        """As a crash would: no chance to save or to say goodbye."""
        self.process.kill()
        self.process.wait()


def free_cluster_port() -> int:
    """A free 127.0.0.1 port whose cluster bus port (+10000) is free too."""
    for _ in range(200):
        port = 20000 + int.from_bytes(os.urandom(2), "big") % 25000
        try:
            for candidate in (port, port + 10000):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


class RedisCluster:
    """A Redis Cluster of Debian's redis-server on 127.0.0.1: ``masters``
    masters with a replica each, made one cluster by ``redis-cli --cluster
    create``; a node that stops answering is failed over within a second or two."""

    CLI = "/usr/bin/redis-cli"

    def __init__(self, directory, masters: int = 3):
        self.directory = directory
        self.ports = [free_cluster_port() for _ in range(masters * 2)]
        self.processes: dict[int, subprocess.Popen] = {}

    def url(self, port: int) -> str:
        return f"redis://127.0.0.1:{port}/0"

    def start(self) -> RedisCluster:
        for port in self.ports:
            directory = os.path.join(self.directory, str(port))
            os.makedirs(directory, exist_ok=True)
            self.processes[port] = subprocess.Popen(
                [RedisServer.BINARY, "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
                 "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "1000", "--save", "",
                 "--appendonly", "no", "--dir", directory, "--protected-mode", "no"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for port in self.ports:
            wait_until(lambda: self.cli(port, "PING") == "PONG", what=f"redis-server on {port} to answer")
        subprocess.run([self.CLI, "--cluster", "create", *(f"127.0.0.1:{port}" for port in self.ports),
                        "--cluster-replicas", "1", "--cluster-yes"], check=True, capture_output=True, timeout=60)
        wait_until(self.ready, timeout=30, what="the cluster to be ready")
        return self

    def cli(self, port: int, *command: str) -> str:
        result = subprocess.run([self.CLI, "-p", str(port), *command], capture_output=True, text=True, timeout=10)
        return result.stdout.strip()

    def ready(self) -> bool:
        """Every live node sees every slot served, and agrees on the masters."""
        views = {port: self.cli(port, "CLUSTER", "INFO") for port in self.alive()}
        return all("cluster_state:ok" in view for view in views.values()) and len(
            {tuple(self.masters(port)) for port in views}) == 1

    def alive(self) -> list[int]:
        return [port for port, process in self.processes.items() if process.poll() is None]

    def masters(self, asked: int | None = None) -> list[int]:
        """The masters' ports, as node ``asked`` (any live one) sees them."""
        asked = asked or self.alive()[0]
        lines = self.cli(asked, "CLUSTER", "NODES").splitlines()
        return sorted(int(line.split()[1].split(":")[1].split("@")[0]) for line in lines
                      if "master" in line.split()[2] and "fail" not in line.split()[2])

    def in_sync(self) -> bool:
        """Every replica has everything its master wrote."""
        for port in self.masters():
            info = dict(line.split(":", 1) for line in self.cli(port, "INFO", "replication").splitlines() if ":" in line)
            offset = info.get("master_repl_offset")
            if not any(value.endswith(f"offset={offset},lag=0") or f"offset={offset}," in value
                       for key, value in info.items() if key.startswith("slave")):
                return False
        return True

    def kill(self, port: int) -> None:
        self.processes[port].kill()
        self.processes[port].wait()

    def stop(self) -> None:
        for process in self.processes.values():
            process.kill()
            process.wait()
