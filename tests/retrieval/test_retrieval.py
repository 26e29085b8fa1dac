"""Fewer searches: RetoMaton pointers and the adaptive-retrieval gate, against references and properties."""

import dataclasses

import faiss
import numpy as np
import pytest

from helpers.tiny_run import eval_job, run_tokens
from knnlm_jax.evaluation.settings import EvaluationError, Settings
from knnlm_jax.evaluation.mixing import knn_log_probs, mix
from knnlm_jax.retrieval.policies import Policy, ascending, exact_distances, fit_gate, nearest, retrieve_batch


def flat_search(keys_NxD, k):
    index = faiss.IndexFlatL2(keys_NxD.shape[1])
    index.add(np.asarray(keys_NxD, np.float32))
    return lambda q: index.search(np.ascontiguousarray(q, np.float32), k)


def test_exact_distances_gather_only_real_candidates():
    rng = np.random.default_rng(0)
    keys = rng.normal(size=(50, 6)).astype(np.float16)
    queries = rng.normal(size=(3, 6)).astype(np.float32)
    ids = np.array([[4, -1, 7], [-1, -1, -1], [0, 49, 4]])
    got = exact_distances(keys, queries, ids)
    for q in range(3):
        for c in range(3):
            want = np.inf if ids[q, c] < 0 else ((keys[ids[q, c]].astype(np.float64) - queries[q]) ** 2).sum()
            assert got[q, c] == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("negative", [False, True])
def test_ascending_is_a_stable_argsort(negative):
    """Ties (by column), zeros, inf and huge values; a negative distance takes the plain path, same answer."""
    rng = np.random.default_rng(0)
    d = rng.choice(np.array([0.0, 1e-30, 0.5, 0.5, 3.0, 1e30, np.inf], np.float32), size=(64, 257))
    d[:, ::7] = rng.random((64, 37), dtype=np.float32)
    if negative:
        d[3, 5] = -1e-6
    assert (ascending(d) == np.argsort(d, axis=1, kind="stable")).all()


def test_nearest_sorts_and_pads():
    d, i = nearest(np.array([[3.0, 1.0, 2.0, 0.5]]), np.array([[7, 8, -1, 9]]), 5)
    np.testing.assert_array_equal(i, [[9, 8, 7, -1, -1]])
    assert np.isinf(d[0, 3:]).all() and np.all(np.diff(d[0, :3]) > 0)


def chain_datastore(n=400, d=8, seed=0):
    """Keys far apart; the evaluated text is the datastore's own: query t lies next to entry t."""
    rng = np.random.default_rng(seed)
    keys = (rng.normal(size=(n, d)) * 10).astype(np.float16)
    vals = rng.integers(0, 20, size=n).astype(np.int32)
    queries = keys.astype(np.float32) + rng.normal(size=(n, d)).astype(np.float32) * 0.01
    return keys, vals, queries


def test_pointers_follow_successor_entries_and_save_searches():
    keys, vals, queries = chain_datastore()
    k = 4
    spans = np.array([100, 100, 100, 100])
    calls = []
    search = flat_search(keys, k)

    def counted(q):
        calls.append(len(q))
        return search(q)

    d, i, retrieved, searched = retrieve_batch(Policy(min_pointers=1), queries, vals, spans, search=counted,
                                               keys_NxD=keys, vals_N=vals, k=k)
    # token t's own entry t is its nearest and its value is the target, so t+1 follows a pointer to entry t+1
    np.testing.assert_array_equal(i[:, 0], np.arange(400))
    assert retrieved.all()
    np.testing.assert_array_equal(np.flatnonzero(searched), [0, 100, 200, 300])  # each window's first token
    assert sum(calls) == 4 and len(calls) == 1  # the four windows search side by side, once
    # a pointer-served token's only candidates are successors of its predecessor's hits
    row = 150
    prev = i[row - 1][(i[row - 1] >= 0) & (vals[np.maximum(i[row - 1], 0)] == vals[row - 1])]
    assert set(i[row][i[row] >= 0]) == set(prev + 1)
    np.testing.assert_allclose(d[row][i[row] >= 0], exact_distances(keys, queries[row:row + 1], i[row:row + 1])
                               [0][i[row] >= 0], rtol=1e-6)


def test_a_high_threshold_searches_every_token_and_keeps_the_nearest():
    keys, vals, queries = chain_datastore(seed=1)
    k = 6
    d, i, retrieved, searched = retrieve_batch(Policy(min_pointers=10**6), queries, vals, [200, 200],
                                               search=flat_search(keys, k), keys_NxD=keys, vals_N=vals, k=k)
    assert searched.all() and retrieved.all()
    ref_d, ref_i = flat_search(keys, k)(queries)
    np.testing.assert_array_equal(i[:, 0], ref_i[:, 0])  # a searching token keeps the search's neighbours
    assert np.all(d[:, 0] <= ref_d[:, 0] * (1 + 1e-3) + 1e-3)


def test_pointer_sets_are_bounded_to_the_nearest_hits_successors():
    """Every neighbour a hit (one value everywhere): each pointer-served token keeps at most ``max_pointers``
    candidates, the successors of its predecessor's nearest hits."""
    keys, _, queries = chain_datastore(seed=3)
    vals = np.zeros(len(keys), np.int32)
    k = 8
    d, i, retrieved, searched = retrieve_batch(Policy(min_pointers=1, max_pointers=3), queries, vals, [200, 200],
                                               search=flat_search(keys, k), keys_NxD=keys, vals_N=vals, k=k)
    served = np.flatnonzero(retrieved & ~searched)
    assert len(served) > 300 and ((i[served] >= 0).sum(1) <= 3).all()
    unbounded = retrieve_batch(Policy(min_pointers=1), queries, vals, [200, 200], search=flat_search(keys, k),
                               keys_NxD=keys, vals_N=vals, k=k)[1]
    assert ((unbounded[served] >= 0).sum(1) > 3).any()
    row = served[served % 200 == 1][0]  # served by the search of its window's first token
    nearest_hits = flat_search(keys, k)(queries[row - 1 : row])[1][0][:3]
    assert set(i[row][i[row] >= 0]) == set(nearest_hits + 1)


def test_own_entry_is_never_a_neighbour_or_a_pointer():
    keys, vals, queries = chain_datastore(seed=2)
    own = np.arange(400)
    d, i, _, _ = retrieve_batch(Policy(min_pointers=1), queries, vals, [400], search=flat_search(keys, 5),
                                keys_NxD=keys, vals_N=vals, k=5, own_ids_R=own)
    assert not (i == own[:, None]).any()


def test_gate_fraction_and_direction():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(4000, 3))
    helps = (f[:, 0] + 0.3 * rng.normal(size=4000)) > 0.5  # only feature 0 matters
    gate = fit_gate(f, helps, 0.3)
    assert gate.fraction == pytest.approx(0.3, abs=0.01)
    assert abs(gate.weights_F[0]) > 5 * max(abs(gate.weights_F[1]), abs(gate.weights_F[2]))
    chosen = gate.retrieve(f)
    assert helps[chosen].mean() > 0.8 > helps[~chosen].mean()
    assert fit_gate(f, helps, 1.0).retrieve(f).all()
    with pytest.raises(ValueError):
        fit_gate(f, helps, 0.0)


def test_gated_tokens_search_alone_and_skipped_ones_mix_to_the_lm():
    keys, vals, queries = chain_datastore(seed=3)
    feats = np.random.default_rng(3).normal(size=(400, 2))
    gate = fit_gate(feats, feats[:, 0] > 0, 0.5)
    calls = []
    search = flat_search(keys, 4)
    d, i, retrieved, searched = retrieve_batch(Policy(gate=gate), queries, vals, [400],
                                               search=lambda q: calls.append(len(q)) or search(q),
                                               keys_NxD=keys, vals_N=vals, k=4, features_RxF=feats)
    np.testing.assert_array_equal(retrieved, gate.retrieve(feats))
    np.testing.assert_array_equal(searched, retrieved)
    assert calls == [int(retrieved.sum())] and (i[~retrieved] == -1).all()


def test_retrieve_all_gate_gives_the_full_kNN_LM(ev, tmp_path):
    """A gate that lets every token retrieve is the full kNN-LM, to the bit."""
    tokens = ev.splits["valid"][1][:96]
    full = run_tokens(ev, tmp_path, tokens, name="full")
    assert full.features is not None and full.features.shape == (96, len(ev.trained.cfg.cutoffs) + 2 + ev.store.dim)
    gate = fit_gate(np.asarray(full.features), np.arange(96) % 2 == 0, 1.0)
    gated = run_tokens(ev, tmp_path, tokens, name="gated", policy=Policy(gate=gate))
    assert gated.retrieved.all() and gated.meta["searches"] == 96 and gated.meta["foss"] == 0
    np.testing.assert_array_equal(gated.ids, full.ids)
    np.testing.assert_allclose(gated.dists, full.dists, rtol=1e-6)
    np.testing.assert_array_equal(knn_log_probs(gated, [3.0]), knn_log_probs(full, [3.0]))


def test_skipped_tokens_score_as_the_lm_for_every_lambda(ev, tmp_path):
    tokens = ev.splits["valid"][1][:96]
    full = run_tokens(ev, tmp_path, tokens, name="full")
    retrieved = np.arange(96) % 3 != 0
    view = dataclasses.replace(full, retrieved=retrieved)
    knn = knn_log_probs(view, [2.0])[0]
    for lam in (0.0, 0.4, 1.0):
        mixed = mix(full.logp_lm, knn, lam)
        np.testing.assert_allclose(mixed[~retrieved], full.logp_lm[~retrieved], atol=1e-5)
        np.testing.assert_array_equal(mixed[retrieved], mix(full.logp_lm, knn_log_probs(full, [2.0])[0], lam)
                                      [retrieved])


def test_retomaton_pass_counts_searches(ev, tmp_path):
    tokens = ev.splits["train"][1][:192]  # the datastore's own text: long chains of pointers
    files = run_tokens(ev, tmp_path, tokens, name="reto", policy=Policy(min_pointers=1), drop_self=True)
    assert files.meta["policy"]["policy"] == "retomaton"
    assert 0 < files.meta["searches"] < 192 and files.meta["foss"] == pytest.approx(1 - files.meta["searches"] / 192)
    assert files.retrieved.all()
    assert not (np.asarray(files.ids) == np.arange(192)[:, None]).any()  # self-retrievals dropped


def test_pointer_groups_of_batches_change_nothing_but_the_steps(ev, tmp_path, monkeypatch):
    """Windows retrieved side by side in groups of batches: the same files (cache included) as batch by batch."""
    from knnlm_jax.evaluation import streaming as eval_pass

    tokens = ev.splits["train"][1][:200]
    kw = dict(policy=Policy(min_pointers=2), drop_self=True, cache_thetas=(0.1,), cache_size=24)
    monkeypatch.setattr(eval_pass, "POINTER_WINDOWS", 4)  # one batch of 4 windows at a time
    single = run_tokens(ev, tmp_path, tokens, name="single", **kw)
    monkeypatch.setattr(eval_pass, "POINTER_WINDOWS", 12)  # three batches at a time, the last group short
    grouped = run_tokens(ev, tmp_path, tokens, name="grouped", **kw)
    assert single.meta["batches"] == grouped.meta["batches"] and single.meta["searches"] == grouped.meta["searches"]
    for name in ("logp_lm", "ids", "hit", "retrieved", "cache", "features"):
        np.testing.assert_array_equal(getattr(grouped, name), getattr(single, name), err_msg=name)
    np.testing.assert_allclose(grouped.dists, single.dists, rtol=1e-6)


def test_settings_refuse_bad_retrieval_options():
    with pytest.raises(EvaluationError, match="retomaton"):
        Settings(min_pointers=-1).check()
    with pytest.raises(EvaluationError, match="approximate"):
        Settings(min_pointers=4, exact=False).check()
    for bad in (0.0, 1.5):
        with pytest.raises(EvaluationError, match="retrieve-fraction"):
            Settings(retrieve_fraction=bad).check()


def run_eval(ev, out, split="test", **kw):
    from knnlm_jax.evaluation import evaluate as evaluation

    settings = Settings(**dict(dict(k=16, lmbda=None, temperature=None, max_tokens=150, batch_size=4, window=16,
                                    context=8), **kw))
    return evaluation.run(str(out), eval_job(ev, settings), split, ev.splits, progress=False, log=lambda m: None)


def test_run_fits_the_gate_on_valid_and_reports_saved_searches(ev, tmp_path):
    from knnlm_jax.evaluation.token_files import open_token_files

    r = run_eval(ev, tmp_path / "both", min_pointers=4, retrieve_fraction=0.5)
    ret = r["retrieval"]
    assert ret["policy"] == "both" and ret["gate"]["fitted_on"] == "valid tokens 0..74"
    assert ret["gate"]["fraction"] == pytest.approx(0.5, abs=0.02)
    test = open_token_files(str(tmp_path / "both" / "tokens-test-both"))
    assert ret["foss"]["test"] == pytest.approx(1 - test.meta["searches"] / 150) and ret["foss"]["test"] > 0.4
    # the gate was fitted from the full kNN-LM's valid files, then valid was rerun with the policy for tuning
    assert open_token_files(str(tmp_path / "both" / "tokens-valid")).meta["policy"]["policy"] == "full"
    assert open_token_files(str(tmp_path / "both" / "tokens-valid-both")).meta["policy"]["gate"] == \
        test.meta["policy"]["gate"]
    adaptive = run_eval(ev, tmp_path / "adaptive", retrieve_fraction=0.5)
    assert adaptive["retrieval"]["foss"]["valid"] == pytest.approx(0.5, abs=0.05)  # the full files, gated
    assert not (tmp_path / "adaptive" / "tokens-valid-adaptive").exists()
    with pytest.raises(EvaluationError, match="fitted on valid"):
        run_eval(ev, tmp_path / "v", split="valid", retrieve_fraction=0.5)


@pytest.mark.parametrize("exact", [True, False])
def test_device_search_gives_the_flat_index_perplexity(ev, tmp_path, exact):
    """``--search device`` on a Flat datastore: the same neighbours, the same perplexity (1e-6 relative)."""
    from knnlm_jax.evaluation import evaluate as evaluation
    from knnlm_jax.retrieval.device_search import DeviceSearcher

    assert ev.index.__class__.__name__ == "IndexFlatL2"
    settings = Settings(k=16, lmbda=0.3, temperature=2.0, max_tokens=150, batch_size=4, window=16, context=8,
                        exact=exact)
    results = {}
    for name, index in (("faiss", ev.index), ("device", DeviceSearcher(ev.store.keys, block=64))):
        results[name] = evaluation.run(str(tmp_path / name), eval_job(ev, settings, index=index), "test", ev.splits,
                                       progress=False, log=lambda m: None)
    faiss_ppl, device_ppl = (results[n]["rows"][1]["ppl"] for n in ("faiss", "device"))
    assert device_ppl == pytest.approx(faiss_ppl, rel=1e-6)
    assert results["device"]["index"] == "exact on device (JAX)"
    # real keys: the same neighbours as IndexFlatL2 (queries: held-out keys of the same model)
    queries = np.asarray(ev.store.keys[::7][:40], np.float32) + 0.01
    d_dev, i_dev = DeviceSearcher(ev.store.keys, block=64).search(queries, 16)
    d_ref, i_ref = ev.index.search(queries, 16)
    np.testing.assert_allclose(d_dev, d_ref, rtol=1e-4, atol=1e-4)
    differ = i_dev != i_ref
    assert differ.mean() < 0.02  # only swaps between (near-)equal distances
    np.testing.assert_allclose(d_dev[differ], d_ref[differ], rtol=1e-4, atol=1e-4)


def test_the_pass_follows_pointers_from_the_true_targets(ev, tmp_path):
    """The pass's RetoMaton against a reference: the pointer algorithm run window by window (windows never
    share pointers) on the pass's own query keys and the true next tokens."""
    from knnlm_jax.data.windows import windows

    tokens = np.asarray(ev.splits["train"][1][:192])  # the datastore's own text: long chains of pointers
    files = run_tokens(ev, tmp_path, tokens, name="reto", policy=Policy(min_pointers=1), drop_self=True)
    queries = np.asarray(files.features)[:, -ev.store.dim:]
    search = flat_search(np.asarray(ev.store.keys, np.float32), 8)
    ids = np.full((len(tokens), 8), -1, np.int64)
    searched = 0
    for _, lo, hi in windows(len(tokens), 16, 8):
        rows = np.arange(lo, hi)
        _, ids[rows], _, s = retrieve_batch(Policy(min_pointers=1), queries[rows], tokens[rows], [hi - lo],
                                            search=search, keys_NxD=ev.store.keys, vals_N=ev.store.vals, k=8,
                                            own_ids_R=rows)
        searched += int(s.sum())
    np.testing.assert_array_equal(np.asarray(files.ids), ids)
    assert files.meta["searches"] == searched < len(tokens)


def test_the_fitted_gate_retrieves_where_retrieval_helps_on_held_out_text(ev, tmp_path):
    """End to end: on test, the tokens the gate (fitted on valid) lets retrieve gain more from the kNN-LM, at
    the gate's own λ and T, than the tokens it skips, and more than a random half does."""
    from knnlm_jax.evaluation.token_files import open_token_files

    gated = run_eval(ev, tmp_path / "adaptive", retrieve_fraction=0.5, max_tokens=400)
    gate = gated["retrieval"]["gate"]
    run_eval(ev, tmp_path / "full", lmbda=gate["lmbda"], temperature=gate["temperature"], max_tokens=400)
    full = open_token_files(str(tmp_path / "full" / "tokens-test"))
    retrieved = np.asarray(open_token_files(str(tmp_path / "adaptive" / "tokens-test-adaptive")).retrieved)
    lm = np.asarray(full.logp_lm)
    gain = mix(lm, knn_log_probs(full, [gate["temperature"]])[0], gate["lmbda"]) - lm
    assert 0.3 < retrieved.mean() < 0.7
    assert gain[retrieved].mean() > gain[~retrieved].mean()
    random_halves = [gain[np.random.default_rng(s).random(len(gain)) < retrieved.mean()].mean() for s in range(200)]
    assert gain[retrieved].mean() > np.quantile(random_halves, 0.9)
