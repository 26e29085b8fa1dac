"""Re-analyses of saved per-token files, for a reader who doubts a headline number.

- :func:`at_temperature`: λ tuned on valid at a fixed T (the paper's T = 1), beside a tuned T;
- :func:`per_k`: λ and T re-tuned on valid for each k (the k curve without a k = 1024 tuning);
- :func:`paired_bootstrap`: an interval for the relative perplexity gap of two systems scored on
  the same tokens, resampling contiguous blocks (tokens within an article are not independent);
- :func:`frequency_buckets`: the gain by how often the target occurs in the training data.
- :func:`previous_gap` and :func:`perplexity_by`: the gain on tokens whose target recurs within the LM's context,
  only within a cache's reach, or not at all.

Everything reads the files an evaluation already wrote: no forward pass, no search.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from knnlm_jax.evaluation.mixing import knn_log_probs, mix, tune_knn
from knnlm_jax.evaluation.settings import perplexity
from knnlm_jax.evaluation.token_files import TokenFiles

BLOCK_TOKENS = 1024  # tokens per resampled block: about an article's paragraph run at WikiText's scale
MIN_BLOCKS = 30  # fewer tokens than this many blocks: smaller blocks (an interval needs blocks to resample)
BOOTSTRAP_SAMPLES = 2000
FREQUENCY_EDGES = (1, 10, 100, 1_000, 10_000)  # training counts that bound the buckets


@dataclasses.dataclass(frozen=True)
class Fixed:
    """One kNN-LM setting tuned on valid and applied to test."""

    temperature: float
    lmbda: float
    k: int
    valid_ppl: float
    test_ppl: float
    test_logp_N: np.ndarray  # per test token: log p of the mixture (for intervals)

    def summary(self) -> dict:
        return dict(temperature=self.temperature, lmbda=self.lmbda, k=self.k, valid_ppl=self.valid_ppl,
                    test_ppl=self.test_ppl)


def _apply(valid: TokenFiles, test: TokenFiles, temperatures, k: int) -> Fixed:
    tuned = tune_knn(valid, temperatures=temperatures, k=k)
    knn_N = knn_log_probs(test, [tuned["temperature"]], [k])[0]
    mixed_N = mix(test.logp_lm, knn_N, tuned["lmbda"])
    return Fixed(float(tuned["temperature"]), float(tuned["lmbda"]), int(k), float(tuned["ppl"]),
                 perplexity(mixed_N), mixed_N)


def at_temperature(valid: TokenFiles, test: TokenFiles, temperature: float | None = 1.0,
                   k: int | None = None) -> Fixed:
    """λ tuned on ``valid`` at ``temperature`` (``None``: T tuned too, on the evaluation's grid), applied to
    ``test``; ``k`` nearest neighbours (default: all the files hold)."""
    from knnlm_jax.evaluation.settings import TEMPERATURES

    temps = TEMPERATURES if temperature is None else (float(temperature),)
    return _apply(valid, test, temps, valid.k if k is None else int(k))


def per_k(valid: TokenFiles, ks, test: TokenFiles | None = None) -> list[dict]:
    """For each k: λ and T tuned on ``valid`` with only the k nearest, its valid perplexity (and test's)."""
    rows = []
    for k in ks:
        if test is not None:
            rows.append(at_temperature(valid, test, None, k).summary())
            continue
        tuned = tune_knn(valid, k=int(k))
        rows.append(dict(k=int(k), temperature=float(tuned["temperature"]), lmbda=float(tuned["lmbda"]),
                         valid_ppl=float(tuned["ppl"])))
    return rows


def share_of_gain(base_ppl: float, at_k_ppl: float, at_max_ppl: float) -> float:
    """How much of the largest k's gain (in log perplexity) a smaller k already gives."""
    whole = np.log(base_ppl) - np.log(at_max_ppl)
    return float((np.log(base_ppl) - np.log(at_k_ppl)) / whole) if whole > 0 else float("nan")


def paired_bootstrap(logp_a_N, logp_b_N, block: int = BLOCK_TOKENS, samples: int = BOOTSTRAP_SAMPLES,
                     seed: int = 0, level: float = 0.95) -> dict:
    """The relative perplexity change from system a to b on the same tokens (``ppl_b / ppl_a - 1``) and
    its ``level`` interval: contiguous blocks of ``block`` tokens (fewer where that leaves under
    ``MIN_BLOCKS`` blocks) resampled with replacement (the last, shorter block too), both systems on the
    same draw. ``within_noise`` when the interval covers 0."""
    a, b = np.asarray(logp_a_N, np.float64), np.asarray(logp_b_N, np.float64)
    if a.shape != b.shape or a.ndim != 1 or not len(a):
        raise ValueError(f"paired_bootstrap needs two equal, non-empty 1-d arrays (got {a.shape}, {b.shape})")
    block = max(1, min(int(block), len(a) // MIN_BLOCKS))
    starts = np.arange(0, len(a), block)
    diff_B = np.add.reduceat(b - a, starts)  # summed log-prob gain per block
    count_B = np.diff(np.append(starts, len(a)))
    rng = np.random.default_rng(seed)
    draws_SxB = rng.integers(0, len(starts), size=(samples, len(starts)))
    ratio_S = np.exp(-diff_B[draws_SxB].sum(1) / count_B[draws_SxB].sum(1)) - 1
    lo, hi = np.quantile(ratio_S, [(1 - level) / 2, (1 + level) / 2])
    change = float(np.exp(-(b - a).mean()) - 1)
    return dict(change=change, low=float(lo), high=float(hi), level=level, block_tokens=block,
                samples=samples, blocks=len(starts), within_noise=bool(lo <= 0 <= hi))


def frequency_buckets(targets_N, counts_V, logp_lm_N, logp_knn_lm_N, unk: int | None = None,
                      edges=FREQUENCY_EDGES) -> list[dict]:
    """Perplexity of the LM and the kNN-LM by the target's count in the training data: one bucket per
    ``[edges[i], edges[i+1])`` (the last open), and ``<unk>`` on its own (``unk``'s id; its count is
    that of every rare word). Each bucket: its share of tokens, both perplexities, the change."""
    targets = np.asarray(targets_N)
    count_N = np.asarray(counts_V, np.int64)[targets]
    lm, knn = np.asarray(logp_lm_N, np.float64), np.asarray(logp_knn_lm_N, np.float64)
    is_unk = targets == unk if unk is not None else np.zeros(len(targets), bool)
    bounds = list(edges) + [np.inf]
    masks = [("<unk>", is_unk)] if is_unk.any() else []
    masks.append((f"< {edges[0]}", (count_N < edges[0]) & ~is_unk))
    for lo, hi in zip(bounds, bounds[1:]):
        label = f"{lo:,}+" if hi == np.inf else f"{lo:,}-{int(hi) - 1:,}"
        masks.append((label, (count_N >= lo) & (count_N < hi) & ~is_unk))
    rows = []
    for label, m in masks:
        if m.any():
            base, knn_ppl = perplexity(lm[m]), perplexity(knn[m])
            rows.append(dict(bucket=label, tokens=int(m.sum()), share=float(m.mean()), lm_ppl=base,
                             knn_lm_ppl=knn_ppl, change=knn_ppl / base - 1))
    return rows


def previous_gap(targets_N) -> np.ndarray:
    """For each position, how many positions back its target last occurred in the same stream (``inf``: never):
    a continuous cache of ``size`` can copy the target where the gap is at most ``size``."""
    targets = np.asarray(targets_N)
    order = np.argsort(targets, kind="stable")  # positions grouped by token, ascending within each
    same = targets[order[1:]] == targets[order[:-1]]
    gap_N = np.full(len(targets), np.inf)
    gap_N[order[1:][same]] = (order[1:] - order[:-1])[same]
    return gap_N


def perplexity_by(masks: dict, logp_by_system: dict) -> list[dict]:
    """Each system's perplexity on each labelled set of tokens: one row per non-empty mask,
    ``dict(label, tokens, share, ppl={system: perplexity})``."""
    rows = []
    for label, mask_N in masks.items():
        m = np.asarray(mask_N, bool)
        if m.any():
            rows.append(dict(label=label, tokens=int(m.sum()), share=float(m.mean()),
                             ppl={name: perplexity(np.asarray(logp, np.float64)[m])
                                  for name, logp in logp_by_system.items()}))
    return rows
