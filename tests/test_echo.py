"""tools/echo_server.py, as a conformance suite and independent clients see it (RFC 6455 and 7692)."""

import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory
from websockets.sync.client import connect

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20


def load_tool():
    spec = importlib.util.spec_from_file_location("echo_server", ROOT / "tools" / "echo_server.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def echo():
    server = load_tool().make_server("127.0.0.1", 0, max_message_size=16 * MiB)
    server.start()
    yield server
    server.stop()


def url(server, path="/any/path"):
    return f"ws://127.0.0.1:{server.port}{path}"


@pytest.mark.parametrize("compression", ["deflate", None])
@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536, 16 * MiB])
def test_messages_up_to_16_mib_in_one_frame(echo, compression, size):
    payload = os.urandom(size // 2).hex().encode() + b"x" * (size % 2)  # compressible a little
    with connect(url(echo), max_size=None, compression=compression) as ws:
        ws.send(payload)
        assert ws.recv(timeout=60) == payload
        ws.send(payload.decode())
        assert ws.recv(timeout=60) == payload.decode()


@pytest.mark.parametrize("compression", ["deflate", None])
@pytest.mark.parametrize("fragment, total", [(1, 1000), (64, 4 * MiB), (256, 16 * MiB), (1024, MiB), (65536, 16 * MiB)],
                         ids=["1B", "64B-4MiB-65536-fragments", "256B-16MiB-65536-fragments", "1KiB", "64KiB-16MiB"])
def test_messages_in_fragments(echo, compression, fragment, total):
    text = os.urandom(total // 2).hex()
    with connect(url(echo), max_size=None, compression=compression) as ws:
        ws.send(iter([text[i : i + fragment] for i in range(0, total, fragment)]))
        assert ws.recv(timeout=120) == text


@pytest.mark.parametrize("server_wbits", [None, 9, 10, 11, 12, 13, 14, 15])
@pytest.mark.parametrize("client_context, server_context", [(True, True), (True, False), (False, True), (False, False)],
                         ids=["both-keep", "client-keeps", "server-keeps", "neither"])
def test_every_window_and_context_takeover_python_websockets_offers(echo, server_wbits, client_context, server_context):
    factory = ClientPerMessageDeflateFactory(
        server_no_context_takeover=not server_context, client_no_context_takeover=not client_context,
        server_max_window_bits=server_wbits, client_max_window_bits=server_wbits or True)
    with connect(url(echo), extensions=[factory], compression=None, max_size=None) as ws:
        negotiated = ws.response.headers["Sec-WebSocket-Extensions"]
        assert negotiated.startswith("permessage-deflate; server_no_context_takeover")
        assert (f"server_max_window_bits={server_wbits}" in negotiated) == (server_wbits is not None)
        messages = ["small", "repeated words " * 5000, os.urandom(300_000), "one " * 100]
        for message in messages:  # one after another: a context, where kept, carries over
            ws.send(message)
            assert ws.recv(timeout=30) == message
        ws.send(iter(["frag", "mented " * 1000, "✓"]))
        assert ws.recv(timeout=30) == "frag" + "mented " * 1000 + "✓"


def test_an_offer_we_cannot_honour_is_declined_not_failed(echo):
    factory = ClientPerMessageDeflateFactory(server_max_window_bits=8)  # zlib cannot write with 256 bytes
    with connect(url(echo), extensions=[factory], compression=None) as ws:
        assert "Sec-WebSocket-Extensions" not in ws.response.headers
        ws.send("uncompressed then")
        assert ws.recv(timeout=5) == "uncompressed then"


def test_the_tool_without_compression_declines_it():
    server = load_tool().make_server("127.0.0.1", 0, compression=False)
    server.start()
    try:
        with connect(url(server)) as ws:  # python-websockets offers permessage-deflate
            assert "Sec-WebSocket-Extensions" not in ws.response.headers
            ws.send(b"\x00binary\xff")
            assert ws.recv(timeout=5) == b"\x00binary\xff"
    finally:
        server.stop()


# -- Node's ws, an independent implementation -----------------------------------------------


@pytest.fixture(scope="module")
def node_ws(tmp_path_factory):
    node, npm = shutil.which("node"), shutil.which("npm")
    if not (node and npm):
        if os.environ.get("WSCHAT_REQUIRE_SERVICES"):
            pytest.fail("node and npm are needed for the interop test with Node's ws")
        pytest.skip("node and npm are not installed")
    folder = tmp_path_factory.mktemp("node-ws")
    result = subprocess.run([npm, "install", "--no-audit", "--no-fund", "--prefix", str(folder), "ws@8"],
                            capture_output=True, text=True, timeout=300)
    if result.returncode:
        if os.environ.get("WSCHAT_REQUIRE_SERVICES"):
            pytest.fail(f"npm install ws failed: {result.stderr[-500:]}")
        pytest.skip(f"npm install ws failed: {result.stderr[-200:]}")
    return node, folder / "node_modules"


def test_node_ws_with_per_message_deflate(echo, node_ws):
    node, modules = node_ws
    result = subprocess.run([node, str(ROOT / "tests" / "fixtures" / "ws_echo_client.js"), url(echo)],
                            env={**os.environ, "NODE_PATH": str(modules)}, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("permessage-deflate; server_no_context_takeover; client_no_context_takeover")
