"""Ctrl-C that always ends a command cleanly: one line, exit status 130, staged work removed (no JAX).

A ``KeyboardInterrupt`` raised where the signal lands can be swallowed (inside JAX's
garbage-collector hook, which prints it and carries on) or end in a crash at shutdown (XLA
threads still compiling). So the commands handle SIGINT themselves: run the clean-ups
registered with :func:`cleanup_on_interrupt` (staged outputs, temporary files), say so in one
line and leave at once, as a ``kill -9`` would, which every writer already survives: everything
complete on disk was written by rename, so nothing half-written can look complete.
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


def exit_interrupted(prog: str) -> None:
    """Say so in one line and leave with status 130 now, skipping the interpreter's shutdown."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.write(2, f"{prog}: interrupted\n".encode())
    os._exit(130)


def _exit(prog: str) -> None:
    for fn in reversed(list(_CLEANUPS)):
        try:
            fn()
        except Exception:  # noqa: BLE001 - best effort: the exit must happen
            pass
    exit_interrupted(prog)


@contextmanager
def handled(prog: str):
    """For the duration of the block, SIGINT runs the clean-ups and ends the command (exit 130)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: _exit(prog))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
