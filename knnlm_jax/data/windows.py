"""Context windows over a token stream: which positions each forward pass scores (no I/O).

Entry ``n`` is input position ``n`` of the stream ``[</s>] + tokens`` (its target is
``tokens[n]``); a window feeds a slice of the stream and keeps a span of entries, so that
the build and the evaluation score every target exactly once.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from knnlm_jax.core.errors import InputError


@dataclasses.dataclass(frozen=True)
class WindowSpec:
    """Windows of ``length`` tokens, each kept entry seeing at least ``context`` earlier ones.

    One spec for the build and the evaluation, validated once, here.
    """

    length: int
    context: int

    def __post_init__(self):
        if self.length < 1 or not 0 <= self.context < self.length:
            raise InputError(f"need 0 <= context < window, got window {self.length} and context {self.context}")

    @classmethod
    def from_config(cls, config, stage: str) -> "WindowSpec":
        """``stage`` ``build`` or ``eval``: ``<stage>_window`` (0: ``tokens_per_sample``) and
        ``<stage>_context`` (-1: half the window)."""
        length = int(config.get(f"{stage}_window", 0) or config.tokens_per_sample)
        context = int(config.get(f"{stage}_context", -1))
        context = length // 2 if context < 0 else context
        if not 0 <= context < length:
            raise InputError(f"{stage}_context {context} must be below {stage}_window {length}")
        return cls(length, context)

    def windows(self, n_tokens: int) -> np.ndarray:
        """The ``W x 3`` windows over ``n_tokens`` targets (:func:`windows`)."""
        return windows(n_tokens, self.length, self.context)


def windows(n_tokens: int, length: int, context: int) -> np.ndarray:
    """``W x 3`` int64 rows ``(input_start, span_start, span_end)`` covering entries ``[0, n_tokens)``.

    A window feeds ``stream[input_start : input_start + length]`` and keeps the entries
    ``[span_start, span_end)``. The first window keeps ``[0, length)``; each later one keeps
    the next ``length - context`` entries with ``input_start = span_end - length``, so every
    kept entry sees at least ``context`` earlier tokens. The last span stops at
    ``n_tokens`` (its input starts at ``max(0, n_tokens - length)``). Spans tile
    ``[0, n_tokens)`` exactly: one entry per target token.
    """
    if length < 1 or not 0 <= context < length:
        raise InputError(f"need 0 <= context < window, got window {length} and context {context}")
    if n_tokens <= 0:
        return np.zeros((0, 3), np.int64)
    stride = length - context
    n_later = -(-max(0, n_tokens - length) // stride)
    ends = np.minimum(length + stride * np.arange(n_later + 1, dtype=np.int64), n_tokens)
    starts = np.concatenate([[0], ends[:-1]])
    return np.stack([np.maximum(ends - length, 0), starts, ends], axis=1)


def window_of(windows_Wx3: np.ndarray, entries) -> np.ndarray:
    """Index of the window whose span holds each entry id."""
    return np.searchsorted(windows_Wx3[:, 2], np.asarray(entries), side="right")


def window_batch(stream: np.ndarray, windows_Wx3: np.ndarray, length: int, pad_id: int, rows: int = 0):
    """``(inputs BxL, targets BxL, mask BxL)`` for windows of ``stream = [</s>] + tokens``.

    ``mask`` marks each window's span; unmasked targets are set to ``pad_id`` (they are not
    entries, and a head-band id keeps adaptive-softmax capacities exact). ``rows`` pads the
    batch with fully masked rows so that every batch has one shape.
    """
    b = max(rows, len(windows_Wx3))
    inputs = np.full((b, length), pad_id, np.int32)
    targets = np.full((b, length), pad_id, np.int32)
    mask = np.zeros((b, length), bool)
    for i, (start, lo, hi) in enumerate(windows_Wx3):
        seg = stream[start : start + length + 1]
        n = len(seg) - 1
        inputs[i, :n], targets[i, :n] = seg[:-1], seg[1:]
        mask[i, lo - start : hi - start] = True
    return inputs, np.where(mask, targets, pad_id).astype(np.int32), mask


def token_stream(tokens_N: np.ndarray, eos: int) -> np.ndarray:
    """``[</s>] + tokens`` as in :func:`knnlm_jax.data.blocks.lm_blocks` (a copy: for small splits)."""
    return np.concatenate([np.asarray([eos], np.int32), np.asarray(tokens_N, np.int32)])


class StreamView:
    """``[</s>] + tokens`` without a copy: slices read the (memory-mapped) token array."""

    def __init__(self, tokens_N: np.ndarray, eos: int):
        self.tokens, self.eos = tokens_N, int(eos)

    def __len__(self) -> int:
        return len(self.tokens) + 1

    def __getitem__(self, span: slice) -> np.ndarray:
        start, stop, step = span.indices(len(self))
        if step != 1:
            raise IndexError("a token stream is sliced with step 1")
        if stop <= start:
            return np.zeros(0, np.int32)
        body = np.asarray(self.tokens[max(start, 1) - 1 : stop - 1], np.int32)
        return np.concatenate([np.asarray([self.eos], np.int32), body]) if start == 0 else body
