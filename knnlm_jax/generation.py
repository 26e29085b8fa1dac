"""Text generation with the LM or the kNN-LM: a KV cache, one datastore search per new token.

Each step runs the model on one position against its cached attention keys and values
(:func:`make_decode_step`, jitted; the model's own ``decode_step``, with the same layers and
numerics as its full forward) and returns the full next-token log-distribution ``p_LM`` and the query
key (the run's key type). With a datastore, the query's ``k`` nearest entries (host FAISS,
optionally re-ranked exactly) give ``p_kNN`` over the whole vocabulary by scatter-add
(:func:`~knnlm_jax.retrieval.knn.knn_full_log_probs`); the next token is drawn from
``log(λ p_kNN + (1 - λ) p_LM)`` (``λ = 0``: the LM alone, no search) greedily or by sampling
with a temperature, top-k and top-p, from a seeded NumPy generator. Every step keeps where
its token's probability came from (:class:`Step`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from knnlm_jax.retrieval.knn import interpolate, knn_full_log_probs
from knnlm_jax.core.errors import InputError


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: ``temperature`` 0 is greedy; ``top_k`` 0 and ``top_p`` 1 keep all."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def check(self) -> None:
        if self.temperature < 0:
            raise InputError(f"sampling temperature {self.temperature}: must be >= 0 (0: greedy)")
        if self.top_k < 0:
            raise InputError(f"top-k {self.top_k}: must be >= 0 (0: off)")
        if not 0.0 < self.top_p <= 1.0:
            raise InputError(f"top-p {self.top_p}: must be in (0, 1]")


@dataclasses.dataclass
class Step:
    """One generated token and where its probability came from."""

    token: int
    logp_lm: float  # log p_LM(token)
    logp_knn: float | None  # log p_kNN(token); None without retrieval
    logp: float  # log of the mixture it was drawn from
    neighbours: list  # up to a few (datastore id, value, distance) nearest first


@functools.lru_cache(maxsize=8)
def make_decode_step(graphdef, key_type: str, max_len: int):
    """Jitted ``(params, cache, token_B, pos) -> (logp BxV, query BxD, cache)`` for one position.

    The model decodes itself (its ``decode_step``, see :mod:`knnlm_jax.models.protocol`); ``cache``
    is its :func:`empty_cache` of ``max_len`` positions.
    """
    def step(params, cache, token_B, pos):
        model = nnx.merge(graphdef, params)
        x, states, new_cache = model.decode_step(token_B, cache, pos)
        return model.full_log_probs(x)[:, 0], states[key_type][:, 0].astype(jnp.float32), new_cache

    return jax.jit(step)


def empty_cache(trained, batch: int, max_len: int):
    """The model's own attention cache for ``batch`` sequences of ``max_len`` positions."""
    return trained.model().empty_cache(batch, max_len)


def choose(logp_V: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> int:
    """The next token from log-probs: argmax, or a draw after temperature, top-k and top-p."""
    logp_V = np.asarray(logp_V, np.float64)
    if sampling.temperature == 0:
        return int(np.argmax(logp_V))
    scores = logp_V / sampling.temperature
    if sampling.top_k:
        kth = np.sort(scores)[-min(sampling.top_k, len(scores))]
        scores = np.where(scores >= kth, scores, -np.inf)
    p = np.exp(scores - np.max(scores))
    p /= p.sum()
    if sampling.top_p < 1:
        order = np.argsort(-p, kind="stable")
        keep = np.cumsum(p[order]) - p[order] < sampling.top_p  # the smallest prefix reaching top_p
        mask = np.zeros_like(p, bool)
        mask[order[keep]] = True
        p = np.where(mask, p, 0.0)
        p /= p.sum()
    return int(rng.choice(len(p), p=p))


@dataclasses.dataclass(frozen=True)
class Mixing:
    """How ``p_kNN`` joins ``p_LM``: weight ``lmbda`` (0: the LM alone, no search), softmax ``temperature``."""

    lmbda: float = 0.0
    temperature: float = 1.0

    def check(self) -> None:
        if not 0.0 <= self.lmbda <= 1.0:
            raise InputError(f"lambda {self.lmbda}: must be in [0, 1]")
        if not self.temperature > 0:
            raise InputError(f"kNN temperature {self.temperature}: must be positive")


def generate(trained, context, new_tokens: int, *, key_type: str, retriever=None, mixing: Mixing = Mixing(),
             sampling: Sampling = Sampling(), stop=None, explain: int = 3):
    """Continue ``context`` (token ids, starting with ``</s>`` as a line does) by ``new_tokens`` tokens.

    ``retriever``: a :class:`~knnlm_jax.datastore.retriever.Retriever` (anything with
    ``nearest(queries_1xD) -> Neighbours``), searched only when ``mixing.lmbda > 0``. ``stop``:
    a token id that ends generation early. Returns the list of :class:`Step`.
    """
    sampling.check()
    mixing.check()
    if mixing.lmbda > 0 and retriever is None:
        raise InputError("lambda > 0 needs a datastore to retrieve from")
    context = [int(t) for t in context]
    if not context:
        raise InputError("generation needs at least one context token")
    max_len = len(context) + new_tokens
    step = make_decode_step(trained.graphdef, key_type, max_len)
    cache = empty_cache(trained, 1, max_len)
    rng = np.random.default_rng(sampling.seed)
    for pos, token in enumerate(context):  # prefill, one position at a time
        logp, query, cache = step(trained.params, cache, jnp.asarray([token], jnp.int32), pos)
    steps = []
    for pos in range(len(context), max_len):
        logp_V = np.asarray(logp[0])
        logp_knn_V, mixed_V, neighbours = None, logp_V, []
        if mixing.lmbda > 0:
            logp_knn_V, mixed_V, neighbours = knn_mixture(logp_V, retriever.nearest(np.asarray(query, np.float32)),
                                                          mixing, explain)
        token = choose(mixed_V, sampling, rng)
        steps.append(Step(token, float(logp_V[token]), None if logp_knn_V is None else float(logp_knn_V[token]),
                          float(mixed_V[token]), neighbours))
        if token == stop or pos == max_len - 1:
            break
        logp, query, cache = step(trained.params, cache, jnp.asarray([token], jnp.int32), pos)
    return steps


def knn_mixture(logp_V: np.ndarray, found, mixing: Mixing, explain: int):
    """``(log p_kNN V, log of the mixture V, the ``explain`` nearest (id, value, distance))`` of one query."""
    dists, ids, vals, valid = found.dists_QxK, found.ids_QxK, found.vals_QxK, found.found_QxK
    logp_knn_V = np.asarray(knn_full_log_probs(jnp.asarray(dists), jnp.asarray(vals), jnp.asarray(valid),
                                               len(logp_V), mixing.temperature)[0])
    mixed_V = np.asarray(interpolate(jnp.asarray(logp_V), jnp.asarray(logp_knn_V), mixing.lmbda))
    neighbours = [(int(i), int(v), float(d)) for i, v, d, ok in zip(ids[0], vals[0], dists[0], valid[0]) if ok]
    return logp_knn_V, mixed_V, neighbours[:explain]
