import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from knnlm_jax.models.adaptive import band_capacities
from knnlm_jax.configs import apply_overrides, get_config
from knnlm_jax.models.transformer import KEY_TYPES, ModelConfig, TransformerLM, count_params, forward_states, forward_with_keys

pytestmark = pytest.mark.slow(10)

CFG = ModelConfig(vocab_size=40, num_layers=2, d_model=16, num_heads=2, d_ff=32, cutoffs=(8, 20))


def test_causality_gradient_of_position_t_ignores_later_inputs():
    model = TransformerLM(CFG, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(0), (1, 9), 0, CFG.vocab_size)
    x = model.embed_tokens(tokens)
    t = 4

    def out_at_t(x):
        return model.decode(x)[0, t].sum()

    g = jax.grad(out_at_t)(x)[0]
    per_pos = np.abs(np.asarray(g)).sum(axis=-1)
    assert np.all(per_pos[t + 1 :] == 0.0)
    assert np.all(per_pos[: t + 1] > 0.0)


def test_changing_a_later_token_leaves_earlier_log_probs_unchanged():
    model = TransformerLM(CFG, rngs=nnx.Rngs(0))
    a = jnp.array([[1, 2, 3, 4, 5, 6]])
    b = a.at[0, 4].set(30)
    la = model.target_log_probs(model(a), a)
    lb = model.target_log_probs(model(b), a)
    np.testing.assert_allclose(la[0, :4], lb[0, :4], atol=1e-6)
    assert not np.allclose(la[0, 4:], lb[0, 4:])


@pytest.mark.parametrize("final_norm", [False, True])
def test_key_types_are_the_last_blocks_states(final_norm):
    cfg = ModelConfig(**{**CFG.__dict__, "final_norm": final_norm})
    model = TransformerLM(cfg, rngs=nnx.Rngs(0))
    tokens = jnp.array([[3, 1, 4, 1, 5, 9, 2, 6]])
    keys = {k: forward_with_keys(model, tokens, tokens, k)[1] for k in KEY_TYPES}
    # recompute the last block by hand
    x = model.embed_tokens(tokens)
    x = model.blocks[0](x, deterministic=True, rngs=None)
    last = model.blocks[1]
    attn = last.attn(last.ln1(x), deterministic=True, rngs=None)
    resid = x + attn
    np.testing.assert_allclose(keys["attn_output"], attn, atol=1e-5)
    np.testing.assert_allclose(keys["ffn_input_before_ln"], resid, atol=1e-5)
    np.testing.assert_allclose(keys["ffn_input_after_ln"], last.ln2(resid), atol=1e-5)
    out = last(x, deterministic=True, rngs=None)
    np.testing.assert_allclose(keys["block_output"], out, atol=1e-5)
    final = model.final_ln(out) if final_norm else out
    np.testing.assert_allclose(keys["final_output"], final, atol=1e-5)
    np.testing.assert_allclose(model(tokens), final, atol=1e-5)


@pytest.mark.parametrize("final_norm", [False, True])
def test_rows_give_the_full_forwards_states_at_those_positions(final_norm):
    cfg = ModelConfig(**{**CFG.__dict__, "final_norm": final_norm})
    model = TransformerLM(cfg, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (3, 7), 0, cfg.vocab_size)
    rows_R = jnp.array([20, 0, 8, 9, 13, 13])  # any flat B x T positions, repeats allowed
    hidden, keys = forward_states(model, tokens, KEY_TYPES)
    hidden_r, keys_r = jax.jit(lambda m, t, r: forward_states(m, t, KEY_TYPES, rows_R=r))(model, tokens, rows_R)
    assert hidden_r.shape == (1, len(rows_R), cfg.d_model)
    np.testing.assert_allclose(hidden_r[0], hidden.reshape(-1, cfg.d_model)[rows_R], atol=1e-5)
    for name in KEY_TYPES:
        np.testing.assert_allclose(keys_r[name][0], keys[name].reshape(-1, cfg.d_model)[rows_R], atol=1e-5)


def test_keys_come_with_the_same_log_probs_and_leave_no_sown_state():
    model = TransformerLM(CFG, rngs=nnx.Rngs(0))
    tokens = jnp.array([[3, 1, 4, 1, 5]])
    logp, keys = jax.jit(lambda m, t: forward_with_keys(m, t, t, "ffn_input_after_ln"))(model, tokens)
    assert keys.shape == (1, 5, CFG.d_model)
    np.testing.assert_allclose(logp, model.target_log_probs(model(tokens), tokens), atol=1e-6)
    assert len(jax.tree_util.tree_leaves(nnx.state(model, nnx.Intermediate))) == 0
    model(tokens)  # a plain call sows nothing
    assert len(jax.tree_util.tree_leaves(nnx.state(model, nnx.Intermediate))) == 0


def test_unknown_key_type_is_an_error():
    model = TransformerLM(CFG, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="unknown key type"):
        model(jnp.zeros((1, 3), jnp.int32), key_type="nope")


def test_dropout_is_active_only_when_not_deterministic():
    cfg = ModelConfig(**{**CFG.__dict__, "dropout": 0.5})
    model = TransformerLM(cfg, rngs=nnx.Rngs(0))
    tokens = jnp.array([[3, 1, 4, 1, 5]])
    np.testing.assert_array_equal(model(tokens), model(tokens))
    a = model(tokens, deterministic=False, rngs=nnx.Rngs(dropout=1))
    b = model(tokens, deterministic=False, rngs=nnx.Rngs(dropout=2))
    assert not np.allclose(a, b)


def test_wt103_parameter_count_matches_the_paper():
    config = apply_overrides(get_config("wt103"), ["vocab_size=267735"])
    n = count_params(ModelConfig.from_config(config))
    assert abs(n - 247e6) / 247e6 < 0.01, n


def dot_precisions(cfg) -> list[str]:
    """The precision of every dot in the lowered forward and softmaxes (dense, sparse, full, head)."""
    graphdef, state = nnx.split(TransformerLM(cfg, rngs=nnx.Rngs(0)))
    tokens = jax.random.randint(jax.random.key(0), (2, 6), 0, cfg.vocab_size)
    caps = band_capacities(np.asarray(tokens), (0, *cfg.cutoffs, cfg.vocab_size))

    def everything(state, tokens):
        model = nnx.merge(graphdef, state)
        h = model(tokens)
        return (model.target_log_probs(h, tokens), model.target_log_probs(h, tokens, capacities=caps),
                model.full_log_probs(h), model.head_features(h))

    text = jax.jit(everything).lower(state, tokens).as_text()
    found = [re.search(r"precision = \[(\w+), \w+\]", line) for line in text.splitlines() if "dot_general" in line]
    return [m.group(1) if m else "unset" for m in found]


@pytest.mark.parametrize("impl,tied", [("explicit", True), ("xla", False)])
def test_float32_matmuls_run_at_highest_precision(impl, tied):
    """GPUs and TPUs run float32 matmuls as TF32 or bf16 passes unless told otherwise: in float32 every
    dot (blocks, attention, adaptive input and softmax) asks for HIGHEST; bf16 keeps the default."""
    untied = {} if tied else {"tie_adaptive_weights": False, "tie_adaptive_proj": False}
    cfg = ModelConfig(**{**CFG.__dict__, "attention_impl": impl, **untied})
    precisions = dot_precisions(cfg)
    assert len(precisions) >= 12 and set(precisions) == {"HIGHEST"}, precisions
    assert "HIGHEST" not in dot_precisions(ModelConfig(**{**cfg.__dict__, "compute_dtype": "bfloat16"}))
