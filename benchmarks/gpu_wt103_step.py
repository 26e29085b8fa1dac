#!/usr/bin/env python
"""The paper's wt103 model (247M parameters, 267,735 words, 3072 tokens per sample) on one
accelerator: train-step and key-extraction throughput and peak memory, on random tokens
drawn from a Zipf distribution (no corpus needed). Writes JSON to --out.

  python benchmarks/gpu_wt103_step.py --out results/gpu_wt103_step.json
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
    parser.add_argument("--batch", type=int, default=1, help="sequences per micro-batch")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from knnlm_jax.adaptive import band_capacities, band_edges
    from knnlm_jax.configs import apply_overrides, get_config
    from knnlm_jax.model import ModelConfig, forward_with_keys
    from knnlm_jax.optim import make_optimizer
    from knnlm_jax.training import init_model, make_train_step

    config = apply_overrides(get_config("wt103"), ["vocab_size=267735"])
    cfg = ModelConfig.from_config(config)
    graphdef, params = init_model(cfg, 0)
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    tx = make_optimizer(config)
    state = dict(params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32), rng=jax.random.PRNGKey(0))
    L, B = config.tokens_per_sample, args.batch
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
    out = {
        "device": str(dev.device_kind), "jax": jax.__version__, "parameters": int(n_params),
        "tokens_per_step": B * L, "compile_seconds": compile_s, "first_loss": loss0,
        "last_loss": float(m["loss"]), "step_seconds_median": float(np.median(times)),
        "train_tokens_per_s": B * L / float(np.median(times)),
        "key_extraction_tokens_per_s": B * L / float(np.median(ktimes)),
        "keys_shape": list(keys.shape), "keys_finite": bool(np.isfinite(np.asarray(keys)).all()),
        "peak_bytes_in_use": stats.get("peak_bytes_in_use"),
        "command": " ".join(sys.argv),
    }
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
