import jax
import jax.numpy as jnp
import numpy as np
import pytest

from knnlm_jax.retrieval.knn import interpolate, knn_full_log_probs, knn_target_log_prob, squared_l2


def numpy_knn_logp(dists, vals, valid, target, T):
    d = dists[valid]
    v = vals[valid]
    w = np.exp(-(d - d.min()) / T)
    w /= w.sum()
    p = w[v == target].sum()
    return np.log(p) if p > 0 else -np.inf


def test_papers_worked_example():
    # Eq. 2-3 with neighbours Hawaii/Illinois/Hawaii at distances 0.1/0.7/0.2 and lambda 0.25
    hawaii, illinois = 5, 9
    dists = jnp.array([[0.1, 0.7, 0.2]])
    vals = jnp.array([[hawaii, illinois, hawaii]])
    valid = jnp.ones((1, 3), bool)
    w = np.exp(-np.array([0.1, 0.7, 0.2]))
    p_hawaii = (w[0] + w[2]) / w.sum()
    got = knn_target_log_prob(dists, vals, valid, jnp.array([hawaii]), 1.0)
    np.testing.assert_allclose(np.exp(got), [p_hawaii], rtol=1e-6)
    p_lm = 0.1
    mixed = interpolate(jnp.log(jnp.array([p_lm])), got, 0.25)
    np.testing.assert_allclose(np.exp(mixed), [0.25 * p_hawaii + 0.75 * p_lm], rtol=1e-6)
    assert np.exp(knn_target_log_prob(dists, vals, valid, jnp.array([illinois]), 1.0))[0] == pytest.approx(w[1] / w.sum())


@pytest.mark.parametrize("T", [1.0, 3.7, 0.25])
def test_matches_numpy_reference_with_masks(T):
    rng = np.random.default_rng(0)
    B, K = 16, 12
    dists = rng.uniform(0, 20, (B, K)).astype(np.float32)
    vals = rng.integers(0, 6, (B, K)).astype(np.int32)
    valid = rng.random((B, K)) > 0.2
    valid[3] = False  # a query with no valid neighbour
    targets = rng.integers(0, 6, B).astype(np.int32)
    got = np.asarray(knn_target_log_prob(jnp.asarray(dists), jnp.asarray(vals), jnp.asarray(valid), jnp.asarray(targets), T))
    for b in range(B):
        ref = numpy_knn_logp(dists[b], vals[b], valid[b], targets[b], T) if valid[b].any() else -np.inf
        if np.isinf(ref):
            assert np.isneginf(got[b])
        else:
            np.testing.assert_allclose(got[b], ref, atol=1e-5)


def test_interpolation_limits_and_values():
    lm = jnp.log(jnp.array([0.2, 0.5, 1e-9]))
    knn = jnp.log(jnp.array([0.6, 0.0, 0.3]))
    np.testing.assert_array_equal(interpolate(lm, knn, 0.0), lm)  # exactly the LM
    np.testing.assert_allclose(np.exp(interpolate(lm, knn, 1.0)), [0.6, 0.0, 0.3], atol=1e-7)
    np.testing.assert_allclose(np.exp(interpolate(lm, knn, 0.3)), 0.3 * np.array([0.6, 0.0, 0.3]) + 0.7 * np.array([0.2, 0.5, 1e-9]), rtol=1e-6)
    g = jax.grad(lambda l: interpolate(lm, knn, l).sum())(0.3)
    assert np.isfinite(g)


def test_full_distribution_scatter_adds_and_agrees_with_target_path():
    rng = np.random.default_rng(1)
    B, K, V = 5, 7, 11
    dists = jnp.asarray(rng.uniform(0, 5, (B, K)), jnp.float32)
    vals = jnp.asarray(rng.integers(0, V, (B, K)), jnp.int32)
    valid = jnp.asarray(rng.random((B, K)) > 0.3).at[:, 0].set(True)
    full = knn_full_log_probs(dists, vals, valid, V, 2.0)
    np.testing.assert_allclose(jax.nn.logsumexp(full, axis=-1), 0.0, atol=1e-6)
    for y in range(V):
        np.testing.assert_allclose(full[:, y], knn_target_log_prob(dists, vals, valid, jnp.full(B, y), 2.0), atol=1e-5)


def test_squared_l2():
    q = jnp.array([[0.0, 1.0], [1.0, 1.0]])
    k = jnp.array([[[0.0, 1.0], [3.0, 5.0]], [[1.0, 0.0], [0.0, 0.0]]], jnp.float16)
    np.testing.assert_allclose(squared_l2(q, k), [[0.0, 25.0], [1.0, 2.0]])


def test_cache_matches_numpy_reference_and_sees_only_the_past():
    from knnlm_jax.evaluation.cache import cache_target_log_prob

    rng = np.random.default_rng(3)
    M, Q, D, size = 10, 4, 3, 5
    mem = rng.normal(size=(M, D)).astype(np.float32)
    mem_vals = rng.integers(0, 3, M).astype(np.int32)
    mem_pos = np.arange(M)
    q = rng.normal(size=(Q, D)).astype(np.float32)
    q_pos = np.array([0, 3, 7, 10])
    targets = rng.integers(0, 3, Q).astype(np.int32)
    thetas = np.array([0.5, 2.0])
    got = np.asarray(cache_target_log_prob(q, q_pos, targets, mem, mem_vals, mem_pos, thetas, size))
    for j in range(Q):
        vis = (mem_pos < q_pos[j]) & (mem_pos >= q_pos[j] - size)
        for h, theta in enumerate(thetas):
            if not vis.any():
                assert np.isneginf(got[j, h])
                continue
            s = np.exp(theta * mem[vis] @ q[j])
            p = s[mem_vals[vis] == targets[j]].sum() / s.sum()
            np.testing.assert_allclose(got[j, h], np.log(p) if p > 0 else -np.inf, atol=1e-5)
