"""File hashes (no JAX)."""

from __future__ import annotations

import hashlib


def file_sha256(path: str) -> str:
    """The sha256 of a file's bytes (hex), read in 16 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()
