import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# One persistent JAX compilation cache per test worker, inherited by the tools the tests run as
# subprocesses: the same tiny models are compiled once, not once per process (numerics unchanged).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="knnlm-test-jax-cache-")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    _OWN_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"]


def pytest_unconfigure(config):
    import shutil

    if "_OWN_CACHE" in globals():
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)
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


def write_corpus(d, lines=(400, 40, 40)) -> str:
    """A WikiText-format corpus directory ``d`` of synthetic train, valid and test lines."""
    d.mkdir()
    for split, n, seed in zip(("train", "valid", "test"), lines, (0, 1, 2)):
        (d / f"{split}.txt").write_text("\n".join(synthetic_lines(n, seed)) + "\n", encoding="utf-8")
    return str(d)


@pytest.fixture
def wikitext_dir(tmp_path):
    """A small WikiText-format corpus directory."""
    return write_corpus(tmp_path / "corpus")


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


# The longest files first: `make test` gives each of its 2 workers whole files (--dist loadfile) in
# collection order (--no-loadscope-reorder: xdist's default order is by test count, which put the
# one-test replication suite last, to run alone at the end). Stable sort: every other file, and the
# order inside each file, stay as they were.
LONGEST_FILES = ("test_training.py", "test_replicate.py", "test_training_speed.py", "test_multiprocess.py",
                 "test_pretrained_pipeline.py", "test_evaluate_cli.py", "test_build_cli.py", "test_training_failures.py",
                 "test_evaluation.py", "test_model.py", "test_cli.py")  # as measured: 149 s ... 34 s


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FILES)))

