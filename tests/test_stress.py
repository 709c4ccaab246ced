"""Thread-safety under stress: many threads send and broadcast while clients churn.

Checked to fail without the socket map's lock: with ``Loop.map_lock``
replaced by ``contextlib.nullcontext()`` (a plugin that patches
``Loop.__init__``), broadcasts snapshot the map while the loop thread adds
and removes churning clients, and die with "dictionary changed size during
iteration".  The idle connections make the map as long as a real one, so a
snapshot takes long enough for the loop to change the map meanwhile.
"""

import contextlib
import sys
import threading

from websockets.sync.client import connect

from .helpers import RawClient, Recorder, start_server

STABLE = 12
BROADCASTERS = 4
SENDERS = 2
PER_THREAD = 300
CHURN = 150
IDLE = 1000


def test_send_and_broadcast_from_many_threads_while_clients_churn():
    recorder = Recorder()
    server = start_server(max_queue=64 << 20)
    server.resource("/chat", on_open=recorder.on_open)
    url = f"ws://127.0.0.1:{server.port}/chat"
    errors = []
    received = {i: [] for i in range(STABLE)}

    def guard(target, *args):
        def run():
            try:
                target(*args)
            except BaseException as exc:  # anything a thread raises fails the test
                errors.append(exc)
        return threading.Thread(target=run)

    def read(index, ws):
        while (message := ws.recv(timeout=30)) != "END":
            received[index].append(message)

    def broadcast(thread):
        for i in range(PER_THREAD):
            server.broadcast(f"b{thread}:{i}", path="/chat")

    def send(thread, targets):
        for i in range(PER_THREAD):
            for conn in targets:
                conn.send(f"s{thread}:{i}")

    def churn():
        for _ in range(CHURN):
            with connect(url + "/churn", ping_interval=None) as ws:
                ws.send("hello")

    previous = sys.getswitchinterval()
    server.resource("/idle")
    with contextlib.ExitStack() as stack:
        for _ in range(IDLE):  # a map as long as a real one's
            stack.enter_context(RawClient(server.port, "/idle"))
        # The clients send no keepalive pings: with a keepalive thread, two threads join the client's reader
        # when it closes, a race in CPython 3.11's Thread.join (python/cpython#116372) that this test's
        # switch interval of 1 us brings out ("release unlocked lock"), in the client, not the server.
        stable = [stack.enter_context(connect(url, max_size=None, ping_interval=None)) for _ in range(STABLE)]
        targets = [recorder.wait("open")[1] for _ in range(STABLE)]
        readers = [guard(read, i, ws) for i, ws in enumerate(stable)]
        workers = [guard(broadcast, t) for t in range(BROADCASTERS)]
        workers += [guard(send, t, targets) for t in range(SENDERS)]
        workers += [guard(churn) for _ in range(3)]
        sys.setswitchinterval(1e-6)  # switch threads as often as possible
        try:
            for thread in readers + workers:
                thread.start()
            for thread in workers:
                thread.join(60)
        finally:
            sys.setswitchinterval(previous)
        server.broadcast("END", connections=targets)
        for thread in readers:
            thread.join(60)
    server.stop()

    assert errors == []
    for index in range(STABLE):
        messages = received[index]
        # Every message addressed to the client arrives exactly once, in each thread's order.
        for thread in range(BROADCASTERS):
            assert [m for m in messages if m.startswith(f"b{thread}:")] == [f"b{thread}:{i}" for i in range(PER_THREAD)]
        for thread in range(SENDERS):
            assert [m for m in messages if m.startswith(f"s{thread}:")] == [f"s{thread}:{i}" for i in range(PER_THREAD)]
        assert len(messages) == (BROADCASTERS + SENDERS) * PER_THREAD
