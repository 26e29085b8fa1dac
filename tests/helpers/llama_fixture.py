"""Tiny random Llama-family models written as a GGUF (as llama.cpp's converter writes one) and as a
Hugging Face directory (safetensors written here), with a byte-level BPE tokenizer.

A :class:`Tiny` names one variant (plain Llama, Qwen2-style q/k/v biases, an untied output head,
an explicit head size, grouped key/value heads); the module constants are the default one's.
"""

import dataclasses
import json
import os
import struct

import ml_dtypes
import numpy as np

V, L, D, H, KV, F = 300, 2, 32, 4, 2, 48


@dataclasses.dataclass(frozen=True)
class Tiny:
    """One tiny model's architecture; ``head_dim=0`` means ``d_model // heads`` and is written nowhere."""

    arch: str = "llama"
    vocab: int = V
    layers: int = L
    d_model: int = D
    heads: int = H
    kv_heads: int = KV
    d_ff: int = F
    head_dim: int = 0
    qkv_bias: bool = False
    tied: bool = True
    rope_theta: float = 5000.0
    rms_eps: float = 1e-5

    @property
    def head_size(self) -> int:
        return self.head_dim or self.d_model // self.heads

    def hf_config(self) -> dict:
        """The ``config.json`` that ``transformers`` would write for it."""
        config = dict(model_type=self.arch, vocab_size=self.vocab, num_hidden_layers=self.layers,
                      hidden_size=self.d_model, num_attention_heads=self.heads, num_key_value_heads=self.kv_heads,
                      intermediate_size=self.d_ff, rms_norm_eps=self.rms_eps, tie_word_embeddings=self.tied,
                      rope_parameters=dict(rope_theta=self.rope_theta, rope_type="default"))
        if self.head_dim:
            config["head_dim"] = self.head_dim
        if self.arch != "qwen2":  # Qwen2 always has q/k/v biases; Llama says so
            config["attention_bias"] = self.qkv_bias
        return config


DEFAULT = Tiny()
VARIANTS = {
    "llama": Tiny(kv_heads=H),
    "gqa": Tiny(d_model=48, heads=6, kv_heads=2, rope_theta=10000.0),  # groups of 3 query heads
    "qwen2_bias": Tiny(arch="qwen2", qkv_bias=True, tied=True, rms_eps=1e-6),
    "llama_bias": Tiny(qkv_bias=True),  # llama.cpp permutes the q/k biases too
    "untied": Tiny(tied=False),
    "head_dim": Tiny(head_dim=12, kv_heads=2),  # 4 x 12 != 32
}


def llama_cpp_permute(w, heads):
    """What llama.cpp's converter does to q/k rows (convert_hf_to_gguf.py, LlamaModel.permute)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


MERGES = (("t", "h"), ("th", "e"), ("Ġ", "c"), ("Ġc", "a"), ("Ġca", "t"))


def tiny_tokenizer_parts(merges=MERGES, vocab=V):
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = list(merges)
    tokens = alphabet + ["".join(m) for m in merges]
    tokens += [f"<extra{i}>" for i in range(vocab - len(tokens))]
    return tokens, merges


def tiny_weights(seed=0, spec: Tiny = DEFAULT):
    """Hugging Face name -> float32 array of random weights for ``spec``."""
    rng = np.random.default_rng(seed)
    d, hd, f = spec.d_model, spec.head_size, spec.d_ff
    w = {"model.embed_tokens.weight": rng.normal(0, 0.5, (spec.vocab, d)),
         "model.norm.weight": 1 + rng.normal(0, 0.1, d)}
    for i in range(spec.layers):
        p = f"model.layers.{i}."
        w.update({p + "input_layernorm.weight": 1 + rng.normal(0, 0.1, d),
                  p + "post_attention_layernorm.weight": 1 + rng.normal(0, 0.1, d),
                  p + "self_attn.q_proj.weight": rng.normal(0, 0.3, (spec.heads * hd, d)),
                  p + "self_attn.k_proj.weight": rng.normal(0, 0.3, (spec.kv_heads * hd, d)),
                  p + "self_attn.v_proj.weight": rng.normal(0, 0.3, (spec.kv_heads * hd, d)),
                  p + "self_attn.o_proj.weight": rng.normal(0, 0.3, (d, spec.heads * hd)),
                  p + "mlp.gate_proj.weight": rng.normal(0, 0.3, (f, d)),
                  p + "mlp.up_proj.weight": rng.normal(0, 0.3, (f, d)),
                  p + "mlp.down_proj.weight": rng.normal(0, 0.3, (d, f))})
        if spec.qkv_bias:
            for name, rows in (("q", spec.heads), ("k", spec.kv_heads), ("v", spec.kv_heads)):
                w[p + f"self_attn.{name}_proj.bias"] = rng.normal(0, 0.3, rows * hd)
    if not spec.tied:
        w["lm_head.weight"] = rng.normal(0, 0.5, (spec.vocab, d))
    return {k: np.asarray(v, np.float32) for k, v in w.items()}


def bfloat16_exact(weights):
    """``weights`` rounded to bfloat16 values: the same numbers whichever way a file stores them."""
    return {k: v.astype(ml_dtypes.bfloat16).astype(np.float32) for k, v in weights.items()}


GGUF_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
              "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def write_gguf(path, weights, arch=None, merges=MERGES, spec: Tiny = DEFAULT):
    """``weights`` as llama.cpp's converter writes them: its names, q/k rows permuted except for Qwen2."""
    import gguf

    arch = arch or spec.arch
    tokens, merges = tiny_tokenizer_parts(merges, spec.vocab)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(spec.layers)
    w.add_context_length(64)
    w.add_embedding_length(spec.d_model)
    w.add_feed_forward_length(spec.d_ff)
    w.add_head_count(spec.heads)
    w.add_head_count_kv(spec.kv_heads)
    if spec.head_dim:
        w.add_key_length(spec.head_dim)
        w.add_value_length(spec.head_dim)
    w.add_rope_freq_base(spec.rope_theta)
    w.add_layer_norm_rms_eps(spec.rms_eps)
    w.add_vocab_size(spec.vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_merges([" ".join(m) for m in merges])
    w.add_token_types([1] * spec.vocab)
    w.add_tensor("token_embd.weight", weights["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", weights["model.norm.weight"])
    if "lm_head.weight" in weights:
        w.add_tensor("output.weight", weights["lm_head.weight"])
    for i in range(spec.layers):
        for hf, g in GGUF_NAMES.items():
            for kind in ("weight", "bias"):
                t = weights.get(f"model.layers.{i}.{hf}.{kind}")
                if t is None:
                    continue
                if g in ("attn_q", "attn_k") and arch != "qwen2":
                    t = llama_cpp_permute(t, spec.heads if g == "attn_q" else spec.kv_heads)
                w.add_tensor(f"blk.{i}.{g}.{kind}", np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_hf_dir(directory, weights, spec: Tiny = DEFAULT):
    """``config.json``, ``tokenizer.json`` and one ``model.safetensors`` (every third tensor as bfloat16)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(spec.hf_config(), f)
    tokens, merges = tiny_tokenizer_parts(vocab=spec.vocab)
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(os.path.join(directory, "tokenizer.json"))
    header, blobs, offset = {}, [], 0
    for i, (name, array) in enumerate(sorted(weights.items())):
        data = array.astype(ml_dtypes.bfloat16) if i % 3 == 0 else array  # some tensors as bfloat16
        raw = np.ascontiguousarray(data).tobytes()
        header[name] = dict(dtype="BF16" if i % 3 == 0 else "F32", shape=list(array.shape),
                            data_offsets=[offset, offset + len(raw)])
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header).encode()
    with open(os.path.join(directory, "model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head + b"".join(blobs))
