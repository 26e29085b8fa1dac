"""Re-analyses of per-token files against numpy references: a fixed T, λ and T per k, block bootstrap
intervals, the gain by training frequency."""

import numpy as np
import pytest

from knnlm_jax.evaluation import analysis
from knnlm_jax.evaluation.settings import perplexity
from knnlm_jax.evaluation.token_files import TokenFiles


def files(seed: int, n: int = 400, k: int = 8) -> TokenFiles:
    """Synthetic per-token files: a weak LM and neighbours that hit the target more often when near."""
    rng = np.random.default_rng(seed)
    dists = np.sort(rng.gamma(2.0, 3.0, (n, k)).astype(np.float32), axis=1)
    hit = rng.random((n, k)) < 0.5 * np.exp(-dists / 6)
    valid = np.ones((n, k), bool)
    valid[rng.random(n) < 0.05, -1] = False  # some tokens with a neighbour missing
    dists = np.where(valid, dists, np.inf).astype(np.float32)
    return TokenFiles("synthetic", {}, logp_lm=np.log(rng.uniform(0.02, 0.6, n)).astype(np.float32),
                      targets=rng.integers(0, 50, n).astype(np.int32), dists=dists,
                      ids=np.where(valid, rng.integers(0, 1000, (n, k)), -1), hit=hit & valid, valid=valid)


def reference_mixture(f: TokenFiles, lmbda: float, temperature: float, k: int) -> np.ndarray:
    d = np.asarray(f.dists[:, :k], np.float64)
    w = np.where(f.valid[:, :k], np.exp(-(d - d[:, :1]) / temperature), 0.0)
    p_knn = (w * f.hit[:, :k]).sum(1) / w.sum(1)
    return np.log((1 - lmbda) * np.exp(f.logp_lm.astype(np.float64)) + lmbda * p_knn)


def test_a_fixed_temperature_tunes_only_lambda_and_its_test_number_is_the_mixture():
    valid, test = files(0), files(1)
    t1 = analysis.at_temperature(valid, test, 1.0)
    tuned = analysis.at_temperature(valid, test, None)
    assert t1.temperature == 1.0 and tuned.temperature != 1.0
    assert tuned.valid_ppl <= t1.valid_ppl  # T = 1 is one point of the tuned search
    for fixed in (t1, tuned):
        ref = reference_mixture(test, fixed.lmbda, fixed.temperature, test.k)
        np.testing.assert_allclose(fixed.test_logp_N, ref, atol=2e-5)
        assert fixed.test_ppl == pytest.approx(np.exp(-ref.mean()), rel=1e-5)
        grid = {l: perplexity(reference_mixture(valid, l, fixed.temperature, valid.k)) for l in (0.0, 0.3, 0.9)}
        assert fixed.valid_ppl <= min(grid.values()) * (1 + 1e-5)  # no grid point beats the tuned λ


def test_per_k_retunes_each_k_and_uses_only_the_k_nearest():
    valid, test = files(2), files(3)
    rows = analysis.per_k(valid, [1, 4, 8], test)
    assert [r["k"] for r in rows] == [1, 4, 8]
    for r in rows:
        ref = reference_mixture(test, r["lmbda"], r["temperature"], r["k"])
        assert r["test_ppl"] == pytest.approx(np.exp(-ref.mean()), rel=1e-5)
    assert rows[-1] == analysis.at_temperature(valid, test, None).summary()
    on_valid = analysis.per_k(valid, [1, 8])
    assert [r["valid_ppl"] for r in on_valid] == [rows[0]["valid_ppl"], rows[-1]["valid_ppl"]]
    assert analysis.share_of_gain(100.0, 90.0, 80.0) == pytest.approx(np.log(100 / 90) / np.log(100 / 80))


def test_the_bootstrap_interval_holds_the_change_and_says_when_it_is_noise():
    rng = np.random.default_rng(0)
    a = np.log(rng.uniform(0.01, 0.5, 5000))
    steady = analysis.paired_bootstrap(a, a + np.log(1.1), block=100)  # every token 10% more likely
    assert steady["change"] == pytest.approx(1 / 1.1 - 1)
    assert steady["low"] == pytest.approx(steady["change"]) and steady["high"] == pytest.approx(steady["change"])
    assert not steady["within_noise"] and steady["blocks"] == 50
    noise = analysis.paired_bootstrap(a, a + rng.normal(0, 1, 5000), block=100)
    assert noise["low"] < noise["change"] < noise["high"] and noise["within_noise"]
    short = analysis.paired_bootstrap(a[:300], a[:300] + rng.normal(0, 1, 300))  # 1,024-token blocks: would be 1
    assert short["block_tokens"] == 10 and short["blocks"] == 30 and short["low"] < short["high"]
    same = analysis.paired_bootstrap(a, a)
    assert same["change"] == 0 and same["low"] == same["high"] == 0 and same["within_noise"]
    with pytest.raises(ValueError, match="equal, non-empty"):
        analysis.paired_bootstrap(a, a[:-1])


def test_the_bootstrap_is_deterministic_and_widens_with_larger_blocks():
    rng = np.random.default_rng(1)
    a = np.log(rng.uniform(0.01, 0.5, 8000))
    b = a + rng.normal(0.05, 1, 8000) + np.repeat(rng.normal(0, 0.5, 8), 1000)  # correlated within articles
    small, again = analysis.paired_bootstrap(a, b, block=10, seed=3), analysis.paired_bootstrap(a, b, block=10, seed=3)
    large = analysis.paired_bootstrap(a, b, block=1000, seed=3)
    assert small == again
    assert large["high"] - large["low"] > 2 * (small["high"] - small["low"])  # blocks keep the article's noise


def test_frequency_buckets_partition_the_tokens_with_unk_apart():
    counts = np.array([0, 0, 0, 500, 5, 50, 5000, 20000])  # ids 0-2 specials, 3 is <unk>
    targets = np.array([3, 3, 4, 4, 5, 6, 7, 7, 7, 2])
    lm = np.log(np.full(10, 0.1))
    knn = lm + np.log(np.array([4, 4, 1, 1, 2, 1, 1, 1, 1, 1.0]))
    rows = analysis.frequency_buckets(targets, counts, lm, knn, unk=3)
    by = {r["bucket"]: r for r in rows}
    assert list(by) == ["<unk>", "< 1", "1-9", "10-99", "1,000-9,999", "10,000+"]
    assert sum(r["tokens"] for r in rows) == 10 and sum(r["share"] for r in rows) == pytest.approx(1)
    assert by["<unk>"]["tokens"] == 2 and by["<unk>"]["change"] == pytest.approx(1 / 4 - 1)
    assert by["1-9"]["tokens"] == 2 and by["1-9"]["change"] == pytest.approx(0)
    assert by["10-99"]["knn_lm_ppl"] == pytest.approx(5.0) and by["10,000+"]["tokens"] == 3



def test_the_previous_gap_matches_a_loop_over_the_earlier_targets():
    targets = np.random.default_rng(5).integers(0, 12, 300)
    ref = [next((i - j for j in range(i - 1, -1, -1) if targets[j] == t), np.inf) for i, t in enumerate(targets)]
    np.testing.assert_array_equal(analysis.previous_gap(targets), ref)
    for window in (1, 3, 50):  # what a cache of that size can copy
        within = analysis.previous_gap(targets) <= window
        np.testing.assert_array_equal(within, [t in targets[max(0, i - window):i] for i, t in enumerate(targets)])


def test_perplexity_by_masks_scores_every_system_on_the_same_tokens():
    rng = np.random.default_rng(3)
    logp = {"lm": np.log(rng.uniform(0.01, 1, 200)), "cache": np.log(rng.uniform(0.01, 1, 200))}
    mask = rng.random(200) < 0.3
    rows = analysis.perplexity_by({"in": mask, "out": ~mask, "none": np.zeros(200, bool)}, logp)
    assert [r["label"] for r in rows] == ["in", "out"]  # an empty set has no row
    assert sum(r["tokens"] for r in rows) == 200 and rows[0]["share"] == pytest.approx(mask.mean())
    for row, m in zip(rows, (mask, ~mask)):
        for name, lp in logp.items():
            assert row["ppl"][name] == pytest.approx(perplexity(lp[m]))
