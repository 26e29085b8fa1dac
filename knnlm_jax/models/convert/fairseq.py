"""Convert a fairseq ``transformer_lm`` checkpoint into a run directory of this project.

The paper's base LM is Baevski & Auli's WikiText-103 model (fairseq arch
``transformer_lm_wiki103``: adaptive input and softmax, tied, cutoffs 20000/60000, factor 4,
16 pre-norm layers, d 1024, 8 heads, FFN 4096, sinusoidal positions, no final LayerNorm)::

    python -m knnlm_jax.models.convert.fairseq --checkpoint model.pt --dict dict.txt --out runs/wt103-fairseq \\
        --data_dir /path/to/wikitext-103
    python build.py --workdir runs/wt103-fairseq
    python evaluate.py --workdir runs/wt103-fairseq --datastore train --split test

Reading fairseq's files is :mod:`knnlm_jax.models.convert.fairseq_checkpoint` (a ``.pt`` file needs PyTorch, not
fairseq). The mapping here works on plain NumPy: a fairseq state
dict (name -> array) and its model args (a dict) become this project's config, vocabulary
and parameters (:func:`convert`); :func:`write_run` (with JAX) saves them as a run directory
(``config.json``, ``vocab.txt``, ``best/<step>``) that ``build.py`` and ``evaluate.py`` load.

What fairseq does that the conversion reproduces (fairseq 0.12.2 sources):

- ids: fairseq's ``Dictionary`` puts ``<s> <pad> </s> <unk>`` first (ids 0-3), then the
  ``dict.txt`` words in file order, the same order as :class:`knnlm_jax.data.vocab.Vocab`: no
  permutation is needed.
- positions: ``make_positions`` numbers tokens from ``padding_idx + 1`` (= 2), and the
  sinusoid table is ``[sin | cos]`` halves with frequencies ``exp(-i log(10000) / (half - 1))``,
  this project's formula: ``ModelConfig.position_offset = 2`` selects fairseq's rows.
- LayerNorm epsilon 1e-5 (PyTorch's; flax's default is 1e-6): ``ModelConfig.layer_norm_eps``.
- embeddings scaled by ``sqrt(d)`` unless ``no_scale_embedding``; adaptive input band ``i``
  is ``embeddings.i.0`` (an ``nn.Embedding``) then ``embeddings.i.1`` (a bias-free
  ``nn.Linear(dim_i, d)``).
- attention: separate ``q_proj``/``k_proj``/``v_proj`` (with biases; older checkpoints'
  ``in_proj_weight`` is split as fairseq's upgrade does), ``q`` scaled by ``head_dim ** -0.5``,
  ``out_proj``; pre-norm layers (``self_attn_layer_norm``, ``final_layer_norm``), ReLU ``fc1``/``fc2``.
- adaptive softmax: the head scores band 0's words (tied: ``x @ embeddings.0.0.weight.T``)
  followed by one cluster row per tail (``head.class_proj``); a tail projects with
  band ``i+1``'s input projection (``tie_adaptive_proj``) or its own ``tail.i.0``, then scores
  band ``i+1``'s embeddings (tied) or ``tail.i.2``.
- a decoder ``version <= 2`` means no final LayerNorm, as fairseq's upgrade says.
- the architecture is ``args.arch`` (fairseq < 0.10) or ``cfg.model._name`` (fairseq >= 0.10).
- ``tokens_per_sample`` (the window the model was trained on, which sets the run's windows) is a
  task setting that no architecture defines: it comes from the checkpoint or ``--tokens-per-sample``,
  never from a default.

One numeric difference remains: fairseq computes the sinusoid table in float32 and this
project in float64 (then rounds to float32): over the positions of a 3072-token window
(d 1024) the tables differ by at most 3.2e-4 (4.6e-5 over the first 512), next to token
embeddings scaled by sqrt(d) = 32.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile

import numpy as np

from knnlm_jax.core.hashing import file_sha256
from knnlm_jax.models.convert.fairseq_checkpoint import ConvertError, load_checkpoint, read_dict
from knnlm_jax.data.vocab import SPECIALS, Vocab

FAIRSEQ_PAD = 1  # fairseq Dictionary: <s>=0, <pad>=1, </s>=2, <unk>=3 (the same as knnlm_jax.data.vocab)
LAYER_NORM_EPS = 1e-5  # fairseq.modules.LayerNorm -> torch.nn.LayerNorm's default

# fairseq's defaults for the fields that matter here (base_lm_architecture, fairseq 0.12.2)
BASE_DEFAULTS = dict(
    decoder_attention_heads=8, adaptive_input=False, adaptive_input_factor=4, adaptive_input_cutoff=None,
    adaptive_softmax_cutoff=None, adaptive_softmax_factor=4, tie_adaptive_weights=False, tie_adaptive_proj=False,
    no_decoder_final_norm=False, no_scale_embedding=False, activation_fn="relu", decoder_learned_pos=False,
    no_token_positional_embeddings=False, layernorm_embedding=False, share_decoder_input_output_embed=False,
    character_embeddings=False, cross_self_attention=False, scale_fc=False, scale_attn=False, scale_heads=False,
    scale_resids=False, dropout=0.1, attention_dropout=0.0, activation_dropout=0.0, relu_dropout=0.0,
    adaptive_softmax_dropout=0.0,
)
# ... and what the paper's architecture sets first (transformer_lm_baevski_wiki103 -> transformer_lm_big)
WIKI103_DEFAULTS = dict(
    decoder_layers=16, decoder_attention_heads=8, dropout=0.3, adaptive_input=True, tie_adaptive_weights=True,
    adaptive_input_cutoff="20000,60000", adaptive_softmax_cutoff="20000,60000", adaptive_softmax_dropout=0.2,
    attention_dropout=0.1, activation_dropout=0.1, no_decoder_final_norm=True, tie_adaptive_proj=True,
    decoder_embed_dim=1024, decoder_ffn_embed_dim=4096,
)
ARCH_DEFAULTS = {"transformer_lm_wiki103": WIKI103_DEFAULTS, "transformer_lm_baevski_wiki103": WIKI103_DEFAULTS}


# ---------------------------------------------------------------------------------
# model args


def resolve_args(args: dict) -> dict:
    """Fill what fairseq's architecture functions would (wiki103 and base defaults, old-name upgrades)."""
    args = {k: v for k, v in args.items() if v is not None}
    if "arch" not in args and "_name" in args:  # fairseq >= 0.10 names the architecture cfg.model._name
        args["arch"] = args["_name"]
    if "no_tie_adaptive_proj" in args:  # base_lm_architecture's backward compatibility for old checkpoints
        args["no_decoder_final_norm"] = True
        if args["no_tie_adaptive_proj"] is False:
            args["tie_adaptive_proj"] = True
    if "decoder_final_norm" in args:
        args["no_decoder_final_norm"] = not args["decoder_final_norm"]
    for defaults in (ARCH_DEFAULTS.get(str(args.get("arch")), {}), BASE_DEFAULTS):
        for key, value in defaults.items():
            args.setdefault(key, value)
    return args


def trained_window(args: dict, given: int | None = None) -> int:
    """The ``tokens_per_sample`` the model was trained on: the (resolved) args', or ``given``
    (``--tokens-per-sample``) where they have none; a disagreement is refused."""
    value = args.get("tokens_per_sample")
    if value is None:
        if given is None:
            raise ConvertError("the checkpoint's args have no tokens_per_sample (the window the model was trained on): "
                               "pass --tokens-per-sample N (3072 for the paper's WikiText-103 model)")
        value = given
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or value <= 0 or value != int(value):
        raise ConvertError(f"tokens_per_sample {value!r} is not a positive number of tokens")
    window = int(value)
    if given is not None and given != window:
        raise ConvertError(f"--tokens-per-sample {given} differs from the checkpoint's tokens_per_sample {window}")
    return window


def _cutoffs(value) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return tuple(int(c) for c in value.replace(" ", "").split(",") if c)
    return tuple(int(c) for c in value)


# ---------------------------------------------------------------------------------
# the state dict


def upgrade_state_dict(state: dict) -> dict:
    """fairseq's own upgrades of older checkpoints (``TransformerDecoder`` / ``MultiheadAttention``
    ``upgrade_state_dict_named``): ``in_proj_weight`` split into q/k/v, ``layer_norms.N`` renamed,
    the old sinusoid buffer dropped, ``embed_out`` renamed. Returns a new dict."""
    state = dict(state)
    state.pop("decoder.embed_positions.weights", None)
    for key in [k for k in state if k.endswith("in_proj_weight")]:
        prefix = key[: -len("in_proj_weight")]
        w = state.pop(key)
        dim = w.shape[0] // 3
        state[prefix + "q_proj.weight"], state[prefix + "k_proj.weight"], state[prefix + "v_proj.weight"] = (
            w[:dim], w[dim : 2 * dim], w[2 * dim :])
        if prefix + "in_proj_bias" in state:
            b = state.pop(prefix + "in_proj_bias")
            state[prefix + "q_proj.bias"], state[prefix + "k_proj.bias"], state[prefix + "v_proj.bias"] = (
                b[:dim], b[dim : 2 * dim], b[2 * dim :])
    names = {"0": "self_attn_layer_norm", "1": "encoder_attn_layer_norm", "2": "final_layer_norm"}
    for key in [k for k in state if re.fullmatch(r"decoder\.layers\.\d+\.layer_norms\.[012]\.(weight|bias)", k)]:
        layer, old, what = re.fullmatch(r"decoder\.layers\.(\d+)\.layer_norms\.(\d)\.(\w+)", key).groups()
        state[f"decoder.layers.{layer}.{names[old]}.{what}"] = state.pop(key)
    if "decoder.output_projection.weight" not in state and "decoder.embed_out" in state:
        state["decoder.output_projection.weight"] = state.pop("decoder.embed_out")
    return state


class _Reader:
    """Takes arrays out of a state dict by name, checking shapes, and remembers what was used."""

    def __init__(self, state: dict):
        self.state = state
        self.used: set[str] = set()

    def __contains__(self, name):
        return name in self.state

    def take(self, name: str, shape: tuple | None = None) -> np.ndarray:
        if name not in self.state:
            raise ConvertError(f"the checkpoint has no {name}")
        a = np.asarray(self.state[name])
        if shape is not None and tuple(a.shape) != tuple(shape):
            raise ConvertError(f"{name} has shape {tuple(a.shape)}, expected {tuple(shape)}")
        self.used.add(name)
        return a.astype(np.float32)

    def same(self, name: str, reference: np.ndarray, what: str) -> None:
        """A tied weight's second name: absent, or equal to the weight it is tied to."""
        if name in self.state:
            if not np.array_equal(np.asarray(self.state[name], np.float32), reference):
                raise ConvertError(f"{name} differs from {what}: the checkpoint is not tied as its args say")
            self.used.add(name)

    def unused(self) -> list[str]:
        ignorable = re.compile(r".*(\._float_tensor|\.version)$")
        return sorted(k for k in self.state if k not in self.used and not ignorable.fullmatch(k))


def architecture(state: dict, args: dict) -> dict:
    """This project's model fields for a (upgraded) fairseq state dict and its (resolved) args."""
    if "decoder.layers.0.fc1.weight" not in state:
        raise ConvertError("not a fairseq transformer_lm checkpoint (no decoder.layers.0.fc1.weight)")
    layers = 0
    while f"decoder.layers.{layers}.fc1.weight" in state:
        layers += 1
    d_ff, d = np.shape(state["decoder.layers.0.fc1.weight"])
    heads = int(args["decoder_attention_heads"])
    if d % heads:
        raise ConvertError(f"d {d} is not divisible by decoder_attention_heads {heads}")
    unsupported = [
        (args["activation_fn"] != "relu", f"activation_fn {args['activation_fn']!r} (only relu)"),
        (not args.get("decoder_normalize_before", True), "post-norm layers (decoder_normalize_before false)"),
        (args["decoder_learned_pos"] or "decoder.embed_positions.weight" in state, "learned positions"),
        (args["no_token_positional_embeddings"], "no positional embeddings"),
        (args["layernorm_embedding"] or "decoder.layernorm_embedding.weight" in state, "layernorm_embedding"),
        (args["character_embeddings"], "character embeddings"),
        (args["cross_self_attention"], "cross_self_attention"),
        (any(args[k] for k in ("scale_fc", "scale_attn", "scale_heads", "scale_resids")), "NormFormer scaling"),
        ("decoder.project_in_dim.weight" in state or "decoder.project_out_dim.weight" in state,
         "project_in_dim / project_out_dim (decoder_input_dim or decoder_output_dim != decoder_embed_dim)"),
    ]
    for bad, what in unsupported:
        if bad:
            raise ConvertError(f"unsupported fairseq model: {what}")
    adaptive_input = "decoder.embed_tokens.embeddings.0.0.weight" in state
    adaptive_softmax = "decoder.adaptive_softmax.head.class_proj.weight" in state or (
        "decoder.adaptive_softmax.head.weight" in state)
    if adaptive_input:
        sizes, dims = [], []
        while f"decoder.embed_tokens.embeddings.{len(sizes)}.0.weight" in state:
            size, dim = np.shape(state[f"decoder.embed_tokens.embeddings.{len(sizes)}.0.weight"])
            sizes.append(int(size))
            dims.append(int(dim))
        cutoffs = tuple(int(c) for c in np.cumsum(sizes)[:-1])
        vocab_size = int(sum(sizes))
        factor = args["adaptive_input_factor"]
        if dims[0] != d or any(dim != int(d // factor**i) for i, dim in enumerate(dims)):
            raise ConvertError(f"adaptive input band sizes {dims} are not d {d} // {factor}**i")
        if _cutoffs(args["adaptive_input_cutoff"]) not in (cutoffs, cutoffs + (vocab_size,)):
            raise ConvertError(f"adaptive_input_cutoff {args['adaptive_input_cutoff']} does not match the "
                               f"embeddings' bands {cutoffs}")
    elif "decoder.embed_tokens.weight" in state:
        vocab_size, dim = np.shape(state["decoder.embed_tokens.weight"])
        cutoffs, factor = (), 4
        if dim != d:
            raise ConvertError(f"token embeddings of size {dim} for d {d} (project_in_dim) are not supported")
    else:
        raise ConvertError("the checkpoint has no decoder.embed_tokens weights")
    if adaptive_softmax != adaptive_input:
        raise ConvertError("adaptive input without adaptive softmax (or the reverse) is not supported: "
                           "this project's model uses one set of bands for both")
    tied = bool(args["tie_adaptive_weights"]) if adaptive_softmax else bool(
        args["share_decoder_input_output_embed"] or "decoder.output_projection.weight" not in state)
    if adaptive_softmax:
        if _cutoffs(args["adaptive_softmax_cutoff"]) not in (cutoffs, cutoffs + (vocab_size,)):
            raise ConvertError(f"adaptive_softmax_cutoff {args['adaptive_softmax_cutoff']} differs from the "
                               f"adaptive input's {cutoffs}: not supported")
        if float(args["adaptive_softmax_factor"]) != float(factor):
            raise ConvertError(f"adaptive_softmax_factor {args['adaptive_softmax_factor']} differs from "
                               f"adaptive_input_factor {factor}: not supported")
        if tied != ("decoder.adaptive_softmax.head.class_proj.weight" in state):
            raise ConvertError("tie_adaptive_weights does not match the adaptive softmax's head in the checkpoint")
    version = float(np.asarray(state.get("decoder.version", [1.0])).reshape(-1)[0])
    final_norm = "decoder.layer_norm.weight" in state and version > 2  # fairseq: version <= 2 has none
    if version > 2 and "decoder.layer_norm.weight" not in state and not args["no_decoder_final_norm"]:
        raise ConvertError("the args ask for a final LayerNorm (no_decoder_final_norm false) that the "
                           "checkpoint does not have")
    factor_int = int(factor)
    if factor_int != factor:
        raise ConvertError(f"adaptive factor {factor} is not an integer")
    return dict(
        vocab_size=int(vocab_size), num_layers=layers, d_model=int(d), num_heads=heads, d_ff=int(d_ff),
        cutoffs=cutoffs, adaptive_factor=factor_int, tie_adaptive_weights=tied,
        tie_adaptive_proj=bool(tied and adaptive_softmax and args["tie_adaptive_proj"]),
        final_norm=bool(final_norm), scale_embedding=not args["no_scale_embedding"],
        position_offset=FAIRSEQ_PAD + 1, layer_norm_eps=LAYER_NORM_EPS,
        dropout=float(args["dropout"]), attention_dropout=float(args["attention_dropout"]),
        activation_dropout=float(args["activation_dropout"] or args["relu_dropout"] or 0.0),
        adaptive_softmax_dropout=float(args["adaptive_softmax_dropout"]),
    )


def convert_params(state: dict, arch: dict) -> dict[tuple, np.ndarray]:
    """The fairseq weights as this project's parameters: ``{nnx path tuple: float32 array}``.

    Paths are those of ``nnx.state(TransformerLM(cfg), nnx.Param)`` (e.g.
    ``('blocks', 0, 'attn', 'qkv', 'kernel')``); flax kernels are PyTorch weights transposed.
    Every array of the state dict must be used (buffers and tied duplicates aside).
    """
    r = _Reader(state)
    d, ff, layers = arch["d_model"], arch["d_ff"], arch["num_layers"]
    vocab_size, cutoffs, factor = arch["vocab_size"], arch["cutoffs"], arch["adaptive_factor"]
    edges = (0, *cutoffs, vocab_size)
    dims = [int(d // factor**i) for i in range(len(edges) - 1)]
    p: dict[tuple, np.ndarray] = {}
    emb, proj = [], []
    if cutoffs or "decoder.embed_tokens.embeddings.0.0.weight" in state:
        for i, dim in enumerate(dims):
            emb.append(r.take(f"decoder.embed_tokens.embeddings.{i}.0.weight", (edges[i + 1] - edges[i], dim)))
            proj.append(r.take(f"decoder.embed_tokens.embeddings.{i}.1.weight", (d, dim)))  # nn.Linear(dim, d)
    else:  # a plain nn.Embedding: one band whose projection is the identity
        emb.append(r.take("decoder.embed_tokens.weight", (vocab_size, d)))
        proj.append(np.eye(d, dtype=np.float32))
    for i in range(len(dims)):
        p["embed", "embeddings", i, "embedding"] = emb[i]
        p["embed", "projections", i, "kernel"] = proj[i].T
    for i in range(layers):
        pre = f"decoder.layers.{i}."
        qkv_w = [r.take(pre + f"self_attn.{n}_proj.weight", (d, d)) for n in "qkv"]
        qkv_b = [r.take(pre + f"self_attn.{n}_proj.bias", (d,)) for n in "qkv"]
        block = {
            ("ln1", "scale"): r.take(pre + "self_attn_layer_norm.weight", (d,)),
            ("ln1", "bias"): r.take(pre + "self_attn_layer_norm.bias", (d,)),
            ("attn", "qkv", "kernel"): np.concatenate([w.T for w in qkv_w], axis=1),  # d x 3d: [q | k | v]
            ("attn", "qkv", "bias"): np.concatenate(qkv_b),
            ("attn", "out", "kernel"): r.take(pre + "self_attn.out_proj.weight", (d, d)).T,
            ("attn", "out", "bias"): r.take(pre + "self_attn.out_proj.bias", (d,)),
            ("ln2", "scale"): r.take(pre + "final_layer_norm.weight", (d,)),
            ("ln2", "bias"): r.take(pre + "final_layer_norm.bias", (d,)),
            ("fc1", "kernel"): r.take(pre + "fc1.weight", (ff, d)).T,
            ("fc1", "bias"): r.take(pre + "fc1.bias", (ff,)),
            ("fc2", "kernel"): r.take(pre + "fc2.weight", (d, ff)).T,
            ("fc2", "bias"): r.take(pre + "fc2.bias", (d,)),
        }
        p.update({("blocks", i, *k): v for k, v in block.items()})
    if arch["final_norm"]:
        p["final_ln", "scale"] = r.take("decoder.layer_norm.weight", (d,))
        p["final_ln", "bias"] = r.take("decoder.layer_norm.bias", (d,))
    elif "decoder.layer_norm.weight" in state:  # a version <= 2 decoder: fairseq ignores it too
        r.used.update({"decoder.layer_norm.weight", "decoder.layer_norm.bias"})
    n_tails = len(edges) - 2
    sm = "decoder.adaptive_softmax."
    if not cutoffs and "decoder.embed_tokens.embeddings.0.0.weight" not in state:  # plain output projection
        if arch["tie_adaptive_weights"]:
            r.same("decoder.output_projection.weight", emb[0], "decoder.embed_tokens.weight")
        else:
            p["softmax", "head_words", "kernel"] = r.take("decoder.output_projection.weight", (vocab_size, d)).T
    elif arch["tie_adaptive_weights"]:
        r.same(sm + "head.word_proj.weight", emb[0], "decoder.embed_tokens.embeddings.0.0.weight")
        if n_tails:
            p["softmax", "head_classes", "kernel"] = r.take(sm + "head.class_proj.weight", (n_tails, d)).T
        for i in range(n_tails):
            r.same(sm + f"tail.{i}.2.weight", emb[i + 1], f"decoder.embed_tokens.embeddings.{i + 1}.0.weight")
            if arch["tie_adaptive_proj"]:  # TiedLinear(band i+1's projection, transpose=True)
                r.same(sm + f"tail.{i}.0.weight", proj[i + 1], f"decoder.embed_tokens.embeddings.{i + 1}.1.weight")
            else:  # nn.Linear(d, dim_{i+1})
                p["softmax", "tail_proj", i, "kernel"] = r.take(sm + f"tail.{i}.0.weight", (dims[i + 1], d)).T
    else:
        p["softmax", "head_words", "kernel"] = r.take(sm + "head.weight", (edges[1] + n_tails, d)).T
        for i in range(n_tails):
            p["softmax", "tail_proj", i, "kernel"] = r.take(sm + f"tail.{i}.0.weight", (dims[i + 1], d)).T
            size = edges[i + 2] - edges[i + 1]
            p["softmax", "tail_out", i, "kernel"] = r.take(sm + f"tail.{i}.2.weight", (size, dims[i + 1])).T
    unused = r.unused()
    if unused:
        more = f" (and {len(unused) - 3} more)" if len(unused) > 3 else ""
        raise ConvertError(f"unsupported fairseq parameters: {', '.join(unused[:3])}{more}")
    return p


def convert(state: dict, args: dict, vocab: Vocab) -> tuple[dict, dict[tuple, np.ndarray]]:
    """``(model fields, parameters)`` of a fairseq state dict (name -> array), its model args
    and its dictionary; the model fields are :class:`knnlm_jax.models.transformer.ModelConfig` fields."""
    state = upgrade_state_dict(state)
    arch = architecture(state, resolve_args(args))
    if arch["vocab_size"] != len(vocab):
        raise ConvertError(f"the dictionary has {len(vocab)} words ({len(SPECIALS)} specials + "
                           f"{len(vocab) - len(SPECIALS)} lines) but the checkpoint's embeddings have "
                           f"{arch['vocab_size']} rows: not this checkpoint's dict.txt")
    return arch, convert_params(state, arch)


# ---------------------------------------------------------------------------------
# JAX side: parameters into the model, and the run directory


def model_config(arch: dict, **speed):
    """:class:`ModelConfig` of converted model fields (``speed``: attention_impl, compute_dtype, remat)."""
    from knnlm_jax.models.transformer import ModelConfig

    return ModelConfig(**{**arch, "cutoffs": tuple(arch["cutoffs"]), **speed})


def params_state(cfg, params: dict[tuple, np.ndarray]):
    """An ``nnx.State`` of the model's parameters filled with ``params``; every parameter must be given."""
    import jax.numpy as jnp
    from flax import nnx

    from knnlm_jax.models.steps import abstract_model

    _, abstract = abstract_model(cfg)
    flat = nnx.to_flat_state(abstract)
    expected = {tuple(path): v.get_value() for path, v in flat}
    missing = sorted(map(str, set(expected) - set(params)))
    extra = sorted(map(str, set(params) - set(expected)))
    if missing or extra:
        raise ConvertError(f"converted parameters do not fit the model: missing {missing[:3]}, extra {extra[:3]}")
    for path, shape_dtype in expected.items():
        if tuple(params[path].shape) != tuple(shape_dtype.shape):
            raise ConvertError(f"parameter {path}: shape {params[path].shape}, the model has {shape_dtype.shape}")
    for path, v in flat:
        v.set_value(jnp.asarray(params[tuple(path)], dtype=v.get_value().dtype))
    return nnx.from_flat_state(flat)


def build_model(cfg, params: dict[tuple, np.ndarray]):
    """A :class:`TransformerLM` holding the converted parameters."""
    from flax import nnx

    from knnlm_jax.models.steps import abstract_model

    graphdef, _ = abstract_model(cfg)
    return nnx.merge(graphdef, params_state(cfg, params))


def run_config(arch: dict, vocab: Vocab, *, tokens_per_sample: int, data_dir: str = "",
               compute_dtype: str = "float32", source: dict | None = None) -> dict:
    """The run's ``config.json``: the ``wt103`` config with the converted model's fields and windows
    for its ``tokens_per_sample`` (see :func:`trained_window`)."""
    from knnlm_jax.configs import get_config

    config = get_config("wt103").to_dict()
    config.update({k: (list(v) if isinstance(v, tuple) else v) for k, v in arch.items()})
    config.update(compute_dtype=compute_dtype, data_dir=data_dir, vocab_size=len(vocab))
    if tokens_per_sample != config["tokens_per_sample"]:
        # windows the model was trained for: build half-context windows, evaluate with the last 512 scored
        config.update(tokens_per_sample=int(tokens_per_sample), eval_window=int(tokens_per_sample),
                      eval_context=max(int(tokens_per_sample) - 512, int(tokens_per_sample) // 2))
    config["derived"] = {"vocab_size": len(vocab), "corpus": data_dir, "fairseq": dict(source or {})}
    return config


def write_run(out: str, config: dict, vocab: Vocab, cfg, params: dict[tuple, np.ndarray], step: int = 0) -> str:
    """Write ``out/`` (``config.json``, ``vocab.txt``, ``best/<step>``) as train.py leaves a run.

    Written under a temporary name beside ``out`` and renamed when complete; an existing
    non-empty ``out`` is refused.
    """
    from knnlm_jax.core.checkpoint import Checkpointer

    out = os.path.abspath(out)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ConvertError(f"{out} already exists: choose another --out or remove it")
    state = params_state(cfg, params)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.", dir=parent)
    try:
        ckpt = Checkpointer(os.path.join(tmp, "best"), max_to_keep=1)
        ckpt.save(int(step), {"params": state}, {"source": "fairseq", **config["derived"].get("fairseq", {})})
        ckpt.close()
        vocab.save(os.path.join(tmp, "vocab.txt"))
        with open(os.path.join(tmp, "config.json"), "w") as f:  # last: only now does it look like a run
            json.dump(config, f, indent=2)
        if os.path.isdir(out):
            os.rmdir(out)  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m knnlm_jax.models.convert.fairseq",
        description="Convert a fairseq transformer_lm checkpoint (e.g. the paper's WikiText-103 model) into a "
                    "run directory for build.py and evaluate.py.")
    parser.add_argument("--checkpoint", required=True, help="fairseq model.pt (needs PyTorch), or a .npz copy")
    parser.add_argument("--dict", required=True, dest="dict_path", help="the checkpoint's dict.txt")
    parser.add_argument("--out", required=True, help="the run directory to create (must not exist)")
    parser.add_argument("--data_dir", "--data-dir", default="",
                        help="the WikiText-103 directory build.py and evaluate.py read by default (else pass "
                             "--data_dir to them)")
    parser.add_argument("--compute-dtype", default="float32", choices=("float32", "bfloat16"),
                        help="the run's compute_dtype (float32: fairseq's numerics, matmuls at full float32 "
                             "precision; --set overrides it later)")
    parser.add_argument("--tokens-per-sample", "--tokens_per_sample", type=int, default=None,
                        help="the window the model was trained on, where the checkpoint's args do not say "
                             "(3072 for the paper's WikiText-103 model); it sets the run's windows")
    args = parser.parse_args(argv)
    prog = "fairseq_convert"
    try:
        if args.data_dir and not os.path.isdir(args.data_dir):
            raise ConvertError(f"--data_dir {args.data_dir}: no such directory")
        if not os.path.isfile(args.dict_path):
            raise ConvertError(f"--dict {args.dict_path}: no such file")
        out = os.path.abspath(args.out)
        if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
            raise ConvertError(f"--out {args.out} already exists: choose another or remove it")
        vocab = read_dict(args.dict_path)
        state, fairseq_args, num_updates = load_checkpoint(args.checkpoint)
        resolved = resolve_args(fairseq_args)
        window = trained_window(resolved, args.tokens_per_sample)
        arch, params = convert(state, fairseq_args, vocab)
        source = dict(checkpoint=os.path.abspath(args.checkpoint), sha256=file_sha256(args.checkpoint),
                      arch=str(resolved.get("arch", "")), num_updates=num_updates)
        data_dir = os.path.abspath(args.data_dir) if args.data_dir else ""
        config = run_config(arch, vocab, tokens_per_sample=window, data_dir=data_dir,
                            compute_dtype=args.compute_dtype, source=source)
        cfg = model_config(arch, attention_impl=config["attention_impl"], compute_dtype=args.compute_dtype)
        write_run(out, config, vocab, cfg, params, step=num_updates)
    except (ConvertError, OSError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    n_params = sum(int(np.prod(a.shape)) for a in params.values())
    print(f"{out}: {arch['num_layers']} layers, d {arch['d_model']}, {arch['num_heads']} heads, FFN {arch['d_ff']}, "
          f"cutoffs {list(arch['cutoffs'])}, {len(vocab)} words, {n_params:,} parameters; step {num_updates}; "
          f"tokens_per_sample {window}")
    if not data_dir:
        print("no --data_dir given: pass --data_dir /path/to/wikitext-103 to build.py and evaluate.py")
    return 0


if __name__ == "__main__":
    sys.exit(main())
