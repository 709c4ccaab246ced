"""A thread that wschat starts shows its name outside Python too.

Python gives a thread a name only Python sees (before 3.14).  Named for the
system as well (``top -H``, ``ps -L``, ``perf``, ``/proc/PID/task/TID/comm``),
the loop, the engine's thread and the handler pools can be told apart by
their CPU time: ``tools/bench.py`` reports each one's share of a message.
Linux only (``prctl``); elsewhere, or if it fails, nothing happens.
"""

from __future__ import annotations

import ctypes
import sys
import threading
from typing import Any, Callable, ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")
_PR_SET_NAME = 15
_NAME_BYTES = 15  # the kernel keeps 16 bytes, the last one NUL


def _prctl(platform: str = sys.platform, library: Callable[[None], Any] = ctypes.CDLL) -> Any:
    """libc's ``prctl``, on Linux, where it is found; else None."""
    if not platform.startswith("linux"):
        return None
    try:
        return library(None).prctl
    except (OSError, AttributeError):
        return None


_set_name = _prctl()


def name_this_thread() -> None:
    """Give the calling thread its ``threading`` name in the system (cut to
    15 bytes: ``wschat-handler_0`` shows as ``wschat-handler_``).  For the
    threads wschat starts only: the main thread's name is the process's."""
    if _set_name is not None:
        _set_name(_PR_SET_NAME, threading.current_thread().name.encode("utf-8")[:_NAME_BYTES], 0, 0, 0)


def named(target: Callable[P, T]) -> Callable[P, T]:
    """``target``, naming the thread it runs on first: what wschat gives the
    threads it starts (``Thread(target=named(...))``, a pool's initializer)."""

    def run(*args: P.args, **kwargs: P.kwargs) -> T:
        name_this_thread()
        return target(*args, **kwargs)

    return run
