"""Pure-JAX kNN-LM math (Khandelwal et al. 2020, Eq. 2-3).

``p_kNN(y | x) ∝ Σ_{i ∈ N(x), v_i = y} exp(-d_i / T)`` over the retrieved neighbours,
``p(y | x) = λ p_kNN(y | x) + (1 - λ) p_LM(y | x)``, computed in log space.
Neighbours marked invalid (FAISS id -1, dropped self-retrievals) get no weight.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


def neighbour_log_weights(dists_BxK, valid_BxK, temperature):
    """``log softmax(-d / T)`` over the valid neighbours; ``-inf`` for invalid ones.

    A row with no valid neighbour gets ``-inf`` everywhere (p_kNN is then zero).
    """
    scores = jnp.where(valid_BxK, -dists_BxK.astype(jnp.float32) / temperature, NEG_INF)
    norm_B = jax.nn.logsumexp(scores, axis=-1, keepdims=True)
    return jnp.where(valid_BxK, scores - jnp.where(jnp.isfinite(norm_B), norm_B, 0.0), NEG_INF)


def knn_target_log_prob(dists_BxK, vals_BxK, valid_BxK, targets_B, temperature):
    """``log p_kNN(target)``: log of the summed weights of neighbours whose value is the target."""
    logw = neighbour_log_weights(dists_BxK, valid_BxK, temperature)
    hit = valid_BxK & (vals_BxK == targets_B[:, None])
    return jax.nn.logsumexp(jnp.where(hit, logw, NEG_INF), axis=-1)


def interpolate(logp_lm, logp_knn, lam):
    """``log(λ p_kNN + (1 - λ) p_LM)``; ``λ = 0`` returns ``logp_lm`` exactly."""
    lam = jnp.asarray(lam, jnp.float32)
    a = jnp.where(lam > 0, jnp.log(jnp.maximum(lam, 1e-38)) + logp_knn, NEG_INF)
    b = jnp.where(lam < 1, jnp.log1p(-jnp.minimum(lam, 1.0)) + logp_lm, NEG_INF)
    both = jnp.logaddexp(a, b)
    return jnp.where(lam <= 0, logp_lm, jnp.where(lam >= 1, logp_knn, both))


def knn_full_log_probs(dists_BxK, vals_BxK, valid_BxK, vocab_size: int, temperature):
    """``log p_kNN(w)`` for every word (``B x V``), by scatter-add of neighbour weights.

    Needed for generation; evaluation uses :func:`knn_target_log_prob` and never builds
    tokens x vocabulary.
    """
    w_BxK = jnp.exp(neighbour_log_weights(dists_BxK, valid_BxK, temperature))
    b = dists_BxK.shape[0]
    rows_BxK = jnp.broadcast_to(jnp.arange(b)[:, None], vals_BxK.shape)
    cols_BxK = jnp.where(valid_BxK, vals_BxK, 0)
    p_BxV = jnp.zeros((b, vocab_size), jnp.float32).at[rows_BxK, cols_BxK].add(jnp.where(valid_BxK, w_BxK, 0.0))
    return jnp.log(p_BxV)


def squared_l2(queries_BxD, keys_BxKxD):
    """Exact squared L2 distances of each query to its own K candidate keys (float32)."""
    diff = keys_BxKxD.astype(jnp.float32) - queries_BxD.astype(jnp.float32)[:, None, :]
    return jnp.sum(diff * diff, axis=-1)
