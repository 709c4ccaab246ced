"""docs/deploying.rst as written: its nginx configuration in front of ``python -m wschat``.

Needs Debian's nginx (``.ci/run`` installs it); skipped with the reason where
it is absent, unless WSCHAT_REQUIRE_SERVICES=1 (set by CI) makes that a failure.
"""

import contextlib
import http.client
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from .helpers import free_port, stop_process, wait_for_port

ROOT = Path(__file__).resolve().parent.parent
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"

if not os.path.exists(NGINX) and not os.environ.get("WSCHAT_REQUIRE_SERVICES"):
    pytest.skip(f"nginx is not installed at {NGINX} (apt-get install nginx)", allow_module_level=True)


def documented_block(start: str, end: str) -> str:
    """A configuration block of docs/deploying.rst, as a reader would copy it."""
    text = (ROOT / "docs" / "deploying.rst").read_text(encoding="utf-8")
    block = text.split(start, 1)[1].split(end, 1)[0]
    lines = ("    " + start + block).splitlines()
    return "\n".join(line[4:] for line in lines).strip() + "\n"


MAP_BLOCK = ("map $http_upgrade $connection_upgrade {", "\n    upstream wschat {")


def run_behind_nginx(tmp_path, config: str, upstreams: dict[str, subprocess.Popen]):
    """nginx with ``config`` (``listen 80`` made a free loopback port) in front of
    ``upstreams`` (port -> process, stopped afterwards): yields nginx's port."""
    nginx_port = free_port()
    config = config.replace("listen 80;", f"listen 127.0.0.1:{nginx_port};")
    (tmp_path / "logs").mkdir()
    (tmp_path / "nginx.conf").write_text(
        f"pid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/logs/error.log;\nevents {{}}\n"
        f"http {{\naccess_log off;\nclient_body_temp_path {tmp_path};\nproxy_temp_path {tmp_path};\n{config}}}\n")
    nginx = subprocess.Popen([NGINX, "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"), "-g", "daemon off;"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for port, process in upstreams.items():
            wait_for_port(port, process)
        wait_for_port(nginx_port, nginx)
        yield nginx_port
    finally:
        for process in (nginx, *upstreams.values()):
            stop_process(process, timeout=10)


def start_wschat(port: int, *options: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "wschat", "--host", "127.0.0.1", "--port", str(port),
         "--forwarded-allow-ip", "127.0.0.1", "--welcome", "", "--log-level", "warning", *options],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture
def behind_nginx(tmp_path, request):
    """wschat as the guide runs it (and ``request.param``'s options), nginx in front: nginx's port."""
    wschat_port = free_port()
    wschat = start_wschat(wschat_port, "--metrics", *getattr(request, "param", ()))
    config = documented_block(*MAP_BLOCK) + documented_block("upstream wschat {", "\nand wschat behind it")
    config = config.replace("server 127.0.0.1:1984;", f"server 127.0.0.1:{wschat_port};")
    assert str(wschat_port) in config
    yield from run_behind_nginx(tmp_path, config, {wschat_port: wschat})


@pytest.fixture
def site_behind_nginx(tmp_path):
    """The guide's site: an application (on gunicorn) and wschat, nginx in front: nginx's port."""
    if importlib.util.find_spec("gunicorn") is None and not os.environ.get("WSCHAT_REQUIRE_SERVICES"):
        pytest.skip("gunicorn is not installed (pip install -e '.[test]')")
    app_port, wschat_port = free_port(), free_port()
    app = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-b", f"127.0.0.1:{app_port}", "--chdir", str(ROOT / "tests" / "fixtures"),
         "site_app:app"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "HOME": str(tmp_path)})
    wschat = start_wschat(wschat_port)
    config = documented_block(*MAP_BLOCK) + documented_block("upstream app {", "\nwith the application and wschat")
    config = config.replace("server 127.0.0.1:8000;", f"server 127.0.0.1:{app_port};")
    config = config.replace("server 127.0.0.1:1984;", f"server 127.0.0.1:{wschat_port};")
    assert str(app_port) in config and str(wschat_port) in config
    yield from run_behind_nginx(tmp_path, config, {app_port: app, wschat_port: wschat})


def test_the_documented_site_sends_the_chat_to_wschat_and_the_rest_to_the_app(site_behind_nginx):
    port = site_behind_nginx
    for room in ("/chat", "/chat/lobby"):
        with connect(f"ws://127.0.0.1:{port}{room}") as a, connect(f"ws://127.0.0.1:{port}{room}") as b:
            a.send(f"hello {room}")
            assert b.recv(timeout=5) == f"hello {room}"
    for path, expected in [("/", b"the app served /\n"), ("/chatter", b"the app served /chatter\n"),
                           ("/account?x=1", b"the app served /account\n")]:
        client = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        client.request("GET", path)
        response = client.getresponse()
        assert (response.status, response.read()) == (200, expected)
    client = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    client.request("GET", "/wschat.json")
    response = client.getresponse()
    assert response.status == 200 and json.loads(response.read())["path"] == "/chat"


def test_the_documented_nginx_config_passes_websockets_pages_and_health(behind_nginx):
    port = behind_nginx
    with connect(f"ws://127.0.0.1:{port}/chat") as a, connect(f"ws://127.0.0.1:{port}/chat") as b:
        a.send("through nginx")
        assert b.recv(timeout=5) == "through nginx"
    client = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    client.request("GET", "/")
    response = client.getresponse()
    assert response.status == 200 and b"chat.js" in response.read()
    client = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    client.request("GET", "/healthz")
    assert client.getresponse().status == 200


@pytest.mark.parametrize("behind_nginx", [("--max-connections-per-ip", "1")], indirect=True)
def test_behind_nginx_wschat_sees_each_client_not_the_proxy(behind_nginx):
    port = behind_nginx
    # nginx appends the address it saw; wschat trusts nginx (127.0.0.1) and takes the hop before it.
    # The test's clients are all on 127.0.0.1, so a header they send stands in for their real addresses.
    url = f"ws://127.0.0.1:{port}/chat"
    with connect(url, additional_headers={"X-Forwarded-For": "203.0.113.1"}), \
            connect(url, additional_headers={"X-Forwarded-For": "203.0.113.2"}):  # two clients, one proxy
        with pytest.raises(InvalidStatus) as info:
            connect(url, additional_headers={"X-Forwarded-For": "203.0.113.1"})
        assert info.value.response.status_code == 429  # the first client's second connection
        client = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        client.request("GET", "/metrics")
        response = client.getresponse()
        assert response.status == 200  # allowed from 127.0.0.1 only, by the config
        assert re.search(rb"^wschat_connections 2$", response.read(), re.M)


def test_the_documented_pool_is_one_chat_across_processes(tmp_path, redis_server):
    """Two wschat processes on one Redis, nginx in front: clients land on both
    (round robin) and are in one chat."""
    ports = [free_port(), free_port()]
    pool = {port: start_wschat(port, "--redis", redis_server.url, "--metrics") for port in ports}
    config = documented_block(*MAP_BLOCK) + documented_block("upstream wschat_pool {", "\nand on each machine")
    config = config.replace("server 10.0.0.11:1984;", f"server 127.0.0.1:{ports[0]};")
    config = config.replace("server 10.0.0.12:1984;", f"server 127.0.0.1:{ports[1]};")
    assert all(str(port) in config for port in ports)
    (tmp_path / "nginx").mkdir()
    for nginx_port in run_behind_nginx(tmp_path / "nginx", config, pool):
        url = f"ws://127.0.0.1:{nginx_port}/chat"
        with contextlib.ExitStack() as stack:
            clients = [stack.enter_context(connect(f"{url}?nick=n{i}", subprotocols=["wschat.v1"])) for i in range(4)]
            for ws in clients:
                assert json.loads(ws.recv(timeout=5))["type"] == "welcome"
            clients[0].send(json.dumps({"type": "message", "text": "to the pool"}))
            for ws in clients:
                while (event := json.loads(ws.recv(timeout=5)))["type"] != "message":
                    pass
                assert event["text"] == "to the pool"
            clients[-1].send(json.dumps({"type": "users"}))
            while (event := json.loads(clients[-1].recv(timeout=5)))["type"] != "users":
                pass
            assert event["users"] == ["n0", "n1", "n2", "n3"]
            for port in ports:  # nginx spread the clients: both processes serve some
                client = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                client.request("GET", "/metrics")
                served = re.search(rb"^wschat_connections (\d+)$", client.getresponse().read(), re.M)
                assert int(served.group(1)) >= 1
