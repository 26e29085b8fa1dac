"""The Llama-family forward against an independent NumPy reference written from the math.

The reference (float64, nothing of ``knnlm_jax``'s model code) reads the Hugging Face config and
weights a tiny fixture model was written from: RMSNorm; rotary positions in Hugging Face's
``rotate_half`` convention (dimension ``i`` of a head turns with dimension ``i + K/2``); grouped
key/value heads (query head ``h`` reads key/value head ``h // (H / KV)``) under a causal mask;
SwiGLU; optional q/k/v biases; a tied or untied output head; a head size that need not be
``d_model / H``. Every variant is loaded from a GGUF (llama.cpp's layout) and from a Hugging Face
directory; its log-probs and sown key states must match within 1e-5 of each tensor's largest
entry (float32 rounding is ~1e-6 of it here). The Llama matmuls must also ask for
``Precision.HIGHEST``, read from the lowered computation (CPUs ignore it; GPUs would otherwise
use TF32).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers.llama_fixture import VARIANTS, bfloat16_exact, tiny_weights, write_gguf, write_hf_dir
from knnlm_jax.models.transformer import KEY_TYPES, forward_states
from knnlm_jax.models.convert.pretrained import load_pretrained

T = 20  # positions: enough for the rotary angles to wrap
TOL = 1e-5  # relative to the tensor's largest entry: float32 rounding here is ~1e-6 of it


# ---------------------------------------------------------------------------------
# the reference


def rms_norm(x_TxD, w_D, eps):
    return w_D * x_TxD / np.sqrt(np.mean(x_TxD * x_TxD, axis=-1, keepdims=True) + eps)


def rotate(x_TxHxK, theta):
    """Rotary positions: the pair ``(i, i + K/2)`` of every head turned by ``position * theta**(-2i/K)``."""
    t, _, k = x_TxHxK.shape
    half = k // 2
    angle_TxI = np.arange(t)[:, None] * theta ** (-2.0 * np.arange(half) / k)[None, :]
    cos, sin = np.cos(angle_TxI)[:, None, :], np.sin(angle_TxI)[:, None, :]
    lo, hi = x_TxHxK[..., :half], x_TxHxK[..., half:]
    return np.concatenate([lo * cos - hi * sin, hi * cos + lo * sin], axis=-1)


def linear(x, w, name):
    """``x W^T + b`` for the Hugging Face layer ``name`` (``W`` is ``out x in``); no bias when it has none."""
    return x @ w[name + ".weight"].T + w.get(name + ".bias", 0.0)


def softmax(s, axis=-1):
    e = np.exp(s - np.max(s, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


def attention(x_TxD, w, prefix, config):
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    k = config.get("head_dim") or config["hidden_size"] // heads
    theta, t = config["rope_parameters"]["rope_theta"], x_TxD.shape[0]
    q_TxHxK = rotate(linear(x_TxD, w, prefix + "q_proj").reshape(t, heads, k), theta)
    k_TxGxK = rotate(linear(x_TxD, w, prefix + "k_proj").reshape(t, kv_heads, k), theta)
    v_TxGxK = linear(x_TxD, w, prefix + "v_proj").reshape(t, kv_heads, k)
    causal_TxT = np.tril(np.ones((t, t), bool))
    out_TxHxK = np.empty((t, heads, k))
    for h in range(heads):
        g = h // (heads // kv_heads)  # consecutive query heads share one key/value head
        scores_TxT = np.where(causal_TxT, q_TxHxK[:, h] @ k_TxGxK[:, g].T / np.sqrt(k), -np.inf)
        out_TxHxK[:, h] = softmax(scores_TxT) @ v_TxGxK[:, g]
    return linear(out_TxHxK.reshape(t, heads * k), w, prefix + "o_proj")


def silu(x):
    return x / (1.0 + np.exp(-x))


def reference(config: dict, weights: dict, ids_T):
    """``(log-probs T x V, {key type: the last block's state T x D})`` in float64."""
    w = {name: np.asarray(a, np.float64) for name, a in weights.items()}
    eps = config["rms_norm_eps"]
    x_TxD = w["model.embed_tokens.weight"][ids_T]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        attn_TxD = attention(rms_norm(x_TxD, w[p + "input_layernorm.weight"], eps), w, p + "self_attn.", config)
        mid_TxD = x_TxD + attn_TxD
        ffn_in_TxD = rms_norm(mid_TxD, w[p + "post_attention_layernorm.weight"], eps)
        gated = silu(linear(ffn_in_TxD, w, p + "mlp.gate_proj")) * linear(ffn_in_TxD, w, p + "mlp.up_proj")
        x_TxD = mid_TxD + linear(gated, w, p + "mlp.down_proj")
    final_TxD = rms_norm(x_TxD, w["model.norm.weight"], eps)
    head_VxD = w["model.embed_tokens.weight" if config["tie_word_embeddings"] else "lm_head.weight"]
    logits_TxV = final_TxD @ head_VxD.T
    top_Tx1 = logits_TxV.max(-1, keepdims=True)
    logp_TxV = logits_TxV - top_Tx1 - np.log(np.sum(np.exp(logits_TxV - top_Tx1), -1, keepdims=True))
    states = dict(attn_output=attn_TxD, ffn_input_before_ln=mid_TxD, ffn_input_after_ln=ffn_in_TxD,
                  block_output=x_TxD, final_output=final_TxD)
    return logp_TxV, states


def assert_close(got, want, what="log-probs"):
    """``max |got - want| <= TOL * max(1, max |want|)``."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    err, bound = np.max(np.abs(got - want)), TOL * max(1.0, np.max(np.abs(want)))
    assert got.shape == want.shape and err <= bound, f"{what}: max error {err:.2e} > {bound:.2e}"


# ---------------------------------------------------------------------------------
# the variants, each from both formats


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """Per variant: its spec, the weights (bfloat16-exact, so both files hold the same numbers), and both files."""
    root, out = tmp_path_factory.mktemp("llama-variants"), {}
    for i, (name, spec) in enumerate(VARIANTS.items()):
        weights = bfloat16_exact(tiny_weights(seed=i, spec=spec))
        write_gguf(root / f"{name}.gguf", weights, spec=spec)
        write_hf_dir(root / name, weights, spec=spec)
        out[name] = dict(spec=spec, weights=weights, gguf=str(root / f"{name}.gguf"), hf=str(root / name))
    return out


def tokens(spec, seed=0):
    return np.random.default_rng(seed).integers(0, spec.vocab, T)


@pytest.mark.parametrize("source", ["gguf", "hf"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_the_forward_matches_the_numpy_reference(written, variant, source):
    v = written[variant]
    spec, ids_T = v["spec"], tokens(v["spec"])
    model, _, info = load_pretrained(v[source])
    assert info["kind"] == source
    cfg = model.cfg
    assert (cfg.head_size, cfg.num_kv_heads, cfg.qkv_bias, cfg.tie_embeddings) == (
        spec.head_size, spec.kv_heads, spec.qkv_bias, spec.tied)
    want_logp_TxV, want_states = reference(spec.hf_config(), v["weights"], ids_T)

    hidden, states = forward_states(model, jnp.asarray(ids_T[None]), KEY_TYPES)
    assert_close(model.full_log_probs(hidden)[0], want_logp_TxV)
    for name in KEY_TYPES:
        assert_close(states[name][0], want_states[name], name)
    # the evaluator's path: the last block's feed-forward only at the scored rows
    rows_R = np.arange(T // 2, T)
    hidden, states = forward_states(model, jnp.asarray(ids_T[None]), "ffn_input_after_ln", rows_R=jnp.asarray(rows_R))
    assert_close(model.full_log_probs(hidden)[0], want_logp_TxV[rows_R], "log-probs at rows")
    assert_close(states["ffn_input_after_ln"][0], want_states["ffn_input_after_ln"][rows_R], "keys at rows")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_decode_steps_match_the_numpy_reference(written, variant):
    """Generation's path: one position at a time against the KV cache."""
    v = written[variant]
    ids_T = tokens(v["spec"], seed=1)
    model, _, _ = load_pretrained(v["gguf"])
    want_logp_TxV, want_states = reference(v["spec"].hf_config(), v["weights"], ids_T)
    step = nnx.jit(lambda m, token_B, cache, pos: m.decode_step(token_B, cache, pos))
    cache = model.empty_cache(1, T)
    for pos in range(T):
        h, states, cache = step(model, jnp.asarray(ids_T[pos : pos + 1]), cache, pos)
        assert_close(model.full_log_probs(h)[0, 0], want_logp_TxV[pos], f"log-probs at {pos}")
        assert_close(states["ffn_input_after_ln"][0, 0], want_states["ffn_input_after_ln"][pos], f"keys at {pos}")


def test_the_reference_follows_rotate_half():
    """The reference's rotation is Hugging Face's ``x cos + rotate_half(x) sin``, and turns a vector, not scales it."""
    x_TxHxK = np.random.default_rng(0).normal(size=(5, 2, 8))
    angle_TxK = np.arange(5)[:, None] * np.tile(100.0 ** (-np.arange(0, 8, 2) / 8), 2)[None, :]
    rotate_half = np.concatenate([-x_TxHxK[..., 4:], x_TxHxK[..., :4]], axis=-1)
    want = x_TxHxK * np.cos(angle_TxK)[:, None] + rotate_half * np.sin(angle_TxK)[:, None]
    np.testing.assert_allclose(rotate(x_TxHxK, 100.0), want, atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(rotate(x_TxHxK, 100.0), axis=-1), np.linalg.norm(x_TxHxK, axis=-1))


# ---------------------------------------------------------------------------------
# precision


def dot_precisions(lowered_text: str) -> list[str]:
    """The ``precision = [...]`` of every ``dot_general`` in lowered StableHLO (``"none"`` when absent)."""
    dots = [line for line in lowered_text.splitlines() if "stablehlo.dot_general" in line]
    return [(re.search(r"precision = \[([^\]]*)\]", line) or [None, "none"])[1] for line in dots]


def test_every_llama_matmul_asks_for_highest_precision(written):
    model, _, _ = load_pretrained(written["untied"]["gguf"])  # untied: the head is a Linear too
    graphdef, state = nnx.split(model)

    def forward(state, tokens_BxT):
        m = nnx.merge(graphdef, state)
        return m.full_log_probs(m(tokens_BxT))

    def decode(state, token_B, cache, pos):
        m = nnx.merge(graphdef, state)
        h, _, cache = m.decode_step(token_B, cache, pos)
        return m.full_log_probs(h), cache

    texts = [jax.jit(forward).lower(state, jnp.zeros((1, 6), jnp.int32)).as_text(),
             jax.jit(decode).lower(state, jnp.zeros((1,), jnp.int32), model.empty_cache(1, 6), 0).as_text()]
    for text in texts:
        precisions = dot_precisions(text)
        # per layer q, k, v, scores, context, o, gate, up, down; then the head
        assert len(precisions) == 9 * model.cfg.num_layers + 1
        assert set(precisions) == {"HIGHEST, HIGHEST"}, precisions
