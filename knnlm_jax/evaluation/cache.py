"""Continuous cache (Grave et al. 2017), pure JAX.

``p_cache(w | h_t) ∝ Σ_{t-M ≤ i < t, x_{i+1} = w} exp(θ h_t · h_i)`` over the hidden states
of the last ``M`` positions of the evaluated stream (the paper's "+ Continuous Cache"),
mixed as ``(1 - λc) p + λc p_cache``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


def cache_target_log_prob(queries_QxD, query_pos_Q, targets_Q, mem_keys_MxD, mem_vals_M, mem_pos_M, thetas_H, size):
    """``log p_cache(target)`` for each query and each θ in ``thetas_H``: ``Q x H``.

    Memory entry ``i`` (stream position ``mem_pos_M[i]``, next token ``mem_vals_M[i]``) is
    visible to a query at position ``p`` when ``p - size ≤ mem_pos < p``. Queries with no
    visible entry, or whose target is not in the cache, get ``-inf``.
    """
    dots_QxM = queries_QxD.astype(jnp.float32) @ mem_keys_MxD.astype(jnp.float32).T
    visible_QxM = (mem_pos_M[None, :] < query_pos_Q[:, None]) & (mem_pos_M[None, :] >= query_pos_Q[:, None] - size)
    hit_QxM = visible_QxM & (mem_vals_M[None, :] == targets_Q[:, None])

    def one(theta):
        scores = jnp.where(visible_QxM, theta * dots_QxM, NEG_INF)
        norm = jax.nn.logsumexp(scores, axis=-1)
        num = jax.nn.logsumexp(jnp.where(hit_QxM, scores, NEG_INF), axis=-1)
        return jnp.where(jnp.isfinite(norm), num - norm, NEG_INF)

    return jax.vmap(one, out_axes=1)(jnp.asarray(thetas_H, jnp.float32))
