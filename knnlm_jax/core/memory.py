"""Handing freed heap memory back to the system after a large, temporary working set."""

from __future__ import annotations

import ctypes
import ctypes.util


def release_free_memory() -> bool:
    """``malloc_trim(0)`` where the C library is glibc (else nothing); whether it ran.

    glibc keeps freed chunks of its heap for reuse, so a process that held a large sample for a
    while (e.g. an index's training keys) keeps that much resident afterwards; trimming returns it.
    """
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError, TypeError):
        return False
    trim(0)
    return True
