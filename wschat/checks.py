"""Settings checked as they are given: a bad value is a ``SettingError``
naming the setting and what it accepts, never a server that starts and then
fails its clients.  The command line turns the setting's name into its option."""

from __future__ import annotations

import math
import os
from typing import Iterable


class SettingError(ValueError):
    """A setting's value cannot work; ``name`` is the setting (a keyword argument)."""

    def __init__(self, name: str, accepts: str, value: object):
        super().__init__(f"{name} must be {accepts}, not {value!r}")
        self.name = name
        self.accepts = accepts
        self.value = value


def whole(name: str, value: object, minimum: int = 0, meaning: str = "") -> int:
    """A whole number from ``minimum`` on (``meaning`` says what its smallest value does)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SettingError(name, f"a whole number >= {minimum}{meaning}", value)
    return value


def number(name: str, value: object, *, positive: bool = False, unit: str = "", meaning: str = "") -> float:
    """A finite number, >= 0 (or > 0 when ``positive``)."""
    if (not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0
            or (positive and value == 0)):
        of = f" of {unit}" if unit else ""
        raise SettingError(name, f"a number{of} {'> 0' if positive else '>= 0'}{meaning}", value)
    return float(value)


def seconds(name: str, value: object, *, positive: bool = False, meaning: str = "") -> float:
    return number(name, value, positive=positive, unit="seconds", meaning=meaning)


def port(name: str, value: object) -> int | None:
    if value is None:
        return None
    return whole_in(name, value, 0, 65535, " (0: any free port)")


def whole_in(name: str, value: object, low: int, high: int, meaning: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise SettingError(name, f"a whole number from {low} to {high}{meaning}", value)
    return value


def url_path(name: str, value: object) -> str:
    if not isinstance(value, str) or not value.startswith("/") or any(c.isspace() or c in "?#" for c in value):
        raise SettingError(name, "a URL path starting with / (such as /chat), without spaces, ? or #", value)
    return value


def folder(name: str, value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)) or not os.path.isdir(value):
        raise SettingError(name, "an existing folder", value)
    return os.fspath(value)


def instance(name: str, value: object, kind: type | tuple[type, ...], accepts: str) -> None:
    """A value of ``kind``, said as ``accepts`` when it is not."""
    if not isinstance(value, kind):
        raise SettingError(name, accepts, value)


def function(name: str, value: object) -> None:
    """A function to call later (or None): a value that cannot be called is
    refused now, not when its first call fails."""
    if value is not None and not callable(value):
        raise SettingError(name, "a function (or None)", value)


def strings(name: str, value: object, example: str, *, tokens: bool = False) -> tuple[str, ...]:
    """Several non-empty strings (a list, a tuple...); one ``str`` alone is
    refused, not taken letter by letter.  ``tokens``: names of one word each
    (no space, no comma), as a header lists them."""
    items = None if isinstance(value, (str, bytes)) or not isinstance(value, Iterable) else tuple(value)
    if items is None or not all(isinstance(item, str) and item and not (tokens and _spaced(item)) for item in items):
        raise SettingError(name, f"a list of {'names' if tokens else 'strings'}, such as {example}", value)
    return items


def _spaced(item: str) -> bool:
    return any(c.isspace() or c == "," for c in item)
