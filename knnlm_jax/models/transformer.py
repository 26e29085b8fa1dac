"""Decoder-only pre-norm Transformer LM with adaptive input and adaptive softmax (Flax NNX).

``TransformerLM.__call__`` returns the hidden states; the softmax methods turn them into
target or full log-probabilities. When asked for a ``key_type`` the model sows that
state of the last block (``nnx.Intermediate``) so that ``nnx.capture`` can return it as
the kNN key of every position; nothing is sown otherwise, so training pays nothing.

Speed options (none changes the parameters, so a checkpoint loads under any of them; the
defaults give exactly the original numerics):

- ``attention_impl``: ``"explicit"`` (default) builds the ``B x H x T x T`` scores by hand;
  ``"xla"``, ``"cudnn"`` and ``"auto"`` call ``jax.nn.dot_product_attention`` (``is_causal``)
  with that implementation (``"auto"``: cuDNN's flash kernel on a GPU with bf16/fp16 inputs and
  a head size it supports, else XLA's). A fused kernel cannot drop attention probabilities,
  so while attention dropout is active (``attention_dropout > 0`` and not ``deterministic``)
  the explicit path runs instead; evaluation and datastore builds (deterministic) and
  training with ``attention_dropout = 0`` use the fused one.
- ``compute_dtype``: ``"float32"`` (default) or ``"bfloat16"``: activations and the blocks'
  matmuls in bf16, parameters (hence gradients and optimizer state) float32; LayerNorm
  statistics, attention softmax, the adaptive input, the adaptive softmax (its projections,
  log-softmax) and so the loss stay float32; hidden states and sown keys come out float32.
  In ``"float32"`` every matmul runs at ``jax.lax.Precision.HIGHEST`` (``ModelConfig.precision``):
  GPUs and TPUs otherwise run float32 matmuls as TF32 or bf16 passes, and float32 is what a
  converted fairseq model is compared in; ``"bfloat16"`` keeps the backend's default.
- ``remat``: recompute each block's activations in the backward pass (``nnx.remat``) instead
  of keeping them: memory for time, identical gradients.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from knnlm_jax.models.adaptive import AdaptiveInput, AdaptiveSoftmax
from knnlm_jax.core.errors import InputError

ATTENTION_IMPLS = ("explicit", "xla", "cudnn", "auto")
COMPUTE_DTYPES = ("float32", "bfloat16")

KEY_TYPES = (
    "ffn_input_after_ln",  # the paper's best (Table 5): last block's FFN input after its LayerNorm
    "ffn_input_before_ln",  # the same state before the LayerNorm (the residual stream after attention)
    "attn_output",  # last block's self-attention sublayer output, before the residual add
    "block_output",  # last block's output (the model output, before any final LayerNorm)
    "final_output",  # what the softmax sees: block output after the final LayerNorm when there is one
)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    num_layers: int
    d_model: int
    num_heads: int
    d_ff: int
    cutoffs: tuple[int, ...] = ()
    adaptive_factor: int = 4
    tie_adaptive_weights: bool = True
    tie_adaptive_proj: bool = True
    dropout: float = 0.0
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    adaptive_softmax_dropout: float = 0.0
    final_norm: bool = False
    scale_embedding: bool = True
    # fairseq compatibility (knnlm_jax/models/convert/fairseq.py); the defaults are this project's own numerics
    position_offset: int = 0  # index of the first position in the sinusoid table (fairseq: padding_idx + 1 = 2)
    layer_norm_eps: float = 1e-6  # flax's default; fairseq (PyTorch) uses 1e-5
    # speed only (see the module docstring): the parameters are the same under every value
    attention_impl: str = "explicit"
    compute_dtype: str = "float32"
    remat: bool = False

    @classmethod
    def from_config(cls, config, vocab_size: int | None = None) -> "ModelConfig":
        """Take the model fields of a run config; ``vocab_size`` overrides ``config.vocab_size``."""
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: config[k] for k in fields if k in config}
        values["cutoffs"] = tuple(int(c) for c in values.get("cutoffs", ()))
        if vocab_size is not None:
            values["vocab_size"] = int(vocab_size)
        return cls(**values)

    def __post_init__(self):
        if self.d_model % self.num_heads:
            raise InputError(f"d_model {self.d_model} is not divisible by num_heads {self.num_heads}")
        if self.vocab_size < 5:
            raise InputError(f"vocab_size {self.vocab_size} is too small")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise InputError(f"attention_impl {self.attention_impl!r}: choose one of {', '.join(ATTENTION_IMPLS)}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise InputError(f"compute_dtype {self.compute_dtype!r}: choose one of {', '.join(COMPUTE_DTYPES)}")

    @property
    def dtype(self):
        """The layers' computation dtype: ``None`` (the parameters', float32) or ``jnp.bfloat16``."""
        return None if self.compute_dtype == "float32" else jnp.dtype(self.compute_dtype)

    @property
    def precision(self):
        """Every matmul's precision: ``HIGHEST`` in float32 (true float32 on GPUs and TPUs too),
        ``None`` (the backend's default) in bfloat16, whose speed is the point."""
        return jax.lax.Precision.HIGHEST if self.compute_dtype == "float32" else None


def sinusoidal_positions(length: int, dim: int, offset: int = 0) -> np.ndarray:
    """fairseq-style sinusoidal embeddings: ``[sin | cos]`` halves, ``length x dim``."""
    half = dim // 2
    freq = np.exp(np.arange(half, dtype=np.float64) * -(math.log(10000.0) / max(half - 1, 1)))
    angles = (np.arange(length, dtype=np.float64) + offset)[:, None] * freq[None, :]
    table = np.concatenate([np.sin(angles), np.cos(angles)], axis=1)
    if dim % 2:
        table = np.concatenate([table, np.zeros((length, 1))], axis=1)
    return table.astype(np.float32)


class CausalSelfAttention(nnx.Module):
    """Causal multi-head self-attention; ``cfg.attention_impl`` picks how (see the module docstring)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.num_heads = cfg.num_heads
        self.impl = cfg.attention_impl
        self.precision = cfg.precision
        xavier = nnx.initializers.xavier_uniform()
        kw = dict(kernel_init=xavier, dtype=cfg.dtype, precision=cfg.precision, rngs=rngs)
        self.qkv = nnx.Linear(cfg.d_model, 3 * cfg.d_model, **kw)
        self.out = nnx.Linear(cfg.d_model, cfg.d_model, **kw)
        self.attn_dropout = nnx.Dropout(cfg.attention_dropout)

    def __call__(self, x_BxTxD, *, deterministic, rngs):
        b, t, d = x_BxTxD.shape
        h, hd = self.num_heads, d // self.num_heads
        q, k, v = jnp.split(self.qkv(x_BxTxD).reshape(b, t, 3 * h, hd), 3, axis=2)
        dropping = not deterministic and self.attn_dropout.rate > 0
        if self.impl == "explicit" or dropping:  # a fused kernel has no dropout on the probabilities
            ctx_BxTxHxK = self._explicit(q, k, v, deterministic=deterministic, rngs=rngs)
        else:
            ctx_BxTxHxK = fused_attention(q, k, v, self.impl, self.precision)
        return self.out(ctx_BxTxHxK.reshape(b, t, d))

    def decode(self, x_Bx1xD, cache, pos):
        """Attention of one position over the cache ``(keys, values)`` with this position's written at ``pos``."""
        b, d = x_Bx1xD.shape[0], x_Bx1xD.shape[-1]
        h, hd = self.num_heads, d // self.num_heads
        q, k, v = jnp.split(self.qkv(x_Bx1xD).reshape(b, 1, 3 * h, hd), 3, axis=2)
        keys_BxLxHxK = jax.lax.dynamic_update_slice_in_dim(cache[0], k.astype(cache[0].dtype), pos, 1)
        vals_BxLxHxK = jax.lax.dynamic_update_slice_in_dim(cache[1], v.astype(cache[1].dtype), pos, 1)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, keys_BxLxHxK, preferred_element_type=jnp.float32,
                            precision=self.precision) * hd**-0.5
        scores = jnp.where(jnp.arange(keys_BxLxHxK.shape[1]) <= pos, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, vals_BxLxHxK, precision=self.precision).reshape(b, 1, d)
        return self.out(out), (keys_BxLxHxK, vals_BxLxHxK)

    def _explicit(self, q, k, v, *, deterministic, rngs):
        t, hd = q.shape[1], q.shape[-1]
        scores_BxHxTxT = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32,
                                    precision=self.precision) * hd**-0.5
        causal_TxT = jnp.tril(jnp.ones((t, t), dtype=bool))
        scores_BxHxTxT = jnp.where(causal_TxT, scores_BxHxTxT, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores_BxHxTxT, axis=-1).astype(v.dtype)
        probs = self.attn_dropout(probs, deterministic=deterministic, rngs=rngs)
        return jnp.einsum("bhqk,bkhd->bqhd", probs, v, precision=self.precision)


def cudnn_supported(q_BxTxHxK) -> bool:
    """Whether cuDNN's flash attention can take these inputs here: a GPU, bf16/fp16, head size <= 128 and % 8."""
    hd = q_BxTxHxK.shape[-1]
    return (jax.default_backend() == "gpu" and q_BxTxHxK.dtype in (jnp.bfloat16, jnp.float16)
            and hd % 8 == 0 and hd <= 128)


def fused_attention(q_BxTxHxK, k_BxTxHxK, v_BxTxHxK, impl: str, precision=None):
    """``jax.nn.dot_product_attention``, causal, scale ``1/sqrt(head size)``: ``B x T x H x K``.

    ``impl``: ``"xla"``, ``"cudnn"`` (raises where cuDNN cannot run it) or ``"auto"`` (cuDNN where
    :func:`cudnn_supported`, else XLA; a cuDNN refusal at trace time falls back to XLA).
    ``precision``: the matmuls' precision (``None``: the backend's default).
    """
    if precision is not None:  # dot_product_attention takes no precision argument: set the default it uses
        with jax.default_matmul_precision(jax.lax.Precision(precision).name.lower()):
            return fused_attention(q_BxTxHxK, k_BxTxHxK, v_BxTxHxK, impl)
    if impl == "auto":
        if cudnn_supported(q_BxTxHxK):
            try:
                return jax.nn.dot_product_attention(q_BxTxHxK, k_BxTxHxK, v_BxTxHxK, is_causal=True,
                                                    implementation="cudnn")
            except (NotImplementedError, RuntimeError, ValueError):  # e.g. an older GPU or cuDNN
                pass
        impl = "xla"
    return jax.nn.dot_product_attention(q_BxTxHxK, k_BxTxHxK, v_BxTxHxK, is_causal=True, implementation=impl)


class Block(nnx.Module):
    """Pre-norm block: ``x + attn(ln1(x))``, then ``x + ffn(ln2(x))``."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.ln1 = nnx.LayerNorm(cfg.d_model, epsilon=cfg.layer_norm_eps, dtype=cfg.dtype, rngs=rngs)
        self.attn = CausalSelfAttention(cfg, rngs=rngs)
        self.ln2 = nnx.LayerNorm(cfg.d_model, epsilon=cfg.layer_norm_eps, dtype=cfg.dtype, rngs=rngs)
        kw = dict(kernel_init=nnx.initializers.xavier_uniform(), dtype=cfg.dtype, precision=cfg.precision, rngs=rngs)
        self.fc1 = nnx.Linear(cfg.d_model, cfg.d_ff, **kw)
        self.fc2 = nnx.Linear(cfg.d_ff, cfg.d_model, **kw)
        self.dropout = nnx.Dropout(cfg.dropout)
        self.act_dropout = nnx.Dropout(cfg.activation_dropout)

    def __call__(self, x_BxTxD, *, deterministic, rngs, states=None, rows_R=None):
        """``states``: an optional dict that receives this block's candidate key states.

        ``rows_R``: flat ``B x T`` positions; after the attention sublayer (which reads every
        position) only these go on, and the result is ``1 x R x D``.
        """
        attn_BxTxD = self.attn(self.ln1(x_BxTxD), deterministic=deterministic, rngs=rngs)
        x_BxTxD = x_BxTxD + self.dropout(attn_BxTxD, deterministic=deterministic, rngs=rngs)
        if rows_R is not None:
            d = x_BxTxD.shape[-1]
            attn_BxTxD, x_BxTxD = (a.reshape(-1, d)[rows_R][None] for a in (attn_BxTxD, x_BxTxD))
        ffn_in_BxTxD = self.ln2(x_BxTxD)
        if states is not None:
            states.update(attn_output=attn_BxTxD, ffn_input_before_ln=x_BxTxD, ffn_input_after_ln=ffn_in_BxTxD)
        hidden = self.act_dropout(jax.nn.relu(self.fc1(ffn_in_BxTxD)), deterministic=deterministic, rngs=rngs)
        return x_BxTxD + self.dropout(self.fc2(hidden), deterministic=deterministic, rngs=rngs)


class TransformerLM(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = AdaptiveInput(cfg.vocab_size, cfg.d_model, cfg.cutoffs, cfg.adaptive_factor,
                                   precision=cfg.precision, rngs=rngs)
        self.embed_scale = math.sqrt(cfg.d_model) if cfg.scale_embedding else 1.0
        self.dropout = nnx.Dropout(cfg.dropout)
        self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.final_ln = (nnx.LayerNorm(cfg.d_model, epsilon=cfg.layer_norm_eps, dtype=cfg.dtype, rngs=rngs)
                         if cfg.final_norm else None)
        self.softmax = AdaptiveSoftmax(
            cfg.vocab_size,
            cfg.d_model,
            cfg.cutoffs,
            cfg.adaptive_factor,
            dropout=cfg.adaptive_softmax_dropout,
            adaptive_input=self.embed if cfg.tie_adaptive_weights else None,
            tie_proj=cfg.tie_adaptive_proj,
            precision=cfg.precision,
            rngs=rngs,
        )

    def __call__(self, tokens_BxT, *, deterministic: bool = True, rngs: nnx.Rngs | None = None, key_type=None,
                 rows_R=None):
        """Hidden states ``B x T x D`` (the softmax input); sows ``key_type`` when given.

        ``rows_R`` (flat ``B x T`` positions): the last block's feed-forward and everything
        after it run only there, and hidden states and keys are ``1 x R x D``.
        """
        return self.decode(self.embed_tokens(tokens_BxT), deterministic=deterministic, rngs=rngs, key_type=key_type,
                           rows_R=rows_R)

    def embed_tokens(self, tokens_BxT):
        """Scaled adaptive-input embeddings plus sinusoidal positions: ``B x T x D`` (in the compute dtype)."""
        t = tokens_BxT.shape[1]
        positions_TxD = sinusoidal_positions(t, self.cfg.d_model, self.cfg.position_offset)
        x_BxTxD = self.embed_scale * self.embed(tokens_BxT) + positions_TxD
        return x_BxTxD if self.cfg.dtype is None else x_BxTxD.astype(self.cfg.dtype)

    def decode(self, x_BxTxD, *, deterministic: bool = True, rngs: nnx.Rngs | None = None, key_type=None,
               rows_R=None):
        """The Transformer stack on embedded inputs; sows ``key_type`` (one name or a tuple) when given.

        Returns float32 whatever the compute dtype (the softmax input), and sows float32 states.
        """
        key_types = _key_types(key_type)
        if self.cfg.dtype is not None:
            x_BxTxD = x_BxTxD.astype(self.cfg.dtype)
        x = self.dropout(x_BxTxD, deterministic=deterministic, rngs=rngs)
        states: dict | None = {} if key_types else None
        for i, block in enumerate(self.blocks):
            last = i == len(self.blocks) - 1
            if self.cfg.remat and not (last and (states is not None or rows_R is not None)):
                x = _remat_block(block, x, rngs, deterministic)
            else:
                x = block(x, deterministic=deterministic, rngs=rngs, states=states if last else None,
                          rows_R=rows_R if last else None)
        if states is not None:
            states["block_output"] = x
        if self.final_ln is not None:
            x = self.final_ln(x)
        if self.cfg.dtype is not None:
            x = x.astype(jnp.float32)
        if states is not None:
            states["final_output"] = x
            for name in key_types:
                self.sow(nnx.Intermediate, name, states[name].astype(jnp.float32))
        return x

    def empty_cache(self, batch: int, max_len: int):
        """The attention cache :meth:`decode_step` fills: per layer ``(keys, values)``, ``B x max_len x H x hd``."""
        cfg = self.cfg
        dtype = jnp.float32 if cfg.dtype is None else cfg.dtype
        zeros = jnp.zeros((batch, max_len, cfg.num_heads, cfg.d_model // cfg.num_heads), dtype)
        return tuple((zeros, zeros) for _ in range(cfg.num_layers))

    def decode_step(self, token_B, cache, pos):
        """One position against the cached keys and values: ``(hidden Bx1xD float32, states, cache)``.

        The same layers and numerics as the full forward's explicit attention; ``states`` holds
        every key type at this position; positions after ``pos`` are masked out.
        """
        cfg, max_len = self.cfg, cache[0][0].shape[1]
        positions_LxD = jnp.asarray(sinusoidal_positions(max_len, cfg.d_model, cfg.position_offset))
        x = self.embed_scale * self.embed(token_B[:, None]) + positions_LxD[pos]
        if cfg.dtype is not None:
            x = x.astype(cfg.dtype)
        new_cache, states = [], {}
        for i, block in enumerate(self.blocks):
            attn_out, layer_cache = block.attn.decode(block.ln1(x), cache[i], pos)
            new_cache.append(layer_cache)
            x = x + attn_out
            ffn_in = block.ln2(x)
            if i == len(self.blocks) - 1:
                states.update(attn_output=attn_out, ffn_input_before_ln=x, ffn_input_after_ln=ffn_in)
            x = x + block.fc2(jax.nn.relu(block.fc1(ffn_in)))
        states["block_output"] = x
        if self.final_ln is not None:
            x = self.final_ln(x)
        x = x.astype(jnp.float32)
        states["final_output"] = x
        return x, states, tuple(new_cache)

    def target_log_probs(self, h_BxTxD, targets_BxT, *, capacities=None, deterministic=True, rngs=None):
        return self.softmax.target_log_probs(
            h_BxTxD, targets_BxT, self.embed, capacities=capacities, deterministic=deterministic, rngs=rngs
        )

    def full_log_probs(self, h_BxTxD, *, deterministic=True, rngs=None):
        return self.softmax.full_log_probs(h_BxTxD, self.embed, deterministic=deterministic, rngs=rngs)

    def head_features(self, h_BxTxD):
        """The head softmax's summary per position (what adaptive retrieval gates on)."""
        return self.softmax.head_features(h_BxTxD, self.embed)


@nnx.remat(static_argnums=3)
def _remat_block(block: Block, x_BxTxD, rngs, deterministic: bool):
    """``block(x)`` whose activations are recomputed in the backward pass (``ModelConfig.remat``)."""
    return block(x_BxTxD, deterministic=deterministic, rngs=rngs)


def _key_types(key_type) -> tuple[str, ...]:
    """``key_type`` (``None``, one name or a tuple of names) as a tuple of distinct, known names."""
    names = () if key_type is None else (key_type,) if isinstance(key_type, str) else tuple(key_type)
    for name in names:
        if name not in KEY_TYPES:
            raise InputError(f"unknown key type {name!r}; choose one of {KEY_TYPES}")
    return tuple(dict.fromkeys(names))


def forward_states(model: TransformerLM, tokens_BxT, key_type, rows_R=None):
    """Deterministic forward: ``(hidden states, {key type: states})``, the states via ``sow``/``capture``.

    With ``rows_R`` both are ``1 x R x D`` at those flat positions (see ``TransformerLM``).
    """

    def run(m, tokens):
        return m(tokens, key_type=key_type, rows_R=rows_R)

    hidden, inter = nnx.capture(run, nnx.Intermediate)(model, tokens_BxT)
    return hidden, {name: inter[name].get_value()[0] for name in _key_types(key_type)}


def forward_with_keys(model: TransformerLM, tokens_BxT, targets_BxT, key_type, capacities=None):
    """Deterministic forward: ``(target log-probs B x T, keys B x T x D)``, keys via ``sow``/``capture``.

    ``key_type`` may be a tuple of key types: the keys are then a tuple of ``B x T x D``
    arrays in that order, all from the same forward pass.
    """
    hidden, keys = forward_states(model, tokens_BxT, key_type)
    logp_BxT = model.target_log_probs(hidden, targets_BxT, capacities=capacities)
    if isinstance(key_type, str):
        return logp_BxT, keys[key_type]
    return logp_BxT, tuple(keys[name] for name in key_type)


def count_params(cfg: ModelConfig) -> int:
    """Exact number of parameters, computed abstractly (nothing is allocated)."""
    abstract = nnx.eval_shape(lambda: TransformerLM(cfg, rngs=nnx.Rngs(0)))
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(nnx.state(abstract, nnx.Param))))
