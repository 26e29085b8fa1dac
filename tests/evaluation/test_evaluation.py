"""The streaming evaluator against references: the trainer's perplexity, brute-force kNN, the cache, tuning."""

import json
import os

import jax
import numpy as np
import pytest

from helpers.tiny_run import eval_job, run_tokens
from knnlm_jax.evaluation import evaluate as evaluation
from knnlm_jax.retrieval.policies import exact_distances
from knnlm_jax.evaluation.settings import LAMBDAS, TEMPERATURES, EvaluationError, Settings, drop_self_for, perplexity
from knnlm_jax.evaluation.token_files import open_token_files
from knnlm_jax.evaluation.mixing import knn_log_probs, mix, tune_knn
from knnlm_jax.data.windows import token_stream, window_batch, windows

pytestmark = pytest.mark.slow(9)


def test_base_lm_perplexity_equals_the_trainers_on_the_same_blocks(ev, tmp_path):
    from knnlm_jax.models.adaptive import band_edges
    from knnlm_jax.data.blocks import lm_blocks
    from knnlm_jax.core.distributed import make_mesh
    from knnlm_jax.models.steps import evaluate, make_eval_step

    tokens = ev.splits["valid"][1]
    n = 8 * 16  # whole blocks of a longer split: the windows are then exactly the trainer's blocks
    assert len(tokens) > n
    files = run_tokens(ev, tmp_path, tokens[:n], index=None, context=0, batch_size=8, capacities=None)
    assert files.dists is None and files.n == n
    step = jax.jit(make_eval_step(ev.trained.graphdef), static_argnums=4)
    blocks = lm_blocks(tokens, 16, ev.vocab.eos, pad_last=True)
    nll, count = evaluate(step, ev.trained.params, blocks, 8, make_mesh(),
                          band_edges(ev.trained.cfg.vocab_size, ev.trained.cfg.cutoffs), max_tokens=n)
    assert count == n
    assert perplexity(files.logp_lm) == pytest.approx(np.exp(nll / count), rel=1e-6)
    np.testing.assert_array_equal(files.targets, tokens[:n])


def brute_force(ev, queries, targets, k, temperature):
    """log p_kNN(target) from all distances to all stored keys (float64), softmax over the k nearest."""
    keys = np.asarray(ev.store.keys, np.float64)
    vals = np.asarray(ev.store.vals)
    out = []
    for q, t in zip(queries.astype(np.float64), targets):
        d = ((keys - q) ** 2).sum(axis=1)
        near = np.argsort(d, kind="stable")[:k]
        w = np.exp(-(d[near] - d[near].min()) / temperature)
        p = w[vals[near] == t].sum() / w.sum()
        out.append(np.log(p) if p > 0 else -np.inf)
    return np.array(out)


@pytest.mark.parametrize("k", [8, 4096])
def test_knn_and_mixed_log_probs_equal_a_brute_force_reference(ev, tmp_path, k):
    tokens = ev.splits["valid"][1][:120]
    queries = []
    files = run_tokens(ev, tmp_path, tokens, k=k, on_queries=queries.append)
    queries = np.concatenate(queries)
    assert queries.shape == (120, 16) and files.k == k
    if k > ev.store.size:  # FAISS returns id -1 beyond the datastore: masked
        assert np.all(files.ids[:, ev.store.size :] == -1) and not files.valid[:, ev.store.size :].any()
        assert np.all(files.valid.sum(axis=1) == ev.store.size) and files.meta["not_found"] == 120 * (k - ev.store.size)
        assert np.all(np.isinf(files.dists[:, ev.store.size :]))
    assert np.all(np.diff(np.minimum(files.dists, 1e30), axis=1) >= 0)  # sorted ascending, invalid last
    for temperature in (1.0, 2.5):
        ref = brute_force(ev, queries, tokens, k, temperature)
        got = knn_log_probs(files, [temperature])[0]
        assert np.array_equal(np.isneginf(got), np.isneginf(ref))
        finite = np.isfinite(ref)
        assert finite.sum() > 20
        np.testing.assert_allclose(got[finite], ref[finite], atol=1e-5)
        lm = np.asarray(files.logp_lm, np.float64)
        mixed_ref = np.log(0.3 * np.exp(ref) + 0.7 * np.exp(lm))
        np.testing.assert_allclose(mix(files.logp_lm, got, 0.3), mixed_ref, atol=1e-5)
    assert np.array_equal(mix(files.logp_lm, got, 0.0), files.logp_lm)  # lambda 0 is the LM, bit for bit


def test_exact_reranks_the_approximate_candidates(ev, tmp_path):
    tokens = ev.splits["valid"][1][:100]
    queries = []
    exact = run_tokens(ev, tmp_path, tokens, name="exact", k=16, on_queries=queries.append)
    approx = run_tokens(ev, tmp_path, tokens, name="approx", k=16, exact=False)
    q = np.concatenate(queries)
    keys = np.asarray(ev.store.keys, np.float32)
    # exact: float32 squared L2 from the query to the stored (float16) key of each returned id
    np.testing.assert_allclose(exact.dists, ((keys[exact.ids] - q[:, None]) ** 2).sum(-1), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(approx.dists, exact.dists, rtol=1e-4, atol=1e-4)  # a Flat index: the same neighbours
    for files in (exact, approx):
        assert files.valid.all() and np.isfinite(perplexity(mix(files.logp_lm, knn_log_probs(files, [1.0])[0], 0.25)))


def check_cache_against_reference(ev, files, tokens, thetas, size, window=16, context=8):
    """log p_cache(target) recomputed in NumPy: each position's softmax input state from the window that
    scores it, and a memory of the previous ``size`` positions of the stream (across windows)."""
    stream = token_stream(tokens, ev.vocab.eos)
    w = windows(len(tokens), window, context)
    inputs, _, mask = window_batch(stream, w, window, ev.vocab.eos)
    states = np.asarray(ev.trained.model()(inputs), np.float64)[mask]  # N x D in stream order
    assert len(states) == len(tokens)
    checked = 0
    for p in np.unique(np.linspace(0, len(tokens) - 1, 60).astype(int)):
        mem = np.arange(max(0, p - size), p)
        for c, theta in enumerate(thetas):
            if len(mem) == 0:
                assert np.isneginf(files.cache[p, c])
                continue
            s = theta * states[mem] @ states[p]
            prob = np.exp(s - s.max())[tokens[mem] == tokens[p]].sum() / np.exp(s - s.max()).sum()
            if prob == 0:
                assert np.isneginf(files.cache[p, c])
            else:
                np.testing.assert_allclose(files.cache[p, c], np.log(prob), atol=1e-4)
                checked += 1
    assert checked > 10


def test_the_cache_spans_windows_and_batches(ev, tmp_path):
    """A cache larger than the window remembers earlier windows (the paper's cache spans the text)."""
    tokens = ev.splits["valid"][1][:150]
    files = run_tokens(ev, tmp_path, tokens, name="c", index=None, batch_size=2, cache_thetas=(0.05, 0.5),
                       cache_size=40, capacities=None)
    check_cache_against_reference(ev, files, tokens, (0.05, 0.5), 40)
    # positions late in the split see more than one window's worth of memory: more of them find their target
    small = run_tokens(ev, tmp_path, tokens, name="s", index=None, batch_size=2, cache_thetas=(0.05,), cache_size=8,
                       capacities=None)
    assert np.isfinite(files.cache[:, 0]).sum() > np.isfinite(small.cache[:, 0]).sum()


@pytest.mark.parametrize("density", [0.8, 0.2])  # row-by-row gathering, and only the real candidates
def test_exact_distances_in_threaded_chunks_equal_the_reference(density):
    rng = np.random.default_rng(0)
    keys = rng.normal(size=(50, 8)).astype(np.float16)
    queries = rng.normal(size=(13, 8)).astype(np.float32)
    ids = rng.integers(0, 50, size=(13, 6))
    found = rng.random((13, 6)) < density
    ref = np.where(found, ((keys.astype(np.float32)[ids] - queries[:, None]) ** 2).sum(-1), np.inf)
    for chunk, threads in [(78, 1), (24, 1), (24, 2), (6, 3), (1, 2)]:  # one chunk, several, several on threads
        got = exact_distances(keys, queries, np.where(found, ids, -1), threads=threads, chunk=chunk)
        np.testing.assert_allclose(got, ref, rtol=1e-6)
        assert np.array_equal(np.isinf(got), ~found)


def test_tuning_picks_the_best_grid_point_on_valid(ev, tmp_path):
    files = run_tokens(ev, tmp_path, ev.splits["valid"][1][:200], k=32)
    best = tune_knn(files)
    grid, fine = np.array(best["grid"]["ppl"]), np.array(best["fine_grid"]["ppl"])
    assert best["ppl"] == pytest.approx(min(grid.min(), fine.min()), rel=1e-12) and best["ppl"] <= grid.min()
    coarse_t = best["grid"]["labels"][int(np.argmin(grid.min(axis=1)))]
    assert all(coarse_t / 2**0.5 < t < coarse_t * 2**0.5 for t in best["fine_grid"]["labels"])  # between neighbours
    assert best["lmbda"] in LAMBDAS
    assert best["temperature"] in TEMPERATURES + tuple(best["fine_grid"]["labels"])
    recomputed = perplexity(mix(files.logp_lm, knn_log_probs(files, [best["temperature"]])[0], best["lmbda"]))
    assert recomputed == pytest.approx(best["ppl"], rel=1e-5)
    for lam in (0.0, 0.1, 0.5, 0.9, 1.0):
        for t in (0.25, 1.0, 8.0):
            other = perplexity(mix(files.logp_lm, knn_log_probs(files, [t])[0], lam))
            assert recomputed <= other * (1 + 1e-5)
    fixed = tune_knn(files, lambdas=(0.3,))
    assert fixed["lmbda"] == 0.3


def test_tune_tokens_tunes_on_the_head_of_valid_and_reports_the_whole_split(ev, tmp_path):
    s = ev.splits
    n_test = len(s["test"][1])
    settings = Settings(k=16, lmbda=None, temperature=None, tune_tokens=100, batch_size=4, window=16, context=8,
                        cache=True, cache_size=8, cache_thetas=(0.01, 0.1))
    r = evaluation.run(str(tmp_path / "out"), eval_job(ev, settings), "test", s, progress=False,
                       log=lambda *_: None)
    assert r["tokens"] == n_test > 100 and r["valid"]["tokens"] == 100
    assert r["knn"]["lmbda_source"] == "tuned on valid (its first 100 tokens)"
    assert r["cache"]["knn_cache"]["theta_source"] == "tuned on valid (its first 100 tokens)"
    valid_files = open_token_files(str(tmp_path / "out" / "tokens-valid"))
    assert valid_files.n == 100 and np.array_equal(valid_files.targets, s["valid"][1][:100])
    best = tune_knn(valid_files)
    assert (r["knn"]["lmbda"], r["knn"]["temperature"]) == (best["lmbda"], best["temperature"])
    # reported on valid itself, the whole split is evaluated: --tune-tokens caps only a tuning-only valid
    whole = evaluation.run(str(tmp_path / "valid"), eval_job(ev, settings), "valid", s, progress=False,
                       log=lambda *_: None)
    assert whole["tokens"] == len(s["valid"][1]) > 100
    with pytest.raises(EvaluationError, match="--tune-tokens"):
        Settings(tune_tokens=-1).check()


def test_run_tunes_on_valid_and_reports_test(ev, tmp_path):
    s = ev.splits
    settings = Settings(k=16, lmbda=None, temperature=None, cache=True, cache_size=8, cache_thetas=(0.01, 0.1),
                        max_tokens=150, batch_size=4, window=16, context=8, show=2)
    logs = []
    r = evaluation.run(str(tmp_path / "out"), eval_job(ev, settings), "test", s, progress=False,
                       log=logs.append)
    assert [row["name"] for row in r["rows"]] == ["base LM", "+kNN-LM", "+cache", "+kNN-LM+cache"]
    assert r["tokens"] == 150 and r["valid"]["tokens"] == 150 and r["knn"]["lmbda_source"] == "tuned on valid"
    valid_files = open_token_files(str(tmp_path / "out" / "tokens-valid"))
    assert valid_files.meta["identity"]["split"] == "valid"
    # the chosen lambda is the valid optimum, not the test one
    best = tune_knn(valid_files)
    assert (r["knn"]["lmbda"], r["knn"]["temperature"]) == (best["lmbda"], best["temperature"])
    assert r["cache"]["cache"]["theta"] in (0.01, 0.1) and len(r["examples"]) == 2
    npz = np.load(r["files"]["logprobs"])
    assert set(npz.files) >= {"lm", "knn", "mixed", "cache", "knn_cache", "targets"}
    assert perplexity(npz["mixed"]) == pytest.approx(r["rows"][1]["ppl"])
    for path in r["files"]["sweeps"]:
        assert os.path.isfile(path)
    assert r["sweeps"]["k"]["k"] == [1, 2, 4, 8, 16]
    # sweeps are validation curves (the paper's Figures 4 and 5), never test ones
    at_chosen = r["sweeps"]["k"]["ppl"][-1]
    assert at_chosen == pytest.approx(r["valid"]["knn"]["ppl"], rel=1e-5)
    assert at_chosen != pytest.approx(r["rows"][1]["ppl"], rel=1e-5)
    assert r["sweeps"]["lmbda"]["base_ppl"] == pytest.approx(r["valid"]["base_ppl"])
    with open(os.path.join(tmp_path / "out", "sweep_k.json")) as f:
        assert json.load(f)["split"] == "valid"
    assert valid_files.cache.shape == (150, 2) and valid_files.thetas == (0.01, 0.1)
    check_cache_against_reference(ev, valid_files, s["valid"][1][:150], (0.01, 0.1), 8)
    # a second run reuses the saved per-token files (no new search)
    logs.clear()
    settings.lmbda = 0.0
    r0 = evaluation.run(str(tmp_path / "out"), eval_job(ev, settings), "test", s, progress=False,
                       log=logs.append)
    assert sum("reusing" in m for m in logs) == 2
    assert r0["rows"][1]["ppl"] == r0["rows"][0]["ppl"]  # lambda 0 reproduces the base LM exactly
    # lambda 1 (legal) draws its sweeps without failing; nothing tuned and test asked: no sweeps, old ones removed
    settings.lmbda, settings.temperature, settings.cache = 1.0, 1.0, False
    r1 = evaluation.run(str(tmp_path / "out"), eval_job(ev, settings), "valid", s, progress=False,
                       log=logs.append)
    assert r1["sweeps"] is not None and os.path.isfile(tmp_path / "out" / "sweep_lambda.png")
    r2 = evaluation.run(str(tmp_path / "out"), eval_job(ev, settings), "test", s, progress=False,
                       log=logs.append)
    assert r2["sweeps"] is None and not os.path.exists(tmp_path / "out" / "sweep_k.json")


def test_drop_self_on_the_datastores_own_text(ev, tmp_path):
    n = 200
    kw = dict(k=4, window=ev.window, context=ev.context)
    kept = run_tokens(ev, tmp_path, ev.tokens[:n], name="kept", **kw)
    own = np.arange(n)[:, None]
    assert (kept.ids[:, 0] == own[:, 0]).mean() > 0.95 and kept.dists[:, 0].max() < 1e-3
    dropped = run_tokens(ev, tmp_path, ev.tokens[:n], name="dropped", drop_self=True, **kw)
    assert not np.any(dropped.ids == own) and dropped.meta["self_dropped"] == int((kept.ids == own).sum())
    assert np.all(dropped.valid.sum(axis=1) >= 3)
    # detection: the datastore's own text by sha256 (and length)
    m, (train, tokens), (valid, vtokens) = ev.store.manifest, ev.splits["train"], ev.splits["valid"]
    assert drop_self_for(Settings(), m, train, len(tokens), True)
    assert not drop_self_for(Settings(drop_self="no"), m, train, len(tokens), True)
    assert not drop_self_for(Settings(), m, valid, len(vtokens), True)
    with pytest.raises(EvaluationError, match="not the text"):
        drop_self_for(Settings(drop_self="yes"), m, valid, len(vtokens), True)


def test_settings_refuse_bad_values():
    for kw, message in ((dict(k=0), "--k 0"), (dict(lmbda=1.5), "--lmbda 1.5"), (dict(cache_lambda=-0.1), "cache"),
                        (dict(temperature=0.0), "--temperature"), (dict(drop_self="maybe"), "--drop-self")):
        with pytest.raises(EvaluationError, match=message):
            Settings(**kw).check()


def test_one_forward_gives_the_query_key_and_the_cache_state(ev):
    from knnlm_jax.models.transformer import forward_with_keys

    model = ev.trained.model()
    tokens = np.asarray(ev.splits["valid"][1][:16], np.int32)[None]
    logp, (keys, final) = forward_with_keys(model, tokens, tokens, (ev.config.key_type, "final_output"))
    logp1, keys1 = forward_with_keys(model, tokens, tokens, ev.config.key_type)  # the build's call
    np.testing.assert_array_equal(keys, keys1)
    np.testing.assert_array_equal(logp, logp1)
    np.testing.assert_allclose(final, model(tokens), atol=1e-6)
