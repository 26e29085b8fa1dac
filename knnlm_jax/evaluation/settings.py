"""What an evaluation is asked for: settings, their checks and the tuning grids (no JAX here).

Kept apart from :mod:`knnlm_jax.evaluation.evaluate` so that ``evaluate.py`` refuses bad input
before paying for JAX.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from knnlm_jax.core.errors import KnnlmError
from knnlm_jax.data.windows import WindowSpec

LAMBDAS = tuple(round(0.01 * i, 2) for i in range(101))  # λ and λc grid: 0.00 .. 1.00
TEMPERATURES = tuple(0.25 * 2 ** (i / 2) for i in range(21))  # 0.25 .. 256, steps of sqrt(2)
CACHE_THETAS = tuple(float(x) for x in np.geomspace(1e-4, 1.0, 25))  # θ grid, 10^-4 .. 1, steps of 10^(1/6)


class EvaluationError(KnnlmError, ValueError):
    """A user error in what to evaluate or how."""


def eval_window_sizes(config) -> tuple[int, int]:
    """``(window, context)`` of the evaluation (:meth:`~knnlm_jax.data.windows.WindowSpec.from_config`)."""
    spec = WindowSpec.from_config(config, "eval")
    return spec.length, spec.context


def perplexity(logp_N) -> float:
    """``exp`` of the mean negative log-prob, summed in float64."""
    logp = np.asarray(logp_N, np.float64)
    return float(np.exp(-logp.mean())) if len(logp) else float("nan")


@dataclasses.dataclass
class Settings:
    """What ``evaluate.py`` was asked for; ``None`` means ``auto`` (tuned on valid)."""

    k: int = 1024
    lmbda: float | None = None
    temperature: float | None = 1.0
    nprobe: int | None = None
    exact: bool = True
    cache: bool = False
    cache_size: int = 1024
    cache_lambda: float | None = None
    cache_thetas: tuple = CACHE_THETAS  # one value: fixed θ; several: tuned on valid
    drop_self: str = "auto"  # auto | yes | no
    max_tokens: int = 0
    tune_tokens: int = 0  # tune on only the first N valid tokens when another split is reported (0: all)
    batch_size: int = 8
    window: int = 0
    context: int = 0
    recompute: bool = False
    show: int = 0
    show_skip: tuple = ()  # words --show does not list (e.g. <unk>)
    min_pointers: int = 0  # RetoMaton: search only when fewer pointers remain (0: no pointers)
    max_pointers: int = 0  # RetoMaton: pointers kept per token, the nearest hits' successors first (0: up to k)
    retrieve_fraction: float = 1.0  # adaptive retrieval: the fraction of tokens the gate lets retrieve

    def check(self) -> None:
        if self.k < 1:
            raise EvaluationError(f"--k {self.k}: the number of neighbours must be a positive integer")
        for name, value in (("--lmbda", self.lmbda), ("--cache-lambda", self.cache_lambda)):
            if value is not None and not 0.0 <= value <= 1.0:
                raise EvaluationError(f"{name} {value:g}: must be a number in [0, 1] or auto")
        if self.temperature is not None and not self.temperature > 0:
            raise EvaluationError(f"--temperature {self.temperature:g}: must be positive or auto")
        if self.cache and (not self.cache_thetas or any(not t > 0 for t in self.cache_thetas)):
            raise EvaluationError("--cache-theta: must be positive numbers or auto")
        if self.cache and self.cache_size < 1:
            raise EvaluationError(f"--cache-size {self.cache_size}: must be a positive integer")
        if self.nprobe is not None and self.nprobe < 1:
            raise EvaluationError(f"--nprobe {self.nprobe}: must be a positive integer")
        if self.drop_self not in ("auto", "yes", "no"):
            raise EvaluationError(f"--drop-self {self.drop_self}: choose auto, yes or no")
        if self.max_tokens < 0 or self.tune_tokens < 0 or self.show < 0:
            raise EvaluationError("--max-tokens, --tune-tokens and --show must not be negative")
        if self.min_pointers < 0 or self.max_pointers < 0:
            raise EvaluationError(f"--retomaton {self.min_pointers}, --retomaton-max-pointers {self.max_pointers}: "
                                  "must not be negative")
        if self.min_pointers and not self.exact:
            raise EvaluationError("--retomaton: pointers are scored by exact distances to the stored keys; "
                                  "drop --approximate")
        if not 0.0 < self.retrieve_fraction <= 1.0:
            raise EvaluationError(f"--retrieve-fraction {self.retrieve_fraction:g}: must be in (0, 1]")
        if self.batch_size < 1:
            raise EvaluationError(f"--batch-size {self.batch_size}: must be a positive integer")

    def head(self, tokens_N, tuning_only: bool = False):
        """The tokens of a split this run evaluates: the first ``max_tokens`` (and, for valid when it is
        only tuned on, the first ``tune_tokens``)."""
        caps = [n for n in (self.max_tokens, self.tune_tokens if tuning_only else 0) if n]
        return tokens_N[: min(caps)] if caps else tokens_N

    @property
    def tunes(self) -> bool:
        """Whether anything is tuned on valid."""
        knn = self.lmbda is None or self.temperature is None
        cache = self.cache and (self.cache_lambda is None or len(self.cache_thetas) > 1)
        return knn or cache


def own_text(manifest: dict, data, n_tokens: int) -> bool:
    """Whether ``data`` is the very text the datastore was built from (same sha256 and length)."""
    return manifest.get("corpus_sha256") == data.sha256 and manifest.get("num_entries") == n_tokens


def drop_self_for(settings: Settings, manifest: dict, data, n_tokens: int, requested: bool) -> bool:
    """Whether to drop self-retrievals on ``data`` (``requested``: the split the user asked for)."""
    own = own_text(manifest, data, n_tokens)
    if settings.drop_self == "yes" and requested and not own:
        raise EvaluationError(f"--drop-self yes: the {data.split} split of {data.corpus} is not the text the "
                              f"datastore was built from ({manifest.get('corpus')} {manifest.get('split')})")
    return own and settings.drop_self != "no"
