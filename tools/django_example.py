"""A Django app and its chat on one port: the Django login is the chat's nickname.

    pip install -e '.[examples]'
    gunicorn -w 1 -k gthread --threads 8 -b 127.0.0.1:8000 --chdir tools 'django_example:application()'

Then open http://127.0.0.1:8000/ and log in: the app's page shows the chat,
where you are your Django user.  The WebSocket at ``/chat`` (wschat.v1) is on
the same port: gunicorn hands each upgrade's socket over to wschat
(``wschat.wsgi``), so no worker thread is held per WebSocket.  Without a
Django session the upgrade is refused with 401.  ``/announce?text=...`` is
a Django view that tells every chat client with ``Server.broadcast``.

One worker process (the chat lives in its memory), threads for the app's
requests.  The whole project is this file: settings in code, users and
sessions in SQLite (``DJANGO_EXAMPLE_DB``, default in the temporary folder).
For a demo, logging in needs only a user name; a real app has passwords.
"""

from __future__ import annotations

import atexit
import os
import secrets
import tempfile
from importlib import import_module
from urllib.parse import urlencode

import django
from django.conf import settings

settings.configure(
    DEBUG=False,
    ALLOWED_HOSTS=["127.0.0.1", "localhost", "[::1]"],
    SECRET_KEY=os.environ.get("DJANGO_EXAMPLE_SECRET_KEY") or secrets.token_hex(32),
    ROOT_URLCONF=__name__,
    INSTALLED_APPS=["django.contrib.auth", "django.contrib.contenttypes", "django.contrib.sessions"],
    MIDDLEWARE=["django.contrib.sessions.middleware.SessionMiddleware",
                "django.contrib.auth.middleware.AuthenticationMiddleware"],
    DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3",
                           "NAME": os.environ.get("DJANGO_EXAMPLE_DB")
                           or os.path.join(tempfile.gettempdir(), "wschat-django-example.sqlite3")}},
    USE_TZ=True,
)
django.setup()

from django.contrib import auth  # noqa: E402 (Django's modules need the settings first)
from django.contrib.auth.models import User  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.db import close_old_connections  # noqa: E402
from django.http import FileResponse, Http404, HttpRequest, HttpResponse, JsonResponse  # noqa: E402
from django.shortcuts import redirect  # noqa: E402
from django.urls import path  # noqa: E402
from django.utils.html import escape  # noqa: E402

SessionStore = import_module(settings.SESSION_ENGINE).SessionStore

from wschat import Chat, HandshakeError, Server  # noqa: E402
from wschat.cli import STATIC_DIR  # noqa: E402
from wschat.handshake import Request  # noqa: E402
from wschat.names import nick_problem, normalize  # noqa: E402
from wschat.wsgi import WebSocketMiddleware  # noqa: E402

CLIENT_FILES = {"index.html", "chat.js", "chat.css", "favicon.svg"}
PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Django app</title>
<style>body {{ font: 16px system-ui, sans-serif; margin: 0; display: flex; flex-direction: column; height: 100vh; }}
header {{ padding: .5rem 1rem; background: #0c4b33; color: #fff; }} header a {{ color: #cfe; }}
iframe {{ flex: 1; border: 0; }} form {{ padding: 1rem; }}</style></head>
<body><header>Django app {status}</header>{content}</body></html>
"""
CHAT_FRAME = '<iframe src="/chat-client/index.html" title="Chat"></iframe>'
LOGIN_FORM = """<form action="/login"><label>User name <input name="user" required maxlength="24"></label>
<button>Log in</button> <span>{problem}</span></form>"""

# The chat: no port of its own (gunicorn hands the sockets over); its authorize
# hook looks the session up in the database, so it runs on worker threads.
server = Server(port=None, workers=2)


def session_user(req: Request) -> User:
    """The chat's authorize hook: the Django user of the session cookie; 401 without one."""
    request = HttpRequest()
    request.session = SessionStore(session_key=req.cookies.get(settings.SESSION_COOKIE_NAME))
    try:
        user = auth.get_user(request)  # checks the session's password hash as Django's middleware does
    finally:
        close_old_connections()  # this thread is wschat's, not a Django request's
    if not user.is_authenticated or not user.is_active:
        raise HandshakeError(401, "log in first", (("WWW-Authenticate", 'Cookie realm="chat"'),))
    return user


chat = Chat(server, "/chat", authorize=session_user, nick_of=User.get_username, page_config=None)


def index(request):
    if not request.user.is_authenticated:
        problem = escape(request.GET.get("problem", ""))
        return HttpResponse(PAGE.format(status="", content=LOGIN_FORM.format(problem=problem)))
    name = escape(request.user.get_username())
    status = f'&middot; logged in as <b>{name}</b> &middot; <a href="/logout">log out</a>'
    return HttpResponse(PAGE.format(status=status, content=CHAT_FRAME))


def login(request):
    name = normalize(request.GET.get("user", "").strip())
    problem = nick_problem(name, chat.limits.max_nick_length)
    if problem is not None:
        return redirect("/?" + urlencode({"problem": problem}))
    user, _ = User.objects.get_or_create(username=name)
    auth.login(request, user)
    return redirect("/")


def logout(request):
    auth.logout(request)
    return redirect("/")


def announce(request):
    """A Django view that tells every chat client: ``Server.broadcast``, safe from any thread."""
    if not request.user.is_authenticated:
        return HttpResponse("log in first\n", status=401, content_type="text/plain")
    text = request.GET.get("text", "").strip()
    if not text:
        return HttpResponse("nothing to announce: give ?text=...\n", status=400, content_type="text/plain")
    count = server.broadcast(f"{request.user.get_username()} announces: {text}")
    return HttpResponse(f"sent to {count} {'client' if count == 1 else 'clients'}\n", content_type="text/plain")


def client_file(request, name: str):
    if name not in CLIENT_FILES:
        raise Http404(name)
    return FileResponse(open(os.path.join(STATIC_DIR, name), "rb"))


def client_config(request):
    return JsonResponse(chat.page_config(request.user if request.user.is_authenticated else None))


urlpatterns = [
    path("", index),
    path("login", login),
    path("logout", logout),
    path("announce", announce),
    path("chat-client/wschat.json", client_config),
    path("chat-client/<str:name>", client_file),
]


def application():
    """For gunicorn's ``'django_example:application()'``: called in the worker,
    where the chat's thread runs."""
    from django.core.wsgi import get_wsgi_application

    call_command("migrate", run_syncdb=True, verbosity=0)  # users and sessions
    app = WebSocketMiddleware(get_wsgi_application(), server)
    server.start()
    atexit.register(server.stop)  # a worker leaving (SIGTERM to gunicorn): 1001 to every client
    return app
