"""Pretrained decoder LMs of the Llama family (Llama, SmolLM2; Qwen2/Mistral-style blocks by config), Flax NNX.

The block is Hugging Face's ``LlamaDecoderLayer``: RMSNorm, self-attention with rotary
positions (``rotate_half`` layout) and grouped key/value heads (optional q/k/v biases, as
Qwen2), RMSNorm, SwiGLU feed-forward; a final RMSNorm and an output head, tied to the
embeddings or not. Like :class:`~knnlm_jax.models.transformer.TransformerLM` it returns the softmax
input and sows the same kNN key types of its last block (``ffn_input_after_ln``: the
feed-forward's input after ``post_attention_layernorm``; ``ffn_input_before_ln``: the
residual stream after attention; ``attn_output``; ``block_output``; ``final_output``: after
the final norm), so ``forward_states`` and ``forward_with_keys`` work unchanged. Float32
throughout (weights dequantised from GGUF or read from safetensors by
:mod:`~knnlm_jax.models.convert.pretrained`), every matmul at ``Precision.HIGHEST``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from knnlm_jax.models.transformer import _key_types
from knnlm_jax.core.errors import InputError

# Parity with a float32 reference needs true float32 products: GPUs would otherwise multiply in
# TF32 (10-bit mantissas) or bfloat16 passes; CPUs ignore the setting.
PRECISION = jax.lax.Precision.HIGHEST


def matmul(a, b):
    return jnp.matmul(a, b, precision=PRECISION)


def einsum(spec: str, a, b):
    return jnp.einsum(spec, a, b, precision=PRECISION)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    num_layers: int
    d_model: int
    num_heads: int
    num_kv_heads: int
    d_ff: int
    head_dim: int = 0  # 0: d_model // num_heads
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    tie_embeddings: bool = True
    qkv_bias: bool = False  # Qwen2

    @property
    def head_size(self) -> int:
        return self.head_dim or self.d_model // self.num_heads

    @property
    def cutoffs(self) -> tuple:
        """No adaptive-softmax bands: one full softmax (what the pipeline's capacities read)."""
        return ()

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise InputError(f"{self.num_heads} attention heads do not group over {self.num_kv_heads} key/value heads")


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float):
        self.weight = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        return self.weight[...] * (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps))


class Linear(nnx.Module):
    """``x @ W.T (+ b)`` with ``W`` stored ``out x in`` as PyTorch and GGUF (dequantised) keep it."""

    def __init__(self, d_in: int, d_out: int, bias: bool = False):
        self.weight = nnx.Param(jnp.zeros((d_out, d_in), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((d_out,), jnp.float32)) if bias else None

    def __call__(self, x):
        y = matmul(x, self.weight[...].T)
        return y if self.bias is None else y + self.bias[...]


def rotary(x_BxTxHxK, positions_T, theta: float):
    """Rotary position embedding in Hugging Face's ``rotate_half`` layout."""
    k = x_BxTxHxK.shape[-1]
    inv_freq = 1.0 / (theta ** (np.arange(0, k, 2, dtype=np.float64) / k))
    angles_TxK = jnp.asarray(positions_T, jnp.float32)[:, None] * jnp.asarray(inv_freq, jnp.float32)[None, :]
    angles_TxK = jnp.concatenate([angles_TxK, angles_TxK], axis=-1)
    cos, sin = jnp.cos(angles_TxK)[None, :, None, :], jnp.sin(angles_TxK)[None, :, None, :]
    x1, x2 = x_BxTxHxK[..., : k // 2], x_BxTxHxK[..., k // 2 :]
    return x_BxTxHxK * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


class Attention(nnx.Module):
    def __init__(self, cfg: LlamaConfig):
        hd = cfg.head_size
        self.cfg = cfg
        self.q_proj = Linear(cfg.d_model, cfg.num_heads * hd, cfg.qkv_bias)
        self.k_proj = Linear(cfg.d_model, cfg.num_kv_heads * hd, cfg.qkv_bias)
        self.v_proj = Linear(cfg.d_model, cfg.num_kv_heads * hd, cfg.qkv_bias)
        self.o_proj = Linear(cfg.num_heads * hd, cfg.d_model)

    def __call__(self, x_BxTxD):
        cfg, (b, t, _) = self.cfg, x_BxTxD.shape
        hd, group = cfg.head_size, cfg.num_heads // cfg.num_kv_heads
        positions = jnp.arange(t)
        q = rotary(self.q_proj(x_BxTxD).reshape(b, t, cfg.num_heads, hd), positions, cfg.rope_theta)
        k = rotary(self.k_proj(x_BxTxD).reshape(b, t, cfg.num_kv_heads, hd), positions, cfg.rope_theta)
        v = self.v_proj(x_BxTxD).reshape(b, t, cfg.num_kv_heads, hd)
        k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
        scores = einsum("bqhd,bkhd->bhqk", q, k) * hd**-0.5
        scores = jnp.where(jnp.tril(jnp.ones((t, t), bool)), scores, jnp.finfo(jnp.float32).min)
        ctx = einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)
        return self.o_proj(ctx.reshape(b, t, cfg.num_heads * hd))


class MLP(nnx.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, cfg: LlamaConfig):
        self.gate_proj = Linear(cfg.d_model, cfg.d_ff)
        self.up_proj = Linear(cfg.d_model, cfg.d_ff)
        self.down_proj = Linear(cfg.d_ff, cfg.d_model)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaBlock(nnx.Module):
    def __init__(self, cfg: LlamaConfig):
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.rms_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.rms_eps)
        self.mlp = MLP(cfg)

    def __call__(self, x_BxTxD, states=None, rows_R=None):
        attn = self.self_attn(self.input_layernorm(x_BxTxD))
        x_BxTxD = x_BxTxD + attn
        if rows_R is not None:  # after attention only these flat positions go on: 1 x R x D
            d = x_BxTxD.shape[-1]
            attn, x_BxTxD = (a.reshape(-1, d)[rows_R][None] for a in (attn, x_BxTxD))
        ffn_in = self.post_attention_layernorm(x_BxTxD)
        if states is not None:
            states.update(attn_output=attn, ffn_input_before_ln=x_BxTxD, ffn_input_after_ln=ffn_in)
        return x_BxTxD + self.mlp(ffn_in)


class LlamaLM(nnx.Module):
    def __init__(self, cfg: LlamaConfig):
        self.cfg = cfg
        self.embed_tokens = nnx.Param(jnp.zeros((cfg.vocab_size, cfg.d_model), jnp.float32))
        self.layers = nnx.List([LlamaBlock(cfg) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.d_model, cfg.rms_eps)
        self.lm_head = None if cfg.tie_embeddings else Linear(cfg.d_model, cfg.vocab_size)

    def __call__(self, tokens_BxT, *, key_type=None, rows_R=None, deterministic: bool = True, rngs=None):
        """The softmax input ``B x T x D`` (``1 x R x D`` with ``rows_R``); sows ``key_type`` when given."""
        key_types = _key_types(key_type)
        x = self.embed_tokens[...][tokens_BxT]
        states: dict | None = {} if key_types else None
        for i, layer in enumerate(self.layers):
            last = i == len(self.layers) - 1
            x = layer(x, states=states if last else None, rows_R=rows_R if last else None)
        if states is not None:
            states["block_output"] = x
        x = self.norm(x)
        if states is not None:
            states["final_output"] = x
            for name in key_types:
                self.sow(nnx.Intermediate, name, states[name].astype(jnp.float32))
        return x

    def decode_step(self, token_B, cache, pos):
        """One position against a KV cache: ``(softmax input Bx1xD, sown key types, new cache)``.

        ``cache``: per layer ``(keys, values)``, each ``B x max_len x KV x hd`` (see
        :meth:`empty_cache`); position ``pos``'s are written, later positions are masked out.
        """
        cfg = self.cfg
        x = self.embed_tokens[...][token_B[:, None]]
        b, hd, group = x.shape[0], cfg.head_size, cfg.num_heads // cfg.num_kv_heads
        positions = jnp.reshape(pos, (1,))
        new_cache, states = [], {}
        for i, layer in enumerate(self.layers):
            a, h = layer.self_attn, layer.input_layernorm(x)
            q = rotary(a.q_proj(h).reshape(b, 1, cfg.num_heads, hd), positions, cfg.rope_theta)
            k = rotary(a.k_proj(h).reshape(b, 1, cfg.num_kv_heads, hd), positions, cfg.rope_theta)
            v = a.v_proj(h).reshape(b, 1, cfg.num_kv_heads, hd)
            keys = jax.lax.dynamic_update_slice_in_dim(cache[i][0], k, pos, 1)
            vals = jax.lax.dynamic_update_slice_in_dim(cache[i][1], v, pos, 1)
            new_cache.append((keys, vals))
            scores = einsum("bqhd,bkhd->bhqk", q, jnp.repeat(keys, group, axis=2)) * hd**-0.5
            scores = jnp.where(jnp.arange(keys.shape[1]) <= pos, scores, jnp.finfo(jnp.float32).min)
            ctx = einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), jnp.repeat(vals, group, axis=2))
            attn = a.o_proj(ctx.reshape(b, 1, cfg.num_heads * hd))
            x = x + attn
            ffn_in = layer.post_attention_layernorm(x)
            if i == len(self.layers) - 1:
                states.update(attn_output=attn, ffn_input_before_ln=x, ffn_input_after_ln=ffn_in)
            x = x + layer.mlp(ffn_in)
        states["block_output"] = x
        x = self.norm(x)
        states["final_output"] = x
        return x, states, tuple(new_cache)

    def empty_cache(self, batch: int, max_len: int):
        zeros = jnp.zeros((batch, max_len, self.cfg.num_kv_heads, self.cfg.head_size), jnp.float32)
        return tuple((zeros, zeros) for _ in range(self.cfg.num_layers))

    def logits(self, h_BxTxD):
        return matmul(h_BxTxD, self.embed_tokens[...].T) if self.lm_head is None else self.lm_head(h_BxTxD)

    def full_log_probs(self, h_BxTxD, **_):
        return jax.nn.log_softmax(self.logits(h_BxTxD).astype(jnp.float32), axis=-1)

    def head_features(self, h_BxTxD):
        """The softmax's entropy and top log-prob per position, ``B x T x 2`` (what adaptive retrieval gates on)."""
        logp = self.full_log_probs(h_BxTxD)
        entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1, keepdims=True)
        return jnp.concatenate([entropy, jnp.max(logp, axis=-1, keepdims=True)], axis=-1)

    def target_log_probs(self, h_BxTxD, targets_BxT, **_):
        logp = self.full_log_probs(h_BxTxD)
        return jnp.take_along_axis(logp, targets_BxT[..., None], axis=-1)[..., 0]


def assign(model: LlamaLM, weights: dict) -> None:
    """Set every parameter from ``weights`` (Hugging Face names -> arrays); every one must be given, exactly."""
    params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    names = {hf_name(path): path for path in params}
    missing = sorted(set(names) - set(weights))
    if missing:
        raise InputError(f"the weights lack {len(missing)} tensors, e.g. {missing[0]}")
    for name, path in names.items():
        want = params[path].get_value().shape
        if tuple(weights[name].shape) != tuple(want):
            raise InputError(f"{name}: shape {tuple(weights[name].shape)}, the model expects {tuple(want)}")
        params[path].set_value(jnp.asarray(weights[name], jnp.float32))
    nnx.update(model, nnx.from_flat_state(params))


def hf_name(path: tuple) -> str:
    """This model's parameter path as its Hugging Face name (``model.layers.0.self_attn.q_proj.weight``)."""
    parts = [str(p) for p in path]
    if parts[0] == "lm_head":
        return ".".join(parts)
    name = ".".join(parts)
    return "model." + (name + ".weight" if parts == ["embed_tokens"] else name)
