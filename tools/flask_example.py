"""A Flask app and its chat on one port: the app's login is the chat's nickname.

    pip install . flask
    python tools/flask_example.py --host 127.0.0.1 --port 8000

Then open http://127.0.0.1:8000/login?user=ann (or the form on the page): the
app's page shows the chat, where ann is ann.  The WebSocket at ``/chat``
(wschat.v1) is the same port: Flask's server hands each upgrade's socket over
to wschat (``wschat.wsgi``), so no thread is held per WebSocket.  Without a
session, the upgrade is refused with 401.  Ctrl-C or SIGTERM stops both, and
the chat's clients get a 1001 close.

With gunicorn instead of Flask's server (one worker process: the chat lives in
its memory; threads for the app's requests)::

    gunicorn -w 1 -k gthread --threads 8 -b 127.0.0.1:8000 --chdir tools 'flask_example:gunicorn_app()'
"""

from __future__ import annotations

import argparse
import atexit
import html
import os
import secrets
import signal

from flask import Flask, abort, jsonify, redirect, request, send_from_directory, session, url_for
from itsdangerous import BadSignature

from wschat import Chat, HandshakeError, Server
from wschat.cli import STATIC_DIR
from wschat.handshake import Request
from wschat.names import nick_problem, normalize
from wschat.wsgi import WebSocketMiddleware

CLIENT_FILES = {"index.html", "chat.js", "chat.css", "favicon.svg"}

PAGE = """<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>Example app</title><link rel="icon" href="/chat-client/favicon.svg" type="image/svg+xml">
<style>body {{ font: 16px system-ui, sans-serif; margin: 0; display: flex; flex-direction: column; height: 100vh; }}
header {{ padding: .5rem 1rem; background: #223; color: #fff; }} header a {{ color: #adf; }}
iframe {{ flex: 1; border: 0; }} form {{ padding: 1rem; }}</style></head>
<body><header>Example app {status}</header>{content}</body></html>
"""
LOGIN_FORM = """<form action="/login"><label>User name <input name="user" required maxlength="24"></label>
<button>Log in</button> <span>{problem}</span></form>"""


def session_user(app: Flask):
    """An authorize hook for the chat: the user of the Flask session cookie; 401 without one."""
    serializer = app.session_interface.get_signing_serializer(app)
    max_age = int(app.permanent_session_lifetime.total_seconds())

    def authorize(req: Request) -> str:
        cookie = req.cookies.get(app.config["SESSION_COOKIE_NAME"])
        try:
            user = serializer.loads(cookie, max_age=max_age).get("user") if cookie else None
        except BadSignature:
            user = None
        if not user:
            raise HandshakeError(401, "log in first: /login?user=NAME", (("WWW-Authenticate", 'Cookie realm="chat"'),))
        return user

    return authorize


def create_app(secret_key: str | None = None) -> tuple[Flask, Server, Chat]:
    """The Flask app, wrapped so that ``/chat`` upgrades go to the chat's server (not started)."""
    app = Flask(__name__)
    app.secret_key = secret_key or os.environ.get("EXAMPLE_SECRET_KEY") or secrets.token_hex(32)
    server = Server(port=None)  # no port of its own: Flask's server hands the sockets over
    chat = Chat(server, "/chat", authorize=session_user(app), page_config=None)

    @app.get("/")
    def index():
        user = session.get("user")
        if user is None:
            return PAGE.format(status="", content=LOGIN_FORM.format(problem=html.escape(request.args.get("problem", ""))))
        status = f"&middot; logged in as <b>{html.escape(user)}</b> &middot; <a href=\"/logout\">log out</a>"
        return PAGE.format(status=status, content='<iframe src="/chat-client/index.html" title="Chat"></iframe>')

    @app.get("/login")
    def login():
        user = normalize(request.args.get("user", "").strip())
        problem = nick_problem(user, chat.limits.max_nick_length)
        if problem is not None:
            return redirect(url_for("index", problem=problem))
        session["user"] = user
        return redirect("/")

    @app.get("/logout")
    def logout():
        session.pop("user", None)
        return redirect("/")

    @app.get("/chat-client/<name>")
    def client(name: str):
        if name not in CLIENT_FILES:
            abort(404)
        return send_from_directory(STATIC_DIR, name)

    @app.get("/chat-client/wschat.json")
    def client_config():
        return jsonify(chat.page_config(session.get("user")))

    app.wsgi_app = WebSocketMiddleware(app.wsgi_app, server)
    return app, server, chat


def gunicorn_app() -> Flask:
    """For gunicorn's ``'flask_example:gunicorn_app()'``: called in the worker, where the chat's thread runs."""
    app, server, _ = create_app()
    server.start()
    atexit.register(server.stop)  # a worker leaving (SIGTERM to gunicorn): 1001 to every client
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    app, server, _ = create_app()
    server.start()

    def interrupt(*_):  # werkzeug's server ends on KeyboardInterrupt; make SIGTERM one
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    try:
        app.run(args.host, args.port, threaded=True)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


if __name__ == "__main__":
    main()
