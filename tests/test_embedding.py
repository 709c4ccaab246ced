"""The README's embedding example: a synchronous app posts to the chat from its own threads."""

import importlib.util
import os
import re
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import pytest
from websockets.exceptions import ConnectionClosedOK
from websockets.sync.client import connect

from wschat.chat import Chat

from .helpers import start_server

EXAMPLE = os.path.join(os.path.dirname(__file__), os.pardir, "tools", "embed_example.py")


def load_example():
    spec = importlib.util.spec_from_file_location("embed_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_app_request_handler_posts_to_chat():
    example = load_example()
    server = start_server()
    chat = Chat(server, welcome="")
    app = example.make_app(chat, port=0)
    thread = threading.Thread(target=app.serve_forever)
    thread.start()
    try:
        with connect(f"ws://127.0.0.1:{server.port}/chat") as ws:
            url = f"http://127.0.0.1:{app.server_address[1]}/announce?text=deploy+finished"
            with urllib.request.urlopen(url, timeout=5) as response:
                assert response.read() == b"sent to 1 user\n"  # 6ddb637: "1 users"
            assert ws.recv(timeout=5) == "deploy finished"
    finally:
        app.shutdown()
        app.server_close()
        thread.join(5)
        server.stop()


def test_empty_or_invalid_announcements_are_refused():
    example = load_example()
    server = start_server()
    chat = Chat(server, welcome="")
    app = example.make_app(chat, port=0)
    thread = threading.Thread(target=app.serve_forever)
    thread.start()
    try:
        for query in ["", "?text=", "?text=+++"]:
            url = f"http://127.0.0.1:{app.server_address[1]}/announce{query}"
            with pytest.raises(urllib.error.HTTPError) as info:
                urllib.request.urlopen(url, timeout=5)
            assert info.value.code == 400
    finally:
        app.shutdown()
        app.server_close()
        thread.join(5)
        server.stop()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_the_example_stops_on_a_signal_and_closes_its_clients_with_1001(signum):
    process = subprocess.Popen([sys.executable, EXAMPLE, "--app-port", "0", "--chat-port", "0"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        chat_port = int(re.search(r"chat on ws://127\.0\.0\.1:(\d+)/chat", line).group(1))
        with connect(f"ws://127.0.0.1:{chat_port}/chat") as ws:
            ws.recv(timeout=5)  # the welcome
            process.send_signal(signum)
            with pytest.raises(ConnectionClosedOK) as info:
                ws.recv(timeout=10)
            assert info.value.rcvd.code == 1001
        assert process.wait(10) == 0
    finally:
        process.kill()
        process.communicate()
