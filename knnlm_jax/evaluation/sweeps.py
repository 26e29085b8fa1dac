"""Sweeps over k and λ on valid (the paper's Figures 4 and 5) and their plots."""

from __future__ import annotations

import os

import numpy as np

from knnlm_jax.evaluation.settings import perplexity
from knnlm_jax.evaluation.mixing import knn_log_probs, nll_table
from knnlm_jax.evaluation.token_files import TokenFiles


def k_values(k_max: int) -> list[int]:
    ks = [1 << i for i in range(k_max.bit_length()) if 1 << i <= k_max]
    return ks + ([k_max] if ks[-1] != k_max else [])


def sweep_k(files: TokenFiles, temperature: float, lmbda: float) -> dict:
    """Perplexity against the number of neighbours used (the paper's Figure 4), at fixed T and λ."""
    ks = k_values(files.k)
    knn = knn_log_probs(files, [temperature] * len(ks), ks)
    ppl = np.exp(nll_table(files.logp_lm, knn, [lmbda])[:, 0])
    knn_only = [perplexity(row) for row in knn]
    return dict(k=ks, ppl=ppl.tolist(), knn_only_ppl=knn_only, lmbda=lmbda, temperature=temperature,
                base_ppl=perplexity(files.logp_lm))


def sweep_lambda(files: TokenFiles, logp_knn_N, temperature: float, lambdas=None) -> dict:
    """Perplexity against λ (the paper's Figure 5), at fixed T and k."""
    lambdas = [round(0.05 * i, 2) for i in range(21)] if lambdas is None else list(lambdas)
    ppl = np.exp(nll_table(files.logp_lm, logp_knn_N[None], lambdas)[0])
    return dict(lmbda=lambdas, ppl=ppl.tolist(), temperature=temperature, k=files.k,
                base_ppl=perplexity(files.logp_lm))


def plot_sweep(path: str, x, y, base: float, *, xlabel: str, title: str, log2x: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 3.2), dpi=120)
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    finite = np.isfinite(y)  # e.g. lambda = 1 gives infinite perplexity where nothing was retrieved
    ax.plot(x[finite], y[finite], marker="o", markersize=3, label="kNN-LM")
    if not finite.all():
        ax.text(0.02, 0.02, f"{int((~finite).sum())} points with infinite perplexity not drawn",
                transform=ax.transAxes, fontsize=7)
    ax.axhline(base, color="gray", linestyle="--", linewidth=1, label="base LM")
    if log2x and finite.any():
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("perplexity")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path + ".tmp.png")
    plt.close(fig)
    os.replace(path + ".tmp.png", path)
