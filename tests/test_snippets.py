"""README.rst and docs/*.rst as a contract: every code block a reader would
paste runs here as written (issue 21).

Each block is found by its first line in ``HOW`` below, which says how it is
run; a block that is not there fails ``test_every_block_has_a_way_to_be_run``,
so a snippet cannot be added without a test.  What is changed to run it on a
test machine, and nothing else: ports become free ones, other machines'
addresses (10.0.0.x, 0.0.0.0) become 127.0.0.1 (and a command that listens
on the default port is given a free one), Redis's URL the test's own
redis-server, ``python``, ``gunicorn`` and ``wschat`` this interpreter's, and
docs/deploying.rst's ``myapp:app`` (the reader's own app) a small WSGI app.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from .helpers import free_port, stop_process, wait_for_port

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = ["README.rst", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.rst"))]


def literal_blocks() -> list[tuple[str, str]]:
    """(document, text) of every literal block, as docutils reads them."""
    import docutils.core
    import docutils.nodes

    blocks = []
    for name in DOCUMENTS:
        tree = docutils.core.publish_doctree((ROOT / name).read_text(encoding="utf-8"),
                                             settings_overrides={"report_level": 5})
        blocks += [(name, node.astext()) for node in tree.findall(docutils.nodes.literal_block)]
    return blocks


def first_line(text: str) -> str:
    return text.strip().splitlines()[0].strip()


class Localized:
    """A snippet's text made to run here (see the module docstring)."""

    PORTS = ("1984", "8000", "9001")

    def __init__(self, text: str, redis_url: str | None = None):
        self.ports = {port: free_port() for port in self.PORTS if re.search(rf"\b{port}\b", text)}
        for port, free in self.ports.items():
            text = re.sub(rf"\b{port}\b", str(free), text)
        text = re.sub(r"\b10\.0\.0\.\d+\b|\b0\.0\.0\.0\b", "127.0.0.1", text)
        if redis_url:
            text = re.sub(r"redis://127\.0\.0\.1:6379/0", redis_url, text)
        self.text = text.replace("myapp:app", "--chdir tests/fixtures site_app:app")

    @property
    def port(self) -> int:
        return next(iter(self.ports.values()))


def command(line: str) -> list[str]:
    """A shell line (its comment dropped) as argv, with this interpreter's programs."""
    argv = shlex.split(line, comments=True)
    programs = {"python": [sys.executable], "gunicorn": [sys.executable, "-m", "gunicorn"],
                "wschat": [sys.executable, "-m", "wschat"]}
    return programs[argv[0]] + argv[1:] if argv[0] in programs else argv


def start(argv: list[str], tmp_path: Path) -> subprocess.Popen:
    env = {**os.environ, "HOME": str(tmp_path)}  # gunicorn writes its control socket under HOME
    return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def get(port: int, target: str, headers: dict | None = None) -> tuple[int, str]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    connection.request("GET", target, headers=headers or {})
    response = connection.getresponse()
    result = response.status, response.read().decode("utf-8", "replace")
    connection.close()
    return result


# -- what a running snippet must do ------------------------------------------------------


def chats(port: int) -> None:
    with connect(f"ws://127.0.0.1:{port}/chat", subprotocols=["wschat.v1"]) as ws:
        assert json.loads(ws.recv(timeout=10))["type"] == "welcome"


def serves_a_page_and_chats(port: int) -> None:
    assert get(port, "/")[0] == 200
    chats(port)


def flask_on_its_port(port: int) -> None:
    assert get(port, "/") == (200, "the app's own pages, on the chat's port")
    chats(port)


def authorizes_from_the_session_cookie(port: int) -> None:
    with pytest.raises(InvalidStatus) as info:
        connect(f"ws://127.0.0.1:{port}/feed")
    assert info.value.response.status_code == 401
    cookie = {"Cookie": "session=8f14e45f"}
    with connect(f"ws://127.0.0.1:{port}/feed", additional_headers=cookie) as ws:
        assert ws.recv(timeout=10) == "hi alice"
    with connect(f"ws://127.0.0.1:{port}/chat", subprotocols=["wschat.v1"], additional_headers=cookie) as ws:
        assert json.loads(ws.recv(timeout=10))["nick"] == "Alice"


def echoes(port: int) -> None:
    with connect(f"ws://127.0.0.1:{port}/echo") as ws:
        for message in ("text", b"\x00binary"):
            ws.send(message)
            assert ws.recv(timeout=10) == message


def listens(port: int) -> None:
    """A server line: that it listens and stops cleanly is the check."""


def answers_health(port: int) -> None:
    assert get(port, "/healthz") == (200, "ok\n")


# -- how each block is run -------------------------------------------------------------------

# first line -> (how, check): "python" runs the block as a script (a server
# one, ending in serve_forever or app.run, is checked while it runs, then
# stopped); "lines" starts each line as a server and checks it; the rest say
# which test runs them.
HOW = {
    "python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/python -m wschat":
        ("tests/test_readme.py", None),
    "python3 -m venv .venv && .venv/bin/pip install -e '.[test]' && .venv/bin/python -m coverage run -m pytest "
    "&& .venv/bin/python -m coverage combine -q && .venv/bin/python -m coverage report":
        ("tests/test_readme.py", None),
    "python tools/echo_server.py --port 9001": ("lines", echoes),
    "python -m wschat --redis redis://127.0.0.1:6379/0                    # one process": ("lines", chats),
    "upstream wschat {": ("the pool in docs/deploying.rst", None),
    "from wschat import Chat, Server": ("python", None),
    "from flask import Flask": ("python", flask_on_its_port),
    "python tools/flask_example.py --host 127.0.0.1 --port 8000": ("lines", listens),
    "gunicorn -w 1 -k gthread --threads 8 -b 127.0.0.1:8000 --chdir tools 'django_example:application()'":
        ("tests/test_django.py", None),
    "from wschat import Chat, HandshakeError, Server": ("python", authorizes_from_the_session_cookie),
    "import logging": ("python", echoes),
    "python tools/bench.py                       # 3 rounds: fanout, large-64k, large-1m, idle, churn":
        ("bench options", None),
    "python3 -m venv /opt/wschat && /opt/wschat/bin/pip install /path/to/wschat": ("install", None),
    "map $http_upgrade $connection_upgrade {": ("tests/test_deploy.py", None),
    "wschat --host 127.0.0.1 --port 1984 --forwarded-allow-ip 127.0.0.1 --metrics": ("lines", answers_health),
    "upstream app {": ("tests/test_deploy.py", None),
    "gunicorn -b 127.0.0.1:8000 myapp:app": ("lines", listens),
    "upstream wschat_pool {": ("tests/test_deploy.py", None),
    "wschat --host 0.0.0.0 --port 1984 --forwarded-allow-ip 10.0.0.10 --redis redis://10.0.0.20:6379/0 --processes 0":
        ("lines", serves_a_page_and_chats),
    "[Unit]": ("install", None),
}
BLOCKS = literal_blocks()


def blocks_run_as(how: str) -> list[tuple[str, str]]:
    return [(name, text) for name, text in BLOCKS if HOW.get(first_line(text), (None,))[0] == how]


def ids(blocks):
    return [f"{name}:{first_line(text)[:40]}" for name, text in blocks]


def test_every_block_has_a_way_to_be_run():
    unknown = [f"{name}: {first_line(text)}" for name, text in BLOCKS if first_line(text) not in HOW]
    assert not unknown, "a new code block: say in HOW how it is run\n" + "\n".join(unknown)
    gone = set(HOW) - {first_line(text) for _, text in BLOCKS}
    assert not gone, f"HOW names blocks no document has any more: {gone}"
    from .test_django import readme_command
    from .test_readme import readme_commands

    read_by = {"tests/test_readme.py": readme_commands(), "tests/test_django.py": [readme_command()],
               "tests/test_deploy.py": (ROOT / "tests" / "test_deploy.py").read_text(encoding="utf-8")}
    for name, text in BLOCKS:  # a block another test runs is one that test reads
        how = HOW[first_line(text)][0]
        if how in read_by:
            assert first_line(text) in read_by[how], (name, how)


def test_readmes_pool_is_the_one_the_deployment_guide_runs():
    [(_, fragment)] = blocks_run_as("the pool in docs/deploying.rst")
    [(_, pool)] = [(n, t) for n, t in BLOCKS if first_line(t) == "upstream wschat_pool {"]
    assert [line for line in fragment.splitlines() if "server " in line] == \
        [line for line in pool.splitlines() if "server 10." in line]


@pytest.mark.parametrize("name,text", blocks_run_as("python"), ids=ids(blocks_run_as("python")))
def test_a_python_snippet_runs_as_written(name, text, tmp_path):
    local = Localized(text)
    check = HOW[first_line(text)][1]
    process = start([sys.executable, "-c", local.text], tmp_path)
    if check is None:  # runs to its end
        out, err = process.communicate(timeout=60)
        assert process.returncode == 0, err
        return
    try:
        wait_for_port(local.port, process)
        check(local.port)
    finally:
        code, err = stop_process(process, signal.SIGINT)
    assert code == 0, err  # Ctrl-C, as the reader would stop it: no KeyboardInterrupt traceback


@pytest.mark.parametrize("name,text", blocks_run_as("lines"), ids=ids(blocks_run_as("lines")))
def test_each_command_line_serves_as_written_and_stops_on_sigterm(name, text, tmp_path, request):
    redis_url = request.getfixturevalue("redis_server").url if "redis://" in text else None
    check = HOW[first_line(text)][1]
    for line in Localized(text, redis_url).text.splitlines():
        argv = command(line)
        ports = [int(port) for port in re.findall(r"(?:--port |-b 127\.0\.0\.1:)(\d+)", line)]
        if not ports:  # wschat's default port, 1984, made a free one
            ports = [free_port()]
            argv += ["--port", str(ports[0])]
        process = start(argv, tmp_path)
        try:
            wait_for_port(ports[0], process)
            check(ports[0])
        finally:
            code, err = stop_process(process)
        assert code == 0, (line, err)


def test_the_bench_lines_name_options_bench_has():
    """tools/bench.py itself is run by tests/test_bench.py; its README lines
    must parse (the git and build lines are git's and setuptools')."""
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import bench
    finally:
        sys.path.remove(str(ROOT / "tools"))
    [(_, text)] = blocks_run_as("bench options")
    lines = [line for line in text.splitlines() if line.startswith("python tools/bench.py")]
    assert len(lines) == 5
    for line in lines:
        args = bench.make_parser().parse_args(command(line)[2:])  # a bad option exits: the test fails
        assert set(args.scenarios.split(",")) <= set(bench.scenarios(quick=True)), line


@pytest.mark.timeout(300)
def test_the_deployment_guide_installs_and_its_systemd_command_serves(tmp_path):
    """docs/deploying.rst: the install line (into a temporary folder, from
    this checkout), then the systemd unit's ExecStart with what it installed."""
    [(_, install)] = [(n, t) for n, t in blocks_run_as("install") if t.startswith("python3")]
    [(_, unit)] = [(n, t) for n, t in blocks_run_as("install") if t.startswith("[Unit]")]
    venv = tmp_path / "opt-wschat"
    line = install.replace("/opt/wschat", str(venv)).replace("/path/to/wschat", str(ROOT))
    line = line.replace("python3 -m venv", f"{sys.executable} -m venv")
    result = subprocess.run(line, shell=True, capture_output=True, text=True, timeout=280)
    assert result.returncode == 0, result.stderr[-2000:]
    [exec_start] = [row.split("=", 1)[1] for row in unit.splitlines() if row.startswith("ExecStart=")]
    local = Localized(exec_start.replace("/opt/wschat", str(venv)))
    process = start(shlex.split(local.text), tmp_path)
    try:
        wait_for_port(local.port, process)
        answers_health(local.port)
        assert get(local.port, "/metrics")[0] == 200  # --metrics
    finally:
        code, err = stop_process(process)
    assert code == 0, err


# Each tool the documents name, and the test that runs it (beyond --help below).
TOOLS = {
    "tools/bench.py": "tests/test_bench.py", "tools/bench_servers.py": "tests/test_bench.py",
    "tools/django_example.py": "tests/test_django.py", "tools/echo_server.py": "tests/test_echo.py",
    "tools/embed_example.py": "tests/test_embedding.py", "tools/flask_example.py": "tests/test_wsgi.py",
    "tools/hostile.py": "tests/test_memory.py", "tools/microbench.py": "tests/test_snippets.py",
    "tools/check_layers.py": "tests/test_layers.py", "tools/redis_script.py": "tests/test_bench.py",
}


def test_every_tool_the_documents_name_is_run_by_a_test():
    named = {tool for name in DOCUMENTS for tool in re.findall(r"tools/\w+\.py", (ROOT / name).read_text(encoding="utf-8"))}
    assert named == set(TOOLS), named ^ set(TOOLS)
    for tool, test in TOOLS.items():
        assert Path(tool).stem in (ROOT / test).read_text(encoding="utf-8"), (tool, test)


@pytest.mark.parametrize("tool", [t for t in TOOLS if not t.endswith(("_example.py", "bench_servers.py"))])
def test_each_command_line_tool_starts_and_explains_itself(tool):
    result = subprocess.run([sys.executable, tool, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.startswith("usage:"), result.stderr


def test_microbench_measures_both_paths():
    result = subprocess.run([sys.executable, "tools/microbench.py", "--seconds", "0.01"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    rows = result.stdout.splitlines()
    assert rows[0].split()[:2] == ["case", "unit"] and len(rows) == 11 and "unmask 1 MiB" in rows[-1]
