"""Stage 2 of an evaluation: pure-JAX mixing over the per-token files, in chunks, and the tuning on valid.

Never a tokens x vocabulary array: each chunk is ``MIX_ROWS`` tokens times K neighbours.
``auto`` parameters (λ, T, the cache's λc and θ) are chosen on valid from its saved files
(no new searches per grid point).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from knnlm_jax.evaluation.settings import LAMBDAS, TEMPERATURES, EvaluationError
from knnlm_jax.retrieval.knn import interpolate, knn_target_log_prob
from knnlm_jax.evaluation.token_files import TokenFiles

MIX_ROWS = 8192  # tokens per mixing chunk (times K neighbours)


def _rows_for(n: int, rows: int) -> int:
    """Chunk rows: ``rows``, or the next power of two above ``n`` when smaller (few compiled shapes)."""
    return max(1, min(rows, 1 << max(0, n - 1).bit_length()))


def _chunks(n: int, rows: int):
    for c in range(0, n, rows):
        yield c, min(n, c + rows)


def _padded(array, rows: int, fill=0):
    array = np.asarray(array)
    if len(array) == rows:
        return array
    pad = np.full((rows - len(array), *array.shape[1:]), fill, array.dtype)
    return np.concatenate([array, pad])


@jax.jit
def _knn_chunk(dists_CxK, hit_CxK, valid_CxK, temps_G, ks_G):
    """``log p_kNN(target)`` for each (temperature, k) pair: ``G x C``; ``hit`` stands for ``vals == target``."""
    rank_K = jnp.arange(dists_CxK.shape[1])
    ones_C = jnp.ones(dists_CxK.shape[0], jnp.int32)

    def one(t, k):
        return knn_target_log_prob(dists_CxK, hit_CxK.astype(jnp.int32), valid_CxK & (rank_K < k), ones_C, t)

    return jax.vmap(one)(temps_G, ks_G)


def knn_log_probs(files: TokenFiles, temperatures, ks=None, rows: int = MIX_ROWS) -> np.ndarray:
    """``G x N`` log p_kNN(target) for pairs ``(temperatures[g], ks[g])`` (``ks`` default: all K).

    Only the ``k`` nearest (valid) neighbours count: the files are sorted by distance.
    """
    if files.dists is None:
        raise EvaluationError(f"{files.directory} holds no neighbours (a base-LM evaluation)")
    temps = np.asarray(temperatures, np.float32).reshape(-1)
    ks = np.full(len(temps), files.k, np.int32) if ks is None else np.asarray(ks, np.int32).reshape(-1)
    temps, ks = np.broadcast_arrays(temps, ks)
    out = np.empty((len(temps), files.n), np.float32)
    rows = _rows_for(files.n, rows)
    for a, b in _chunks(files.n, rows):
        res = _knn_chunk(_padded(files.dists[a:b], rows, np.inf), _padded(files.hit[a:b], rows),
                         _padded(files.valid[a:b], rows), jnp.asarray(temps), jnp.asarray(ks))
        out[:, a:b] = np.asarray(res)[:, : b - a]
    if files.retrieved is not None:  # a token that did not retrieve is the LM's alone: p_kNN := p_LM, any λ
        skipped = ~np.asarray(files.retrieved)
        out[:, skipped] = np.asarray(files.logp_lm)[skipped]
    return out


@jax.jit
def _mix_chunk(base_C, others_GxC, lambdas_L, weight_C):
    """Summed NLL of ``interpolate(base, other_g, λ_l)`` over the weighted rows: ``G x L``."""

    def one(other_C):
        def at(lam):
            return -jnp.sum(jnp.where(weight_C, interpolate(base_C, other_C, lam), 0.0))

        return jax.vmap(at)(lambdas_L)

    return jax.vmap(one)(others_GxC)


def nll_table(base_N, others_GxN, lambdas, rows: int = MIX_ROWS) -> np.ndarray:
    """Mean NLL (``G x L``) of ``log((1 - λ) p_base + λ p_other)`` for every ``other`` row and λ."""
    base = np.asarray(base_N, np.float32)
    others = np.asarray(others_GxN, np.float32).reshape(-1, len(base))
    lambdas = jnp.asarray(np.asarray(lambdas, np.float32).reshape(-1))
    total = np.zeros((len(others), len(lambdas)), np.float64)
    rows = _rows_for(len(base), rows)
    for a, b in _chunks(len(base), rows):
        weight = _padded(np.ones(b - a, bool), rows)
        total += np.asarray(_mix_chunk(_padded(base[a:b], rows), _padded(others[:, a:b].T, rows).T, lambdas, weight))
    return total / max(1, len(base))


@jax.jit
def _interpolate(base, other, lam):
    return interpolate(base, other, lam)


def mix(base_N, other_N, lmbda: float, rows: int = MIX_ROWS) -> np.ndarray:
    """Per-token ``log((1 - λ) p_base + λ p_other)``; ``λ = 0`` returns ``base`` exactly."""
    base = np.asarray(base_N, np.float32)
    other = np.asarray(other_N, np.float32)
    out = np.empty(len(base), np.float32)
    rows = _rows_for(len(base), rows)
    for a, b in _chunks(len(base), rows):
        out[a:b] = np.asarray(_interpolate(_padded(base[a:b], rows), _padded(other[a:b], rows), lmbda))[: b - a]
    return out


def tune(base_N, others_GxN, lambdas, labels) -> dict:
    """The grid point (``labels[g]``, λ) of least mean NLL, with the whole table of perplexities."""
    table = nll_table(base_N, others_GxN, lambdas)
    g, l = np.unravel_index(int(np.argmin(np.where(np.isnan(table), np.inf, table))), table.shape)
    return dict(label=labels[g], lmbda=float(lambdas[l]), ppl=float(np.exp(table[g, l])),
                grid={"labels": list(labels), "lambdas": [float(x) for x in lambdas],
                      "ppl": np.exp(table).tolist()})


def tune_knn(files: TokenFiles, lambdas=LAMBDAS, temperatures=TEMPERATURES, k: int | None = None,
             refine: int = 3) -> dict:
    """λ and T of least perplexity on ``files`` (valid), over the grids (pass one value to fix one).

    With several temperatures (a geometric grid), the best is then refined on a grid
    ``2**(1/8)`` times finer around it (``refine`` points each side), reported as ``fine_grid``.
    """
    temperatures = tuple(float(t) for t in temperatures)
    best = tune(files.logp_lm, knn_log_probs(files, temperatures, k), tuple(lambdas), temperatures)
    result = dict(lmbda=best["lmbda"], temperature=best["label"], ppl=best["ppl"], grid=best["grid"])
    if len(temperatures) > 1 and refine > 0:
        fine = tuple(best["label"] * 2 ** (j / 8) for j in range(-refine, refine + 1) if j)
        better = tune(files.logp_lm, knn_log_probs(files, fine, k), tuple(lambdas), fine)
        result["fine_grid"] = better["grid"]
        if better["ppl"] < best["ppl"]:
            result.update(lmbda=better["lmbda"], temperature=better["label"], ppl=better["ppl"])
    return result


def tune_cache(base_N, cache_NxH, thetas, lambdas=LAMBDAS) -> dict:
    """λc and θ of least perplexity for ``(1 - λc) p_base + λc p_cache``."""
    best = tune(base_N, np.asarray(cache_NxH).T, tuple(lambdas), tuple(float(t) for t in thetas))
    return dict(lmbda=best["lmbda"], theta=best["label"], ppl=best["ppl"], grid=best["grid"])
