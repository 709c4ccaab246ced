"""The README's embedding example: a synchronous app posts to the chat from its own threads."""

import importlib.util
import os
import threading
import urllib.request

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
                assert response.read() == b"sent to 1 users\n"
            assert ws.recv(timeout=5) == "deploy finished"
    finally:
        app.shutdown()
        app.server_close()
        thread.join(5)
        server.stop()
