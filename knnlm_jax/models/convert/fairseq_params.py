"""A fairseq ``transformer_lm`` state dict as this project's parameters (plain NumPy).

:func:`upgrade_state_dict` applies fairseq's own upgrades of older checkpoints,
:func:`convert_params` maps every weight to its ``nnx`` path (PyTorch weights transposed into
flax kernels), and :func:`convert` does both with :func:`~knnlm_jax.models.convert.fairseq_arch.architecture`.
Which fairseq behaviours are reproduced is listed in :mod:`knnlm_jax.models.convert.fairseq`.
"""

from __future__ import annotations

import re

import numpy as np

from knnlm_jax.data.vocab import SPECIALS, Vocab
from knnlm_jax.models.convert.fairseq_arch import architecture, resolve_args
from knnlm_jax.models.convert.fairseq_checkpoint import ConvertError


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


def convert_params(state: dict, arch: dict) -> dict[tuple, np.ndarray]:
    """The fairseq weights as this project's parameters: ``{nnx path tuple: float32 array}``.

    Paths are those of ``nnx.state(TransformerLM(cfg), nnx.Param)`` (e.g.
    ``('blocks', 0, 'attn', 'qkv', 'kernel')``); flax kernels are PyTorch weights transposed.
    Every array of the state dict must be used (buffers and tied duplicates aside).
    """
    r = _Reader(state)
    p, emb, proj = _embeddings(r, state, arch)
    for i in range(arch["num_layers"]):
        p.update({("blocks", i, *k): v for k, v in _block(r, i, arch["d_model"], arch["d_ff"]).items()})
    if arch["final_norm"]:
        p["final_ln", "scale"] = r.take("decoder.layer_norm.weight", (arch["d_model"],))
        p["final_ln", "bias"] = r.take("decoder.layer_norm.bias", (arch["d_model"],))
    elif "decoder.layer_norm.weight" in state:  # a version <= 2 decoder: fairseq ignores it too
        r.used.update({"decoder.layer_norm.weight", "decoder.layer_norm.bias"})
    p.update(_output_layer(r, state, arch, emb, proj))
    unused = r.unused()
    if unused:
        more = f" (and {len(unused) - 3} more)" if len(unused) > 3 else ""
        raise ConvertError(f"unsupported fairseq parameters: {', '.join(unused[:3])}{more}")
    return p


def _bands(arch: dict) -> tuple[tuple[int, ...], list[int]]:
    """``(edges, dims)``: the vocabulary's band edges and each band's embedding width."""
    edges = (0, *arch["cutoffs"], arch["vocab_size"])
    return edges, [int(arch["d_model"] // arch["adaptive_factor"]**i) for i in range(len(edges) - 1)]


def _is_adaptive(state: dict, arch: dict) -> bool:
    return bool(arch["cutoffs"]) or "decoder.embed_tokens.embeddings.0.0.weight" in state


def _embeddings(r: _Reader, state: dict, arch: dict):
    """``(params, band embeddings, band projections)`` of the input embeddings; the PyTorch arrays
    are returned too, as the tied output layer compares with them."""
    d, (edges, dims) = arch["d_model"], _bands(arch)
    emb, proj = [], []
    if _is_adaptive(state, arch):
        for i, dim in enumerate(dims):
            emb.append(r.take(f"decoder.embed_tokens.embeddings.{i}.0.weight", (edges[i + 1] - edges[i], dim)))
            proj.append(r.take(f"decoder.embed_tokens.embeddings.{i}.1.weight", (d, dim)))  # nn.Linear(dim, d)
    else:  # a plain nn.Embedding: one band whose projection is the identity
        emb.append(r.take("decoder.embed_tokens.weight", (arch["vocab_size"], d)))
        proj.append(np.eye(d, dtype=np.float32))
    p: dict[tuple, np.ndarray] = {}
    for i in range(len(dims)):
        p["embed", "embeddings", i, "embedding"] = emb[i]
        p["embed", "projections", i, "kernel"] = proj[i].T
    return p, emb, proj


def _block(r: _Reader, i: int, d: int, ff: int) -> dict[tuple, np.ndarray]:
    """Decoder layer ``i``'s parameters, by their path inside the block."""
    pre = f"decoder.layers.{i}."
    qkv_w = [r.take(pre + f"self_attn.{n}_proj.weight", (d, d)) for n in "qkv"]
    qkv_b = [r.take(pre + f"self_attn.{n}_proj.bias", (d,)) for n in "qkv"]
    return {
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


def _output_layer(r: _Reader, state: dict, arch: dict, emb: list, proj: list) -> dict[tuple, np.ndarray]:
    """The softmax's own parameters; tied weights must equal the input embeddings they share."""
    d, vocab_size, (edges, dims) = arch["d_model"], arch["vocab_size"], _bands(arch)
    n_tails = len(edges) - 2
    sm = "decoder.adaptive_softmax."
    p: dict[tuple, np.ndarray] = {}
    if not _is_adaptive(state, arch):  # plain output projection
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
