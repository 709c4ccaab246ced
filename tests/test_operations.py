"""What an operator sees: health, metrics, client addresses behind a proxy, limits, headers."""

import json
import threading

import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.sync.client import connect

from wschat.chat import Chat

from .helpers import RawClient, Recorder, start_server, wait_until


def http(port, path, method="GET", headers=()):
    """One plain HTTP request; the status line, the headers (lower-cased) and the body."""
    with RawClient(port, handshake=False) as raw:
        lines = [f"{method} {path} HTTP/1.1", "Host: x", *headers]
        raw.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        data = b""
        while chunk := raw.sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status, *fields = head.decode("latin-1").split("\r\n")
    return int(status.split()[1]), {k.lower(): v for k, _, v in (f.partition(": ") for f in fields)}, body


def metrics(port):
    status, headers, body = http(port, "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_health_answers_while_serving_and_503_while_shutting_down():
    recorder = Recorder()
    server = start_server(close_timeout=30)
    server.resource("/chat", **recorder.handlers())
    assert http(server.port, "/healthz")[:1] == (200,)
    assert http(server.port, "/healthz", "HEAD")[2] == b""
    raw = RawClient(server.port)  # never answers the server's close: the shutdown waits for it
    recorder.wait("open")
    stopper = threading.Thread(target=server.stop)
    stopper.start()
    try:
        wait_until(lambda: not server.running, what="the shutdown")
        status, headers, body = http(server.port, "/healthz")
        assert (status, body) == (503, b"shutting down\n")
        with RawClient(server.port) as late:  # and no new WebSocket meanwhile
            assert late.status == 503
    finally:
        raw.close()
        stopper.join(30)


def test_metrics_parse_and_move():
    server = start_server(metrics_path="/metrics")
    Chat(server, welcome="")
    try:
        before = metrics(server.port)
        assert before[("wschat_connections", ())] == 0
        with connect(f"ws://127.0.0.1:{server.port}/chat") as a, connect(f"ws://127.0.0.1:{server.port}/chat") as b:
            a.send("hello")
            assert b.recv(timeout=5) == "hello" and a.recv(timeout=5) == "hello"
            during = metrics(server.port)
            assert during[("wschat_connections", ())] == 2
            assert during[("wschat_engine_backlog", ())] == 0  # the memory engine keeps what it is given at once
        with RawClient(server.port) as bad:
            bad.send_frame(0x3)  # a reserved opcode: 1002
            assert bad.recv_close() == 1002
        wait_until(lambda: metrics(server.port)[("wschat_closes_total", (("code", "1002"),))] == 1, what="the close")
        after = metrics(server.port)
        assert after[("wschat_http_requests_total", (("status", "101"),))] == 3
        assert after[("wschat_messages_received_total", ())] - before[("wschat_messages_received_total", ())] == 1
        assert after[("wschat_messages_sent_total", ())] - before[("wschat_messages_sent_total", ())] == 2
        assert after[("wschat_protocol_failures_total", (("code", "1002"),))] == 1
        assert after[("wschat_received_bytes_total", ())] > before[("wschat_received_bytes_total", ())]
        assert after[("wschat_sent_bytes_total", ())] > before[("wschat_sent_bytes_total", ())]
        assert after[("process_resident_memory_bytes", ())] > 1 << 20
    finally:
        server.stop()


def test_metrics_are_off_unless_asked_for():
    server = start_server()
    try:
        assert http(server.port, "/metrics")[0] == 404
    finally:
        server.stop()


@pytest.mark.parametrize("trusted, forwarded, expected", [
    ((), "203.0.113.7", "127.0.0.1"),  # no proxy trusted: the header is ignored
    (("127.0.0.1",), "203.0.113.7", "203.0.113.7"),
    (("127.0.0.1", "10.0.0.2"), "198.51.100.1, 203.0.113.7, 10.0.0.2", "203.0.113.7"),  # nearest untrusted hop
    (("127.0.0.1",), "not an address", "127.0.0.1"),
    (("*",), "198.51.100.1, 203.0.113.7", "198.51.100.1"),
])
def test_client_address_behind_a_trusted_proxy(trusted, forwarded, expected):
    recorder = Recorder()
    server = start_server(forwarded_allow_ips=trusted)
    server.resource("/chat", **recorder.handlers())
    try:
        with RawClient(server.port, headers=[f"X-Forwarded-For: {forwarded}"]):
            _, conn = recorder.wait("open")
            assert conn.client_address == expected
    finally:
        server.stop()


def test_connections_per_address_are_limited_with_429():
    server = start_server(max_connections_per_ip=2, forwarded_allow_ips=["127.0.0.1"])
    server.resource("/chat")
    try:
        first, second = RawClient(server.port), RawClient(server.port)
        assert RawClient(server.port).status == 429
        assert RawClient(server.port, headers=["X-Forwarded-For: 203.0.113.9"]).status == 101  # another client
        first.close()
        wait_until(lambda: RawClient(server.port).status == 101, what="room for one more")
        second.close()
    finally:
        server.stop()


def test_pages_and_errors_carry_security_headers(tmp_path):
    (tmp_path / "index.html").write_text("<p>hi</p>")
    server = start_server(static_dir=str(tmp_path))
    try:
        status, headers, _ = http(server.port, "/")
        assert status == 200 and "frame-ancestors 'none'" in headers["content-security-policy"]
        assert headers["x-frame-options"] == "DENY" and headers["x-content-type-options"] == "nosniff"
        for path in ["/missing", "/healthz"]:
            _, headers, _ = http(server.port, path)
            assert headers["x-content-type-options"] == "nosniff" and "frame-ancestors" in headers["content-security-policy"]
    finally:
        server.stop()


def test_the_chat_tells_the_page_where_it_is_and_its_limits():
    server = start_server()
    Chat(server, "/talk")
    try:
        status, headers, body = http(server.port, "/wschat.json")
        assert status == 200 and headers["content-type"].startswith("application/json")
        assert json.loads(body) == {"path": "/talk", "subprotocol": "wschat.v1", "history": 50,
                                    "maxLength": 2000, "maxNickLength": 24, "user": None}
        assert http(server.port, "/wschat.json", "POST")[0] == 405
    finally:
        server.stop()
