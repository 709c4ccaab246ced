from types import SimpleNamespace

import pytest

from wschat import handshake
from wschat.errors import HandshakeError
from wschat.handshake import accept_key, find_head_end, negotiate, parse_extensions, parse_request

KEY = "dGhlIHNhbXBsZSBub25jZQ=="


def head(lines, request_line="GET /chat HTTP/1.1"):
    return (request_line + "\r\n" + "".join(f"{line}\r\n" for line in lines) + "\r\n").encode()


GOOD = ["Host: localhost:1984", "Upgrade: websocket", "Connection: Upgrade", f"Sec-WebSocket-Key: {KEY}", "Sec-WebSocket-Version: 13"]


def without(name, lines=GOOD):
    return [line for line in lines if not line.lower().startswith(name.lower() + ":")]


def request(lines=GOOD, **kwargs):
    return parse_request(head(lines, **kwargs))


def refused(lines=GOOD, request_line="GET /chat HTTP/1.1", **kwargs):
    with pytest.raises(HandshakeError) as info:
        negotiate(parse_request(head(lines, request_line)), **kwargs)
    return info.value


def test_accept_key_rfc_example():
    # RFC 6455 section 1.3.
    assert accept_key(KEY) == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_good_request_gets_101():
    accepted = negotiate(request())
    response = accepted.response()
    assert response.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert b"\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in response
    assert b"\r\nUpgrade: websocket\r\n" in response and b"\r\nConnection: Upgrade\r\n" in response
    assert response.endswith(b"\r\n\r\n") and b"Sec-WebSocket-Protocol" not in response
    assert accepted.request.path == "/chat" and accepted.rsv == 0


def test_header_matching_is_case_insensitive_and_tokenised():
    lines = without("connection", without("upgrade")) + ["upgrade: WebSocket", "connection: keep-alive, Upgrade"]
    assert negotiate(request(lines)).key == KEY
    lines = without("connection") + ["Connection: keep-alive", "Connection: upgrade"]
    assert negotiate(request(lines)).key == KEY


def test_an_empty_body_declared_is_no_body():
    assert negotiate(request(GOOD + ["Content-Length: 0"])).key == KEY


def test_path_drops_query():
    assert request(request_line="GET /chat/room?x=1 HTTP/1.1").path == "/chat/room"


@pytest.mark.parametrize(
    "lines, request_line, reason",
    [
        (GOOD, "POST /chat HTTP/1.1", "GET"),
        (GOOD, "GET /chat HTTP/1.0", "HTTP/1.1"),
        (without("host"), None, "Host"),
        (GOOD + ["Host: other"], None, "more than one Host"),
        (without("connection"), None, "Connection"),
        (without("connection") + ["Connection: keep-alive"], None, "Connection"),
        (without("sec-websocket-key"), None, "Key"),
        (without("sec-websocket-key") + ["Sec-WebSocket-Key: not base64!"], None, "Key"),
        (without("sec-websocket-key") + ["Sec-WebSocket-Key: AAAA"], None, "Key"),
        (GOOD + [f"Sec-WebSocket-Key: {KEY}"], None, "more than one"),
        (GOOD + ["Content-Length: 5"], None, "no body"),  # section 4.1: a GET without a body
        (GOOD + ["Transfer-Encoding: chunked"], None, "no body"),
        (GOOD + ["Content-Length: 0", "Content-Length: 0"], None, "no body"),
    ],
)
def test_bad_requests_get_400(lines, request_line, reason):
    error = refused(lines, request_line or "GET /chat HTTP/1.1")
    assert error.status == 400 and reason in error.reason


@pytest.mark.parametrize("lines", [without("upgrade"), without("upgrade") + ["Upgrade: h2c"], ["Host: x"]],
                         ids=["no-upgrade", "another-protocol", "a-page-request"])
def test_a_request_that_asks_no_websocket_upgrade_gets_426_naming_it(lines):
    """A browser that opens the WebSocket address as a page gets 426 (RFC 9110
    15.5.22: the response names the protocol wanted, in Upgrade and so in
    Connection), not 400: its request is good HTTP."""
    error = refused(lines)
    assert error.status == 426 and error.headers == (("Upgrade", "websocket"),)
    assert "WebSocket connections only" in error.reason and "Upgrade: websocket" in error.reason
    head, _, body = handshake.build_error_response(error).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 426 Upgrade Required\r\n")
    assert b"\r\nUpgrade: websocket\r\n" in head and b"\r\nConnection: Upgrade, close\r\n" in head
    assert body == (error.reason + "\n").encode()


@pytest.mark.parametrize("version", [None, "8", "14", "13, 8"])
def test_other_versions_get_426_with_version_header(version):
    lines = without("sec-websocket-version") + ([f"Sec-WebSocket-Version: {version}"] if version else [])
    error = refused(lines)
    assert error.status == 426 and error.headers == (("Sec-WebSocket-Version", "13"),)
    response = handshake.build_error_response(error)
    assert response.startswith(b"HTTP/1.1 426 Upgrade Required\r\n")
    assert b"\r\nSec-WebSocket-Version: 13\r\n" in response and b"\r\nConnection: close\r\n" in response


def test_origin_allow_list():
    allowed = ["http://localhost:1984"]
    assert negotiate(request(GOOD + ["Origin: HTTP://LOCALHOST:1984"]), allowed_origins=allowed)
    assert negotiate(request(), allowed_origins=allowed)  # non-browser client: no Origin
    assert refused(GOOD + ["Origin: http://evil.example"], allowed_origins=allowed).status == 403
    assert negotiate(request(GOOD + ["Origin: http://evil.example"]))  # no list: no policy


def test_subprotocol_server_preference():
    lines = GOOD + ["Sec-WebSocket-Protocol: chat, wschat.v1"]
    accepted = negotiate(request(lines), subprotocols=["wschat.v1", "chat"])
    assert accepted.subprotocol == "wschat.v1"
    assert b"\r\nSec-WebSocket-Protocol: wschat.v1\r\n" in accepted.response()
    assert negotiate(request(lines), subprotocols=["other"]).subprotocol is None
    assert negotiate(request(), subprotocols=["wschat.v1"]).subprotocol is None


class FakeExtension:
    name = "x-fake"

    def __init__(self):
        self.offers = []

    def accept(self, params):
        self.offers.append(params)
        if ("refuse", None) in params:
            return None
        return SimpleNamespace(response="x-fake; agreed", rsv=0b010)


def test_extension_negotiation_hook():
    ext = FakeExtension()
    lines = GOOD + ['Sec-WebSocket-Extensions: x-unknown, x-fake; client_max_window_bits; server_max_window_bits="10"',
                    "Sec-WebSocket-Extensions: x-fake"]
    accepted = negotiate(request(lines), extensions=[ext])
    assert ext.offers == [[("client_max_window_bits", None), ("server_max_window_bits", "10")]]  # the first it took
    assert accepted.rsv == 0b010 and accepted.agreement("x-fake").response == "x-fake; agreed"
    assert b"\r\nSec-WebSocket-Extensions: x-fake; agreed\r\n" in accepted.response()


def test_extension_declined_then_the_next_offer_taken():
    ext = FakeExtension()
    accepted = negotiate(request(GOOD + ["Sec-WebSocket-Extensions: x-fake; refuse, , x-fake; refuse"]), extensions=[ext])
    assert accepted.extensions == [] and accepted.extension_header is None
    assert b"Extensions" not in accepted.response()
    assert len(ext.offers) == 2
    accepted = negotiate(request(GOOD + ["Sec-WebSocket-Extensions: x-fake; refuse, x-fake"]), extensions=[ext])
    assert accepted.extension_header == "x-fake; agreed"


@pytest.mark.parametrize("header, offers", [
    ("a, b; c=d", [("a", []), ("b", [("c", "d")])]),
    ('a; c="quoted, with \\"escapes\\""', [("a", [("c", 'quoted, with "escapes"')])]),
    (" A ; C = 1 , , b ,", [("a", [("c", "1")]), ("b", [])]),
    ("a;;", []), ("a; =1", []), ("a; c=", []), ('a; c="open', []), ("a b", []), ("a=1", []), ("a; c=1=2", []),
])
def test_extension_header_grammar(header, offers):
    assert parse_extensions(request(GOOD + [f"Sec-WebSocket-Extensions: {header}"])) == offers


def test_find_head_end_and_size_limit():
    data = head(GOOD)
    assert find_head_end(data[:-1]) is None
    assert find_head_end(data) == len(data)
    assert find_head_end(data + b"extra") == len(data)
    with pytest.raises(HandshakeError) as info:
        find_head_end(b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 2000, max_size=8192)
    assert info.value.status == 431
    # A complete head that is too long is refused too, not only a partial one.
    with pytest.raises(HandshakeError):
        find_head_end(head(GOOD + ["X: " + "y" * 9000]), max_size=8192)


@pytest.mark.parametrize(
    "data, status",
    [
        (b"GET /chat\r\n\r\n", 400),
        (b"GET  /chat HTTP/1.1\r\n\r\n", 400),
        (b"GET /chat HTTP/2.0\r\n\r\n", 400),
        (b"GET chat HTTP/1.1\r\n\r\n", 400),
        (b"GET /\xff HTTP/1.1\r\n\r\n", 400),
        (head(["Host: x", "no colon here"]), 400),
        (head([f"X-{i}: y" for i in range(101)]), 431),
    ],
)
def test_malformed_requests(data, status):
    with pytest.raises(HandshakeError) as info:
        parse_request(data)
    assert info.value.status == status


def test_error_response_is_plain_text_and_closes():
    response = handshake.build_error_response(HandshakeError(400, "missing Host header"))
    head_part, body = response.split(b"\r\n\r\n", 1)
    assert head_part.startswith(b"HTTP/1.1 400 Bad Request")
    assert b"Connection: close" in head_part and b"Content-Length: 20" in head_part
    assert body == b"missing Host header\n"


def test_is_upgrade():
    assert request().is_upgrade
    assert not request(["Host: x"]).is_upgrade
