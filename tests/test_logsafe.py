"""Peer text made safe for log lines."""

from wschat.logsafe import address_text, quoted


def test_quoted_escapes_line_breaks_controls_and_bidi():
    assert quoted("a\nb\r\x1b[31m\u202e") == repr("a\nb\r\x1b[31m\u202e")
    assert "\n" not in quoted("x\ny") and "\u202e" not in quoted("\u202e")


def test_quoted_cuts_and_takes_bytes():
    assert quoted("x" * 10, limit=4) == "'xxxx'…"
    assert quoted(b"ok\xff\n") == repr("ok\\xff\n")
    assert quoted(None) == "None"


def test_address_text():
    assert address_text(("127.0.0.1", 80)) == "127.0.0.1:80"
    assert address_text(("::1", 80, 0, 0)) == "::1:80"
    assert address_text("/tmp/socket") == "/tmp/socket"
