"""SIGTERM (schedulers, ``timeout``) behaves like Ctrl-C, and neither lands inside an optimizer step.

:func:`install` makes both signals raise at once, except inside :func:`critical` blocks (an optimizer step
and its bookkeeping), where they are held until the block ends, so an interrupted run never saves
half-updated weights.
"""
from __future__ import annotations

import contextlib
import signal
import threading


class Terminated(KeyboardInterrupt):
    """The process received SIGTERM."""


_state = {"depth": 0, "pending": None}


def _raise(signum):
    raise Terminated("terminated (SIGTERM)") if signum == signal.SIGTERM else KeyboardInterrupt()


def _handler(signum, frame):
    if _state["depth"]:
        _state["pending"] = signum
        return
    _raise(signum)


@contextlib.contextmanager
def critical():
    """Hold SIGINT/SIGTERM until the block has finished."""
    _state["depth"] += 1
    try:
        yield
    finally:
        _state["depth"] -= 1
        if not _state["depth"] and _state["pending"] is not None:
            signum, _state["pending"] = _state["pending"], None
            _raise(signum)


@contextlib.contextmanager
def installed():
    """Route SIGINT and SIGTERM through :func:`_handler` for the duration of the block (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in old:
        signal.signal(s, _handler)
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
