"""Embedding wschat in a plain synchronous web application.

A ``http.server`` app (stand-in for a legacy Flask or Django app) starts the
chat in a background thread, then posts to it from its own request handler:

    python tools/embed_example.py            # app on :8000, chat on :1984
    curl 'http://127.0.0.1:8000/announce?text=deploy+finished'

Every client of ws://127.0.0.1:1984/chat receives "deploy finished".
"""

from __future__ import annotations

import http.server
import threading
from urllib.parse import parse_qs, urlsplit

from wschat import Chat, Server
from wschat.__main__ import STATIC_DIR


def make_app(chat: Chat, port: int = 8000) -> http.server.ThreadingHTTPServer:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            url = urlsplit(self.path)
            if url.path != "/announce":
                self.send_error(404)
                return
            text = parse_qs(url.query).get("text", [""])[0]
            chat.post(text, nick="app")  # safe from this request thread
            body = f"sent to {len(chat.users())} users\n".encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)


def main(app_port: int = 8000, chat_port: int = 1984) -> None:
    server = Server("127.0.0.1", chat_port, static_dir=STATIC_DIR)
    chat = Chat(server)
    server.start()  # the chat runs in its own thread from here on
    app = make_app(chat, app_port)
    print(f"app on http://127.0.0.1:{app_port}/announce?text=hi, chat on {server.url}/chat")
    try:
        app.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        app.server_close()
        server.stop()


if __name__ == "__main__":
    main()
