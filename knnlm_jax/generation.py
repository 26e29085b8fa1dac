"""Text generation with the LM or the kNN-LM: a KV cache, one datastore search per new token.

Each step runs the model on one position against its cached attention keys and values
(:func:`make_decode_step`, jitted; the same layers and numerics as the full forward's
explicit attention) and returns the full next-token log-distribution ``p_LM`` and the query
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
from knnlm_jax.models.transformer import sinusoidal_positions
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

    ``cache``: per layer ``(keys, values)``, each ``B x max_len x H x hd``; position ``pos``'s
    are written, positions after it are masked out.
    """
    def step(params, cache, token_B, pos):
        model = nnx.merge(graphdef, params)
        if hasattr(model, "decode_step"):  # a pretrained LM (knnlm_jax.models.llama) decodes itself
            x, states, new_cache = model.decode_step(token_B, cache, pos)
            return model.full_log_probs(x)[:, 0], states[key_type][:, 0].astype(jnp.float32), new_cache
        cfg = model.cfg
        positions_LxD = jnp.asarray(sinusoidal_positions(max_len, cfg.d_model, cfg.position_offset))
        x = model.embed_scale * model.embed(token_B[:, None]) + positions_LxD[pos]
        if cfg.dtype is not None:
            x = x.astype(cfg.dtype)
        b, d = x.shape[0], x.shape[-1]
        new_cache, states = [], {}
        for i, block in enumerate(model.blocks):
            attn = block.attn
            h, hd = attn.num_heads, d // attn.num_heads
            q, k, v = jnp.split(attn.qkv(block.ln1(x)).reshape(b, 1, 3 * h, hd), 3, axis=2)
            keys_BxLxHxK = jax.lax.dynamic_update_slice_in_dim(cache[i][0], k.astype(cache[i][0].dtype), pos, 1)
            vals_BxLxHxK = jax.lax.dynamic_update_slice_in_dim(cache[i][1], v.astype(cache[i][1].dtype), pos, 1)
            new_cache.append((keys_BxLxHxK, vals_BxLxHxK))
            scores = jnp.einsum("bqhd,bkhd->bhqk", q, keys_BxLxHxK, preferred_element_type=jnp.float32,
                                precision=attn.precision) * hd**-0.5
            scores = jnp.where(jnp.arange(max_len) <= pos, scores, jnp.finfo(jnp.float32).min)
            probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
            attn_out = attn.out(jnp.einsum("bhqk,bkhd->bqhd", probs, vals_BxLxHxK, precision=attn.precision)
                                .reshape(b, 1, d))
            x = x + attn_out
            ffn_in = block.ln2(x)
            if i == len(model.blocks) - 1:
                states.update(attn_output=attn_out, ffn_input_before_ln=x, ffn_input_after_ln=ffn_in)
            x = x + block.fc2(jax.nn.relu(block.fc1(ffn_in)))
        states["block_output"] = x
        if model.final_ln is not None:
            x = model.final_ln(x)
        x = x.astype(jnp.float32)
        states["final_output"] = x
        logp_BxV = model.full_log_probs(x)[:, 0]
        return logp_BxV, states[key_type][:, 0].astype(jnp.float32), tuple(new_cache)

    return jax.jit(step)


def empty_cache(trained, batch: int, max_len: int):
    model = trained.model()
    if hasattr(model, "empty_cache"):  # a pretrained LM (knnlm_jax.models.llama) sizes its own, as it decodes itself
        return model.empty_cache(batch, max_len)
    cfg = trained.cfg
    hd = cfg.d_model // cfg.num_heads
    dtype = jnp.float32 if cfg.dtype is None else cfg.dtype
    zeros = jnp.zeros((batch, max_len, cfg.num_heads, hd), dtype)
    return tuple((zeros, zeros) for _ in range(cfg.num_layers))


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


def generate(trained, context, new_tokens: int, *, key_type: str, retrieve=None, vals_N=None, lmbda: float = 0.0,
             knn_temperature: float = 1.0, sampling: Sampling = Sampling(), stop=None, explain: int = 3):
    """Continue ``context`` (token ids, starting with ``</s>`` as a line does) by ``new_tokens`` tokens.

    ``retrieve(query_1xD) -> (dists 1xK, ids 1xK)``: the datastore's nearest entries (ids -1
    where none), with ``vals_N`` their next tokens; searched only when ``lmbda > 0``. ``stop``:
    a token id that ends generation early. Returns the list of :class:`Step`.
    """
    sampling.check()
    if not 0.0 <= lmbda <= 1.0:
        raise InputError(f"lambda {lmbda}: must be in [0, 1]")
    if lmbda > 0 and retrieve is None:
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
        logp_knn_V, neighbours = None, []
        mixed_V = logp_V
        if lmbda > 0:
            dists, ids = retrieve(np.asarray(query, np.float32))
            valid = ids >= 0
            vals = np.asarray(vals_N[np.where(valid, ids, 0).reshape(-1)]).reshape(ids.shape)
            logp_knn_V = np.asarray(knn_full_log_probs(jnp.asarray(dists), jnp.asarray(vals), jnp.asarray(valid),
                                                       len(logp_V), knn_temperature)[0])
            mixed_V = np.asarray(interpolate(jnp.asarray(logp_V), jnp.asarray(logp_knn_V), lmbda))
            neighbours = [(int(i), int(v), float(d)) for i, v, d, ok in zip(ids[0], vals[0], dists[0], valid[0])
                          if ok][:explain]
        token = choose(mixed_V, sampling, rng)
        steps.append(Step(token, float(logp_V[token]), None if logp_knn_V is None else float(logp_knn_V[token]),
                          float(mixed_V[token]), neighbours))
        if token == stop or pos == max_len - 1:
            break
        logp, query, cache = step(trained.params, cache, jnp.asarray([token], jnp.int32), pos)
    return steps
