"""Peer text made safe for log lines."""

import pytest

from wschat.logsafe import address_text, quoted, without_password


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


@pytest.mark.parametrize("url, shown", [
    ("redis://:s3cret@10.0.0.20:6379/0", "redis://:***@10.0.0.20:6379/0"),
    ("rediss://app:p%40ss@redis.example:6380/2", "rediss://app:***@redis.example:6380/2"),
    ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
    ("redis://app@127.0.0.1/0", "redis://app@127.0.0.1/0"),
])
def test_a_password_in_a_url_never_reaches_a_log_line(url, shown):
    assert without_password(url) == shown
