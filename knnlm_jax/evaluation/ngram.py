"""An interpolated Kneser-Ney n-gram LM over token ids (NumPy): the paper's Figure 7 baseline.

Counts come from one pass over the training ids (n-grams as rows of a sliding window, made
unique with ``np.unique``). The highest order uses raw counts, lower orders continuation
counts (distinct left extensions), each with its own absolute discount
``D = n1 / (n1 + 2 n2)`` (Ney et al. 1994); unigrams interpolate with the uniform
distribution over the vocabulary, so every id has mass. A context never seen backs off to
the next lower order whole. :func:`log_probs` scores a token stream, the context of
position ``i`` being the ids before it in the stream.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from knnlm_jax.core.errors import InputError


def _rows(ids_N: np.ndarray, n: int) -> np.ndarray:
    """``(N - n + 1) x n`` sliding n-grams as one fixed-size byte string each (comparable, sortable)."""
    grams = np.lib.stride_tricks.sliding_window_view(np.ascontiguousarray(ids_N, ">i4"), n)
    return np.ascontiguousarray(grams).view(np.dtype((np.void, 4 * n))).reshape(-1)


def _table(keys: np.ndarray, values: np.ndarray):
    order = np.argsort(keys, kind="stable")
    return keys[order], values[order]


def _lookup(table, queries: np.ndarray) -> np.ndarray:
    """The values of ``queries`` in a ``(sorted keys, values)`` table; 0 where absent."""
    keys, values = table
    if len(keys) == 0:
        return np.zeros(len(queries), values.dtype)
    at = np.minimum(np.searchsorted(keys, queries), len(keys) - 1)
    return np.where(keys[at] == queries, values[at], 0)


def _discount(counts: np.ndarray) -> float:
    n1, n2 = np.sum(counts == 1), np.sum(counts == 2)
    return float(n1 / (n1 + 2 * n2)) if n1 + n2 else 0.5


@dataclasses.dataclass
class Order:
    """One order's tables: the n-gram's count, its context's total and number of distinct followers."""

    grams: tuple  # (sorted n-gram keys, counts)
    contexts: tuple  # (sorted context keys, total count)
    followers: tuple  # (sorted context keys, distinct next ids)
    discount: float


def _order(gram_keys: np.ndarray, counts: np.ndarray, n: int) -> Order:
    context_keys = np.ascontiguousarray(gram_keys.view(np.uint8).reshape(-1, 4 * n)[:, : 4 * (n - 1)])
    context_keys = context_keys.view(np.dtype((np.void, 4 * (n - 1)))).reshape(-1)
    uniq, inverse = np.unique(context_keys, return_inverse=True)
    totals = np.bincount(inverse.reshape(-1), weights=counts).astype(np.int64)
    distinct = np.bincount(inverse.reshape(-1)).astype(np.int64)
    return Order(_table(gram_keys, counts), (uniq, totals), (uniq, distinct), _discount(counts))


@dataclasses.dataclass
class KneserNey:
    """Interpolated Kneser-Ney of order ``n`` over ``vocab_size`` ids."""

    n: int
    vocab_size: int
    unigram: np.ndarray  # V: the interpolated unigram distribution
    orders: list  # orders 2..n: Order (continuation counts below n, raw counts at n)

    @classmethod
    def fit(cls, ids_N: np.ndarray, n: int, vocab_size: int) -> "KneserNey":
        if n < 1:
            raise InputError(f"n-gram order {n}: must be at least 1")
        raw = {k: np.unique(_rows(ids_N, k), return_counts=True) for k in range(1, n + 1)}
        orders = []
        for k in range(2, n + 1):
            if k == n:
                keys, counts = raw[k]
            else:  # continuation counts: distinct (k+1)-grams ending in each k-gram
                suffixes = raw[k + 1][0].view(np.uint8).reshape(-1, 4 * (k + 1))[:, 4:]
                suffixes = np.ascontiguousarray(suffixes).view(np.dtype((np.void, 4 * k))).reshape(-1)
                keys, counts = np.unique(suffixes, return_counts=True)
            orders.append(_order(keys, counts.astype(np.int64), k))
        if n == 1:
            ids1, c1 = raw[1]
        else:  # unigram continuation counts: distinct left neighbours
            second = raw[2][0].view(np.uint8).reshape(-1, 8)[:, 4:]
            ids1, c1 = np.unique(np.ascontiguousarray(second).view(np.dtype((np.void, 4))).reshape(-1),
                                 return_counts=True)
        words = np.ascontiguousarray(ids1).view(">i4").astype(np.int64)
        counts = np.zeros(vocab_size, np.float64)
        counts[words] = c1
        d = _discount(c1)
        unigram = (np.maximum(counts - d, 0) + d * len(words) / vocab_size) / counts.sum()
        return cls(n, vocab_size, unigram, orders)

    def log_probs(self, ids_N: np.ndarray) -> np.ndarray:
        """``log p(ids[i] | ids[i-n+1:i])`` for every position (shorter contexts at the start)."""
        ids_N = np.asarray(ids_N)
        p = self.unigram[ids_N].astype(np.float64)
        for k, order in enumerate(self.orders, start=2):
            if len(ids_N) < k:
                break
            grams = _rows(ids_N, k)  # position i >= k-1 ends the gram that starts at i-k+1
            contexts = np.ascontiguousarray(grams.view(np.uint8).reshape(-1, 4 * k)[:, : 4 * (k - 1)])
            contexts = contexts.view(np.dtype((np.void, 4 * (k - 1)))).reshape(-1)
            total = _lookup(order.contexts, contexts).astype(np.float64)
            distinct = _lookup(order.followers, contexts).astype(np.float64)
            count = _lookup(order.grams, grams).astype(np.float64)
            lower = p[k - 1 :]
            seen = total > 0
            safe = np.where(seen, total, 1.0)
            mixed = np.maximum(count - order.discount, 0) / safe + order.discount * distinct / safe * lower
            p[k - 1 :] = np.where(seen, mixed, lower)
        return np.log(p)
