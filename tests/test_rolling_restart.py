"""SIGHUP to ``--processes``: every process replaced while clients talk, and
nothing lost, nothing doubled (issue 19).

Each talker is a wschat.v1 client that does what a careful client does (the
browser client does the same): it names each message with an ``id``, sends
the next once it has seen the last come back, and when its connection is
closed it comes back with ``since``/``epoch``; a message of its own that is
not in what it gets then was never taken, and is sent again.  The counts at
the end are Redis's own history of the room.

And when processes cannot start, keep dying or hang: a replacement that
cannot start leaves the old processes serving, children that cannot start
stop the supervisor with their error, a crash loop is restarted with
backoff, a child that does not stop within ``--graceful-timeout`` is killed,
and what cannot work (no Redis, a port taken) is refused before any child starts.
"""

import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time

from websockets.exceptions import ConnectionClosed, InvalidHandshake
from websockets.sync.client import connect

from .helpers import certificate_in, wait_until
from .test_redis import children_of

TALKERS = 6


class Talker(threading.Thread):
    def __init__(self, url: str, number: int, stop: threading.Event):
        super().__init__(name=f"talker-{number}", daemon=True)
        self.url, self.number, self.stop = url, number, stop
        self.epoch, self.last_seq = None, 0
        self.sent, self.confirmed, self.pending = [], set(), None
        self.closes, self.refusals, self.dups, self.gaps, self.errors = [], [], [], [], []

    def run(self) -> None:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not (self.stop.is_set() and self.pending is None):
            since = f"&since={self.last_seq}&epoch={self.epoch}" if self.epoch else ""
            try:
                with connect(f"{self.url}?nick=t{self.number}{since}", subprotocols=["wschat.v1"],
                             open_timeout=5) as ws:
                    self.talk(ws)
            except ConnectionClosed as closed:
                self.closes.append(closed.rcvd.code if closed.rcvd else None)
            except (OSError, InvalidHandshake, TimeoutError) as exc:
                self.refusals.append(repr(exc))
                time.sleep(0.05)  # between the old process letting go and a client finding the new one

    def talk(self, ws) -> None:
        welcome = self.next_event(ws, "welcome")
        assert self.epoch in (None, welcome["epoch"]), "the room's sequence began anew"
        self.epoch = welcome["epoch"]
        for record in welcome["history"]:
            self.take(record)
        if self.pending is not None:  # not in the history: never taken, so sent again
            self.send(ws, self.pending)
        while not (self.stop.is_set() and self.pending is None):
            if self.pending is None and not self.stop.wait(0.01):  # at most 100 messages/s each
                self.pending = f"t{self.number}-{len(self.sent) + 1}"
                self.sent.append(self.pending)
                self.send(ws, self.pending)
            try:
                event = json.loads(ws.recv(timeout=0.5))
            except TimeoutError:
                continue
            if event["type"] == "message":
                self.take(event)
            elif event["type"] == "error" and event["code"] == "not_sent":
                self.send(ws, self.pending)
            elif event["type"] == "error" and event["code"] != "nick_refused":  # its old claim may linger a moment
                self.errors.append(event)

    @staticmethod
    def next_event(ws, kind):
        while True:
            event = json.loads(ws.recv(timeout=10))
            if event["type"] == kind:
                return event

    def send(self, ws, message_id: str) -> None:
        ws.send(json.dumps({"type": "message", "text": message_id, "id": message_id}))

    def take(self, record: dict) -> None:
        seq = record["seq"]
        if seq <= self.last_seq:
            self.dups.append(seq)
            return
        if self.last_seq and seq != self.last_seq + 1:
            self.gaps.append((self.last_seq, seq))
        self.last_seq = seq
        if record.get("id") == self.pending:
            self.confirmed.add(self.pending)
            self.pending = None


def test_sighup_replaces_every_process_and_loses_nothing(redis_server, tmp_path):
    log_path = tmp_path / "supervisor.log"
    with open(log_path, "w") as log:
        parent = subprocess.Popen(
            [sys.executable, "-m", "wschat", "--port", "0", "--redis", redis_server.url, "--processes", "2",
             "--rate-limit", "0", "--history", "5000", "--max-history-bytes", "0", "--log-level", "info", "--welcome", ""],
            stdout=subprocess.PIPE, stderr=log, text=True)
    stop = threading.Event()
    talkers = []
    try:
        line = parent.stdout.readline()
        assert "(2 processes)" in line, line + log_path.read_text()
        port = int(re.search(r":(\d+)/chat", line).group(1))
        url = f"ws://127.0.0.1:{port}/chat"
        first = set(children_of(parent.pid))
        talkers = [Talker(url, number, stop) for number in range(TALKERS)]
        for talker in talkers:
            talker.start()
        wait_until(lambda: all(len(t.confirmed) >= 5 for t in talkers), timeout=30, what="everyone talking")

        parent.send_signal(signal.SIGHUP)
        wait_until(lambda: "every process replaced" in log_path.read_text(), timeout=60, what="the rolling restart")
        now = set(children_of(parent.pid))
        assert len(now) == 2 and not now & first, (first, now)
        before = {t.number: len(t.confirmed) for t in talkers}
        wait_until(lambda: all(len(t.confirmed) >= before[t.number] + 5 for t in talkers), timeout=30,
                   what="everyone talking after the restart")
        stop.set()
        for talker in talkers:
            talker.join(30)
            assert not talker.is_alive()
    finally:
        stop.set()
        parent.send_signal(signal.SIGTERM)
        parent.wait(30)
    log = log_path.read_text()
    assert log.count("replaced (pid") == 2, log
    for talker in talkers:
        assert 1001 in talker.closes  # its process went away under it
        assert not talker.dups and not talker.gaps and not talker.errors, (
            talker.number, talker.dups, talker.gaps, talker.errors, talker.closes, talker.refusals[:5])
        assert talker.pending is None and talker.confirmed == set(talker.sent)

    import redis

    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    kept = [json.loads(text) for text in client.lrange("wschat:{r:main}:history", 0, -1)]
    ids = [record["id"] for record in kept]
    assert sorted(ids) == sorted(message_id for talker in talkers for message_id in talker.sent)  # once each
    assert [record["seq"] for record in kept] == list(range(1, len(kept) + 1))
    for talker in talkers:  # each talker's own messages, in the order it sent them
        assert [i for i in ids if i.startswith(f"t{talker.number}-")] == talker.sent


def healthy(port: int) -> bool:
    """``/healthz`` answers 200 over TLS (the certificate is not what is tested here)."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=5)) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        return sock.recv(100).startswith(b"HTTP/1.1 200")


def test_a_replacement_that_cannot_start_leaves_the_old_processes_serving(redis_server, tmp_path):
    """SIGHUP with a certificate that has gone bad: the first replacement
    fails, the supervisor says so and keeps the old processes, which go on
    serving; once the file is good again, the next SIGHUP replaces them."""
    cert, key = certificate_in(tmp_path)
    good = open(cert).read()
    log_path = tmp_path / "supervisor.log"
    with open(log_path, "w") as log:
        parent = subprocess.Popen(
            [sys.executable, "-m", "wschat", "--port", "0", "--redis", redis_server.url, "--processes", "2",
             "--certfile", cert, "--keyfile", key, "--log-level", "info"],
            stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        line = parent.stdout.readline()
        assert "(2 processes)" in line, line + log_path.read_text()
        port = int(re.search(r":(\d+)/chat", line).group(1))
        first = set(children_of(parent.pid))
        with open(cert, "w") as broken:
            broken.write("not a certificate\n")
        parent.send_signal(signal.SIGHUP)
        wait_until(lambda: "keeping the old processes" in log_path.read_text(), timeout=30, what="the refusal")
        assert "its replacement could not start (exit code 1)" in log_path.read_text()
        assert set(children_of(parent.pid)) == first and healthy(port)

        with open(cert, "w") as fixed:
            fixed.write(good)
        parent.send_signal(signal.SIGHUP)
        wait_until(lambda: "every process replaced" in log_path.read_text(), timeout=60, what="the rolling restart")
        now = set(children_of(parent.pid))
        assert len(now) == 2 and not now & first and healthy(port)
    finally:
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(30) == 0
        parent.stdout.close()


def test_a_child_that_cannot_start_stops_the_supervisor_with_its_error(redis_server, tmp_path):
    """Every child fails at start (a certificate it cannot use): one error
    from the child, one from the supervisor, and exit code 1."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("not a certificate\n")
    key.write_text("not a key\n")
    result = subprocess.run(
        [sys.executable, "-m", "wschat", "--port", "0", "--redis", redis_server.url, "--processes", "2",
         "--certfile", str(cert), "--keyfile", str(key)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"cannot use {cert} and {key} as certificate and key" in result.stderr
    assert "process 1 could not start (exit code 1): stopping" in result.stderr
    assert result.stdout == ""  # no ready line


def test_a_child_that_keeps_dying_is_restarted_later_each_time_and_a_stop_does_not_wait(redis_server, tmp_path):
    """A child that dies soon after it started is restarted after 0.5 s,
    then 1 s, and so on (up to 10 s): a crash loop does not spin. SIGTERM
    during such a wait stops everything at once, the restart never made."""
    log_path = tmp_path / "supervisor.log"
    with open(log_path, "w") as log:
        parent = subprocess.Popen(
            [sys.executable, "-m", "wschat", "--port", "0", "--redis", redis_server.url, "--processes", "2",
             "--log-level", "info"], stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        assert "(2 processes)" in parent.stdout.readline(), log_path.read_text()
        first = children_of(parent.pid)
        os.kill(first[0], signal.SIGKILL)
        wait_until(lambda: "restarted (pid" in log_path.read_text(), timeout=30, what="the first restart")
        assert "restarting it in 0.5 s" in log_path.read_text()
        (replacement,) = set(children_of(parent.pid)) - set(first)
        os.kill(replacement, signal.SIGKILL)  # dead again at once: the wait doubles
        wait_until(lambda: "restarting it in 1.0 s" in log_path.read_text(), timeout=30, what="the second wait")
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(30) == 0
    finally:
        parent.kill()
        parent.wait()
        parent.stdout.close()
    assert log_path.read_text().count("restarted (pid") == 1
    wait_until(lambda: not os.path.exists(f"/proc/{first[1]}"), what="the other child to be gone")


def test_a_child_that_does_not_stop_in_time_is_killed_in_a_restart_and_in_a_stop(redis_server, tmp_path):
    """``--graceful-timeout``: a child that has not gone that long after its
    SIGTERM (here one that is stopped, SIGSTOP, and so cannot close its
    clients) is killed, in a rolling restart (which goes on to the next
    child) and when the supervisor stops (which then exits as usual).  3 s:
    time enough for the other child, which stops by itself, on a busy machine."""
    log_path = tmp_path / "supervisor.log"
    with open(log_path, "w") as log:
        parent = subprocess.Popen(
            [sys.executable, "-m", "wschat", "--port", "0", "--redis", redis_server.url, "--processes", "2",
             "--graceful-timeout", "3", "--log-level", "info"], stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        assert "(2 processes)" in parent.stdout.readline(), log_path.read_text()
        hung, other = children_of(parent.pid)
        os.kill(hung, signal.SIGSTOP)
        parent.send_signal(signal.SIGHUP)
        wait_until(lambda: "every process replaced" in log_path.read_text(), timeout=60, what="the rolling restart")
        assert f"(pid {hung}) did not stop in time: killing it" in log_path.read_text()
        assert f"(pid {other}) did not stop" not in log_path.read_text()  # it stopped by itself
        assert not os.path.exists(f"/proc/{hung}")  # killed, and reaped
        new_hung, _ = children_of(parent.pid)
        os.kill(new_hung, signal.SIGSTOP)
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(30) == 0
        assert f"(pid {new_hung}) did not stop in time: killing it" in log_path.read_text()
        assert not os.path.exists(f"/proc/{new_hung}")
    finally:
        parent.kill()
        parent.wait()
        parent.stdout.close()


def test_the_supervisor_refuses_at_once_what_cannot_work(redis_server):
    """Before any child starts: an unreachable Redis (named without its
    password), a port another program holds, a grace that is no time."""
    def run(*options):
        return subprocess.run([sys.executable, "-m", "wschat", "--host", "127.0.0.1", "--processes", "2", *options],
                              capture_output=True, text=True, timeout=60)

    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # (bound, not listening: nothing answers there)
        result = run("--port", "0", "--redis", f"redis://:sekrit@127.0.0.1:{port}/0")
    assert result.returncode == 1 and result.stdout == "", result.stderr
    assert f"wschat: cannot reach Redis at redis://:***@127.0.0.1:{port}/0: " in result.stderr
    assert "sekrit" not in result.stderr and "Traceback" not in result.stderr

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run("--port", str(port), "--redis", redis_server.url)
    assert result.returncode == 1 and result.stdout == "", result.stderr
    assert f"wschat: cannot listen on 127.0.0.1:{port}: Address already in use" in result.stderr

    result = run("--port", "0", "--redis", redis_server.url, "--graceful-timeout", "0")
    assert result.returncode == 2 and "--graceful-timeout must be a number of seconds > 0, not 0.0" in result.stderr
