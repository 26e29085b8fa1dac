"""A split's int32 token array: encoded in chunks into a cached ``.npy``, returned memory-mapped.

Under several processes (:class:`Share`) each encodes every P-th block of lines and writes it
at its place in the one array: the same bytes as one process encoding it all, since a block
ends only where the vocabulary's encoding may restart (any line for words; see
:func:`~knnlm_jax.data.subword.restartable` for a subword text).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import struct
import tempfile
from typing import Callable, Iterable

import numpy as np

from knnlm_jax.data.corpus import Split, hashing
from knnlm_jax.core.interrupts import cleanup_on_interrupt
from knnlm_jax.data.vocab import CHUNK_LINES, Vocab, line_runs

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


def _token_path(cache_dir: str, split: str, sha256: str, vocab) -> str:
    """The cache's name: the text, the vocabulary and, for a subword one, that the text was encoded whole
    (an array of lines encoded one by one, as before, is not reused)."""
    tag = "-text" if hasattr(vocab, "encode_text") else ""
    return os.path.join(cache_dir, f"{split}-{sha256[:16]}-{vocab.fingerprint()[:8]}{tag}.npy")


def _load_cached(path: str) -> np.ndarray | None:
    if os.path.isfile(path):
        try:
            return np.load(path, mmap_mode="r")
        except (OSError, ValueError):
            pass  # a damaged cache is rebuilt
    return None


@dataclasses.dataclass(frozen=True)
class Share:
    """This process's part of an encoding all processes do together: its ``index`` of ``count``, and
    the collectives it needs, given by the caller (the text layer imports no JAX):
    ``allgather(int64 array) -> count x array`` and ``barrier(name)``."""

    index: int
    count: int
    allgather: Callable
    barrier: Callable
    block_lines: int = CHUNK_LINES


def _encode_shared(cache_dir: str, data: Split, vocab: Vocab, share: Share) -> str:
    """Encode ``data`` together (see the module docstring); returns the cache path (process 0 renamed it)."""
    fp, h = vocab.fingerprint(), hashlib.sha256()
    source = hashlib.sha256(data.identity.encode("utf-8")).hexdigest()[:16]  # another text: another name
    tmp = os.path.join(cache_dir, f".{data.split}-{source}-{fp[:8]}-{share.count}")
    lengths = []
    with open(f"{tmp}.part{share.index}", "wb") as part:
        for b, block in enumerate(line_runs(hashing(data.lines(), h), share.block_lines, vocab.starts_fresh)):
            ids = vocab.encode(block) if b % share.count == share.index else np.zeros(0, np.int32)
            part.write(np.ascontiguousarray(ids, "<i4").tobytes())
            lengths.append(len(ids))
    per_block = np.asarray(share.allgather(np.asarray(lengths, np.int64))).sum(axis=0)
    starts = np.concatenate([[0], np.cumsum(per_block)])
    if share.index == 0:
        with open(f"{tmp}.npy", "wb") as f:
            f.write(_npy_header(int(starts[-1])))
            f.truncate(_NPY_HEADER_BYTES + 4 * int(starts[-1]))
    share.barrier(f"laid out {tmp}")
    with open(f"{tmp}.part{share.index}", "rb") as part, open(f"{tmp}.npy", "r+b") as out:
        for b in range(share.index, len(per_block), share.count):
            out.seek(_NPY_HEADER_BYTES + 4 * int(starts[b]))
            out.write(part.read(4 * int(per_block[b])))
        out.flush()
        os.fsync(out.fileno())
    os.remove(f"{tmp}.part{share.index}")
    share.barrier(f"encoded {tmp}")
    path = _token_path(cache_dir, data.split, h.hexdigest(), vocab)
    if share.index == 0:
        if h.hexdigest() != data.known_sha256():
            data.record_sha256(h.hexdigest())
        os.replace(f"{tmp}.npy", path)
    share.barrier(f"published {tmp}")
    return path


def load_tokens(cache_dir: str, data: Split, vocab: Vocab, share: Share | None = None) -> np.ndarray:
    """int32 ids of ``data`` (one ``</s>`` per line), memory-mapped read-only.

    Cached as ``<cache_dir>/<split>-<sha256[:16]>-<vocab[:8]>.npy``. A missing array is encoded
    in bounded chunks straight to a temporary file (hashing the text in the same pass when its
    sha256 is not yet known), then renamed into place; with a ``share`` of several processes,
    by all of them together (every process must call this).
    """
    os.makedirs(cache_dir, exist_ok=True)
    known = data.known_sha256()
    cached = None if known is None else _load_cached(_token_path(cache_dir, data.split, known, vocab))
    if share is not None and share.count > 1:
        everyone = np.asarray(share.allgather(np.asarray([cached is not None], np.int64)))
        if everyone.all():
            return cached
        return np.load(_encode_shared(cache_dir, data, vocab, share), mmap_mode="r")
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
        path = _token_path(cache_dir, data.split, data.sha256, vocab)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return np.load(path, mmap_mode="r")
