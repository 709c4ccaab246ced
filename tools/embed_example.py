"""Embedding wschat in a plain synchronous web application.

A ``http.server`` app (stand-in for a legacy Flask or Django app) starts the
chat in a background thread, then posts to it from its own request handler:

    python tools/embed_example.py            # app on :8000, chat on :1984
    curl 'http://127.0.0.1:8000/announce?text=deploy+finished'

Every client of ws://127.0.0.1:1984/chat receives "deploy finished".
Ctrl-C or SIGTERM stops both, and the chat's clients get a 1001 close.
"""

from __future__ import annotations

import argparse
import http.server
import signal
import threading
from urllib.parse import parse_qs, urlsplit

from wschat import Chat, Server
from wschat.cli import STATIC_DIR


def make_app(chat: Chat, port: int = 8000) -> http.server.ThreadingHTTPServer:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            url = urlsplit(self.path)
            if url.path != "/announce":
                self.send_error(404)
                return
            text = parse_qs(url.query).get("text", [""])[0].strip()
            if not text:
                self.reply(400, "nothing to announce: give ?text=...\n")
                return
            try:
                chat.post(text, nick="app")  # safe from this request thread
            except ValueError as exc:  # not valid Unicode
                self.reply(400, f"{exc}\n")
                return
            count = len(chat.users())
            self.reply(200, f"sent to {count} {'user' if count == 1 else 'users'}\n")

        def reply(self, status: int, text: str) -> None:
            body = text.encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--app-port", type=int, default=8000)
    parser.add_argument("--chat-port", type=int, default=1984)
    args = parser.parse_args(argv)
    server = Server("127.0.0.1", args.chat_port, static_dir=STATIC_DIR)
    chat = Chat(server)
    server.start()  # the chat runs in its own thread from here on
    app = make_app(chat, args.app_port)

    def stop(*_):  # app.shutdown() waits for serve_forever, which runs in this very thread: ask from another
        threading.Thread(target=app.shutdown).start()

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop)
    print(f"app on http://127.0.0.1:{app.server_address[1]}/announce?text=hi, chat on {server.url}/chat", flush=True)
    try:
        app.serve_forever()
    finally:
        app.server_close()
        server.stop()  # every chat client gets 1001


if __name__ == "__main__":
    main()
