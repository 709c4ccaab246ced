"""What a process does with the messages its engine delivers: a published
batch split into its messages' lines (``redis_store.message_lines``), runs of
messages (``engine.Messages``), read from their JSON without decoding it
(``dialect.text_of``), framed in one pass (``frames.frame_texts``), and
delivered by a ``LocalRoom`` to its plain and wschat.v1 members."""

import json
import random

import pytest

from wschat import dialect, frames
from wschat.dialect import encode, message_record, text_of, texts_of
from wschat.engine import Lines, Records, record_of
from wschat.frames import Opcode, frame_header
from wschat.redis_store import message_lines_python
from wschat.rooms import LocalRoom, Recent

from .conftest import _speedups

AWKWARD = ['say "hi"', "back\\slash\\", "line\nbreak\ttab", "\x00\x1f\x7f", "é ü 中文 🎉", '","text":"', "\\",
           '"', "", "x" * 300, "\u2028\u2029", "a\\\"b"]


def line_of(text, nick="ann", seq=1, message_id=None):
    """A message's JSON line as Redis carries it: ``encode``'s, with the seq the script appends."""
    record = message_record("lobby", nick, text, message_id)
    return (encode(record)[:-1] + f',"seq":{seq}}}').encode("utf-8")


def test_text_of_is_the_decoded_text_for_any_text_and_any_nick():
    rng = random.Random(7692)
    lines = [line_of(text, nick) for text in AWKWARD for nick in ("ann", '","text":"x', "b\\", 'q"')]
    lines += [line_of("".join(rng.choice('ab"\\\n é🎉,:{}') for _ in range(rng.randrange(0, 40))), message_id="m1")
              for _ in range(300)]
    expected = [json.loads(line)["text"].encode("utf-8") for line in lines]
    assert [text_of(line) for line in lines] == expected
    assert texts_of(lines) == expected  # the accelerator's path where it is built


def test_a_message_is_encoded_as_the_json_encoder_writes_it_whatever_its_shape():
    """``encode`` writes chat messages itself (half the encoder's
    time): the same text for any text, nick, id and seq, and the encoder's
    for any other shape."""
    rng = random.Random(6455)
    strings = AWKWARD + ["\ud800 lone surrogate", "\udfff"] + [
        "".join(rng.choice('ab"\\\n\x01 é🎉,:{}\ud83d') for _ in range(rng.randrange(0, 30))) for _ in range(200)]
    records = []
    for text in strings:
        record = message_record(rng.choice(strings), rng.choice(strings), text, rng.choice([None, *strings]))
        if rng.random() < 0.5:
            record["seq"] = rng.randrange(1, 2**53)
        records.append(record)
    first = message_record("r", "n", "t")
    records += [
        {**first, "seq": True}, {**first, "time": 1.5}, {**first, "seq": 1, "id": "after"}, {**first, "extra": 1},
        {"type": "message", "nick": "server", "text": "t", "time": 1},  # an announcement: no room
        {"room": "r", "type": "message", "nick": "n", "text": "t", "time": 1},  # another order
        {**first, "nick": None}, {**first, "text": ["not", "a", "str"]}, {**first, "id": 7},
    ]
    expected = [json.dumps(record, ensure_ascii=False, separators=(",", ":")) for record in records]
    assert [encode(record) for record in records] == expected
    assert json.loads(encode(records[0])) == records[0]


def test_text_of_decodes_what_is_not_wschats_own_shape():
    """No "text" after a comma (a foreign or reordered record): decoded the long way."""
    assert text_of(b'{"text":"first","type":"message"}') == b"first"
    with pytest.raises(ValueError):
        text_of(b'{"type":"message","text":"unterminated')


@pytest.mark.skipif(_speedups is None, reason="C accelerator not built")
def test_c_json_texts_falls_back_line_by_line_and_checks_its_arguments():
    asked = []

    def fallback(line):
        asked.append(line)
        return b"decoded"

    lines = [line_of("plain"), line_of('has "quotes"'), b"{}"]
    assert _speedups.json_texts(lines, fallback) == [b"plain", b"decoded", b"decoded"]
    assert asked == lines[1:]
    with pytest.raises(ZeroDivisionError):  # the fallback's error goes up as it is
        _speedups.json_texts([b"{}"], lambda line: 1 / 0)
    with pytest.raises(TypeError):
        _speedups.json_texts((b"{}",), fallback)
    with pytest.raises(TypeError):
        _speedups.json_texts(["text"], fallback)


AWKWARD_LINES = [line_of(text, seq=seq) for seq, text in enumerate(AWKWARD, 1)]
BATCHES = [b"e1\nM" + b"\nM".join(AWKWARD_LINES),
           b"e1\nMa\nEb\nMc", b"e1", b"e1\n", b"e1\nM", b"\nM", b"e1\nMa\n\nE", b"e1\nX\nMa", b"e1\nM\nMb\n",
           b"e1\nMa\nE", b"\n", b""]


def test_a_batch_of_messages_splits_into_its_first_line_and_messages():
    assert message_lines_python(BATCHES[0]) == (b"e1", AWKWARD_LINES)  # JSON has no raw line break
    assert message_lines_python(b"e1\nMa\nEb\nMc") is None  # an event: read line by line


@pytest.mark.skipif(_speedups is None, reason="C accelerator not built")
def test_c_message_lines_splits_as_python_does():
    noise = random.Random(19)
    shuffled = [bytes(noise.choice(b"\nME{x") for _ in range(noise.randrange(12))) for _ in range(2000)]
    for batch in BATCHES + shuffled:
        assert _speedups.message_lines(batch) == message_lines_python(batch), batch
    with pytest.raises(TypeError):
        _speedups.message_lines(bytearray(b"e1\nMa"))


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 70000])
def test_frame_texts_is_each_payload_as_a_final_text_frame(size):
    payloads = [b"a", b"x" * size, "é".encode()]
    expected = b"".join(frame_header(Opcode.TEXT, len(payload)) + payload for payload in payloads)
    assert frames.frame_texts_python(payloads) == expected
    assert frames.frame_texts(payloads) == expected  # the accelerator's where it is built


@pytest.mark.parametrize("implementation", [frames.frame_texts_python, frames.frame_texts])
def test_frame_texts_gives_none_when_a_payload_reaches_below(implementation):
    payloads = [b"a", b"x" * 100, b"b"]
    assert implementation(payloads, 101) == implementation(payloads) == implementation(payloads, 0)
    assert implementation(payloads, 100) is None
    assert implementation([b"x" * 16384], 16384) is None
    assert implementation([], 1) == b""


@pytest.mark.skipif(_speedups is None, reason="C accelerator not built")
def test_c_frame_texts_checks_its_arguments():
    assert _speedups.frame_texts([]) == b""
    with pytest.raises(TypeError):
        _speedups.frame_texts((b"a",))
    with pytest.raises(TypeError):
        _speedups.frame_texts([b"a", "b"])
    with pytest.raises(TypeError):
        _speedups.frame_texts([b"a"], "1")
    with pytest.raises(TypeError):
        _speedups.frame_texts()
    with pytest.raises(TypeError):
        _speedups.frame_texts([b"a"], 1, 2)


def test_runs_of_records_break_where_the_numbering_skips():
    records = [{"seq": seq, "text": str(seq)} for seq in (4, 5, 6, 9, 10, 12)]
    runs = Records.runs("e1", records)
    assert [(run.first, run.last, len(run)) for run in runs] == [(4, 6, 3), (9, 10, 2), (12, 12, 1)]
    assert [record for run in runs for _, record in run.kept()] == records
    assert runs[0].after(4).items == records[1:3] and runs[0].after(4).first == 5
    assert len(runs[0].after(6)) == 0 and runs[0].after(1).items == records[:3]


def test_lines_give_texts_jsons_and_records_as_they_were_published():
    lines = [line_of(text, seq=seq) for seq, text in enumerate(["one", 'two "2"', "three"], 7)]
    run = Lines("e1", 7, lines)
    assert run.last == 9 and run.jsons() is lines
    assert run.texts() == [b"one", b'two "2"', b"three"]
    kept = list(run.after(7).kept())
    assert [seq for seq, _ in kept] == [8, 9]
    assert [record_of(line)["text"] for _, line in kept] == ['two "2"', "three"]
    assert list(run.kept(2)) == [(8, lines[1]), (9, lines[2])] and list(run.kept(5)) == list(run.kept())
    assert record_of({"seq": 1}) == {"seq": 1}


class Members:
    """Stands in for ``Server.broadcast``: what each dialect's members were sent."""

    def __init__(self):
        self.sent = []

    def __call__(self, message, connections=(), exclude=None):
        dialect_of = "structured" if connections is self.room.structured else "plain"
        self.sent.append((dialect_of, message))
        return len(connections)

    def frames(self, which):
        """The text messages ``which`` members got, each decoded from its frame."""
        parser = frames.FrameParser(require_mask=False, max_payload=1 << 20)
        found = []
        for dialect_of, message in self.sent:
            if dialect_of == which:
                parser.feed(b"".join(message.parts) if hasattr(message, "parts") else frames.encode_frame(
                    Opcode.TEXT, message.encode()))
                while (frame := parser.next_frame()) is not None:
                    found.append(frame.payload.decode())
        return found


@pytest.fixture
def room():
    members = Members()
    local = LocalRoom("lobby", members, Recent(5, 1 << 20))
    members.room = local
    local.plain[object()] = None
    local.structured[object()] = None
    local.epoch, local.seq = "e1", 0
    return local, members


def test_a_room_delivers_runs_from_both_engines_once_in_order_and_keeps_the_last(room):
    local, members = room
    published = [line_of(f"m{seq}", seq=seq) for seq in range(1, 5)]
    local.deliver([Lines("e1", 1, published[:3]), {"type": "join", "room": "lobby", "nick": "bob"},
                   Lines("e1", 2, published[1:4]),  # 2 and 3 again (a gap fill met the live ones): 4 is new
                   Records("e1", 5, [{**json.loads(published[0]), "seq": 5, "text": "m5"}])])
    assert members.frames("plain") == ["m1", "m2", "m3", "m4", "m5"]
    structured = [json.loads(text) for text in members.frames("structured")]
    assert [(event["type"], event.get("seq")) for event in structured] == [
        ("message", 1), ("message", 2), ("message", 3), ("join", None), ("message", 4), ("message", 5)]
    assert local.seq == 5 and [seq for seq, _ in local.recent] == [1, 2, 3, 4, 5]
    local.deliver([Lines("e1", 6, [line_of(f"m{seq}", seq=seq) for seq in range(6, 13)])])  # more than it keeps
    assert [(seq, record_of(kept)["text"]) for seq, kept in local.recent] == [(seq, f"m{seq}") for seq in range(8, 13)]


def test_a_newcomers_catch_up_decodes_only_what_was_delivered_after_its_history(room):
    from wschat.engine import History

    local, _ = room
    local.deliver([Lines("e1", 1, [line_of(f"m{seq}", seq=seq) for seq in range(1, 5)])])
    history = History("e1", 2, [{"seq": 1, "text": "m1"}, {"seq": 2, "text": "m2"}], False)
    caught, whole, missed = local.catch_up(history)
    assert [(record["seq"], record["text"]) for record in caught] == [(1, "m1"), (2, "m2"), (3, "m3"), (4, "m4")]
    assert whole and not missed


def test_a_newcomers_history_older_than_what_the_room_holds_is_not_whole(room):
    """Where the room stands past a newcomer's history by messages it does
    not hold (more than it keeps), the catch-up says it is not whole (the
    chat reads the history again, and greets with what there is at last)."""
    from wschat.engine import History

    local, _ = room
    local.deliver([Lines("e1", 1, [line_of(f"m{seq}", seq=seq) for seq in range(1, 9)])])  # keeps 4-8
    records, whole, _ = local.catch_up(History("e1", 2, [{"seq": 1, "text": "m1"}, {"seq": 2, "text": "m2"}], False))
    assert [record["seq"] for record in records] == [1, 2, 4, 5, 6, 7, 8] and not whole and local.seq == 8
    records, whole, _ = local.catch_up(History("e1", 3, [], False))
    assert [record["seq"] for record in records] == [4, 5, 6, 7, 8] and whole


def test_what_a_room_holds_is_bounded_in_weight_as_well_as_in_number():
    """However long its messages, a room here holds no more than ``max_bytes``
    of them (the newest), and a newcomer whose history ends before them is
    read again, as when the room holds too few."""
    from wschat.engine import History

    recent = Recent(64, 1000)
    local = LocalRoom("lobby", Members(), recent)
    local.epoch, local.seq = "e1", 0
    local.deliver([Lines("e1", 1, [line_of(f"m{seq}", seq=seq) for seq in range(1, 11)])])  # short: all ten fit
    assert [seq for seq, _ in recent] == list(range(1, 11)) and recent.size == sum(len(kept) for _, kept in recent)
    long_lines = [line_of(f"{seq} " + "x" * 200, seq=seq) for seq in range(11, 15)]  # 3 fit, not 4
    local.deliver([Lines("e1", 11, long_lines)])
    assert [seq for seq, _ in recent] == [12, 13, 14] and recent.size == sum(map(len, long_lines[1:])) <= 1000
    _, whole, _ = local.catch_up(History("e1", 10, [], False))
    assert not whole
    local.deliver([Records("e1", 15, [{"seq": 15, "text": "y" * 900}])])  # a record weighs its text and 160
    assert [seq for seq, _ in recent] == [] and recent.size == 0  # heavier than the bound: none held
    recent.clear()
    assert len(recent) == 0 and recent.size == 0


def test_what_a_room_holds_is_the_newest_messages_within_both_bounds_whatever_the_runs():
    """``Recent`` holds runs, not messages: after any runs of either engine,
    long or short, what it holds is what a message-by-message model holds
    (the newest ``count`` at most, then the newest within ``max_bytes``)."""
    rng = random.Random(6455)
    for _ in range(300):
        count, max_bytes = rng.choice([1, 3, 5, 64]), rng.choice([50, 400, 2000, 1 << 20])
        recent, model, seq = Recent(count, max_bytes), [], 0
        for _ in range(rng.randrange(1, 12)):
            size = rng.choice([0, 1, 2, 5, 70, 200])
            texts = ["x" * rng.choice([1, 30, 150, 900]) for _ in range(size)]
            if rng.random() < 0.5:
                run = Lines("e1", seq + 1, [line_of(text, seq=seq + 1 + i) for i, text in enumerate(texts)])
            else:
                run = Records("e1", seq + 1, [{"seq": seq + 1 + i, "text": text} for i, text in enumerate(texts)])
            seq += size
            model += zip([s for s, _ in run.kept()], [k for _, k in run.kept()], run.sizes(size))
            del model[:max(0, len(model) - count)]
            while sum(weight for _, _, weight in model) > max_bytes:
                del model[0]
            recent.add(run)
            assert [(s, k) for s, k in recent] == [(s, k) for s, k, _ in model]
            assert len(recent) == len(model) and recent.size == recent.held.total == sum(w for _, _, w in model)


def test_what_the_engine_no_longer_keeps_after_since_comes_from_what_the_room_holds(room):
    """A newcomer that saw up to ``since`` (a plain client at its handshake, a
    client coming back), where the engine keeps too little history: the
    messages after it that the room here still holds fill the gap, and it
    missed some only if they do not."""
    from wschat.engine import History

    local, _ = room
    local.deliver([Lines("e1", 1, [line_of(f"m{seq}", seq=seq) for seq in range(1, 9)])])  # keeps 4-8
    nothing_kept = History("e1", 8, [], True)
    records, whole, missed = local.catch_up(nothing_kept, ("e1", 5))
    assert [record["seq"] for record in records] == [6, 7, 8] and whole and not missed
    records, _, missed = local.catch_up(nothing_kept, ("e1", 2))  # 3 is gone here too
    assert [record["seq"] for record in records] == [4, 5, 6, 7, 8] and missed
    records, _, missed = local.catch_up(History("e1", 8, [{"seq": 8, "text": "m8"}], True), ("e1", 6))
    assert [record["seq"] for record in records] == [7, 8] and not missed
    records, _, missed = local.catch_up(nothing_kept, ("e0", 5))  # another sequence's number: nothing to fill
    assert records == [] and missed


def test_no_speedups_reads_texts_in_python(monkeypatch):
    monkeypatch.setattr(dialect, "speedups", None)
    assert texts_of([line_of('q"'), line_of("p")]) == [b'q"', b"p"]
