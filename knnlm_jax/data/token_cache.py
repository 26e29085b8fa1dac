"""A split's int32 token array: encoded in chunks into a cached ``.npy``, returned memory-mapped."""

from __future__ import annotations

import hashlib
import os
import struct
import tempfile
from typing import Iterable

import numpy as np

from knnlm_jax.data.corpus import Split, hashing
from knnlm_jax.core.interrupts import cleanup_on_interrupt
from knnlm_jax.data.vocab import Vocab

_NPY_HEADER_BYTES = 128  # fixed, so the provisional header can be rewritten in place


def _npy_header(n: int) -> bytes:
    """A version-1.0 ``.npy`` header for ``n`` little-endian int32, always 128 bytes."""
    text = "{'descr': '<i4', 'fortran_order': False, 'shape': (%d,), }" % n
    body = text.ljust(_NPY_HEADER_BYTES - 11) + "\n"
    header = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(body)) + body.encode("latin1")
    assert len(header) == _NPY_HEADER_BYTES, "npy header length changed"
    return header


def _write_tokens(path: str, chunks: Iterable[np.ndarray]) -> int:
    """Write int32 chunks to ``path`` as one ``.npy``: provisional header, data, final header."""
    n = 0
    with open(path, "wb") as f:
        f.write(_npy_header(0))
        for ids in chunks:
            f.write(np.ascontiguousarray(ids, dtype="<i4").tobytes())
            n += len(ids)
        f.seek(0)
        f.write(_npy_header(n))
    return n


def _token_path(cache_dir: str, split: str, sha256: str, vocab_fingerprint: str) -> str:
    return os.path.join(cache_dir, f"{split}-{sha256[:16]}-{vocab_fingerprint[:8]}.npy")


def _load_cached(path: str) -> np.ndarray | None:
    if os.path.isfile(path):
        try:
            return np.load(path, mmap_mode="r")
        except (OSError, ValueError):
            pass  # a damaged cache is rebuilt
    return None


def load_tokens(cache_dir: str, data: Split, vocab: Vocab) -> np.ndarray:
    """int32 ids of ``data`` (one ``</s>`` per line), memory-mapped read-only.

    Cached as ``<cache_dir>/<split>-<sha256[:16]>-<vocab[:8]>.npy``. A missing array is encoded
    in bounded chunks straight to a temporary file (hashing the text in the same pass when its
    sha256 is not yet known), then renamed into place.
    """
    os.makedirs(cache_dir, exist_ok=True)
    fp = vocab.fingerprint()
    known = data.known_sha256()
    if known is not None:
        cached = _load_cached(_token_path(cache_dir, data.split, known, fp))
        if cached is not None:
            return cached
    h = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(prefix=f"{data.split}-", suffix=".tmp.npy", dir=cache_dir)
    os.close(fd)
    try:
        with cleanup_on_interrupt(lambda: os.path.exists(tmp) and os.remove(tmp)):
            _write_tokens(tmp, vocab.encode_chunks(hashing(data.lines(), h)))
        if h.hexdigest() != known:  # unknown until now (or a stale fingerprint entry)
            data.record_sha256(h.hexdigest())
        path = _token_path(cache_dir, data.split, data.sha256, fp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return np.load(path, mmap_mode="r")
