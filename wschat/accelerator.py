"""The optional C accelerator (``wschat._speedups``), or None.

It is built at install time when a compiler is there, and used unless
``WSCHAT_NO_SPEEDUPS`` is set.  Each of its functions stands in for a
pure-Python one that gives the same result (the tests check one against the
other): unmasking in ``frames``, framing a batch of texts in ``frames``,
reading chat messages' texts from their JSON in ``dialect``, splitting a
published batch in ``redis_store``.
"""

from __future__ import annotations

import os
from types import ModuleType


def _load() -> ModuleType | None:
    if os.environ.get("WSCHAT_NO_SPEEDUPS"):
        return None
    try:
        from . import _speedups
    except ImportError:
        return None
    return _speedups


speedups = _load()
#: "C" when the accelerator is in use, "Python" otherwise.
IMPLEMENTATION = "C" if speedups else "Python"
