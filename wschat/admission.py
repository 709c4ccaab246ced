"""What each request gets, sans I/O: an upgrade to one of the resources, a
plain HTTP route, a file, or a refusal.

``Admission`` holds the server's table of endpoints (WebSocket resources and
plain HTTP routes, each replaced whole, never changed in place, so the loop
reads them without a lock) and the limits a new WebSocket must pass.  The
loop's side of a handshake (``opening.py``) asks it, and applies the answer.
"""

from __future__ import annotations

import ipaddress
import threading
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

from .checks import SettingError
from .errors import HandshakeError
from .files import found_file_response, resolve
from .handshake import Accepted, Extension, Request, build_error_response, negotiate
from .resources import Resource

Responder = Callable[[Request], bytes]


@dataclass(slots=True)
class Answer:
    """What a request gets: the response, and for an upgrade the resource
    and the terms agreed; for a refusal, why."""

    response: bytes
    resource: Resource | None = None
    accepted: Accepted | None = None
    refusal: HandshakeError | None = None

    @classmethod
    def refusing(cls, error: HandshakeError, *, head_only: bool = False) -> Answer:
        return cls(build_error_response(error, head_only=head_only), refusal=error)

    @property
    def status(self) -> int:
        return int(self.response[9:12])


@dataclass(frozen=True)
class Limits:
    """What a new WebSocket must pass (see ``Server``)."""

    max_connections: int
    max_connections_per_ip: int = 0


class Admission:
    """The endpoints and the rules of entry (see the module docstring)."""

    def __init__(self, *, limits: Limits, extensions: Sequence[Extension] = (),
                 allowed_origins: list[str] | None = None, forwarded_allow_ips: Iterable[str] = (),
                 static_dir: str | None = None, page_policy: str | None = None):
        self.limits = limits
        self.extensions = tuple(extensions)
        self.allowed_origins = allowed_origins
        self.forwarded_allow_ips = frozenset(forwarded_allow_ips)
        self.static_dir = static_dir
        self.page_policy = page_policy
        self.resources: tuple[Resource, ...] = ()  # longest path first: the order of routing
        self._http_routes: dict[str, Responder] = {}
        self._lock = threading.Lock()  # for writers; readers take the current table as it is

    def add_resource(self, resource: Resource) -> None:
        """Raises ``SettingError`` when a resource serves its path already (it would never be reached)."""
        with self._lock:
            if any(other.path == resource.path for other in self.resources):
                raise SettingError("path", "a path no other resource of this server serves", resource.path)
            self.resources = tuple(sorted((*self.resources, resource), key=lambda r: len(r.path), reverse=True))

    def add_http_route(self, path: str, responder: Responder) -> None:
        with self._lock:
            self._http_routes = {**self._http_routes, path: responder}

    def route(self, path: str) -> Resource | None:
        """The resource that serves ``path`` (longest match), or None."""
        return next((r for r in self.resources if r.matches(path)), None)

    def decide(self, request: Request, *, open_count: int = 0, ip_count: int = 0, stopping: bool = False) -> Answer:
        """What ``request`` gets.  ``open_count`` is how many WebSockets are
        open, ``ip_count`` how many from the request's client."""
        head_only = request.method == "HEAD"
        try:
            responder = None if request.is_upgrade else self._http_routes.get(request.path)
            if responder is not None:
                if request.method not in ("GET", "HEAD"):
                    raise HandshakeError(405, f"method {request.method} not allowed", (("Allow", "GET, HEAD"),))
                return Answer(responder(request))
            resource = self.route(request.path)
            found = None if request.is_upgrade else resolve(self.static_dir, request.path)
            if not request.is_upgrade and (resource is None or found):
                # A file is served, even below a chat's path (``--path /``: the page at /, the chat too).
                return Answer(found_file_response(found, request, self.page_policy))
            if resource is None:
                raise HandshakeError(404, "no WebSocket endpoint at this path")
            self.admit(open_count, ip_count, stopping)
            accepted = negotiate(request, allowed_origins=self.allowed_origins,
                                 subprotocols=resource.subprotocols, extensions=self.extensions)
        except HandshakeError as error:
            return Answer.refusing(error, head_only=head_only)
        return Answer(accepted.response(), resource, accepted)

    def admit(self, open_count: int, ip_count: int, stopping: bool) -> None:
        """Raise the ``HandshakeError`` that the limits give a new WebSocket, if any."""
        if stopping:
            raise HandshakeError(503, "server shutting down", (("Retry-After", "5"),))
        if open_count >= self.limits.max_connections:
            raise HandshakeError(503, "too many connections", (("Retry-After", "5"),))
        per_ip = self.limits.max_connections_per_ip
        if per_ip and ip_count >= per_ip:
            raise HandshakeError(429, "too many connections from this address", (("Retry-After", "5"),))

    def client_address(self, peer: str, request: Request) -> str:
        """The client's address: the peer's own, or, when the peer is a trusted
        proxy, the nearest address in ``X-Forwarded-For`` that is not one."""
        trusted = self.forwarded_allow_ips
        if not trusted or (peer not in trusted and "*" not in trusted):
            return peer
        hops = [hop.strip() for value in request.fields.get("x-forwarded-for", ()) for hop in value.split(",")]
        for hop in reversed(hops):
            if not _is_ip(hop):
                break  # garbage: believe no further
            peer = hop
            if hop not in trusted and "*" not in trusted:
                break
        return peer


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False
