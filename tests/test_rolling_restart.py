"""SIGHUP to ``--processes``: every process replaced while clients talk, and
nothing lost, nothing doubled (issue 19).

Each talker is a wschat.v1 client that does what a careful client does (the
browser client does the same): it names each message with an ``id``, sends
the next once it has seen the last come back, and when its connection is
closed it comes back with ``since``/``epoch``; a message of its own that is
not in what it gets then was never taken, and is sent again.  The counts at
the end are Redis's own history of the room.
"""

import json
import re
import signal
import subprocess
import sys
import threading
import time

from websockets.exceptions import ConnectionClosed, InvalidHandshake
from websockets.sync.client import connect

from .helpers import wait_until
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
