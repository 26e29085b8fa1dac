"""Training at accelerator speed: fused attention, bf16 compute, rematerialisation, multi-process data parallelism.

Every speed option must leave the parameters alone (a checkpoint loads under any of them) and
compute the same function: the fused attention to float32 rounding, bf16 to its precision,
remat exactly. The cuDNN kernel itself needs a GPU; on a CPU ``"auto"`` takes XLA's path.
"""

import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from helpers import ROOT
from knnlm_jax import configs
from knnlm_jax.models.adaptive import band_capacities, band_edges
from knnlm_jax.configs import ConfigError, apply_overrides, get_config, validate
from knnlm_jax.models.transformer import (ATTENTION_IMPLS, COMPUTE_DTYPES, KEY_TYPES, ModelConfig, TransformerLM, cudnn_supported,
                             forward_states)
from knnlm_jax.models.steps import init_model, make_train_step

pytestmark = pytest.mark.slow(3)

CFG = ModelConfig(vocab_size=40, num_layers=2, d_model=16, num_heads=2, d_ff=32, cutoffs=(8, 20), dropout=0.1)


def _cfg(**changes):
    return ModelConfig(**{**CFG.__dict__, **changes})


def _tokens(shape=(3, 9), seed=0):
    return jax.random.randint(jax.random.key(seed), shape, 0, CFG.vocab_size)


def _leaves(tree):
    return jax.tree_util.tree_leaves(tree)


def _loss_and_grads(cfg, tokens, *, deterministic, seed=0):
    """Mean target NLL of ``tokens`` (as the train step normalises) and its gradient (dropout seeded).

    Eager, not jitted: on tiny shapes the per-operation compilations are shared by every
    variant, where each jitted variant would compile anew (seconds each on 2 busy cores).
    """
    graphdef, params = init_model(cfg, seed)

    def loss(params):
        model = nnx.merge(graphdef, params)
        rngs = nnx.Rngs(dropout=7)
        hidden = model(tokens, deterministic=deterministic, rngs=rngs)
        return -jnp.mean(model.target_log_probs(hidden, tokens, deterministic=deterministic, rngs=rngs))

    return jax.value_and_grad(loss)(params)


# ---------------------------------------------------------------------------------
# fused attention


@pytest.mark.parametrize("impl", ["xla", "auto"])
def test_fused_attention_gives_the_explicit_outputs_states_and_rows(impl):
    """Same parameters, same hidden states, keys (every key type, also at ``rows_R``) and log-probs within 1e-5."""
    explicit = TransformerLM(CFG, rngs=nnx.Rngs(0))
    fused = TransformerLM(_cfg(attention_impl=impl), rngs=nnx.Rngs(0))
    for a, b in zip(_leaves(nnx.state(explicit, nnx.Param)), _leaves(nnx.state(fused, nnx.Param))):
        np.testing.assert_array_equal(a, b)
    tokens = _tokens()
    rows_R = jnp.array([26, 0, 8, 9, 13, 13])
    def run(m):  # eager: the tiny shapes' operations compile once for every test
        return forward_states(m, tokens, KEY_TYPES), forward_states(m, tokens, KEY_TYPES, rows_R=rows_R), \
            m.target_log_probs(m(tokens), tokens)

    (h_e, k_e), (hr_e, kr_e), lp_e = run(explicit)
    (h_f, k_f), (hr_f, kr_f), lp_f = run(fused)
    np.testing.assert_allclose(h_f, h_e, atol=1e-5)
    np.testing.assert_allclose(hr_f, hr_e, atol=1e-5)
    np.testing.assert_allclose(lp_f, lp_e, atol=1e-5)
    for name in KEY_TYPES:
        np.testing.assert_allclose(k_f[name], k_e[name], atol=1e-5)
        np.testing.assert_allclose(kr_f[name], kr_e[name], atol=1e-5)


def test_fused_attention_trains_like_the_explicit_one_without_attention_dropout():
    """Training mode (other dropouts on, attention dropout 0): the fused path runs, same loss and gradients."""
    tokens = _tokens()
    le, ge = _loss_and_grads(CFG, tokens, deterministic=False)
    lf, gf = _loss_and_grads(_cfg(attention_impl="auto"), tokens, deterministic=False)
    np.testing.assert_allclose(lf, le, rtol=1e-5)
    for a, b in zip(_leaves(ge), _leaves(gf)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)


def test_active_attention_dropout_falls_back_to_the_explicit_path():
    """A fused kernel cannot drop probabilities: with attention dropout in training the step is the explicit one,
    bit for bit (deterministic forwards take the fused path: the first test)."""
    tokens = _tokens()
    explicit, fused = _cfg(attention_dropout=0.5), _cfg(attention_dropout=0.5, attention_impl="xla")
    le, ge = _loss_and_grads(explicit, tokens, deterministic=False)
    lf, gf = _loss_and_grads(fused, tokens, deterministic=False)
    assert float(lf) == float(le)
    for a, b in zip(_leaves(ge), _leaves(gf)):
        np.testing.assert_array_equal(a, b)
    l_plain, _ = _loss_and_grads(CFG, tokens, deterministic=False)
    assert float(l_plain) != float(le)  # the attention dropout did act


def test_the_fused_path_calls_dot_product_attention_without_a_hand_built_mask(monkeypatch):
    calls = []
    real = jax.nn.dot_product_attention

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
    model = TransformerLM(_cfg(attention_impl="auto"), rngs=nnx.Rngs(0))
    model(_tokens())
    assert len(calls) == CFG.num_layers
    assert all(c["is_causal"] and c["implementation"] == ("cudnn" if jax.default_backend() == "gpu" else "xla")
               for c in calls)
    calls.clear()
    TransformerLM(CFG, rngs=nnx.Rngs(0))(_tokens())  # the default: the explicit path
    assert calls == []


def test_cudnn_is_chosen_only_where_it_can_run():
    q = jnp.zeros((1, 4, 2, 64), jnp.bfloat16)
    gpu = jax.default_backend() == "gpu"
    assert cudnn_supported(q) == gpu
    assert not cudnn_supported(q.astype(jnp.float32))
    assert not cudnn_supported(jnp.zeros((1, 4, 2, 12), jnp.bfloat16))  # head size not a multiple of 8


# ---------------------------------------------------------------------------------
# bf16 compute


def test_bf16_forward_is_close_to_float32_and_keeps_float32_outputs():
    cfg16 = _cfg(compute_dtype="bfloat16", final_norm=True)
    m32, m16 = TransformerLM(_cfg(final_norm=True), rngs=nnx.Rngs(0)), TransformerLM(cfg16, rngs=nnx.Rngs(0))
    tokens = _tokens()
    h32, k32 = forward_states(m32, tokens, KEY_TYPES)
    h16, k16 = forward_states(m16, tokens, KEY_TYPES)
    assert h16.dtype == jnp.float32 and all(k.dtype == jnp.float32 for k in k16.values())
    np.testing.assert_allclose(h16, h32, atol=0.1, rtol=0.05)
    lp32, lp16 = m32.target_log_probs(h32, tokens), m16.target_log_probs(h16, tokens)
    assert lp16.dtype == jnp.float32
    loss32, loss16 = -float(lp32.mean()), -float(lp16.mean())
    assert abs(loss16 - loss32) < 0.02 * loss32
    assert not np.array_equal(h16, h32)  # bf16 did run


def test_bf16_matmuls_run_in_bf16_and_the_softmax_in_float32():
    model = TransformerLM(_cfg(compute_dtype="bfloat16"), rngs=nnx.Rngs(0))
    tokens = _tokens()
    lines = str(jax.make_jaxpr(lambda t: model.target_log_probs(model(t), t))(tokens)).splitlines()
    outputs = [line.split("=")[0] for line in lines if "= dot_general" in line]
    # per block, bf16 out: qkv, probs x values, out, fc1, fc2; the scores come out float32 (preferred_element_type)
    assert sum("bf16[" in o for o in outputs) == 5 * CFG.num_layers
    assert sum(f"f32[3,{CFG.num_heads},9,9]" in o for o in outputs) == CFG.num_layers
    exps = [line for line in lines if "= exp " in line]  # the attention softmax and every log-softmax
    assert len(exps) >= CFG.num_layers + 3 and all("f32[" in e.split("=")[0] for e in exps)
    block = model.blocks[0]
    x = model.embed_tokens(tokens)
    assert x.dtype == jnp.bfloat16 and block.ln1(x).dtype == jnp.bfloat16 and block.fc1(x).dtype == jnp.bfloat16


def test_bf16_train_step_keeps_float32_parameters_and_optimizer_state():
    cfg = _cfg(compute_dtype="bfloat16")
    tx = optax.adamw(1e-2)
    graphdef, params = init_model(cfg, 0)
    state = dict(params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32), rng=jax.random.PRNGKey(1))
    tokens = np.asarray(_tokens((1, 3, 10)))  # inputs 3 x 9, as elsewhere: the eager forward below reuses compilations
    caps = band_capacities(tokens[..., 1:], band_edges(CFG.vocab_size, CFG.cutoffs), granularity=1)
    step = jax.jit(make_train_step(graphdef, tx), static_argnums=3)
    losses = []
    for _ in range(3):
        state, metrics = step(state, tokens[..., :-1], tokens[..., 1:], caps)
        losses.append(float(metrics["loss"]))
    assert metrics["loss"].dtype == jnp.float32 and metrics["grad_norm"].dtype == jnp.float32
    assert all(x.dtype == jnp.float32 for x in _leaves(state["params"]))
    assert all(x.dtype == jnp.float32 for x in _leaves(state["opt_state"]) if jnp.issubdtype(x.dtype, jnp.floating))
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
    # the first step's loss (before any update) in float32, with the step's dropout: within 2%
    base = jax.random.fold_in(jax.random.PRNGKey(1), 0)
    model32 = nnx.merge(*init_model(CFG, 0))
    rngs = nnx.Rngs(dropout=jax.random.fold_in(base, 0))
    hidden = model32(tokens[0, :, :-1], deterministic=False, rngs=rngs)
    loss32 = -float(jnp.mean(model32.target_log_probs(hidden, tokens[0, :, 1:], deterministic=False, rngs=rngs)))
    assert abs(losses[0] - loss32) < 0.02 * loss32


# ---------------------------------------------------------------------------------
# rematerialisation


@pytest.mark.parametrize("deterministic", [True, False])
def test_remat_gives_the_same_loss_and_gradients(deterministic):
    tokens = _tokens()
    cfg = _cfg(attention_dropout=0.2, activation_dropout=0.2)
    l0, g0 = _loss_and_grads(cfg, tokens, deterministic=deterministic)
    l1, g1 = _loss_and_grads(_cfg(attention_dropout=0.2, activation_dropout=0.2, remat=True), tokens,
                             deterministic=deterministic)
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    for a, b in zip(_leaves(g0), _leaves(g1)):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6)


def test_remat_recomputes_in_the_train_step():
    cfg = _cfg(remat=True)
    tx = optax.sgd(0.1)
    graphdef, params = init_model(cfg, 0)
    state = dict(params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32), rng=jax.random.PRNGKey(1))
    tokens = np.asarray(_tokens((2, 2, 9)))
    jaxpr = str(jax.make_jaxpr(make_train_step(graphdef, tx), static_argnums=3)(state, tokens[..., :-1],
                                                                                tokens[..., 1:], None))
    assert jaxpr.count("checkpoint[") + jaxpr.count("remat") >= CFG.num_layers
    graphdef0, _ = init_model(CFG, 0)
    plain = str(jax.make_jaxpr(make_train_step(graphdef0, tx), static_argnums=3)(state, tokens[..., :-1],
                                                                                  tokens[..., 1:], None))
    assert "checkpoint[" not in plain and "remat" not in plain


# ---------------------------------------------------------------------------------
# configs


def test_configs_choose_the_speed_options():
    assert (CFG.attention_impl, CFG.compute_dtype, CFG.remat) == ("explicit", "float32", False)  # the model's defaults
    for name in ("tiny", "wt2"):  # CPU configs: the numerics every run so far was trained with
        c = get_config(name)
        assert (c.attention_impl, c.compute_dtype, c.remat) == ("explicit", "float32", False)
    c = get_config("wt103")
    assert (c.attention_impl, c.compute_dtype, c.remat) == ("auto", "bfloat16", False)
    cfg = ModelConfig.from_config(c, vocab_size=100)
    assert (cfg.attention_impl, cfg.compute_dtype, cfg.remat) == ("auto", "bfloat16", False)
    assert configs.ATTENTION_IMPLS == ATTENTION_IMPLS and configs.COMPUTE_DTYPES == COMPUTE_DTYPES
    c = apply_overrides(get_config("wt2"), ["attention_impl=xla", "compute_dtype=bfloat16", "remat=true"])
    assert validate(c).remat is True


@pytest.mark.parametrize("override, message", [
    ("attention_impl=flash", "attention_impl = 'flash': choose one of explicit, xla, cudnn, auto"),
    ("compute_dtype=float16", "compute_dtype = 'float16': choose one of float32, bfloat16"),
    ("attention_impl=cudnn", "attention_impl = 'cudnn' needs compute_dtype = bfloat16"),
])
def test_bad_speed_options_are_refused_in_one_line(override, message):
    with pytest.raises(ConfigError) as err:
        validate(apply_overrides(get_config("wt2"), [override]))
    assert message in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="remat"):
        apply_overrides(get_config("wt2"), ["remat=maybe"])
    with pytest.raises(ValueError, match="attention_impl"):
        _cfg(attention_impl="flash")


# ---------------------------------------------------------------------------------
# several processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TINY = ["num_layers=1", "d_model=16", "num_heads=2", "d_ff=32", "cutoffs=8,20", "tokens_per_sample=16",
        "batch_size=4", "eval_batch_size=4", "max_steps=3", "warmup_steps=2", "eval_every=3", "checkpoint_every=3",
        "log_every=1", "dropout=0.1"]


def _launch(data_dir, workdir, processes: int):
    """Start ``train.py`` as ``processes`` processes on localhost (1 CPU device each)."""
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--config", "tiny", "--data_dir", data_dir, "--workdir",
           workdir, "--no-progress", *[a for s in TINY for a in ("--set", s)]]
    # LLVM at -O0 compiles the steps in half the time; both launches compile alike
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0")
    if processes > 1:
        port = _free_port()
        cmds = [cmd + ["--coordinator", f"127.0.0.1:{port}", "--num_processes", str(processes), "--process_id", str(p)]
                for p in range(processes)]
    else:
        cmds = [cmd]
    return [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for c in cmds]


def _finish(procs, workdir):
    """Wait for the processes: the run's metrics records and each process's stdout."""
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=150))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return records, [out for out, _ in outs]


def test_two_processes_train_like_one_with_the_same_global_batch(tmp_path, wikitext_dir):
    """2 processes x 1 device (gradients averaged over gloo) against 1 process x 1 device: same losses.

    Both launches run at once (compilation is mostly single-threaded)."""
    dirs = [str(tmp_path / "one"), str(tmp_path / "two")]
    launched = [_launch(wikitext_dir, dirs[0], 1), _launch(wikitext_dir, dirs[1], 2)]
    (one, _), (two, outs) = [_finish(procs, d) for procs, d in zip(launched, dirs)]
    losses = [[r["loss"] for r in records if "loss" in r] for records in (one, two)]
    assert len(losses[0]) == 3
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5, atol=1e-5)
    assert losses[0][0] != pytest.approx(losses[0][2], rel=1e-3)  # the steps do move the parameters
    ppl = [[r["valid_ppl"] for r in records if "valid_ppl" in r and "event" not in r] for records in (one, two)]
    assert len(ppl[0]) == 1
    np.testing.assert_allclose(ppl[1], ppl[0], rtol=1e-5)
    assert "valid perplexity" in outs[0] and "valid perplexity" not in outs[1]  # process 0 alone reports
    assert sum(1 for r in two if r.get("event") == "start") == 1  # and writes the metrics
    assert os.path.isdir(os.path.join(dirs[1], "checkpoints", "3"))
