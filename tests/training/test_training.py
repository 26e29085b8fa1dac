import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from helpers import ROOT, tiny_config
from knnlm_jax.models.adaptive import band_capacities, band_edges
from knnlm_jax.models.transformer import ModelConfig
from knnlm_jax.models.steps import init_model, make_train_step, unigram_perplexity
from knnlm_jax.training.loop import train

pytestmark = pytest.mark.slow(1)

QUIET = dict(progress=False, log=lambda *a: None)


def test_training_lowers_valid_perplexity_below_unigram(tmp_path, wikitext_dir):
    config = tiny_config(wikitext_dir, max_steps=40, eval_every=20, d_model=32, d_ff=64, lr=5e-3, dropout=0.0)
    result = train(config, str(tmp_path / "run"), **QUIET)
    assert result["valid_ppl"] < 0.5 * result["unigram_valid_ppl"]
    assert result["versions"]["jax"] == jax.__version__ and result["versions"]["numpy"] == np.__version__
    records = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
    evals = [r["valid_ppl"] for r in records if "valid_ppl" in r and "event" not in r]
    assert len(evals) == 2 and evals[1] < evals[0]
    assert os.path.isdir(tmp_path / "run" / "best")


def test_resume_after_losing_the_last_checkpoint_gives_identical_results(tmp_path, wikitext_dir):
    config = tiny_config(wikitext_dir)
    run = str(tmp_path / "b")
    ref = train(config, run, **QUIET)  # the uninterrupted result
    shutil.rmtree(os.path.join(run, "checkpoints", "6"))  # as if killed between step 4 and 6
    messages = []
    again = train(config, run, progress=False, log=messages.append)
    assert any("resumed from step 4" in m for m in messages)
    assert again["valid_ppl"] == ref["valid_ppl"]
    steps = [json.loads(l).get("step") for l in open(os.path.join(run, "metrics.jsonl"))]
    assert steps.count(5) == 1  # the lost steps are logged once, not twice


def _valid_curve(run: str) -> tuple[list, list]:
    records = [json.loads(l) for l in open(os.path.join(run, "metrics.jsonl"))]
    evals = [(r["step"], r["valid_ppl"]) for r in records if "valid_ppl" in r and "event" not in r]
    return [s for s, _ in evals], [p for _, p in evals]


def test_training_stops_once_valid_stalls_for_patience_evaluations_and_a_rerun_stays_stopped(tmp_path, wikitext_dir):
    # a high learning rate without dropout: valid stops improving well before max_steps on the tiny corpus
    config = tiny_config(wikitext_dir, max_steps=80, eval_every=2, patience=2, lr=5e-2, dropout=0.0, d_model=32,
                         d_ff=64, checkpoint_every=100)
    run = str(tmp_path / "r")
    result = train(config, run, **QUIET)
    steps, ppl = _valid_curve(run)
    best_before = [min(range(i + 1), key=ppl.__getitem__) for i in range(len(ppl))]  # first minimum so far
    first_stall = next(i for i in range(len(ppl)) if i - best_before[i] >= config.patience)
    assert result["stopped_early"] and result["steps"] == steps[first_stall] == steps[-1] < config.max_steps
    assert result["best_step"] == steps[best_before[-1]] and result["best_valid_ppl"] == min(ppl)
    messages = []
    again = train(config, run, progress=False, log=messages.append)
    assert any(f"resumed from step {result['steps']}" in m for m in messages)
    assert again["steps"] == result["steps"] and again["valid_ppl"] == result["valid_ppl"]
    assert _valid_curve(run) == (steps, ppl)  # it trained and evaluated no further
    never = train(tiny_config(wikitext_dir, max_steps=8, eval_every=2, patience=0, lr=5e-2, dropout=0.0),
                  str(tmp_path / "full"), **QUIET)
    assert never["steps"] == 8 and not never["stopped_early"]


def test_a_changed_config_does_not_continue_an_old_run(tmp_path, wikitext_dir):
    train(tiny_config(wikitext_dir, max_steps=2), str(tmp_path / "r"), **QUIET)
    with pytest.raises(ValueError, match="different config"):
        train(tiny_config(wikitext_dir, max_steps=2, lr=0.5), str(tmp_path / "r"), **QUIET)


def _state(cfg, tx, seed=0):
    graphdef, params = init_model(cfg, seed)
    state = dict(params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32),
                 rng=jax.random.PRNGKey(1))
    return graphdef, state


def test_gradient_accumulation_equals_one_big_batch():
    cfg = ModelConfig(vocab_size=40, num_layers=1, d_model=16, num_heads=2, d_ff=32, cutoffs=(8, 20))
    tx = optax.sgd(0.1)
    tokens = np.asarray(jax.random.randint(jax.random.key(0), (4, 9), 0, 40))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    caps = band_capacities(targets, band_edges(40, cfg.cutoffs), granularity=1)
    graphdef, s1 = _state(cfg, tx)
    _, s2 = _state(cfg, tx)
    step = make_train_step(graphdef, tx)
    a, ma = step(s1, inputs[None], targets[None], caps)
    b, mb = step(s2, inputs.reshape(2, 2, 8), targets.reshape(2, 2, 8), caps)
    np.testing.assert_allclose(ma["loss"], mb["loss"], rtol=1e-6)
    for x, y in zip(jax.tree_util.tree_leaves(a["params"]), jax.tree_util.tree_leaves(b["params"])):
        np.testing.assert_allclose(x, y, atol=1e-6)


def test_sparse_tails_give_the_same_step_as_dense_tails():
    cfg = ModelConfig(vocab_size=40, num_layers=1, d_model=16, num_heads=2, d_ff=32, cutoffs=(8, 20))
    tx = optax.sgd(0.1)
    tokens = np.asarray(jax.random.randint(jax.random.key(0), (1, 4, 9), 0, 40))
    graphdef, s1 = _state(cfg, tx)
    _, s2 = _state(cfg, tx)
    step = make_train_step(graphdef, tx)
    caps = band_capacities(tokens[..., 1:], band_edges(40, cfg.cutoffs))
    a, ma = step(s1, tokens[..., :-1], tokens[..., 1:], caps)
    b, mb = step(s2, tokens[..., :-1], tokens[..., 1:], None)
    np.testing.assert_allclose(ma["loss"], mb["loss"], rtol=1e-6)
    np.testing.assert_allclose(ma["grad_norm"], mb["grad_norm"], rtol=1e-5)


def test_unigram_perplexity_add_one():
    train_ids = np.array([4, 4, 5])
    # counts+1 over V=6: [1,1,1,1,3,2] / 9
    assert unigram_perplexity(train_ids, np.array([4]), 6) == pytest.approx(3.0)
    assert unigram_perplexity(train_ids, np.array([0, 5]), 6) == pytest.approx(np.exp(-(np.log(1 / 9) + np.log(2 / 9)) / 2))


TWO_DEVICE_SCRIPT = r"""
import sys, json
sys.path.insert(0, {root!r})
import jax
from helpers import tiny_config
from knnlm_jax.training.loop import train
config = tiny_config({data!r}, batch_size=4, eval_batch_size=4, max_steps=4, eval_every=4)
result = train(config, {workdir!r}, progress=False, log=lambda *a: None)
print(json.dumps(dict(devices=jax.device_count(), valid_ppl=result["valid_ppl"])))
"""


def _run_devices(n, data, workdir):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}", JAX_PLATFORMS="cpu")
    code = TWO_DEVICE_SCRIPT.format(root=ROOT, data=data, workdir=workdir)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         cwd=os.path.join(ROOT, "tests"), timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_two_devices_give_the_same_loss_as_one(tmp_path, wikitext_dir):
    one = _run_devices(1, wikitext_dir, str(tmp_path / "one"))
    two = _run_devices(2, wikitext_dir, str(tmp_path / "two"))
    assert (one["devices"], two["devices"]) == (1, 2)
    assert two["valid_ppl"] == pytest.approx(one["valid_ppl"], rel=1e-5)


def test_wt103_is_the_papers_architecture():
    from knnlm_jax.configs import get_config
    from knnlm_jax.models.transformer import count_params

    c = get_config("wt103")
    assert (c.num_layers, c.d_model, c.num_heads, c.d_ff) == (16, 1024, 8, 4096)  # fairseq transformer_lm_wiki103
    assert (tuple(c.cutoffs), c.adaptive_factor, c.tokens_per_sample) == ((20000, 60000), 4, 3072)
    assert count_params(ModelConfig.from_config(c, vocab_size=267735)) == 246_932_928


SGD_DEVICES_SCRIPT = r"""
import json, sys
sys.path.insert(0, {root!r})
import jax, jax.numpy as jnp, numpy as np, optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from knnlm_jax.models.adaptive import band_capacities, band_edges
from knnlm_jax.models.transformer import ModelConfig
from knnlm_jax.models.steps import init_model, make_train_step

cfg = ModelConfig(vocab_size=40, num_layers=1, d_model=16, num_heads=2, d_ff=32, cutoffs=(8, 20))
tx = optax.sgd(1.0)
tokens = np.asarray(jax.random.randint(jax.random.key(0), (1, 4, 9), 0, 40))
caps = band_capacities(tokens[..., 1:], band_edges(40, cfg.cutoffs), granularity=1)
out = {{}}
for n in (1, 2):
    mesh = Mesh(np.array(jax.devices()[:n]), ("data",))
    graphdef, params = init_model(cfg, 0)
    state = jax.device_put(dict(params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32),
                                rng=jax.random.PRNGKey(1)), NamedSharding(mesh, P()))
    batch = NamedSharding(mesh, P(None, "data", None))
    step = jax.jit(make_train_step(graphdef, tx), static_argnums=3)
    losses = []
    for _ in range(3):
        state, m = step(state, jax.device_put(tokens[..., :-1], batch), jax.device_put(tokens[..., 1:], batch), caps)
        losses.append(float(m["loss"]))
    out[n] = dict(losses=losses, params=[np.asarray(x).ravel().tolist() for x in jax.tree_util.tree_leaves(state["params"])])
print(json.dumps(dict(devices=jax.device_count(), **{{str(k): v for k, v in out.items()}})))
"""


def test_data_parallel_sgd_averages_gradients_over_devices():
    """Plain SGD shows the gradient's scale: summing over 2 devices instead of averaging would double the updates."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", SGD_DEVICES_SCRIPT.format(root=ROOT)], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["devices"] == 2
    one, two = result["1"], result["2"]
    assert one["losses"][0] != pytest.approx(one["losses"][2], rel=1e-3)  # the steps do move the parameters
    np.testing.assert_allclose(two["losses"], one["losses"], rtol=1e-5)
    for a, b in zip(one["params"], two["params"]):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
