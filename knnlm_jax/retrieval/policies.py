"""Which tokens search the datastore, and with which candidates: fewer searches (NumPy, host side).

Three ways to save searches, all evaluation options (the full kNN-LM searches every token):

- **RetoMaton pointers** (Alon et al. 2022, without clustering): after token ``t``, the
  retrieved entries whose value was the actual next token point to their successors
  (entry ``n + 1``); those (at most ``max_pointers``, the nearest hits' successors first) are
  token ``t + 1``'s candidates without a search. With fewer than ``min_pointers`` the token
  searches and takes the search's ``k`` instead. Each token's candidates are ranked by exact
  squared L2 from the stored keys, once per batch (see :class:`PointerSteps`). Pointers are followed within an evaluation window (the windows of a batch run side
  by side, step by step), so each window's first scored token starts afresh.
- **Adaptive retrieval** (He et al. 2021): a linear gate on what the LM computed for the
  token (the head softmax's entropy, top log-prob and tail-cluster log-probs, and the query
  key itself) predicts, before the search, how much retrieval will gain there (the log of
  the mixed over the LM's probability of the target); only tokens predicted to gain most
  retrieve, and one that does not is scored by the LM alone (λ = 0 there). The gate is a
  ridge regression fitted on one half of valid, its threshold set so that a chosen fraction
  of tokens retrieves.
- **Both**: pointers first; a token with too few pointers searches only when the gate lets it.

:func:`retrieve_batch` serves one batch of the streaming pass for any of these; the
token files record per token whether it retrieved and the pass counts searches (FoSS, the
fraction of saved searches, is ``1 - searches / tokens``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from knnlm_jax.retrieval.index import as_float32
from knnlm_jax.core.errors import InputError

EXACT_CHUNK = 16384  # candidate keys gathered per chunk of exact distances (8 MiB of float16 at D = 256)
FEATURES = ("head_entropy", "head_max_logp", "tail_cluster_logp", "query_key")  # per tail band; D values


@dataclasses.dataclass(frozen=True)
class Gate:
    """A fitted adaptive-retrieval gate: retrieve when ``w · standardise(f) + b >= threshold`` (predicted gain)."""

    weights_F: tuple
    bias: float
    mean_F: tuple
    scale_F: tuple
    threshold: float
    fraction: float  # the fraction of the fitting tokens that retrieve at this threshold

    def scores(self, features_NxF) -> np.ndarray:
        x = (np.asarray(features_NxF, np.float64) - np.asarray(self.mean_F)) / np.asarray(self.scale_F)
        return x @ np.asarray(self.weights_F) + self.bias

    def retrieve(self, features_NxF) -> np.ndarray:
        return self.scores(features_NxF) >= self.threshold

    def fingerprint(self) -> str:
        text = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class Policy:
    """How a pass retrieves: ``min_pointers`` > 0 follows RetoMaton pointers; ``gate`` skips tokens."""

    min_pointers: int = 0
    gate: Gate | None = None
    max_pointers: int = 0  # pointers kept per token, the nearest hits' successors first (0: up to k)

    @property
    def full(self) -> bool:
        return self.min_pointers <= 0 and self.gate is None

    @property
    def name(self) -> str:
        return {(False, False): "full", (True, False): "retomaton", (False, True): "adaptive",
                (True, True): "both"}[(self.min_pointers > 0, self.gate is not None)]

    def identity(self) -> dict:
        return dict(policy=self.name, min_pointers=self.min_pointers,
                    gate=self.gate.fingerprint() if self.gate else None, max_pointers=self.max_pointers)


# ---------------------------------------------------------------------------------
# the adaptive gate: ridge regression (pure NumPy)


def fit_gate(features_NxF, gain_N, fraction: float, l2: float = 1e-2) -> Gate:
    """Ridge regression of ``gain`` on standardised features; threshold at ``fraction`` retrieving.

    ``gain_N``: what retrieval gained at each token (e.g. ``log p_mixed - log p_LM`` at the
    tuned λ and T, so ranking by the prediction targets perplexity). The threshold is the
    ``1 - fraction`` quantile of the fitted scores, so that ``fraction`` of these tokens
    retrieve.
    """
    if not 0.0 < fraction <= 1.0:
        raise InputError(f"retrieve fraction {fraction}: must be in (0, 1]")
    x = np.asarray(features_NxF, np.float64)
    y = np.asarray(gain_N, np.float64)
    if len(x) == 0:
        raise InputError("no tokens to fit the adaptive-retrieval gate on")
    mean, scale = x.mean(0), x.std(0)
    scale = np.where(scale > 0, scale, 1.0)
    z = np.concatenate([(x - mean) / scale, np.ones((len(x), 1))], axis=1)
    reg = l2 * np.eye(z.shape[1])
    reg[-1, -1] = 0.0  # no penalty on the bias
    w = np.linalg.solve(z.T @ z / len(z) + reg, z.T @ y / len(z))
    scores = z @ w
    threshold = float(np.quantile(scores, 1.0 - fraction, method="lower")) if fraction < 1 else -np.inf
    return Gate(tuple(float(v) for v in w[:-1]), float(w[-1]), tuple(float(v) for v in mean),
                tuple(float(v) for v in scale), threshold, float(np.mean(scores >= threshold)))


# ---------------------------------------------------------------------------------
# one batch of the pass


def exact_distances(keys_NxD, queries_QxD, ids_QxC, threads: int | None = None,
                    chunk: int = EXACT_CHUNK) -> np.ndarray:
    """Squared L2 (float32) of each query to its candidates' stored keys; ``inf`` where the id is -1.

    Computed as ``sum((key - query)**2)`` (no cancellation), in chunks of about ``chunk``
    candidate keys on one thread per core; float16 keys are decoded by FAISS's SIMD routine.
    Mostly-real candidate lists (a search's k) are gathered row by row; sparse ones (pointer
    sets, padded) only where the id is real.
    """
    ids_QxC = np.asarray(ids_QxC)
    q, c = ids_QxC.shape
    queries_QxD = np.asarray(queries_QxD, np.float32)
    real_QxC = ids_QxC >= 0
    out = np.full((q, c), np.inf, np.float32)
    if not real_QxC.any():
        return out
    if real_QxC.mean() >= 0.5:  # dense: chunks of whole rows
        rows = max(1, chunk // max(1, c))

        def part(a: int) -> None:
            ids = np.where(real_QxC[a : a + rows], ids_QxC[a : a + rows], 0)
            diff = as_float32(keys_NxD[ids.reshape(-1)]).reshape(len(ids), c, -1)
            diff -= queries_QxD[a : a + rows, None, :]
            out[a : a + rows] = np.where(real_QxC[a : a + rows], np.einsum("mkd,mkd->mk", diff, diff), np.inf)

        _threaded(part, range(0, q, rows), threads)
        return out
    q_idx, c_idx = np.nonzero(real_QxC)
    flat_ids = ids_QxC[q_idx, c_idx]
    flat = np.empty(len(flat_ids), np.float32)

    def part_sparse(a: int) -> None:
        diff = as_float32(keys_NxD[flat_ids[a : a + chunk]])
        diff -= queries_QxD[q_idx[a : a + chunk]]
        flat[a : a + chunk] = np.einsum("md,md->m", diff, diff)

    _threaded(part_sparse, range(0, len(flat_ids), chunk), threads)
    out[q_idx, c_idx] = flat
    return out


def _threaded(fn, starts, threads: int | None) -> None:
    """``fn(start)`` for each start, on up to ``threads`` threads (NumPy and FAISS release the GIL)."""
    if len(starts) == 1:
        fn(starts[0])
        return
    with ThreadPoolExecutor(max(1, min(len(starts), threads or os.cpu_count() or 1))) as pool:
        list(pool.map(fn, starts))  # list(): re-raises a chunk's exception


def ascending(dists_QxC: np.ndarray) -> np.ndarray:
    """``np.argsort(dists, axis=1, kind="stable")`` for float32, about twice as fast: a non-negative
    float's bits order like the float, so (bits << 32 | column) sorted as integers gives the order,
    ties by column."""
    q, c = dists_QxC.shape
    if c >= 2**32 or not (dists_QxC >= 0).all():  # a negative approximate distance (or NaN): the plain way
        return np.argsort(dists_QxC, axis=1, kind="stable")
    packed = dists_QxC.view(np.uint32).astype(np.uint64) << np.uint64(32)
    packed |= np.arange(c, dtype=np.uint64)
    packed.sort(axis=1)
    return (packed & np.uint64(0xFFFFFFFF)).astype(np.int64)


def nearest(dists_QxC, ids_QxC, k: int):
    """The ``k`` nearest valid candidates per row, ascending: ``(dists QxK, ids QxK)``; -1 / inf padding."""
    dists = np.where(ids_QxC >= 0, dists_QxC, np.inf)
    if dists.shape[1] < k:
        pad = k - dists.shape[1]
        dists = np.pad(dists, ((0, 0), (0, pad)), constant_values=np.inf)
        ids_QxC = np.pad(ids_QxC, ((0, 0), (0, pad)), constant_values=-1)
    order = ascending(dists.astype(np.float32, copy=False))[:, :k]
    d = np.take_along_axis(dists, order, axis=1).astype(np.float32)
    i = np.take_along_axis(ids_QxC, order, axis=1)
    return d, np.where(np.isfinite(d), i, -1)


def retrieve_batch(policy: Policy, queries_RxD, targets_R, spans_W, *, search, keys_NxD, vals_N, k: int,
                   features_RxF=None, own_ids_R=None, exact: bool = True):
    """Neighbours of one batch's ``R`` scored tokens under ``policy`` (not the full kNN-LM).

    ``spans_W``: the scored rows of each window, in order (``R = sum(spans)``).
    ``search(queries_QxD) -> (dists, ids)``: the index's top-k. ``own_ids_R``: each token's
    own datastore entry, never a neighbour (self-retrieval), or ``None``. Returns
    ``(dists RxK ascending, ids RxK, retrieved R, searched R)``. Distances are exact from
    ``keys_NxD``, except with the gate alone and ``exact=False`` (FAISS's own); pointers
    need the keys.
    """
    if policy.min_pointers > 0 and keys_NxD is None:
        raise InputError("RetoMaton pointers need the stored keys (exact distances)")
    r = len(targets_R)
    dists_RxK = np.full((r, k), np.inf, np.float32)
    ids_RxK = np.full((r, k), -1, np.int64)
    gate_R = np.ones(r, bool) if policy.gate is None else policy.gate.retrieve(features_RxF)
    searched_R = np.zeros(r, bool)
    retrieved_R = np.zeros(r, bool)
    queries_RxD = np.asarray(queries_RxD, np.float32)
    own_R = np.full(r, -2, np.int64) if own_ids_R is None else np.asarray(own_ids_R, np.int64)

    def searched(rows):
        d, i = search(queries_RxD[rows])
        i = np.where(i == own_R[rows, None], -1, i)
        return d, i

    if policy.min_pointers <= 0:  # adaptive only: one batched search of the gated tokens
        rows = np.flatnonzero(gate_R)
        if len(rows):
            d, cand = searched(rows)
            if exact:
                d = exact_distances(keys_NxD, queries_RxD[rows], cand)
            dists_RxK[rows], ids_RxK[rows] = nearest(d, cand, k)
        searched_R[rows] = True
        retrieved_R[rows] = True
        return dists_RxK, ids_RxK, retrieved_R, searched_R

    steps = PointerSteps(policy, targets_R, vals_N, k, gate_R, own_R, searched)
    cand_RxK = np.full((r, k), -1, np.int64)
    for rows, cand, searched_here, used in steps.run(spans_W):
        cand_RxK[rows], searched_R[rows], retrieved_R[rows] = cand, searched_here, used
    # one batched exact ranking of every token's candidates (which ones each token kept never depended on it):
    # the searched tokens' k, then the pointer-served tokens' pointers, compacted at the front of their rows
    for rows in (np.flatnonzero(searched_R), np.flatnonzero(retrieved_R & ~searched_R)):
        if len(rows):
            cand = cand_RxK[rows, : max(1, int((cand_RxK[rows] >= 0).sum(1).max()))]
            dists_RxK[rows], ids_RxK[rows] = nearest(exact_distances(keys_NxD, queries_RxD[rows], cand), cand, k)
    return dists_RxK, ids_RxK, retrieved_R, searched_R


class PointerSteps:
    """RetoMaton's pointers, followed step by step across windows side by side (:func:`retrieve_batch`).

    At step ``j`` each window's ``j``-th scored token takes as its candidates the successors of
    its predecessor's candidates that were hits (entry ``n + 1`` after a hit ``n``), at most
    ``policy.max_pointers`` of them, the search's nearest first; with fewer than
    ``policy.min_pointers`` it searches (where the gate lets it) and takes the search's ``k``
    instead. A token keeps all its candidates (at most ``k``), so their exact ranking changes
    no later step and is computed once for the batch, after the steps.
    """

    def __init__(self, policy, targets_R, vals_N, k, gate_R, own_R, search):
        self.policy, self.targets_R, self.vals_N, self.k = policy, targets_R, vals_N, k
        self.gate_R, self.own_R, self.search = gate_R, own_R, search

    def run(self, spans_W):
        """Yield ``(rows, candidates rows x k, searched, used)`` per step; rows index the batch's tokens."""
        spans_W = np.asarray(spans_W, np.int64)
        starts_W = np.concatenate([[0], np.cumsum(spans_W)[:-1]])
        pointers_WxP = np.full((len(spans_W), 0), -1, np.int64)
        for j in range(int(spans_W.max(initial=0))):
            active_W = np.flatnonzero(spans_W > j)
            rows = starts_W[active_W] + j
            cand, search_here, use = self.step(rows, pointers_WxP[active_W])
            yield rows, cand, search_here, use
            pointers_WxP = self.successors(cand, rows, active_W, len(spans_W))

    def step(self, rows, pointers):
        """One step's candidates ``(rows x k ids, -1 padded; searched; used)`` of the tokens at ``rows``."""
        pointers = np.where(pointers == self.own_R[rows, None], -1, pointers)
        enough = (pointers >= 0).sum(1) >= self.policy.min_pointers
        search_here = ~enough & self.gate_R[rows]
        cand = np.full((len(rows), self.k), -1, np.int64)
        width = min(pointers.shape[1], self.k)
        cand[enough, :width] = pointers[enough, :width]
        if search_here.any():
            cand[search_here] = self.search(rows[search_here])[1]  # FAISS's order: nearest first
        return cand, search_here, enough | search_here  # a gated-off token with too few pointers: the LM alone

    def successors(self, cand, rows, active_W, n_windows):
        """The next step's pointers: entry ``n + 1`` for each hit ``n``, in the candidates' order, at most
        ``max_pointers``."""
        n_entries = len(self.vals_N)
        found = cand >= 0
        vals = np.asarray(self.vals_N[np.where(found, cand, 0).reshape(-1)]).reshape(cand.shape)
        hit = found & (vals == self.targets_R[rows, None])
        successor = np.where(hit & (cand + 1 < n_entries), cand + 1, -1)
        width = max(1, min(int((successor >= 0).sum(1).max(initial=0)), self.policy.max_pointers or self.k))
        order = np.argsort(successor < 0, axis=1, kind="stable")[:, :width]  # real pointers first, in order
        new = np.full((n_windows, width), -1, np.int64)
        new[active_W] = np.take_along_axis(successor, order, axis=1)
        return new
