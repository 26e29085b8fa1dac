"""Handing freed heap memory back to the system after a large, temporary working set."""

from __future__ import annotations

import ctypes
import functools


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim`` from the symbols already loaded (no library search), or None."""
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


def release_free_memory() -> bool:
    """``malloc_trim(0)`` where the C library is glibc (else nothing); whether it ran.

    glibc keeps freed chunks of its heap for reuse, so a process that held a large sample for a
    while (e.g. an index's training keys) keeps that much resident afterwards; trimming returns it.
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
