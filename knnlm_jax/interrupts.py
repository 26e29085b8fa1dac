"""Ctrl-C that always ends a command cleanly: one line, exit status 130, staged work removed (no JAX).

A ``KeyboardInterrupt`` raised where the signal lands can be swallowed (inside a garbage
collector callback of JAX) or end in a crash at shutdown (XLA threads still compiling). So
the commands handle SIGINT themselves: run the registered clean-ups, say so in one line and
leave at once, as a ``kill -9`` would but tidier. Everything complete on disk was written
by rename, so nothing half-written can look complete.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from contextlib import contextmanager

_CLEANUPS: list = []


@contextmanager
def cleanup_on_interrupt(fn):
    """Call ``fn()`` if the command is interrupted while inside the block."""
    _CLEANUPS.append(fn)
    try:
        yield
    finally:
        _CLEANUPS.remove(fn)


def _exit(prog: str) -> None:
    for fn in reversed(list(_CLEANUPS)):
        try:
            fn()
        except Exception:  # noqa: BLE001 - best effort: the exit must happen
            pass
    sys.stdout.flush()
    os.write(2, f"{prog}: interrupted\n".encode())
    os._exit(130)


@contextmanager
def handled(prog: str):
    """SIGINT ends the command (``prog: interrupted``, exit 130) for the duration of the block."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: _exit(prog))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
