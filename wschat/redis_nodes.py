"""Which Redis node serves a room: the one Redis, or on a Redis Cluster the
master that owns the room's hash slot now.

The engine's own connections (its batches of events and its subscriptions,
see ``resp.py``) are routed here; a cluster's map of slots is read with
``CLUSTER SLOTS`` from any node that answers, and read again when a node
fails or moves a slot (a failover).  redis-py's ``RedisCluster`` routes the
engine's other calls by its own map.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlsplit

from redis.crc import key_slot

from .resp import ReplyError, RespConnection

Address = tuple[str, int]
SLOTS = 16384


class ClusterNotReady(ConnectionError):
    """Some slot has no master that answers (a failover is under way)."""


class Nodes:
    """The Redis at ``url``, or the cluster it is a node of (see the module
    docstring); connections to them, with the URL's password and database."""

    def __init__(self, url: str, timeout: float):
        parts = urlsplit(url)  # redis-py checked it already
        self.address: Address = (parts.hostname or "127.0.0.1", parts.port or 6379)
        self.timeout = timeout
        self._tls = parts.scheme == "rediss"
        self._auth = [unquote(part) for part in (parts.username, parts.password) if part]  # AUTH [user] password
        db = parts.path.strip("/")
        self._db = int(db) if db.isdigit() else 0
        self.cluster = False
        self.known: list[Address] = [self.address]  # every node seen, to ask for the map when some are gone
        self._owners: list[Address] = []

    def connect(self, node: Address, raw: bool = False) -> RespConnection:
        """A connection to ``node``, authenticated and on the URL's database
        (``raw``: its replies in bytes, not decoded)."""
        conn = RespConnection(node, self.timeout, tls=self._tls, raw=raw)
        try:
            if self._auth:
                conn.call("AUTH", *self._auth)
            if self._db:
                conn.call("SELECT", self._db)
        except BaseException:
            conn.close()
            raise
        return conn

    def discover(self) -> None:
        """Learn whether this is a cluster and, if so, which master owns each
        slot.  Raises ``ConnectionError`` (or ``OSError``) when no node
        answers, ``ClusterNotReady`` when some slot has no master."""
        problem: Exception | None = None
        for address in list(self.known):
            try:
                conn = self.connect(address)
            except OSError as exc:
                problem = exc
                continue
            try:
                if "cluster_enabled:1" not in conn.call("INFO", "cluster"):
                    self.cluster = False
                    return
                if "cluster_state:ok" not in conn.call("CLUSTER", "INFO"):
                    raise ClusterNotReady(f"the Redis Cluster is not ready (asked {address[0]}:{address[1]})")
                slots = conn.call("CLUSTER", "SLOTS")
            except (OSError, ReplyError) as exc:
                problem = exc
                continue
            finally:
                conn.close()
            self._learn(address, slots)
            return
        raise ConnectionError(f"no Redis node answers ({problem})")

    def _learn(self, asked: Address, slots: list[Any]) -> None:
        owners: list[Address | None] = [None] * SLOTS
        for start, end, master, *replicas in slots:
            owner = (master[0] or asked[0], int(master[1]))
            owners[start : end + 1] = [owner] * (end - start + 1)
            for node in (master, *replicas):
                address = (node[0] or asked[0], int(node[1]))
                if address not in self.known:
                    self.known.append(address)
        found = [owner for owner in owners if owner is not None]
        if len(found) < SLOTS:
            raise ClusterNotReady("some slots of the Redis Cluster have no master")
        self._owners = found
        self.cluster = True

    def reachable(self) -> bool:
        """Whether every master answers now (the map read again first)."""
        try:
            self.discover()
            for node in self.masters():
                conn = self.connect(node)
                try:
                    conn.call("PING")
                finally:
                    conn.close()
        except (OSError, ReplyError):
            return False
        return True

    def node_of(self, key: str) -> Address:
        """The node that serves ``key`` (a room's key or channel)."""
        if not self.cluster:
            return self.address
        return self._owners[key_slot(key.encode())]

    def moved(self, error: str) -> None:
        """A ``MOVED slot host:port`` reply: that slot is served there now."""
        _, slot, where = error.split()
        host, _, port = where.rpartition(":")
        self._owners[int(slot)] = (host or self.address[0], int(port))

    def masters(self) -> set[Address]:
        return set(self._owners) if self.cluster else {self.address}
