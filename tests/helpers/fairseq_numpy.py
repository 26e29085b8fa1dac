"""fairseq written from its source (0.12.2), sharing no code with this project's model: checkpoints in
fairseq's layout (:func:`fairseq_state`) and its forward in NumPy (:func:`fairseq_log_probs`), the
reference ``models/test_fairseq_convert.py`` checks the converter against.
"""

import math

import numpy as np

PAD = 1


# ---------------------------------------------------------------------------------
# a fairseq-layout checkpoint


def fairseq_state(seed=0, *, vocab_size=40, cutoffs=(8, 20), d=16, ffn=32, layers=2, factor=4, adaptive=True,
                  tied=True, tie_proj=True, final_norm=False):
    """Names and shapes as fairseq 0.12.2 creates them (PyTorch ``(out, in)`` weights), random values."""
    rng = np.random.default_rng(seed)

    def w(*shape, scale=0.3):
        return (rng.normal(size=shape) * scale).astype(np.float32)

    def ln(prefix):
        return {f"{prefix}.weight": 1 + w(d, scale=0.1), f"{prefix}.bias": w(d, scale=0.1)}

    sd = {"decoder.version": np.array([3.0], np.float32), "decoder.embed_positions._float_tensor": np.zeros(1)}
    edges = (0, *cutoffs, vocab_size)
    dims = [int(d // factor**i) for i in range(len(edges) - 1)]
    emb, proj = [], []
    if adaptive:  # AdaptiveInput: embeddings.i = Sequential(Embedding(size, dim, pad), Linear(dim, d, bias=False))
        for i, dim in enumerate(dims):
            emb.append(w(edges[i + 1] - edges[i], dim, scale=dim**-0.5))
            proj.append(w(d, dim))
            sd[f"decoder.embed_tokens.embeddings.{i}.0.weight"] = emb[i]
            sd[f"decoder.embed_tokens.embeddings.{i}.1.weight"] = proj[i]
        emb[0][PAD] = 0
        sd["decoder.embed_tokens._float_tensor"] = np.zeros(1)
    else:
        sd["decoder.embed_tokens.weight"] = w(vocab_size, d, scale=d**-0.5)
    for i in range(layers):
        pre = f"decoder.layers.{i}."
        for name in ("k_proj", "v_proj", "q_proj", "out_proj"):
            sd[pre + f"self_attn.{name}.weight"], sd[pre + f"self_attn.{name}.bias"] = w(d, d), w(d, scale=0.1)
        sd.update(ln(pre + "self_attn_layer_norm"))
        sd[pre + "fc1.weight"], sd[pre + "fc1.bias"] = w(ffn, d), w(ffn, scale=0.1)
        sd[pre + "fc2.weight"], sd[pre + "fc2.bias"] = w(d, ffn), w(d, scale=0.1)
        sd.update(ln(pre + "final_layer_norm"))
    if final_norm:
        sd.update(ln("decoder.layer_norm"))
    sm = "decoder.adaptive_softmax."
    if adaptive:
        sd[sm + "version"] = np.array([1])
        n_tails = len(cutoffs)
        if tied:  # TiedHeadModule(word_proj = TiedLinear(band 0 embeddings), class_proj); tails tied too
            sd[sm + "head.word_proj.weight"] = emb[0]
            sd[sm + "head.class_proj.weight"] = w(n_tails, d)
            sd[sm + "head._float_tensor"] = np.zeros(1)
            for i in range(n_tails):
                sd[sm + f"tail.{i}.0.weight"] = proj[i + 1] if tie_proj else w(dims[i + 1], d)
                sd[sm + f"tail.{i}.2.weight"] = emb[i + 1]
        else:
            sd[sm + "head.weight"] = w(cutoffs[0] + n_tails, d)
            for i in range(n_tails):
                sd[sm + f"tail.{i}.0.weight"] = w(dims[i + 1], d)
                sd[sm + f"tail.{i}.2.weight"] = w(edges[i + 2] - edges[i + 1], dims[i + 1])
    else:  # share_decoder_input_output_embed: output_projection.weight is embed_tokens.weight
        sd["decoder.output_projection.weight"] = sd["decoder.embed_tokens.weight"]
    return sd

# ---------------------------------------------------------------------------------
# fairseq's forward in NumPy (float64), from fairseq 0.12.2's source


def layer_norm(x, weight, bias, eps=1e-5):  # torch.nn.LayerNorm
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def sinusoid_table(num_embeddings, dim, padding_idx):  # SinusoidalPositionalEmbedding.get_embedding, float32
    half = dim // 2
    step = math.log(10000) / (half - 1)
    freq = np.exp(np.arange(half, dtype=np.float32) * np.float32(-step))
    angles = np.arange(num_embeddings, dtype=np.float32)[:, None] * freq[None, :]
    table = np.concatenate([np.sin(angles), np.cos(angles)], axis=1)
    if dim % 2:
        table = np.concatenate([table, np.zeros((num_embeddings, 1), np.float32)], axis=1)
    table[padding_idx] = 0
    return table


def fairseq_log_probs(sd, args, tokens_BxT, x_BxTxD=None):
    """``B x T x V`` log-probabilities of fairseq's TransformerLanguageModel (eval mode, no incremental state).

    ``x_BxTxD``: the decoder's input in place of the embedded tokens (positions included).
    """
    sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
    heads = args["decoder_attention_heads"]
    layers = sum(1 for k in sd if k.startswith("decoder.layers.") and k.endswith(".fc1.weight"))
    adaptive = "decoder.embed_tokens.embeddings.0.0.weight" in sd
    # make_positions: numbers from padding_idx + 1, pads keep padding_idx (a zero row)
    mask = (tokens_BxT != PAD).astype(np.int64)
    positions = np.cumsum(mask, axis=1) * mask + PAD
    if adaptive:
        bands = sum(1 for k in sd if k.startswith("decoder.embed_tokens.embeddings.") and k.endswith(".0.weight"))
        cutoff = list(np.cumsum([sd[f"decoder.embed_tokens.embeddings.{i}.0.weight"].shape[0] for i in range(bands)]))
        d = sd["decoder.embed_tokens.embeddings.0.1.weight"].shape[0]
        emb = np.zeros(tokens_BxT.shape + (d,))
        for i in range(bands):  # AdaptiveInput.forward
            lo = cutoff[i - 1] if i > 0 else 0
            m = (tokens_BxT < cutoff[i]) & (tokens_BxT >= lo)
            emb[m] = sd[f"decoder.embed_tokens.embeddings.{i}.0.weight"][tokens_BxT[m] - lo] @ \
                sd[f"decoder.embed_tokens.embeddings.{i}.1.weight"].T
    else:
        d = sd["decoder.embed_tokens.weight"].shape[1]
        emb = sd["decoder.embed_tokens.weight"][tokens_BxT]
    scale = 1.0 if args.get("no_scale_embedding") else math.sqrt(d)
    x = scale * emb + sinusoid_table(positions.max() + 1, d, PAD)[positions] if x_BxTxD is None else x_BxTxD
    b, t = tokens_BxT.shape
    hd = d // heads
    future = np.triu(np.full((t, t), -np.inf), 1)  # buffered_future_mask
    key_pad = np.where(tokens_BxT == PAD, -np.inf, 0.0)[:, None, None, :]
    for i in range(layers):
        p = f"decoder.layers.{i}."
        residual = x
        h = layer_norm(x, sd[p + "self_attn_layer_norm.weight"], sd[p + "self_attn_layer_norm.bias"])
        q = (h @ sd[p + "self_attn.q_proj.weight"].T + sd[p + "self_attn.q_proj.bias"]) * hd**-0.5
        k = h @ sd[p + "self_attn.k_proj.weight"].T + sd[p + "self_attn.k_proj.bias"]
        v = h @ sd[p + "self_attn.v_proj.weight"].T + sd[p + "self_attn.v_proj.bias"]
        q, k, v = (a.reshape(b, t, heads, hd).transpose(0, 2, 1, 3) for a in (q, k, v))
        scores = q @ k.transpose(0, 1, 3, 2) + future + (key_pad if (tokens_BxT == PAD).any() else 0.0)
        probs = np.exp(log_softmax(scores))
        attn = (probs @ v).transpose(0, 2, 1, 3).reshape(b, t, d)
        x = residual + attn @ sd[p + "self_attn.out_proj.weight"].T + sd[p + "self_attn.out_proj.bias"]
        residual = x
        h = layer_norm(x, sd[p + "final_layer_norm.weight"], sd[p + "final_layer_norm.bias"])
        h = np.maximum(h @ sd[p + "fc1.weight"].T + sd[p + "fc1.bias"], 0.0)
        x = residual + h @ sd[p + "fc2.weight"].T + sd[p + "fc2.bias"]
    if "decoder.layer_norm.weight" in sd and sd["decoder.version"][0] > 2:
        x = layer_norm(x, sd["decoder.layer_norm.weight"], sd["decoder.layer_norm.bias"])
    if not adaptive:  # output_projection
        return log_softmax(x @ sd["decoder.output_projection.weight"].T)
    # AdaptiveSoftmax.get_log_prob(input, target=None)
    sm = "decoder.adaptive_softmax."
    vocab_size = cutoff[-1]
    tails = len(cutoff) - 1
    if sm + "head.class_proj.weight" in sd:  # TiedHeadModule: [words | classes]
        head_y = np.concatenate([x @ sd[sm + "head.word_proj.weight"].T, x @ sd[sm + "head.class_proj.weight"].T], -1)
    else:
        head_y = x @ sd[sm + "head.weight"].T
    log_probs = np.zeros((b, t, vocab_size))
    head_sz = cutoff[0] + tails
    log_probs[..., :head_sz] = log_softmax(head_y)
    tail_priors = log_probs[..., cutoff[0]:head_sz].copy()
    for i in range(tails):
        start, end = cutoff[i], cutoff[i + 1]
        proj = sd[sm + f"tail.{i}.0.weight"]  # nn.Linear(d, dim): dim x d; TiedLinear(transpose=True): d x dim
        tail_out = (x @ (proj if proj.shape[0] == d else proj.T)) @ sd[sm + f"tail.{i}.2.weight"].T
        log_probs[..., start:end] = log_softmax(tail_out) + tail_priors[..., i, None]
    return log_probs
