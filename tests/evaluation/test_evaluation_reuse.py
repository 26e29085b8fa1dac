"""Saved per-token files are reused only for the very same evaluation; each setting that changes them forces a pass.

Also: valid and test being the same text is refused when something is tuned, and the cache's
λc and θ are tuned on valid only.
"""

import dataclasses
import os
import shutil

import faiss
import numpy as np
import pytest

from helpers.tiny_run import eval_job
from knnlm_jax.evaluation import evaluate as evaluation
from knnlm_jax.datastore.format import open_datastore
from knnlm_jax.evaluation.settings import EvaluationError, Settings
from knnlm_jax.evaluation.mixing import tune_cache
from knnlm_jax.evaluation.token_files import open_token_files


def run(ev, out, split="valid", splits=None, trained=None, store=None, index=None, key_type=None, **kw):
    settings = dict(k=8, lmbda=0.3, temperature=1.0, max_tokens=96, batch_size=4, window=16, context=8)
    settings.update(kw)
    logs = []
    job = eval_job(ev, Settings(**settings), trained=trained, key_type=key_type, store=store, index=index)
    result = evaluation.run(str(out), job, split, splits or ev.splits, progress=False, log=logs.append)
    return result, any("reusing" in line for line in logs)


def test_each_setting_that_changes_the_files_forces_a_new_pass(ev, tmp_path):
    out = tmp_path / "out"
    assert not run(ev, out)[1]
    assert run(ev, out)[1]  # the very same evaluation: reused
    ivf = faiss.index_factory(ev.store.dim, "IVF4,Flat")
    keys = np.asarray(ev.store.keys, np.float32)
    ivf.train(keys)
    ivf.add(keys)
    other_store = tmp_path / "other"
    shutil.copytree(ev.store.directory, other_store)
    changes = {
        "k": dict(k=4),
        "exact": dict(exact=False),
        "max_tokens": dict(max_tokens=64),
        "weights": dict(trained=dataclasses.replace(ev.trained, fingerprint="0" * 64)),
        "datastore": dict(store=open_datastore(str(other_store))),
    }
    for name, change in changes.items():
        run(ev, out)  # the baseline's files again
        assert run(ev, out)[1], name  # the very same evaluation reuses them
        assert not run(ev, out, **change)[1], f"{name} changed but the saved files were reused"
    # the same directory under a retrieval policy: another pointer threshold is another pass
    assert not run(ev, out, min_pointers=4)[1] and run(ev, out, min_pointers=4)[1]
    assert not run(ev, out, min_pointers=8)[1], "the RetoMaton threshold changed but the saved files were reused"
    # nprobe: with inverted lists, a new probe count is a new search
    assert not run(ev, out, index=ivf, nprobe=1)[1]
    assert run(ev, out, index=ivf, nprobe=1)[1]
    assert not run(ev, out, index=ivf, nprobe=2)[1], "nprobe changed but the saved files were reused"


def test_valid_and_test_the_same_text_is_refused_when_tuning(ev, tmp_path):
    same = dict(ev.splits, test=ev.splits["valid"])
    with pytest.raises(EvaluationError, match="same text"):
        run(ev, tmp_path / "same", split="test", splits=same, lmbda=None)
    result, _ = run(ev, tmp_path / "given", split="test", splits=same)  # nothing tuned: allowed
    assert result["rows"][1]["ppl"] > 0


def test_the_cache_is_tuned_on_valid_only(ev, tmp_path):
    thetas = (0.01, 0.1, 1.0)
    result, _ = run(ev, tmp_path / "c", split="test", cache=True, cache_size=16, cache_thetas=thetas,
                    cache_lambda=None, lmbda=None)
    valid = open_token_files(str(tmp_path / "c" / "tokens-valid"))
    best = tune_cache(valid.logp_lm, valid.cache, thetas)
    assert (result["cache"]["cache"]["lmbda"], result["cache"]["cache"]["theta"]) == (best["lmbda"], best["theta"])
    test = open_token_files(str(tmp_path / "c" / "tokens-test"))
    on_test = tune_cache(test.logp_lm, test.cache, thetas)
    assert result["valid"]["cache"]["ppl"] == pytest.approx(best["ppl"])
    assert os.path.isdir(tmp_path / "c" / "tokens-test") and on_test["ppl"] > 0


def test_window_context_self_retrieval_searcher_and_key_type_each_force_a_new_pass(ev, tmp_path):
    """Field by field: each of these changes the per-token files, so none may be reused across it."""
    from knnlm_jax.retrieval.device_search import DeviceSearcher

    out = tmp_path / "out"
    other_key = next(t for t in ("ffn_input_before_ln", "attn_output") if t != ev.config.key_type)
    changes = {
        "window": dict(window=12),
        "context": dict(context=4),
        "searcher": dict(index=DeviceSearcher(ev.store.keys, block=64)),
        "key type": dict(key_type=other_key),
    }
    for name, change in changes.items():
        run(ev, out)
        assert run(ev, out)[1], name
        assert not run(ev, out, **change)[1], f"{name} changed but the saved files were reused"
        assert run(ev, out, **change)[1], f"{name}: the very same evaluation reuses its files"
    # the continuous cache: its size and its thetas change the cache's per-token columns
    cache = dict(cache=True, cache_size=8, cache_thetas=(0.1,), cache_lambda=0.2)
    assert not run(ev, out, **cache)[1] and run(ev, out, **cache)[1]
    assert not run(ev, out, **dict(cache, cache_size=16))[1], "cache_size changed but the saved files were reused"
    assert not run(ev, out, **dict(cache, cache_thetas=(0.1, 0.3)))[1], "cache thetas changed but files were reused"
    # self-retrieval: dropped by default on the datastore's own text, kept with drop_self="no"
    assert not run(ev, out, split="train")[1] and run(ev, out, split="train")[1]
    assert not run(ev, out, split="train", drop_self="no")[1], "drop_self changed but the saved files were reused"
