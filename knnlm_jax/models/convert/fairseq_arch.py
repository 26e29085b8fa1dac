"""A fairseq ``transformer_lm``'s model args and state dict shapes as this project's model fields.

Plain NumPy (no JAX, no PyTorch): :func:`resolve_args` fills what fairseq's architecture
functions would, :func:`architecture` reads the model's shape off the (upgraded) state dict and
refuses what this project's model cannot reproduce. Which fairseq behaviours are reproduced is
listed in :mod:`knnlm_jax.models.convert.fairseq`.
"""

from __future__ import annotations

import numpy as np

from knnlm_jax.models.convert.fairseq_checkpoint import ConvertError

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
# the architecture


def architecture(state: dict, args: dict) -> dict:
    """This project's model fields for a (upgraded) fairseq state dict and its (resolved) args."""
    layers, d, d_ff, heads = _decoder_shape(state, args)
    _refuse_unsupported(state, args)
    adaptive_input = "decoder.embed_tokens.embeddings.0.0.weight" in state
    if adaptive_input:
        vocab_size, cutoffs, factor = _adaptive_input_bands(state, args, d)
    else:
        vocab_size, cutoffs, factor = _plain_embeddings(state, d)
    tied, adaptive_softmax = _output_layer(state, args, adaptive_input, vocab_size, cutoffs, factor)
    final_norm = _final_norm(state, args)
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


def _decoder_shape(state: dict, args: dict) -> tuple[int, int, int, int]:
    """``(layers, d, d_ff, heads)`` of the decoder's layers."""
    if "decoder.layers.0.fc1.weight" not in state:
        raise ConvertError("not a fairseq transformer_lm checkpoint (no decoder.layers.0.fc1.weight)")
    layers = 0
    while f"decoder.layers.{layers}.fc1.weight" in state:
        layers += 1
    d_ff, d = np.shape(state["decoder.layers.0.fc1.weight"])
    heads = int(args["decoder_attention_heads"])
    if d % heads:
        raise ConvertError(f"d {d} is not divisible by decoder_attention_heads {heads}")
    return layers, d, d_ff, heads


def _refuse_unsupported(state: dict, args: dict) -> None:
    """Refuses the fairseq options this project's model does not implement."""
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


def _adaptive_input_bands(state: dict, args: dict, d: int) -> tuple[int, tuple[int, ...], float]:
    """``(vocab_size, cutoffs, factor)`` of adaptive input embeddings, checked against the args."""
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
    return vocab_size, cutoffs, factor


def _plain_embeddings(state: dict, d: int) -> tuple[int, tuple[int, ...], float]:
    """``(vocab_size, (), 4)`` of one ``nn.Embedding`` of width ``d``."""
    if "decoder.embed_tokens.weight" not in state:
        raise ConvertError("the checkpoint has no decoder.embed_tokens weights")
    vocab_size, dim = np.shape(state["decoder.embed_tokens.weight"])
    if dim != d:
        raise ConvertError(f"token embeddings of size {dim} for d {d} (project_in_dim) are not supported")
    return vocab_size, (), 4


def _output_layer(state: dict, args: dict, adaptive_input: bool, vocab_size: int, cutoffs: tuple,
                  factor) -> tuple[bool, bool]:
    """``(tied, adaptive_softmax)``: whether the output layer shares the input embeddings, and whether it
    is an adaptive softmax (then with the adaptive input's bands, as this project's model has)."""
    adaptive_softmax = "decoder.adaptive_softmax.head.class_proj.weight" in state or (
        "decoder.adaptive_softmax.head.weight" in state)
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
    return tied, adaptive_softmax


def _final_norm(state: dict, args: dict) -> bool:
    """Whether the decoder ends with a LayerNorm (fairseq: a ``version <= 2`` decoder has none)."""
    version = float(np.asarray(state.get("decoder.version", [1.0])).reshape(-1)[0])
    final_norm = "decoder.layer_norm.weight" in state and version > 2
    if version > 2 and "decoder.layer_norm.weight" not in state and not args["no_decoder_final_norm"]:
        raise ConvertError("the args ask for a final LayerNorm (no_decoder_final_norm false) that the "
                           "checkpoint does not have")
    return final_norm
