"""The ``wschat.v1`` dialect on the wire: JSON events out, JSON requests in.

Every event leaves in one compact form (``encode``), the same in every engine
and process.  Requests come in bounded: no longer than a chat message may be
(with room for escapes), and never nested deeper than the JSON parser can
take; what is wrong with one is said in words the client can show.  The
format is in README.rst.
"""

from __future__ import annotations

import json
import time
from typing import Any
from urllib.parse import parse_qs, urlsplit

from .accelerator import speedups
from .logsafe import quoted

Event = dict[str, Any]  # an event or a request, as its JSON object

SUBPROTOCOL = "wschat.v1"
MAX_REQUEST = 64 * 1024  # characters in one request when chat messages have no length limit
FIELDS = {"message": "text", "nick": "nick", "users": None}  # request type -> the string it carries


_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))  # json.dumps would make one a call
_string = json.encoder.encode_basestring  # a str as _ENCODER writes it: quoted, escaped, non-ASCII left as it is
_MESSAGE_KEYS = ("type", "room", "nick", "text", "time")  # message_record's, in its order


def encode(event: Event) -> str:
    """One event as JSON: compact, non-ASCII left as it is."""
    if event.get("type") == "message":
        return _encode_message(event)
    return _ENCODER.encode(event)


def _encode_message(record: Event) -> str:
    """``encode`` of a chat message as ``message_record`` makes it (with an
    ``id``, a ``seq``): the same text, written directly in half the time
    (over Redis every message is encoded once, on the loop); any other
    shape goes to the encoder."""
    keys = tuple(record)
    tail = ""
    try:
        if keys[:5] != _MESSAGE_KEYS or type(record["time"]) is not int:
            raise TypeError
        for key in keys[5:]:
            value = record[key]
            if key == "id" and type(value) is str:
                tail += ',"id":' + _string(value)
            elif key == "seq" and type(value) is int:
                tail += f',"seq":{value}'
            else:
                raise TypeError
        return (f'{{"type":"message","room":{_string(record["room"])},"nick":{_string(record["nick"])},'
                f'"text":{_string(record["text"])},"time":{record["time"]}{tail}}}')
    except TypeError:  # (also from _string: a value that is not a str)
        return _ENCODER.encode(record)


def utf8_size(text: str) -> int:
    """``text``'s length in UTF-8, without encoding it when it is ASCII (as
    most JSON and chat text is: an O(1) test in CPython)."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def now_ms() -> int:
    """The time events carry: milliseconds since the epoch."""
    return int(time.time() * 1000)


MAX_ID = 64  # characters in a message's "id", the sender's own name for it


def message_record(room: str, nick: str, text: str, message_id: str | None = None) -> Event:
    """A chat message as it is published (its engine adds ``seq``), with
    the sender's ``id`` for it when it gave one."""
    record = {"type": "message", "room": room, "nick": nick, "text": text, "time": now_ms()}
    if message_id is not None:
        record["id"] = message_id
    return record


def text_of(line: bytes) -> bytes:
    """A message's text, in UTF-8, from its JSON (``encode``'s, in UTF-8)
    without decoding the JSON: the bytes between the quotes of its ``"text"``
    when no escape is among them, as in most chat text.  (In JSON a quote
    inside a string is escaped, so the first ``,"text":"`` is the key's.)"""
    start = line.find(b',"text":"') + 9
    end = line.find(b'"', start)
    if start < 9 or end < 0 or line.find(b"\\", start, end) >= 0:  # not plain: decode it
        text: str = json.loads(line)["text"]
        return text.encode("utf-8")
    return line[start:end]


def texts_of(lines: list[bytes]) -> list[bytes]:
    """``text_of`` each line (in the C accelerator when it is there)."""
    if speedups:
        texts: list[bytes] = speedups.json_texts(lines, text_of)
        return texts
    return [text_of(line) for line in lines]


def announcement(text: str) -> str:
    """``Server.broadcast``'s text to every client, as a wschat.v1 event: a
    message from "server" with no room and no ``seq`` (it is in no history)."""
    return encode({"type": "message", "nick": "server", "text": text, "time": now_ms()})


def parse_chat_request(message: str, max_length: int = 0) -> tuple[Event | None, str | None]:
    """A request, or why it is not one.  ``max_length`` is the chat's
    message length limit (0: none), which bounds a request too."""
    limit = 6 * max_length + 1024 if max_length else MAX_REQUEST
    if len(message) > limit:
        return None, f"request longer than {limit} characters"
    try:
        request = json.loads(message)
    except RecursionError:
        return None, "request nested too deeply: a request is a flat JSON object"
    except json.JSONDecodeError as exc:
        return None, f"not JSON ({exc.msg} at character {exc.pos})"
    if not isinstance(request, dict) or not isinstance(request.get("type"), str):
        return None, 'expected a JSON object with a "type" string'
    kind = request["type"]
    if kind not in FIELDS:
        return None, f'unknown request type {quoted(kind, 40)}: "message", "nick" or "users"'
    field = FIELDS[kind]
    if field is not None and not isinstance(request.get(field), str):
        return None, f'a "{kind}" request needs a "{field}" string'
    problem = text_problem(request["text"]) if field == "text" else None
    if problem is None and kind == "message" and "id" in request:
        message_id = request["id"]
        if not isinstance(message_id, str) or not 0 < len(message_id) <= MAX_ID or text_problem(message_id):
            problem = f'an "id" is a string of 1 to {MAX_ID} characters'
    return (None, f"{problem}; not sent") if problem else (request, None)


def text_problem(text: str) -> str | None:
    """Why ``text`` cannot be sent, or None: a lone surrogate is valid JSON
    but not Unicode, and is refused before anything is stored.  (Text from a
    frame never has one: it was decoded from valid UTF-8.)"""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"text is not valid Unicode (a lone surrogate at character {exc.start})"
    return None


def asked_nick(target: str) -> str:
    """The nickname a client asks for in its handshake: ``?nick=NAME``."""
    return parse_qs(urlsplit(target).query).get("nick", [""])[0].strip()


def returning_from(target: str) -> tuple[int | None, str | None]:
    """Where a returning client left off: ``?since=SEQ&epoch=EPOCH`` (see
    ``engine.select_history``); (None, None) for a newcomer."""
    query = parse_qs(urlsplit(target).query)
    since = query.get("since", [""])[0]
    if not since.isascii() or not since.isdigit() or len(since) > 18:
        return None, None
    return int(since), query.get("epoch", [None])[0]
