import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from knnlm_jax.models.adaptive import AdaptiveInput, AdaptiveSoftmax, band_capacities, band_edges
from knnlm_jax.models.transformer import ModelConfig, TransformerLM

V = 53


def make(cutoffs, tied=True, tie_proj=True, d=16, factor=2):
    rngs = nnx.Rngs(0)
    inp = AdaptiveInput(V, d, cutoffs, factor, rngs=rngs)
    sm = AdaptiveSoftmax(V, d, cutoffs, factor, dropout=0.0, adaptive_input=inp if tied else None,
                         tie_proj=tie_proj, rngs=rngs)
    h = jax.random.normal(jax.random.key(1), (3, 7, d))
    targets = jax.random.randint(jax.random.key(2), (3, 7), 0, V)
    return inp, sm, h, targets


CASES = [((), True, True), ((10, 30), True, True), ((10, 30), True, False), ((10, 30), False, False),
         ((5, 20, 40), True, True)]


@pytest.mark.parametrize("cutoffs,tied,tie_proj", CASES)
def test_full_log_probs_normalised_at_every_position(cutoffs, tied, tie_proj):
    inp, sm, h, _ = make(cutoffs, tied, tie_proj)
    full = sm.full_log_probs(h, inp)
    assert full.shape == (3, 7, V)
    np.testing.assert_allclose(jax.nn.logsumexp(full, axis=-1), 0.0, atol=1e-5)


@pytest.mark.parametrize("cutoffs,tied,tie_proj", CASES)
def test_target_log_probs_equal_gather_of_full(cutoffs, tied, tie_proj):
    inp, sm, h, targets = make(cutoffs, tied, tie_proj)
    full = sm.full_log_probs(h, inp)
    gathered = jnp.take_along_axis(full, targets[..., None], axis=-1)[..., 0]
    dense = sm.target_log_probs(h, targets, inp)
    np.testing.assert_allclose(dense, gathered, atol=1e-5)
    caps = band_capacities(np.asarray(targets), band_edges(V, cutoffs))
    sparse = sm.target_log_probs(h, targets, inp, capacities=caps)
    np.testing.assert_allclose(sparse, gathered, atol=1e-5)


def test_capacities_cover_band_counts_and_round_up():
    edges = band_edges(100, (10, 50))
    targets = np.array([[1, 12, 13, 60], [70, 80, 90, 11]])
    caps = band_capacities(targets, edges, granularity=4)
    assert caps == (4, 4)  # 3 in [10,50) -> 4, 4 in [50,100) -> 4
    assert band_capacities(targets, edges, mask=np.array([[1, 1, 0, 1], [0, 0, 0, 0]], bool), granularity=1) == (1, 1)
    # the largest micro-batch decides
    assert band_capacities(np.stack([targets, np.zeros_like(targets)]), edges, granularity=1) == (3, 4)


def test_one_cluster_equals_plain_softmax():
    inp, sm, h, targets = make((), tied=True)
    emb, proj = inp.band_weights(0)
    expected = jax.nn.log_softmax(h @ emb.T, axis=-1)
    np.testing.assert_allclose(sm.full_log_probs(h, inp), expected, atol=1e-5)
    _, sm_untied, _, _ = make((), tied=False)
    expected = jax.nn.log_softmax(sm_untied.head_words(h), axis=-1)
    np.testing.assert_allclose(sm_untied.full_log_probs(h), expected, atol=1e-5)


def test_adaptive_input_uses_band_embeddings():
    inp, _, _, _ = make((10, 30))
    tokens = jnp.array([[0, 9, 10, 29, 30, 52]])
    out = inp(tokens)
    for j, t in enumerate(np.asarray(tokens[0])):
        band = int(np.searchsorted(inp.edges, t, side="right") - 1)
        emb, proj = inp.band_weights(band)
        np.testing.assert_allclose(out[0, j], emb[t - inp.edges[band]] @ proj, atol=1e-5)


def test_cutoffs_outside_the_vocabulary_are_dropped():
    assert band_edges(50, (10, 60, 50, 0)) == (0, 10, 50)


def test_tied_model_shares_weights_and_has_no_tail_matrices():
    cfg = ModelConfig(vocab_size=V, num_layers=1, d_model=16, num_heads=2, d_ff=32, cutoffs=(10, 30))
    untied = ModelConfig(**{**cfg.__dict__, "tie_adaptive_weights": False, "tie_adaptive_proj": False})
    n = lambda c: sum(x.size for x in jax.tree_util.tree_leaves(nnx.state(TransformerLM(c, rngs=nnx.Rngs(0)), nnx.Param)))
    # untied adds head words (10 + 2 classes) x 16, tail projections and tail output matrices
    extra = n(untied) - n(cfg)
    assert extra == 16 * 12 - 16 * 2 + (16 * 4 + 4 * 20) + (16 * 1 + 1 * 23)


def reference_log_probs(inp, sm, h):
    """``B x T x V`` log-probs built in NumPy from the layer's parameters (tied weights and projections)."""
    edges, h = inp.edges, np.asarray(h, np.float64)
    emb0, _ = (np.asarray(a, np.float64) for a in inp.band_weights(0))
    x = h @ np.asarray(sm.head_proj.kernel[...], np.float64) if sm.head_proj is not None else h
    head = np.concatenate([x @ emb0.T, h @ np.asarray(sm.head_classes.kernel[...], np.float64)], axis=-1)
    head = head - np.log(np.exp(head - head.max(-1, keepdims=True)).sum(-1, keepdims=True)) - head.max(-1, keepdims=True)
    parts = [head[..., : edges[1]]]
    for i in range(len(edges) - 2):
        emb, proj = (np.asarray(a, np.float64) for a in inp.band_weights(i + 1))
        logits = (h @ proj.T) @ emb.T  # tied projection: hidden -> band dim by the input projection's transpose
        tail = logits - logits.max(-1, keepdims=True)
        tail = tail - np.log(np.exp(tail).sum(-1, keepdims=True))
        parts.append(head[..., edges[1] + i : edges[1] + i + 1] + tail)
    return np.concatenate(parts, axis=-1)


def test_adaptive_softmax_equals_an_independent_numpy_softmax_with_several_clusters():
    inp, sm, h, targets = make((5, 20, 40), d=16, factor=2)
    expected = reference_log_probs(inp, sm, h)
    np.testing.assert_allclose(np.exp(expected).sum(-1), 1.0, atol=1e-9)
    gathered = np.take_along_axis(expected, np.asarray(targets)[..., None], axis=-1)[..., 0]
    caps = band_capacities(np.asarray(targets), band_edges(V, (5, 20, 40)))
    for capacities in (None, caps):
        np.testing.assert_allclose(sm.target_log_probs(h, targets, inp, capacities=capacities), gathered, atol=1e-4)
    np.testing.assert_allclose(sm.full_log_probs(h, inp), expected, atol=1e-4)


def test_a_too_small_capacity_gives_nan_never_a_wrong_number():
    inp, sm, h, targets = make((10, 30))
    exact = band_capacities(np.asarray(targets), band_edges(V, (10, 30)), granularity=1)
    assert min(exact) >= 2
    right = sm.target_log_probs(h, targets, inp, capacities=exact)
    for short in ((exact[0] - 1, exact[1]), (exact[0], 0)):
        logp = np.asarray(sm.target_log_probs(h, targets, inp, capacities=short))
        finite = np.isfinite(logp)
        assert not finite.all()  # the uncovered targets
        np.testing.assert_allclose(logp[finite], np.asarray(right)[finite], atol=1e-6)  # the rest are exact


# ---------------------------------------------------------------------------------
# training mode: dropout where fairseq's AdaptiveSoftmax.forward puts it


def dropout_masks(rate, seed, shapes):
    """The scaled keep-masks (0 or ``1 / (1 - rate)``) that ``nnx.Dropout`` draws from
    ``nnx.Rngs(dropout=seed)`` for calls on arrays of these shapes, in this order."""
    rngs, drop = nnx.Rngs(dropout=seed), nnx.Dropout(rate)
    return [np.asarray(drop(jnp.ones(shape), deterministic=False, rngs=rngs), np.float64) for shape in shapes]


def numpy_weights(inp, sm):
    """The layer's weights as float64 functions of NumPy inputs: head logits, tail projections and outputs."""
    f64 = lambda a: np.asarray(a, np.float64)
    kernel = lambda linear: f64(linear.kernel[...])
    n_tails = len(sm.edges) - 2
    if sm.tied:
        emb0 = f64(inp.band_weights(0)[0])
        head = lambda x: np.concatenate([x @ emb0.T, x @ kernel(sm.head_classes)], axis=-1)
        embs, projs = zip(*[(f64(e), f64(p)) for e, p in (inp.band_weights(i + 1) for i in range(n_tails))])
        tail_out = [lambda z, e=e: z @ e.T for e in embs]
    else:
        head = lambda x: x @ kernel(sm.head_words)
        tail_out = [lambda z, k=kernel(sm.tail_out[i]): z @ k for i in range(n_tails)]
    if sm.tie_proj:
        tail_proj = [lambda x, p=p: x @ p.T for p in projs]
    else:
        tail_proj = [lambda x, k=kernel(sm.tail_proj[i]): x @ k for i in range(n_tails)]
    return head, tail_proj, tail_out


def np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def fairseq_training_target_log_probs(inp, sm, h_BxTxD, targets_BxT, input_mask, tail_masks):
    """``log p(target)`` of fairseq's ``AdaptiveSoftmax.forward`` in training mode, as ``adaptive_loss``
    scores it: ``input = dropout(input)``; ``head(input)``; tail ``i`` on the rows whose target is in
    band ``i`` (``index_select``, flat order): ``Sequential(proj, Dropout, out)``. ``tail_masks[i]``
    holds one mask row per selected row, in that order."""
    head, tail_proj, tail_out = numpy_weights(inp, sm)
    d, edges = h_BxTxD.shape[-1], sm.edges
    x_NxD = (np.asarray(h_BxTxD, np.float64) * input_mask).reshape(-1, d)
    t_N = np.asarray(targets_BxT).reshape(-1)
    head_lp = np_log_softmax(head(x_NxD))
    logp_N = head_lp[np.arange(len(t_N)), np.minimum(t_N, edges[1] - 1)]
    for i in range(len(edges) - 2):
        (rows,) = np.nonzero((t_N >= edges[i + 1]) & (t_N < edges[i + 2]))
        z = tail_proj[i](x_NxD[rows]) * tail_masks[i]
        tail_lp = np_log_softmax(tail_out[i](z))[np.arange(len(rows)), t_N[rows] - edges[i + 1]]
        logp_N[rows] = head_lp[rows, edges[1] + i] + tail_lp
    return logp_N.reshape(t_N.shape[0] // h_BxTxD.shape[1], -1)


@pytest.mark.parametrize("tied,tie_proj", [(True, True), (True, False), (False, False)])
@pytest.mark.parametrize("sparse", [False, True])
def test_training_dropout_is_placed_as_fairseqs(tied, tie_proj, sparse):
    """Fixed masks (reproduced from the same dropout rng): one on the softmax input, read by the head and
    every tail, then one on each tail's projection; for the dense path the tail masks cover every position."""
    rate, seed = 0.5, 3
    inp, _, h, targets = make((10, 30), tied, tie_proj)
    sm = AdaptiveSoftmax(V, 16, (10, 30), 2, dropout=rate, adaptive_input=inp if tied else None,
                         tie_proj=tie_proj, rngs=nnx.Rngs(0))
    edges, n = sm.edges, h.shape[0] * h.shape[1]
    rows = [np.nonzero((np.asarray(targets).reshape(-1) >= lo) & (np.asarray(targets).reshape(-1) < hi))[0]
            for lo, hi in zip(edges[1:-1], edges[2:])]
    caps = band_capacities(np.asarray(targets), edges) if sparse else None
    tail_shapes = [(caps[i], dim) if sparse else (*h.shape[:2], dim) for i, dim in enumerate(sm.dims[1:])]
    input_mask, *tail_masks = dropout_masks(rate, seed, [h.shape, *tail_shapes])
    assert 0.3 < (input_mask == 0).mean() < 0.7  # the masks drop something
    # the masks' rows that fairseq's selected rows meet: the first ones (sparse) or the rows' own (dense)
    per_row = [m[: len(r)] if sparse else m.reshape(n, -1)[r] for m, r in zip(tail_masks, rows)]
    expected = fairseq_training_target_log_probs(inp, sm, h, targets, input_mask, per_row)
    got = sm.target_log_probs(h, targets, inp, capacities=caps, deterministic=False, rngs=nnx.Rngs(dropout=seed))
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-4, rtol=0)
    if not sparse:  # full_log_probs draws the same masks in the same order
        full = sm.full_log_probs(h, inp, deterministic=False, rngs=nnx.Rngs(dropout=seed))
        gathered = jnp.take_along_axis(full, targets[..., None], axis=-1)[..., 0]
        np.testing.assert_allclose(np.asarray(gathered), expected, atol=1e-4, rtol=0)
