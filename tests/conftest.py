"""Shared fixtures: both implementations of the frame hot paths."""

import pytest

from wschat import frames

try:
    from wschat import _speedups
except ImportError:  # no compiler at install time: only the pure path exists
    _speedups = None

IMPLEMENTATIONS = {"python": frames.apply_mask_python}
if _speedups is not None:
    IMPLEMENTATIONS["c"] = _speedups.apply_mask


@pytest.fixture(params=sorted(IMPLEMENTATIONS))
def implementation(request, monkeypatch):
    """Run a test once per mask implementation (pure Python, and C when built)."""
    monkeypatch.setattr(frames, "apply_mask", IMPLEMENTATIONS[request.param])
    return request.param


@pytest.fixture
def redis_server(tmp_path):
    """A real redis-server of our own (see ``helpers.RedisServer``), stopped after the test.
    Skipped with the reason where it is missing, unless WSCHAT_REQUIRE_SERVICES=1 (CI)."""
    import importlib.util
    import os

    from .helpers import RedisServer

    if not os.environ.get("WSCHAT_REQUIRE_SERVICES"):
        if not os.path.exists(RedisServer.BINARY):
            pytest.skip(f"redis-server is not installed at {RedisServer.BINARY} (apt-get install redis-server)")
        if importlib.util.find_spec("redis") is None:
            pytest.skip("redis-py is not installed (pip install -e '.[test]')")
    server = RedisServer(tmp_path).start()
    yield server
    server.kill()


@pytest.fixture
def tls_redis_server(tmp_path, monkeypatch):
    """A redis-server that speaks only TLS (``rediss://``), with a self-signed
    certificate that this test's processes trust (SSL_CERT_FILE); skipped like ``redis_server``."""
    import importlib.util
    import os
    import shutil

    from .helpers import RedisServer

    if not os.environ.get("WSCHAT_REQUIRE_SERVICES"):
        if not os.path.exists(RedisServer.BINARY) or not shutil.which("openssl"):
            pytest.skip(f"redis-server ({RedisServer.BINARY}) or openssl is not installed")
        if importlib.util.find_spec("redis") is None:
            pytest.skip("redis-py is not installed (pip install -e '.[test]')")
    server = RedisServer(tmp_path, tls=True).start()
    monkeypatch.setenv("SSL_CERT_FILE", server.certificate)
    yield server
    server.kill()


@pytest.fixture
def redis_cluster(tmp_path):
    """A real Redis Cluster of our own, 3 masters and 3 replicas (see
    ``helpers.RedisCluster``); skipped like ``redis_server``."""
    import importlib.util
    import os

    from .helpers import RedisCluster, RedisServer

    if not os.environ.get("WSCHAT_REQUIRE_SERVICES"):
        for binary in (RedisServer.BINARY, RedisCluster.CLI):
            if not os.path.exists(binary):
                pytest.skip(f"{binary} is not installed (apt-get install redis-server)")
        if importlib.util.find_spec("redis") is None:
            pytest.skip("redis-py is not installed (pip install -e '.[test]')")
    cluster = RedisCluster(tmp_path)
    try:
        yield cluster.start()
    finally:
        cluster.stop()
