"""Our sans-I/O core against two independent RFC 6455 implementations."""

import pytest
import wsproto
import wsproto.events as wse
from websockets.client import ClientProtocol
from websockets.frames import Frame as WsFrame, Opcode as WsOpcode
from websockets.uri import parse_uri

from wschat.handshake import find_head_end, negotiate, parse_request
from wschat.protocol import BinaryMessage, CloseReceived, Ping, TextMessage

from .helpers import open_protocol, pull


def upgrade(request_bytes, **kwargs):
    end = find_head_end(request_bytes)
    return negotiate(parse_request(request_bytes[:end]), **kwargs)


def test_wsproto_client(implementation):
    client = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
    accepted = upgrade(client.send(wse.Request(host="localhost", target="/chat", subprotocols=["wschat.v1"])), subprotocols=["wschat.v1"])
    client.receive_data(accepted.response())
    [event] = client.events()
    assert isinstance(event, wse.AcceptConnection) and event.subprotocol == "wschat.v1"

    server = open_protocol()
    big = "ü" * 50000
    data = client.send(wse.TextMessage("hello")) + client.send(wse.BytesMessage(b"\x00" * 70000))
    data += client.send(wse.TextMessage(big[:7], message_finished=False)) + client.send(wse.TextMessage(big[7:]))
    data += client.send(wse.Ping(b"are you there"))
    assert pull(server, data) == [TextMessage("hello"), BinaryMessage(b"\x00" * 70000), TextMessage(big), Ping(b"are you there")]

    server.send_text("back at you")
    server.send_binary(b"\x01" * 300)
    client.receive_data(server.data_to_send())
    events = list(client.events())
    assert isinstance(events[0], wse.Pong) and events[0].payload == b"are you there"
    assert events[1].data == "back at you" and events[2].data == b"\x01" * 300

    pull(server, client.send(wse.CloseConnection(code=1000, reason="done")))
    client.receive_data(server.data_to_send())
    [closing] = client.events()
    assert isinstance(closing, wse.CloseConnection) and closing.code == 1000


def test_websockets_client(implementation):
    client = ClientProtocol(parse_uri("ws://localhost:1984/chat"), max_size=None)
    client.send_request(client.connect())
    accepted = upgrade(client.data_to_send()[0])
    client.receive_data(accepted.response())
    assert client.events_received()[0].status_code == 101

    server = open_protocol()
    client.send_text(b"hi there")
    client.send_binary(b"\xff" * 100000)
    client.send_ping(b"ping!")
    received = pull(server, b"".join(client.data_to_send()))
    assert received == [TextMessage("hi there"), BinaryMessage(b"\xff" * 100000), Ping(b"ping!")]

    server.send_text("ünïcode")
    server.close(1001, "bye")
    client.receive_data(server.data_to_send())
    frames = client.events_received()
    assert [f.opcode for f in frames] == [WsOpcode.PONG, WsOpcode.TEXT, WsOpcode.CLOSE]
    assert frames[1].data.decode() == "ünïcode"
    # The client echoes the close; that ends our closing handshake.
    assert pull(server, b"".join(client.data_to_send())) == [CloseReceived(1001, "bye")]
    assert server.data_to_send() == b""  # our close went first: nothing more to say


@pytest.mark.parametrize("code", [1002, 1007, 1009])
def test_our_failure_closes_are_understood_by_websockets(code):
    client = ClientProtocol(parse_uri("ws://localhost/"))
    client.send_request(client.connect())
    client.receive_data(upgrade(client.data_to_send()[0]).response())
    server = open_protocol(max_message_size=10)
    bad = {1002: WsFrame(WsOpcode.CONT, b"x"), 1007: WsFrame(WsOpcode.TEXT, b"\xff"), 1009: WsFrame(WsOpcode.BINARY, b"x" * 11)}[code]
    client.send_frame(bad)
    pull(server, b"".join(client.data_to_send()))
    client.receive_data(server.data_to_send())
    assert client.close_rcvd.code == code
