"""The HTTP/1.1 upgrade of RFC 6455 section 4, sans I/O.

Parse a request head with ``http.client.parse_headers``, check it against
every server-side requirement of section 4.2.1, and build the ``101`` response
(or a plain HTTP error with a one-line reason).  Subprotocols are chosen from a
server-side list; extensions go through a small negotiation hook so that
permessage-deflate (RFC 7692) can be added without changing this module.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import http.client
import io
import re
from dataclasses import dataclass, field
from email.message import Message
from http import HTTPStatus
from typing import Iterable, Protocol, Sequence
from urllib.parse import parse_qs

from .errors import HandshakeError

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
SUPPORTED_VERSION = "13"
DEFAULT_MAX_HEADER_SIZE = 8192


def accept_key(key: str) -> str:
    """``Sec-WebSocket-Accept`` for a client's ``Sec-WebSocket-Key`` (section 4.2.2)."""
    digest = hashlib.sha1((key + GUID).encode("ascii")).digest()
    return base64.b64encode(digest).decode("ascii")


@dataclass(slots=True)
class Request:
    """An HTTP request head: the request line, the headers, and the raw head.

    ``raw`` is what a connection keeps after the handshake (one bytes
    object); ``Connection.request`` parses it again when asked.
    ``client_address`` is the client's IP address, once the server knows it
    (see ``Admission.client_address``).
    """

    method: str
    target: str
    version: str
    headers: Message
    raw: bytes = b""
    fields: dict[str, list[str]] = field(default_factory=dict)  # lower-cased name -> values, for lookups
    client_address: str = ""

    def __post_init__(self) -> None:
        if not self.fields:
            for name, value in self.headers.items():
                self.fields.setdefault(name.lower(), []).append(value)

    @property
    def path(self) -> str:
        """The target without its query string."""
        return self.target.split("?", 1)[0]

    @property
    def query(self) -> dict[str, list[str]]:
        """The query string's parameters, decoded: ``?a=1&a=2`` gives ``{"a": ["1", "2"]}``."""
        return parse_qs(self.target.partition("?")[2])

    @property
    def cookies(self) -> dict[str, str]:
        """The cookies the client sent, by name (the first of a repeated name).
        A malformed pair is skipped, not the whole header."""
        jar: dict[str, str] = {}
        for header in self.fields.get("cookie", ()):
            for pair in header.split(";"):
                name, equals, value = pair.strip().partition("=")
                if equals and name and _COOKIE_NAME.fullmatch(name):
                    value = value.strip()
                    if len(value) > 1 and value[0] == value[-1] == '"':
                        value = value[1:-1]
                    jar.setdefault(name, value)
        return jar

    def tokens(self, name: str) -> list[str]:
        """The comma-separated tokens of every ``name`` header, lower-cased."""
        return [token.lower() for token in self.values(name)]

    def values(self, name: str) -> list[str]:
        """The comma-separated values of every ``name`` header, as sent."""
        values = self.fields.get(name.lower(), ())
        return [token.strip() for value in values for token in value.split(",") if token.strip()]

    @property
    def is_upgrade(self) -> bool:
        """Whether the client asks for a WebSocket (the rest is checked by ``negotiate``)."""
        return "websocket" in self.tokens("Upgrade")


def find_head_end(buffer: bytes | bytearray, max_size: int = DEFAULT_MAX_HEADER_SIZE, start: int = 0) -> int | None:
    """Where the request head ends in ``buffer`` (after the blank line), or None.

    Raises ``HandshakeError(431)`` once the head is larger than ``max_size``,
    so a client cannot make the server buffer without bound.  ``start`` skips
    bytes already searched.
    """
    end = buffer.find(b"\r\n\r\n", max(0, start - 3), max_size + 4)
    if end < 0:
        if len(buffer) > max_size:
            raise HandshakeError(431, "request header fields too large")
        return None
    return end + 4


_COOKIE_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_TARGET = re.compile(rb"/[\x21-\x7e]*")
_METHOD = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_BAD_HEAD = re.compile(rb"\r(?!\n)|\n[ \t]|[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def parse_request(head: bytes) -> Request:
    """Parse a request head (request line and headers, blank line included).

    Strict where leniency lets a peer smuggle text: a bare CR, a folded
    header line (obs-fold, RFC 9112 section 5.2) or a control character is a
    400, and so is a target that is not an absolute path of visible ASCII.
    """
    line, _, rest = head.partition(b"\r\n")
    parts = line.split(b" ")
    if len(parts) != 3 or not _METHOD.fullmatch(parts[0]):
        raise HandshakeError(400, "malformed request line")
    method, target, version = parts
    if not version.startswith(b"HTTP/1."):
        raise HandshakeError(400, "unsupported HTTP version")
    if not _TARGET.fullmatch(target):
        raise HandshakeError(400, "request target must be an absolute path of visible ASCII")
    if _BAD_HEAD.search(rest):
        raise HandshakeError(400, "malformed header block (bare CR, folded line or control character)")
    try:
        headers = http.client.parse_headers(io.BytesIO(rest))
    except http.client.HTTPException as exc:
        raise HandshakeError(431, f"request header fields too large ({exc})") from None
    if headers.defects:
        raise HandshakeError(400, "malformed header line")
    return Request(method.decode("ascii"), target.decode("ascii"), version.decode("ascii"), headers, bytes(head))


class Agreement(Protocol):
    """What an extension settled for a connection (one object may serve many)."""

    @property
    def response(self) -> str:
        """The extension's entry in the response's Sec-WebSocket-Extensions."""

    @property
    def rsv(self) -> int:
        """The RSV bits (0b100 is RSV1) frames may carry from now on."""


class Extension(Protocol):
    """An extension the server supports, offered to the negotiation.

    ``accept`` gets the parameters of one offer, e.g.
    ``[("client_max_window_bits", None)]``, and returns an ``Agreement`` to
    accept it, or None to decline it (RFC 7692 asks to decline, not fail, an
    offer with parameters it does not know or values it cannot take).
    """

    name: str

    def accept(self, params: list[tuple[str, str | None]]) -> Agreement | None: ...


_EXTENSION_TOKEN = re.compile(r'\s*(?:([!#$%&\'*+\-.^_`|~0-9A-Za-z]+)|"((?:[^"\\]|\\.)*)"|([;,=]))')


def parse_extensions(request: Request) -> list[tuple[str, list[tuple[str, str | None]]]]:
    """The offers of ``Sec-WebSocket-Extensions``, in order: ``[(name, [(param, value)])]``.

    Names and parameter names are lower-cased; a quoted value is unquoted.
    A header that does not follow the grammar of RFC 6455 section 9.1
    contributes no offer at all: it is declined, not guessed at.
    """
    offers = []
    for value in request.fields.get("sec-websocket-extensions", ()):
        offers += _parse_extension_list(value)
    return offers


def _parse_extension_list(value: str) -> list[tuple[str, list[tuple[str, str | None]]]]:
    items, position = [], 0
    while position < len(value.rstrip()):
        match = _EXTENSION_TOKEN.match(value, position)
        if match is None:
            return []
        token, quoted, mark = match.groups()
        items.append(("token", token) if token else ("quoted", re.sub(r"\\(.)", r"\1", quoted)) if quoted is not None
                     else ("mark", mark))
        position = match.end()
    offers: list[tuple[str, list[tuple[str, str | None]]]] = []
    expect = "name"  # what the grammar allows next
    for kind, text in items:
        if expect == "name":
            if kind == "mark" and text == ",":
                continue  # an empty list element: ignored, as RFC 9110 section 5.6.1 asks
            if kind != "token":
                return []
            offers.append((text.lower(), []))
            expect = "after"
        elif expect == "after":  # after a name or a whole parameter
            if text == ";" and kind == "mark":
                expect = "param"
            elif text == "," and kind == "mark":
                expect = "name"
            elif text == "=" and kind == "mark" and offers[-1][1] and offers[-1][1][-1][1] is None:
                expect = "value"
            else:
                return []
        elif expect == "param":
            if kind != "token":
                return []
            offers[-1][1].append((text.lower(), None))
            expect = "after"
        elif expect == "value":
            if kind == "mark":
                return []
            name, _ = offers[-1][1].pop()
            offers[-1][1].append((name, text))
            expect = "after"
    return offers if expect in ("after", "name") else []


@dataclass
class Accepted:
    """The outcome of a successful negotiation."""

    request: Request
    key: str
    subprotocol: str | None = None  # as the server names it
    subprotocol_token: str | None = None  # as the client spelled it: the answer must echo one of its values
    extensions: list[Agreement] = field(default_factory=list)
    extension_header: str | None = None

    @property
    def rsv(self) -> int:
        """The RSV bits the accepted extensions allow."""
        bits = 0
        for agreement in self.extensions:
            bits |= agreement.rsv
        return bits

    def agreement(self, name: str) -> Agreement | None:
        """The agreement of the extension called ``name``, if it was accepted."""
        return next((agreement for agreement in self.extensions if agreement.response.split(";", 1)[0] == name), None)

    def response(self) -> bytes:
        """The ``101 Switching Protocols`` response."""
        headers = [
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Accept", accept_key(self.key)),
        ]
        if self.subprotocol_token:
            headers.append(("Sec-WebSocket-Protocol", self.subprotocol_token))
        if self.extension_header:
            headers.append(("Sec-WebSocket-Extensions", self.extension_header))
        return build_response(101, headers)


def _single(request: Request, name: str) -> str | None:
    values = request.fields.get(name.lower(), ())
    if len(values) > 1:
        raise HandshakeError(400, f"more than one {name} header")
    return values[0].strip() if values else None


def negotiate(
    request: Request,
    *,
    allowed_origins: Iterable[str] | None = None,
    subprotocols: Sequence[str] = (),
    extensions: Sequence[Extension] = (),
) -> Accepted:
    """Check an upgrade request (RFC 6455 section 4.2.1) and agree on its terms.

    Raises ``HandshakeError`` with the status to answer: 426 for a request
    that asks no upgrade to WebSocket (a browser that opens the address as a
    page, say: the response names the protocol wanted) or for a version
    other than 13, 403 for an Origin outside ``allowed_origins`` (a request
    without Origin, from a non-browser client, is let through), 400 for
    anything else.  The subprotocol chosen is the first of ``subprotocols``
    (server preference) that the client offered, compared without regard to
    case and answered in the client's own spelling.
    """
    if "websocket" not in request.tokens("Upgrade"):
        raise HandshakeError(426, "this address takes WebSocket connections only (missing 'Upgrade: websocket')",
                             (("Upgrade", "websocket"),))
    if request.method != "GET":
        raise HandshakeError(400, "WebSocket upgrade needs the GET method")
    if request.version != "HTTP/1.1":
        raise HandshakeError(400, "WebSocket upgrade needs HTTP/1.1")
    if not _single(request, "Host"):
        raise HandshakeError(400, "missing Host header")
    if request.fields.get("transfer-encoding") or request.fields.get("content-length", ["0"]) != ["0"]:
        # Section 4.1: the upgrade is a GET without a body.  Bytes after the head are frames, so a
        # body would be read as frames (standalone) or swallowed by a WSGI server: refuse it before the 101.
        raise HandshakeError(400, "a WebSocket upgrade request has no body")
    if "upgrade" not in request.tokens("Connection"):
        raise HandshakeError(400, "missing 'Connection: Upgrade'")
    version = _single(request, "Sec-WebSocket-Version")
    if version != SUPPORTED_VERSION:
        raise HandshakeError(
            426, f"unsupported WebSocket version {version!r}", (("Sec-WebSocket-Version", SUPPORTED_VERSION),)
        )
    key = _single(request, "Sec-WebSocket-Key")
    try:
        if key is None or len(base64.b64decode(key, validate=True)) != 16:
            raise ValueError
    except (binascii.Error, ValueError):
        raise HandshakeError(400, "Sec-WebSocket-Key must be base64 of 16 bytes") from None
    if allowed_origins is not None:
        origin = _single(request, "Origin")
        if origin is not None and origin.lower() not in {o.lower() for o in allowed_origins}:
            raise HandshakeError(403, f"origin {origin} not allowed")

    accepted = Accepted(request, key)
    offered = {token.lower(): token for token in reversed(request.values("Sec-WebSocket-Protocol"))}
    accepted.subprotocol = next((p for p in subprotocols if p.lower() in offered), None)
    if accepted.subprotocol is not None:
        accepted.subprotocol_token = offered[accepted.subprotocol.lower()]

    by_name = {extension.name.lower(): extension for extension in extensions}
    settled = set()
    for name, params in parse_extensions(request):  # the client's order is its preference
        extension = by_name.get(name)
        if extension is None or name in settled:
            continue
        agreement = extension.accept(params)
        if agreement is not None:
            settled.add(name)
            accepted.extensions.append(agreement)
    accepted.extension_header = ", ".join(agreement.response for agreement in accepted.extensions) or None
    return accepted


def build_response(
    status: int,
    headers: Iterable[tuple[str, str]] = (),
    body: bytes = b"",
    *,
    with_length: bool = False,
    head_only: bool = False,
) -> bytes:
    """An HTTP/1.1 response head, with ``body`` appended (and counted, with
    ``with_length``).  ``head_only`` answers a HEAD request: the length of
    the body, but not the body."""
    phrase = HTTPStatus(status).phrase
    lines = [f"HTTP/1.1 {status} {phrase}"]
    lines.extend(f"{name}: {value}" for name, value in headers)
    if with_length:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (b"" if head_only else body)


SECURITY_HEADERS = (
    ("X-Content-Type-Options", "nosniff"),
    ("Content-Security-Policy", "default-src 'none'; frame-ancestors 'none'"),
)


def text_response(status: int, body: bytes, content_type: str = "text/plain; charset=utf-8", *,
                  head_only: bool = False, headers: Iterable[tuple[str, str]] = ()) -> bytes:
    """A whole response that closes the connection: ``body`` (but not for HEAD),
    never cached, never sniffed as another type, never framed.  An
    ``Upgrade`` among ``headers`` is named in ``Connection`` too, as RFC 9110
    section 7.8 requires of its sender."""
    headers = list(headers)
    connection = "Upgrade, close" if any(name == "Upgrade" for name, _ in headers) else "close"
    headers += [("Content-Type", content_type), ("Cache-Control", "no-store"), *SECURITY_HEADERS,
                ("Connection", connection)]
    return build_response(status, headers, body, with_length=True, head_only=head_only)


def build_error_response(error: HandshakeError, *, head_only: bool = False) -> bytes:
    """A plain-text HTTP error response that closes the connection (no body for HEAD)."""
    return text_response(error.status, (error.reason + "\n").encode("utf-8"), head_only=head_only, headers=error.headers)
