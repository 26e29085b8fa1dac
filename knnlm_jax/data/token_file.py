"""Reading a split's token array by ranges, without mapping it: training's corpus is never in memory.

A memory map counts every page it has read towards the process's resident memory, so an epoch
of random blocks over a memory-mapped corpus ends with the whole corpus resident. Here reads are
``pread`` calls on the ``.npy`` file: what was read stays in the page cache, shared and
reclaimable, not in the process. Arrays that are not files (small, in memory) are sliced.

Training blocks are those of :func:`knnlm_jax.data.blocks.lm_blocks` (``pad_last=False``): block
``i`` of length ``L`` reads ``stream[iL : (i+1)L + 1]`` of ``stream = [</s>] + tokens``; its
inputs are the first ``L`` ids, its targets the last ``L``.
"""

from __future__ import annotations

import os

import numpy as np

CHUNK_TOKENS = 1 << 22  # tokens per read when streaming over a whole split


class TokenFile:
    """``tokens_N`` (a memory-mapped ``.npy`` from ``token_cache``, or any int32 array) read by range."""

    def __init__(self, tokens_N: np.ndarray):
        self.n = len(tokens_N)
        path = getattr(tokens_N, "filename", None)
        self.path, self.offset = (os.fspath(path), int(tokens_N.offset)) if path else (None, 0)
        self._array = None if path else np.asarray(tokens_N, np.int32)
        self._fd = None

    def __getstate__(self):  # picklable for loader threads and processes: reopened where used
        return dict(self.__dict__, _fd=None)

    def read(self, start: int, stop: int) -> np.ndarray:
        """int32 ids ``[start, stop)`` (clipped to the array)."""
        start, stop = max(0, start), min(self.n, stop)
        if stop <= start:
            return np.zeros(0, np.int32)
        if self._array is not None:
            return self._array[start:stop].copy()
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        data = os.pread(self._fd, 4 * (stop - start), self.offset + 4 * start)
        return np.frombuffer(data, "<i4").astype(np.int32)

    def chunks(self, size: int = CHUNK_TOKENS):
        """The whole array in consecutive reads of ``size`` ids."""
        for start in range(0, self.n, size):
            yield self.read(start, start + size)

    def bincount(self, minlength: int) -> np.ndarray:
        """``np.bincount`` of every id, streamed."""
        counts = np.zeros(minlength, np.int64)
        for ids in self.chunks():
            counts += np.bincount(ids, minlength=minlength)[:minlength]
        return counts


class TrainBlocks:
    """Training blocks of ``length`` over a :class:`TokenFile` (a random-access source: ``len``, ``[i]``)."""

    def __init__(self, tokens: TokenFile, length: int, eos: int):
        self.tokens, self.length, self.eos = tokens, int(length), int(eos)
        self.n_blocks = tokens.n // self.length  # targets: the n tokens; the partial last block is dropped

    def __len__(self) -> int:
        return self.n_blocks

    def __getitem__(self, i: int) -> np.ndarray:
        """``stream[iL : (i+1)L + 1]``: ``L + 1`` ids, inputs ``[:-1]`` and targets ``[1:]``."""
        start = int(i) * self.length
        if start == 0:
            return np.concatenate([[self.eos], self.tokens.read(0, self.length)]).astype(np.int32)
        return self.tokens.read(start - 1, start + self.length)

    def rows(self, blocks_K: np.ndarray) -> np.ndarray:
        """``K x (L+1)`` ids of the given blocks."""
        return np.stack([self[i] for i in np.asarray(blocks_K).reshape(-1)]) if len(blocks_K) else \
            np.zeros((0, self.length + 1), np.int32)

    def band_counts(self, edges) -> np.ndarray:
        """``NB x tails`` int64: each block's targets in each tail band of the adaptive softmax, streamed."""
        tails = list(zip(edges[1:-1], edges[2:]))
        out = np.zeros((self.n_blocks, len(tails)), np.int64)
        per_chunk = max(1, CHUNK_TOKENS // self.length)
        for b0 in range(0, self.n_blocks, per_chunk):
            b1 = min(self.n_blocks, b0 + per_chunk)
            targets = self.tokens.read(b0 * self.length, b1 * self.length).reshape(b1 - b0, self.length)
            for h, (lo, hi) in enumerate(tails):
                out[b0:b1, h] = ((targets >= lo) & (targets < hi)).sum(axis=1)
        return out
