"""The converter against fairseq itself, without fairseq: a committed reference fairseq made.

``tests/fixtures/fairseq_tiny/`` (``benchmarks/fairseq_reference.py``; ``reference.json`` says how):
a shrunk ``transformer_lm_wiki103`` (2 layers, d 32, 4 heads, FFN 64, cutoffs 16,40, factor 4,
tied adaptive weights and projections, pre-norm, sinusoidal positions, no final LayerNorm)
preprocessed, trained a few updates, saved and scored by fairseq's own ``fairseq-preprocess``,
``fairseq-train`` and ``fairseq-eval-lm`` (``--tokens-per-sample 40 --context-window 20``):
its ``checkpoint.pt`` and ``dict.txt``, and in ``reference.npz`` eval-lm's batch (inputs,
full log-probs) and the log-prob it scored for every test token.

The ``.pt`` is read as a user's would be, which needs PyTorch: without it these tests skip,
except under ``CI=true``, where they fail (a skip would hide the only comparison with fairseq).
"""

import hashlib
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from helpers import FIXTURES
from knnlm_jax import runs

DATA = os.path.join(FIXTURES, "fairseq_tiny")
TOL = 1e-5  # float32 rounding of log-probs down to -22: 4.8e-6 measured
PAD, EOS = 1, 2  # fairseq's ids (the project's too)


def convert_cli(argv) -> int:
    """The converter's command line (``knnlm-convert-fairseq``) in this process: its exit status."""
    from knnlm_jax.cli.convert import main

    try:
        return main(argv)
    except SystemExit as exit_info:
        return exit_info.code


def reference() -> tuple[dict, dict]:
    """``(reference.json, reference.npz arrays)``."""
    with open(os.path.join(DATA, "reference.json")) as f:
        meta = json.load(f)
    with np.load(os.path.join(DATA, "reference.npz")) as z:
        return meta, {k: z[k] for k in z.files}


def require_torch() -> None:
    """PyTorch reads the ``.pt``: skip without it, but fail under ``CI=true`` (CI installs it)."""
    try:
        import torch  # noqa: F401
    except ImportError:
        message = "reading fairseq's checkpoint.pt needs PyTorch: pip install torch (the CPU build is enough)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true: {message}")
        pytest.skip(message)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The committed checkpoint converted by the command line, then loaded as build/evaluate load a run."""
    require_torch()
    out = str(tmp_path_factory.mktemp("fairseq") / "run")
    code = convert_cli(["--checkpoint", os.path.join(DATA, "checkpoint.pt"), "--dict", os.path.join(DATA, "dict.txt"),
                    "--workdir", out])
    assert code == 0
    config = runs.run_config(out)
    return config, runs.load_model(out, config, runs.load_vocab(out, config))


def test_the_reference_files_are_those_recorded():
    """The sha256s fairseq's run recorded: no file regenerated or edited without the others."""
    meta, _ = reference()
    for name, digest in meta["sha256"].items():
        with open(os.path.join(DATA, name), "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == digest, f"{name} is not the one reference.json records"


def test_the_converted_model_gives_fairseqs_log_probs(run):
    """Every distribution fairseq's eval-lm batch had, at each non-pad input (right padding does not
    reach earlier positions through causal attention)."""
    _, trained = run
    _, ref = reference()
    model = trained.model()
    src_BxT = ref["src_tokens_BxT"]
    got_BxTxV = np.asarray(model.full_log_probs(model(jnp.asarray(src_BxT))))
    real_BxT = src_BxT != PAD
    assert real_BxT.sum() == 180 and np.isfinite(ref["log_probs_BxTxV"][real_BxT]).all()
    assert np.abs(got_BxTxV - ref["log_probs_BxTxV"])[real_BxT].max() <= TOL


def test_the_run_windows_come_from_the_checkpoints_tokens_per_sample(run):
    """fairseq trained on 40-token samples (not wt103's 3072): the run's windows are 40 tokens with half
    as context, for building and for evaluation (eval-lm's --context-window 20)."""
    from knnlm_jax.datastore.building import window_sizes
    from knnlm_jax.evaluation.settings import eval_window_sizes

    config, trained = run
    meta, _ = reference()
    tokens_per_sample = meta["tokens_per_sample"]
    assert tokens_per_sample != 3072 and config.tokens_per_sample == tokens_per_sample
    assert window_sizes(config) == (tokens_per_sample, tokens_per_sample // 2)
    assert eval_window_sizes(config) == (tokens_per_sample, meta["context_window"])
    assert trained.step == 4 and trained.source == "best"  # fairseq's num_updates


def test_the_evaluator_scores_the_test_stream_as_fairseq_eval_lm(run, tmp_path):
    """The streaming evaluator with the run's windows gives every test token the log-prob eval-lm gave it:
    eval-lm's blocks of 20 after up to 20 earlier tokens are the run's 40-token windows scoring 20."""
    from helpers.tiny_run import stream_tokens
    from knnlm_jax.evaluation.settings import eval_window_sizes

    config, trained = run
    _, ref = reference()
    window, context = eval_window_sizes(config)
    files = stream_tokens(trained, config.key_type, EOS, str(tmp_path / "eval"), ref["targets_N"], window=window,
                          context=context, batch_size=4)
    assert files.n == len(ref["target_log_probs_N"]) == 100
    assert np.abs(np.asarray(files.logp_lm) - ref["target_log_probs_N"]).max() <= TOL
