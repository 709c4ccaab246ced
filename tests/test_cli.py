"""``python -m wschat`` as a user runs it: a real process on 127.0.0.1."""

import http.client
import os
import re
import signal
import socket
import subprocess
import sys

import pytest
from websockets.exceptions import ConnectionClosedOK
from websockets.sync.client import connect

from wschat import cli
from wschat.chat import DEFAULT_WELCOME

from .helpers import self_signed


def run_server(*args):
    process = subprocess.Popen(
        [sys.executable, "-m", "wschat", "--host", "127.0.0.1", "--port", "0", "--log-level", "warning", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    line = process.stdout.readline()
    match = re.search(r"ws://127\.0\.0\.1:(\d+)/chat - open http://127\.0\.0\.1:\d+/ in a browser", line)
    assert match, line + process.stderr.read()
    return process, int(match.group(1))


def test_version_says_which_frames_path():
    out = subprocess.run([sys.executable, "-m", "wschat", "--version"], capture_output=True, text=True, check=True).stdout
    assert re.fullmatch(r"wschat \d+\.\d+\.\d+ \(frames: (C; C accelerator in use|Python; C accelerator not in use)\)\n", out)


@pytest.mark.parametrize("url, page", [
    ("ws://127.0.0.1:1984", "http://127.0.0.1:1984/"),
    ("ws://0.0.0.0:1984", "http://127.0.0.1:1984/"),  # every address: a browser here opens the loopback
    ("ws://[::]:1984", "http://[::1]:1984/"),
    ("wss://chat.example:443", "https://chat.example:443/"),
])
def test_the_ready_line_gives_a_page_address_a_browser_opens(url, page):
    assert cli.ready_line(url, "/chat") == f"wschat listening on {url}/chat - open {page} in a browser"
    assert cli.ready_line(url, "/chat", 2).endswith(" in a browser (2 processes)")


def test_help_lists_every_option():
    out = subprocess.run([sys.executable, "-m", "wschat", "--help"], capture_output=True, text=True, check=True).stdout
    for option in ["--host", "--port", "--ping-interval", "--max-message-size", "--max-connections", "--allowed-origin",
                   "--certfile", "--keyfile", "--workers", "--history", "--welcome", "--max-chat-length",
                   "--rate-limit", "--scheduling", "--log-level", "--version"]:
        assert option in out


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_serves_chat_and_page_then_shuts_down_gracefully(signum):
    process, port = run_server()
    try:
        with connect(f"ws://127.0.0.1:{port}/chat") as ws:
            assert ws.recv(timeout=5) == DEFAULT_WELCOME
            ws.send("hi")
            assert ws.recv(timeout=5) == "hi"
            client = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            client.request("GET", "/")
            response = client.getresponse()
            assert response.status == 200 and b"chat.js" in response.read()
            process.send_signal(signum)
            with pytest.raises(ConnectionClosedOK) as info:
                ws.recv(timeout=10)
            assert info.value.rcvd.code == 1001
        assert process.wait(10) == 0
    finally:
        process.kill()
        process.communicate()


def thread_policies(pid: int) -> set[int]:
    """The scheduling policy of each of ``pid``'s threads."""
    return {os.sched_getscheduler(int(tid)) for tid in os.listdir(f"/proc/{pid}/task")}


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="SCHED_BATCH is Linux's")
@pytest.mark.parametrize(("given", "policy"), [((), "SCHED_BATCH"), (("--scheduling", "normal"), "SCHED_OTHER")])
def test_every_thread_runs_under_the_scheduling_policy_asked(given, policy):
    """--scheduling batch (the default) reaches every thread the server
    starts, those of its engine and handlers included; normal leaves the system's."""
    process, port = run_server("--workers", "2", *given)
    try:
        with connect(f"ws://127.0.0.1:{port}/chat") as ws:  # the handler threads are started by now
            assert ws.recv(timeout=5) == DEFAULT_WELCOME
            assert len(os.listdir(f"/proc/{process.pid}/task")) >= 3  # main, loop, a handler (its on_open)
            assert thread_policies(process.pid) == {getattr(os, policy)}
    finally:
        process.kill()
        process.communicate()


def test_one_process_given_sighup_says_why_and_keeps_serving():
    process, port = run_server()
    try:
        with connect(f"ws://127.0.0.1:{port}/chat") as ws:
            assert ws.recv(timeout=5) == DEFAULT_WELCOME
            process.send_signal(signal.SIGHUP)  # systemctl reload on a unit without --processes
            line = process.stderr.readline()
            while "SIGHUP" not in line:
                line = process.stderr.readline()
            assert "run with --processes" in line
            ws.send("still here")
            assert ws.recv(timeout=5) == "still here"
    finally:
        process.terminate()
        process.communicate(timeout=10)
    assert process.returncode == 0


def test_plain_echo_for_conformance_suites():
    process, port = run_server("--welcome", "", "--max-chat-length", "0", "--rate-limit", "0")
    try:
        with connect(f"ws://127.0.0.1:{port}/chat") as ws:
            for i in range(50):
                ws.send(f"echo {i}")
                assert ws.recv(timeout=5) == f"echo {i}"
    finally:
        process.terminate()
        process.communicate(timeout=10)


def test_port_in_use_is_one_line_and_exit_1():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "wschat", "--port", str(port)], capture_output=True, text=True, timeout=20)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "cannot listen on 127.0.0.1" in result.stderr
    assert "Traceback" not in result.stderr


def test_certfile_needs_keyfile():
    with pytest.raises(SystemExit):
        cli.parse_args(["--certfile", "cert.pem"])


@pytest.mark.parametrize("given", ["DEBUG", "Warning", "info"])
def test_a_log_level_in_any_case(given):
    assert cli.parse_args(["--log-level", given]).log_level == given.lower()


def test_an_unknown_log_level_is_refused(capsys):
    with pytest.raises(SystemExit):
        cli.parse_args(["--log-level", "verbose"])
    assert "invalid choice: 'verbose'" in capsys.readouterr().err


def test_build_wires_every_option(tmp_path):
    args = cli.parse_args(["--port", "0", "--ping-interval", "2", "--max-message-size", "100", "--max-connections", "7",
                           "--allowed-origin", "http://a", "--allowed-origin", "http://b", "--workers", "3",
                           "--history", "9", "--welcome", "", "--max-chat-length", "0", "--rate-limit", "0",
                           "--max-nick-length", "5", "--ping-timeout", "0", "--max-queue", "12345"])
    server, chat = cli.build(args)
    assert (server.ping_interval, server.max_message_size, server.max_connections, server.workers) == (2, 100, 7, 3)
    assert server.allowed_origins == ["http://a", "http://b"] and server.ping_timeout is None
    assert server.max_queue == 12345
    assert (chat.history_size, chat.welcome, chat.limits.max_length, chat.limits.rate, chat.limits.max_nick_length) == (9, "", 0, 0, 5)


@pytest.mark.parametrize("which", ["certfile", "keyfile"])
def test_a_missing_certificate_or_key_is_one_line_naming_it(tmp_path, which):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    self_signed(str(cert), str(key))
    missing = tmp_path / "missing.pem"
    args = {"certfile": [str(missing), str(key)], "keyfile": [str(cert), str(missing)]}[which]
    result = subprocess.run([sys.executable, "-m", "wschat", "--port", "0", "--certfile", args[0], "--keyfile", args[1]],
                            capture_output=True, text=True, timeout=20)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and str(missing) in result.stderr


def test_history_help_says_who_gets_it():
    out = subprocess.run([sys.executable, "-m", "wschat", "--help"], capture_output=True, text=True, check=True).stdout
    assert "wschat.v1 clients" in " ".join(out.split())


def test_one_line_to_start_and_one_line_per_join_and_close():
    process, port = run_server("--log-level", "info")
    try:
        with connect(f"ws://127.0.0.1:{port}/chat") as ws:
            ws.recv(timeout=5)
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0
        errors = process.stderr.read().splitlines()
    finally:
        process.kill()
        process.communicate()
    joined = [line for line in errors if "joined room" in line]
    closed = [line for line in errors if "Closed connection" in line]
    assert len(joined) == 1 and len(closed) == 1, errors
    assert not [line for line in errors if "listening" in line or ": open " in line or ": closed (" in line], errors


def test_metrics_and_health_from_the_command_line():
    from prometheus_client.parser import text_string_to_metric_families

    process, port = run_server("--metrics")
    try:
        with connect(f"ws://127.0.0.1:{port}/chat"):
            client = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            client.request("GET", "/metrics")
            families = {f.name: f for f in text_string_to_metric_families(client.getresponse().read().decode())}
            assert families["wschat_connections"].samples[0].value == 1
            client = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            client.request("GET", "/healthz")
            assert client.getresponse().status == 200
    finally:
        process.terminate()
        process.communicate(timeout=10)
