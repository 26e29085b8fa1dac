"""The Kneser-Ney n-gram LM (Figure 7's baseline): a dictionary reference, normalisation, back-off."""

import collections

import numpy as np
import pytest

from knnlm_jax.evaluation.ngram import KneserNey


def reference_kn(train, n, vocab_size):
    """Interpolated Kneser-Ney written the plain way, with dictionaries, for small inputs."""
    grams = {k: collections.Counter(tuple(train[i : i + k]) for i in range(len(train) - k + 1)) for k in range(1, n + 1)}
    tables = {}
    for k in range(1, n + 1):
        if k == n:
            counts = grams[k]
        else:
            counts = collections.Counter(g[1:] for g in grams[k + 1])
        ones, twos = sum(c == 1 for c in counts.values()), sum(c == 2 for c in counts.values())
        tables[k] = (counts, ones / (ones + 2 * twos) if ones + twos else 0.5)

    def prob(context, w):
        counts, d = tables[1]
        total = sum(counts.values())
        p = (max(counts.get((w,), 0) - d, 0) + d * len(counts) / vocab_size) / total
        for k in range(2, n + 1):
            if len(context) < k - 1:
                break
            h = tuple(context[len(context) - k + 1 :])
            counts, d = tables[k]
            followers = {g[-1]: c for g, c in counts.items() if g[:-1] == h}
            t = sum(followers.values())
            if t:
                p = max(followers.get(w, 0) - d, 0) / t + d * len(followers) / t * p
        return p

    return prob


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_matches_a_dictionary_reference(n):
    rng = np.random.default_rng(n)
    train = list(rng.integers(0, 7, 300) * (rng.random(300) < 0.7))  # skewed: repeats at every order
    test = list(rng.integers(0, 9, 40))  # ids 7 and 8 never seen in training
    lm = KneserNey.fit(np.asarray(train), n, vocab_size=9)
    prob = reference_kn(train, n, 9)
    expected = [np.log(prob(test[:i], w)) for i, w in enumerate(test)]
    np.testing.assert_allclose(lm.log_probs(np.asarray(test)), expected, rtol=1e-10)


@pytest.mark.parametrize("n", [2, 3, 5])
def test_every_context_is_a_distribution(n):
    rng = np.random.default_rng(0)
    train = rng.integers(0, 12, 2000) % rng.integers(1, 12, 2000)
    lm = KneserNey.fit(train, n, vocab_size=15)
    for context in ([], [3], [1, 0], list(train[100:104]), [14, 13, 12, 11]):  # seen, unseen, partly seen
        rows = np.asarray([context + [w] for w in range(15)])
        p = np.exp([lm.log_probs(r)[-1] for r in rows])
        assert p.min() > 0 and p.sum() == pytest.approx(1.0, abs=1e-12)


def test_a_higher_order_predicts_a_repeated_text_better():
    rng = np.random.default_rng(0)
    text = rng.integers(0, 50, 200)
    train = np.concatenate([text, text, text])
    nll = [-KneserNey.fit(train, n, 50).log_probs(text).mean() for n in (1, 2, 3)]
    assert nll[0] > nll[1] > nll[2]
