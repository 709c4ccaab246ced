"""Names people choose: nicknames and room names, one rule for the server and the page.

Both are normalized with NFKC first, so full-width ``ａｄｍｉｎ`` is ``admin``
and what everyone sees is the normalized form.  Both may use letters and
digits of any script, and ``.``, ``_``, ``-``.  (``static/chat.js`` applies the
same normalization and pattern before it connects.)

Nicknames are identities, so two more rules keep one person from passing for
another:

* their letters all come from one script: ``аdmin`` with a Cyrillic ``а`` is
  refused.  Han, Hiragana, Katakana, Hangul and Bopomofo count as one script,
  since Japanese and Korean names mix them.  (The standard library has no
  script property; the first word of a letter's Unicode name is its script.)
  Names written wholly in another script that look Latin (``раураl``, all
  Cyrillic) are not detected: that needs the confusables data of Unicode
  TR39, which the standard library does not ship;
* they are compared case-folded: ``Admin`` and ``admin`` are the same person.
"""

from __future__ import annotations

import re
import unicodedata

ROOM_PATTERN = re.compile(r"[\w.-]{1,64}")
NICK_PATTERN = re.compile(r"[^\W][\w.-]*")
_HAN_FAMILY = {"CJK", "HIRAGANA", "KATAKANA", "HANGUL", "BOPOMOFO"}


def normalize(name: str) -> str:
    """The form of a name that is stored and shown (NFKC)."""
    return unicodedata.normalize("NFKC", name)


def room_problem(room: str) -> str | None:
    """Why ``room`` (normalized) is not a room name, or None."""
    if not ROOM_PATTERN.fullmatch(room):
        return "a room name is 1 to 64 letters, digits, '.', '_' or '-'"
    return None


def nick_key(nick: str) -> str:
    """What two nicknames are compared by: ``Admin`` and ``admin`` are one."""
    return unicodedata.normalize("NFKC", nick.casefold())


def guest_nick(number: int, max_length: int = 0) -> str:
    """Guest ``number``'s nickname: ``guest-7``, or ``g7`` where that is too
    long, its number then taken modulo what fits (``max_length`` >= 2)."""
    nick = f"guest-{number}"
    if max_length and len(nick) > max_length:
        nick = f"g{number % 10 ** (max_length - 1)}"
    return nick


def nick_problem(nick: str, max_length: int = 0) -> str | None:
    """Why ``nick`` (normalized) cannot be a nickname, or None."""
    if not NICK_PATTERN.fullmatch(nick) or (max_length and len(nick) > max_length):
        limit = f", at most {max_length}" if max_length else ""
        return f"a nickname is letters, digits, '.', '_' or '-', starting with a letter or digit{limit}"
    scripts = {_script(char) for char in nick if char.isalpha()}
    if len(scripts) > 1 and not scripts <= _HAN_FAMILY:
        return f"a nickname's letters must all be of one script (not {' and '.join(sorted(scripts)).lower()})"
    return None


def _script(char: str) -> str:
    return unicodedata.name(char, "UNKNOWN").split(" ", 1)[0]
