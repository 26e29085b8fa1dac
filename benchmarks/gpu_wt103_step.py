#!/usr/bin/env python
"""The paper's wt103 model (247M parameters, 267,735 words, 3072 tokens per sample) on one
accelerator: train-step and key-extraction throughput and peak memory, on random tokens
drawn from a Zipf distribution (no corpus needed), for each ``--batch`` size (sequences per
micro-batch): tokens/s, model FLOPs utilisation against ``--peak-tflops`` (bf16 dense; H100
and H200: 989), peak device memory. Writes one JSON with a ``batch_B`` entry per size.

  python benchmarks/gpu_wt103_step.py --batch 1,4 --out results/gpu_wt103_step.json
  python benchmarks/gpu_wt103_step.py --batch 1 --set compute_dtype=float32 --set attention_impl=explicit ...
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch", default="1", help="sequences per micro-batch: one or a comma list")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="wt103 config overrides")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="the device's dense bf16 peak")
    args = parser.parse_args()
    from knnlm_jax.core.report import write_json

    results = {f"batch_{b}": run_one(int(b), args) for b in args.batch.split(",")}
    write_json(args.out, dict(what=__doc__.split("\n\n")[0], overrides=args.set, **results))
    print(json.dumps(results, indent=2))
    return 0


def model_flops_per_token(cfg, n_params: int, embedding_params: int, tokens: int) -> float:
    """Training FLOPs per token: 6 per non-embedding parameter plus causal attention's 6 L T d (fwd + bwd)."""
    return 6.0 * (n_params - embedding_params) + 6.0 * cfg.num_layers * cfg.d_model * tokens


def run_one(batch: int, args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from knnlm_jax.models.adaptive import band_capacities, band_edges
    from knnlm_jax.configs import apply_overrides, get_config
    from knnlm_jax.models.transformer import ModelConfig, forward_with_keys
    from knnlm_jax.training.optim import make_optimizer
    from knnlm_jax.models.steps import init_model, make_train_step

    config = apply_overrides(get_config("wt103"), ["vocab_size=267735", *args.set])
    cfg = ModelConfig.from_config(config)
    graphdef, params = init_model(cfg, 0)
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    tx = make_optimizer(config)
    state = dict(params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32), rng=jax.random.PRNGKey(0))
    L, B = config.tokens_per_sample, batch
    rng = np.random.default_rng(0)
    tokens = np.minimum(rng.zipf(1.1, size=(1, B, L + 1)) + 3, cfg.vocab_size - 1).astype(np.int32)
    inputs, targets = tokens[..., :-1], tokens[..., 1:]
    edges = band_edges(cfg.vocab_size, cfg.cutoffs)
    caps = band_capacities(targets, edges)
    step = jax.jit(make_train_step(graphdef, tx), donate_argnums=0, static_argnums=3)
    t = time.perf_counter()
    state, m = step(state, inputs, targets, caps)
    loss0 = float(m["loss"])
    compile_s = time.perf_counter() - t
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        state, m = step(state, inputs, targets, caps)
        float(m["loss"])
        times.append(time.perf_counter() - t)

    @jax.jit
    def keys_fn(params, inputs, targets):
        model = nnx.merge(graphdef, params)
        return forward_with_keys(model, inputs, targets, "ffn_input_after_ln", caps)

    lp, keys = keys_fn(state["params"], inputs[0], targets[0])
    jax.block_until_ready(keys)
    ktimes = []
    for _ in range(args.steps):
        t = time.perf_counter()
        jax.block_until_ready(keys_fn(state["params"], inputs[0], targets[0]))
        ktimes.append(time.perf_counter() - t)
    dev = jax.devices()[0]
    stats = dev.memory_stats() or {}
    embedding = sum(x.size for x in jax.tree_util.tree_leaves(nnx.state(nnx.merge(graphdef, params).embed)))
    flops = model_flops_per_token(cfg, int(n_params), int(embedding), L)
    tps = B * L / float(np.median(times))
    out = {
        "device": str(dev.device_kind), "jax": jax.__version__, "parameters": int(n_params),
        "compute_dtype": str(config.get("compute_dtype")), "attention_impl": str(config.get("attention_impl")),
        "model_flops_per_token": flops, "mfu": tps * flops / (args.peak_tflops * 1e12),
        "tokens_per_step": B * L, "compile_seconds": compile_s, "first_loss": loss0,
        "last_loss": float(m["loss"]), "step_seconds_median": float(np.median(times)),
        "train_tokens_per_s": B * L / float(np.median(times)),
        "key_extraction_tokens_per_s": B * L / float(np.median(ktimes)),
        "keys_shape": list(keys.shape), "keys_finite": bool(np.isfinite(np.asarray(keys)).all()),
        "peak_bytes_in_use": stats.get("peak_bytes_in_use"),
    }
    return out


if __name__ == "__main__":
    sys.exit(main())
