"""A smoke run of the load generator, and proof that its verification bites."""

import importlib.util
import os
import subprocess
import sys
import time
import types

import pytest

from wschat.chat import Chat, ChatLimits

from .helpers import start_server

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "tools", "bench.py")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def chat_port():
    server = start_server(max_message_size=2 << 20)
    Chat(server, welcome="", limits=ChatLimits.off())
    yield server.port
    server.stop()


def test_smoke_run_of_every_scenario(bench, chat_port):
    figures = bench.run_fanout(chat_port, clients=3, messages=10, size=64, window=2, pid=os.getpid())
    assert figures["deliveries/s"] > 0 and figures["p99 ms"] >= figures["p50 ms"] > 0
    assert figures[bench.THREAD + "wschat-loop"] > 0  # the CPU of the server's threads, told apart by name
    assert 0 <= figures["server sys %"] <= 100
    assert bench.run_fanout(chat_port, clients=2, messages=3, size=70000, window=1)["MB/s"] > 0
    idle = bench.run_idle(chat_port, 20, os.getpid())
    assert idle["handshakes/s"] > 0 and idle["broadcast ms"] > 0
    assert bench.run_churn(chat_port, total=10, concurrency=3)["connections/s"] > 0


def test_cpu_times_tell_user_from_system(bench):
    """``server sys %`` rests on them: Python arithmetic is user time."""
    user, system = bench.cpu_times(os.getpid())
    start = time.process_time()
    while time.process_time() - start < 0.2:
        sum(range(1000))
    more_user, more_system = bench.cpu_times(os.getpid())
    assert more_user - user >= 0.1 > more_system - system
    assert bench.cpu_seconds(os.getpid()) >= more_user + more_system


def test_ratios_pair_up_round_by_round(bench):
    """A slow round slows every server in it: its ratios still count, the
    medians of each server's figures alone would not line up."""
    assert bench.paired_ratio([10, 1, 1], [5, 1, 0.25]) == 2  # the ratio of the medians: 1
    assert bench.paired_ratio([3], [1, 2, 3]) == 3  # failed after round 1
    assert bench.paired_ratio([1], [0]) is None


def test_the_fanout_window_reaches_the_fanout_scenarios_only(bench, monkeypatch):
    """``--fanout-window``: how many messages a fanout client keeps in flight
    (a server's batches are at most that many per client it holds)."""
    windows = {}
    monkeypatch.setattr(bench, "run_fanout", lambda port, clients, messages, size, *, window, **kwargs:
                        windows.setdefault(size, set()).add(window))
    server = types.SimpleNamespace(port=1, process=types.SimpleNamespace(pid=1), broker=None, publishes=None)
    table = bench.scenarios(True, 20, 40)
    for name in ("fanout", "fanout-10", "fanout-deflate", "large-64k", "large-1m"):
        table[name](server)
    assert windows == {64: {40}, 65536: {2}, 1 << 20: {1}}  # the large messages keep theirs
    with pytest.raises(SystemExit):
        bench.main(["--fanout-window", "0"])


@pytest.mark.parametrize("size", [64, 70000])
def test_a_dropped_message_fails_the_run(bench, size):
    server = start_server(max_message_size=2 << 20)

    def on_message(conn, message):
        if not message.startswith("00000100000005"):  # sender 1 loses its message 5
            server.broadcast(message)

    server.resource("/chat", on_message=on_message)
    try:
        with pytest.raises(bench.BenchError, match=r"sender 1: lost \[5\]"):
            bench.run_fanout(server.port, clients=3, messages=10, size=size, window=10, stall=1.0)
    finally:
        server.stop()


def test_verification_names_loss_duplicates_and_reordering(bench):
    header = bench.server_header(64)
    frames = [header + bench.payload(0, seq, 64) for seq in range(4)]
    bench.verify([b"".join(frames)], 64, 1, 4)
    with pytest.raises(bench.BenchError, match=r"lost \[2\]"):
        bench.verify([b"".join(frames[:2] + frames[3:])], 64, 1, 4)
    with pytest.raises(bench.BenchError, match="1 duplicated"):
        bench.verify([b"".join(frames + frames[3:])], 64, 1, 4)
    with pytest.raises(bench.BenchError, match="reordered"):
        bench.verify([b"".join([frames[1], frames[0]] + frames[2:])], 64, 1, 4)
    with pytest.raises(bench.BenchError, match="whole number"):
        bench.verify([b"".join(frames)[:-1]], 64, 1, 4)
    with pytest.raises(bench.BenchError, match="unknown sender"):
        bench.verify([header + bench.payload(7, 0, 64)], 64, 1, 1)


@pytest.mark.parametrize("kind", ["threading", "asyncio"])
def test_the_reference_servers_carry_a_fanout(bench, kind):
    """tools/bench_servers.py, the python-websockets servers bench.py measures wschat against."""
    import subprocess
    import sys

    from .helpers import free_port, stop_process, wait_for_port

    port = free_port()
    servers = os.path.join(os.path.dirname(BENCH), "bench_servers.py")
    process = subprocess.Popen([sys.executable, servers, kind, str(port)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        wait_for_port(port, process)
        # One client: these servers register a client only once its handler runs, after the
        # 101, so a second client may miss the warm-up message (bench.py's runs fail loudly then).
        assert bench.run_fanout(port, clients=1, messages=20, size=64, window=2)["deliveries/s"] > 0
    finally:
        stop_process(process, timeout=10)


def test_a_server_that_cannot_start_is_reported_and_the_run_goes_on(bench, monkeypatch, capsys):
    """A server that exits at start (here wschat refusing a bad option, as
    one without redis-py refuses ``--redis``) is one FAILED line with its
    own error, the other servers are measured all the same, and the run's
    exit code says a wschat server failed."""
    monkeypatch.setitem(bench.SERVERS, "wschat-broken", (bench.WSCHAT + ["--port", "{port}", "--processes", "2"], {}))
    monkeypatch.setitem(bench.SERVERS, "wschat-here", (bench.WSCHAT + ["--port", "{port}"], {}))
    assert bench.main(["--servers", "wschat-broken,wschat-here", "--scenarios", "fanout", "--quick",
                       "--rounds", "1", "--reference", "wschat-here"]) == 1
    err = capsys.readouterr().err
    assert "FAILED: wschat-broken fanout: wschat-broken did not start:" in err
    assert "--processes needs --redis" in err  # what the server itself said
    assert "round 1: fanout     wschat-here" in err


@pytest.mark.parametrize("name", ["wschat-redis", "wschat-redis-tls"])
def test_the_redis_variants_carry_a_fanout(bench, name):
    """The benchmark's own redis-server, over TCP and over TLS (rediss://, with
    a certificate it makes and the server trusts), as ``--servers`` runs them."""
    import shutil

    if not os.environ.get("WSCHAT_REQUIRE_SERVICES"):
        if not os.path.exists(bench.BenchRedis.BINARY) or not shutil.which("openssl"):
            pytest.skip(f"redis-server ({bench.BenchRedis.BINARY}) or openssl is not installed")
        if importlib.util.find_spec("redis") is None:
            pytest.skip("redis-py is not installed (pip install -e '.[test]')")
    server = bench.RunningServer(name)
    try:
        figures = bench.run_fanout(server.port, clients=3, messages=20, size=64, window=2,
                                   pid=server.process.pid, broker=server.broker, publishes=server.publishes)
        assert figures["deliveries/s"] > 0  # (every message checked: once each, in order)
        assert figures["CPU/redis CPU"] >= 0  # (0 when redis-server used less than a clock tick)
        assert 1 <= figures["msgs/publish"] <= 3 * 2  # a batch holds at most what the clients have in flight
    finally:
        server.stop()
        bench.REDIS.stop()
        bench.REDIS = None


def test_redis_script_measures_what_each_batch_size_costs_redis():
    """``tools/redis_script.py`` runs the publish script on a redis-server of
    its own (with subscribers) and prints its CPU per message for each size."""
    if not os.environ.get("WSCHAT_REQUIRE_SERVICES"):
        if not os.path.exists("/usr/bin/redis-server"):
            pytest.skip("redis-server is not installed at /usr/bin/redis-server (apt-get install redis-server)")
        if importlib.util.find_spec("redis") is None:
            pytest.skip("redis-py is not installed (pip install -e '.[test]')")
    result = subprocess.run([sys.executable, "tools/redis_script.py", "--sizes", "120,30", "--messages", "3000"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.splitlines()
    assert header.split() == ["batch", "redis-server", "CPU", "per", "message"]
    assert [row.split()[0] for row in rows] == ["120", "30"]
    assert all(float(row.split()[1]) >= 0 and row.endswith(" us") for row in rows), rows
