"""A tiny random Llama-family model written as a GGUF (as llama.cpp's converter writes one) and as a
Hugging Face directory (safetensors written here), with a byte-level BPE tokenizer."""

import json
import os
import struct

import ml_dtypes
import numpy as np

V, L, D, H, KV, F = 300, 2, 32, 4, 2, 48


def llama_cpp_permute(w, heads):
    """What llama.cpp's converter does to q/k rows (convert_hf_to_gguf.py, LlamaModel.permute)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


MERGES = (("t", "h"), ("th", "e"), ("Ġ", "c"), ("Ġc", "a"), ("Ġca", "t"))


def tiny_tokenizer_parts(merges=MERGES):
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = list(merges)
    tokens = alphabet + ["".join(m) for m in merges]
    tokens += [f"<extra{i}>" for i in range(V - len(tokens))]
    return tokens, merges


def tiny_weights(seed=0):
    rng = np.random.default_rng(seed)
    hd = D // H
    w = {"model.embed_tokens.weight": rng.normal(0, 0.5, (V, D)), "model.norm.weight": 1 + rng.normal(0, 0.1, D)}
    for i in range(L):
        p = f"model.layers.{i}."
        w.update({p + "input_layernorm.weight": 1 + rng.normal(0, 0.1, D),
                  p + "post_attention_layernorm.weight": 1 + rng.normal(0, 0.1, D),
                  p + "self_attn.q_proj.weight": rng.normal(0, 0.3, (H * hd, D)),
                  p + "self_attn.k_proj.weight": rng.normal(0, 0.3, (KV * hd, D)),
                  p + "self_attn.v_proj.weight": rng.normal(0, 0.3, (KV * hd, D)),
                  p + "self_attn.o_proj.weight": rng.normal(0, 0.3, (D, H * hd)),
                  p + "mlp.gate_proj.weight": rng.normal(0, 0.3, (F, D)),
                  p + "mlp.up_proj.weight": rng.normal(0, 0.3, (F, D)),
                  p + "mlp.down_proj.weight": rng.normal(0, 0.3, (D, F))})
    return {k: np.asarray(v, np.float32) for k, v in w.items()}


def write_gguf(path, weights, arch="llama", merges=MERGES):
    import gguf

    tokens, merges = tiny_tokenizer_parts(merges)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(L)
    w.add_context_length(64)
    w.add_embedding_length(D)
    w.add_feed_forward_length(F)
    w.add_head_count(H)
    w.add_head_count_kv(KV)
    w.add_rope_freq_base(5000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(V)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_merges([" ".join(m) for m in merges])
    w.add_token_types([1] * V)
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    w.add_tensor("token_embd.weight", weights["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", weights["model.norm.weight"])
    for i in range(L):
        for hf, g in names.items():
            t = weights[f"model.layers.{i}.{hf}.weight"]
            if g in ("attn_q", "attn_k"):
                t = llama_cpp_permute(t, H if g == "attn_q" else KV)
            w.add_tensor(f"blk.{i}.{g}.weight", np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_hf_dir(directory, weights):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    os.makedirs(directory, exist_ok=True)
    config = dict(model_type="llama", vocab_size=V, num_hidden_layers=L, hidden_size=D, num_attention_heads=H,
                  num_key_value_heads=KV, intermediate_size=F, rms_norm_eps=1e-5, tie_word_embeddings=True,
                  rope_parameters=dict(rope_theta=5000.0, rope_type="default"))
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    tokens, merges = tiny_tokenizer_parts()
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
