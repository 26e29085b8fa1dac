"""One writer at a time: advisory locks on lock files beside what they guard (no JAX).

A lock is ``fcntl.flock`` on ``<parent>/.<name>.lock``. The kernel releases it when its
process ends, however it ends, so a ``kill -9`` never leaves a stale lock. The file lives
beside the directory it guards, never inside it, so ``--overwrite`` (which removes the
directory) cannot delete a lock someone holds. The holder writes its PID, host and start
time into the file so that a refused writer, or a reader of unfinished work, can say who.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from contextlib import contextmanager

from knnlm_jax.core.errors import KnnlmError


class LockedError(KnnlmError, ValueError):
    """Another process is writing what this one wants to write."""


def lock_path(directory: str, part: str = "") -> str:
    """``<parent>/.<name>[.<part>].lock``: beside ``directory``, so removing it keeps the lock."""
    directory = os.path.normpath(directory)
    name = os.path.basename(directory) + (f".{part}" if part else "")
    return os.path.join(os.path.dirname(directory), f".{name}.lock")


def _describe(info: dict | None) -> str:
    if not info:
        return "another process (its PID is not recorded yet)"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("since", 0)))
    return f"PID {info.get('pid')} on host {info.get('host')} (since {since})"


def _read(fd: int) -> dict | None:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "null")
    except (OSError, ValueError):
        return None


def holder(path: str) -> str | None:
    """Who holds the lock at ``path`` now (a phrase), else ``None``; this process never counts."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None  # no lock file: nobody ever wrote here with locks
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                return None
            info = _read(fd)
            if info and info.get("pid") == os.getpid() and info.get("host") == socket.gethostname():
                return None
            return _describe(info)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _take(fd: int, path: str, tries: int = 20) -> bool:
    """The exclusive lock, retried briefly (a reader's :func:`holder` holds it shared for an instant)."""
    for attempt in range(tries):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise OSError(err.errno, f"cannot lock ({err.strerror}; a file system without flock?)",
                              path) from None
            time.sleep(0.025)
    return False


@contextmanager
def exclusive(path: str, what: str):
    """Hold the lock at ``path`` for the block; refuse in one line (:class:`LockedError`) when held.

    ``what`` names the guarded thing in the refusal, e.g. ``"datastore train"``.
    """
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if not _take(fd, path):
            raise LockedError(f"{what} is being written by {_describe(_read(fd))}; wait for it to finish or "
                              "stop it, then run this again")
        info = dict(pid=os.getpid(), host=socket.gethostname(), since=time.time(), command=" ".join(sys.argv))
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
