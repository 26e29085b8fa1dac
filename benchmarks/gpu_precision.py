#!/usr/bin/env python
"""What float32 at ``Precision.HIGHEST`` changes on an accelerator: the same forward of the project's
Transformer (the ``wt103`` architecture at ``--vocab`` words, float32) with every matmul at HIGHEST (what
the code does) and at the backend's default (TF32 on A100/H100/H200, one bf16 pass on TPU), on the same
random tokens: tokens/s of each (median of ``--repeats``) and the largest and mean absolute difference of
the target log-probs. On a CPU both are the same computation (a check of the script, not a measurement).

  python benchmarks/gpu_precision.py --out results/gpu_precision.json
  python benchmarks/gpu_precision.py --out /tmp/p.json --set num_layers=2 --set d_model=64 --vocab 1000 --length 64
"""

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--vocab", type=int, default=267735, help="vocabulary size (the paper's: 267,735)")
    parser.add_argument("--length", type=int, default=3072, help="tokens per sequence")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="wt103 config overrides")
    args = parser.parse_args()

    import jax

    from knnlm_jax.core.report import write_json

    highest = run(args, default_precision=False)
    default = run(args, default_precision=True)
    diff = abs(highest.pop("logp") - default.pop("logp"))
    result = dict(what=__doc__.split("\n\n")[0], device=str(jax.devices()[0].device_kind), overrides=args.set,
                  vocab=args.vocab, length=args.length, batch=args.batch, highest=highest, default=default,
                  max_abs_logp_difference=float(diff.max()), mean_abs_logp_difference=float(diff.mean()),
                  speed_ratio_default_over_highest=default["tokens_per_s"] / highest["tokens_per_s"])
    write_json(args.out, result)
    print(json.dumps(result, indent=2))
    return 0


def run(args, *, default_precision: bool) -> dict:
    """Target log-probs and tokens/s of one forward, at HIGHEST or (patched) at the backend's default."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from knnlm_jax.configs import apply_overrides, get_config
    from knnlm_jax.models.transformer import ModelConfig, forward_with_keys
    from knnlm_jax.models.steps import init_model

    config = get_config("wt103")
    apply_overrides(config, ["compute_dtype=float32", *args.set])
    original = ModelConfig.precision
    if default_precision:  # what the code did before: no precision, the backend's default
        ModelConfig.precision = property(lambda self: None)
    try:
        cfg = ModelConfig.from_config(config, vocab_size=args.vocab)
        graphdef, params = init_model(cfg, 0)
        rng = np.random.default_rng(0)
        tokens = np.minimum(rng.zipf(1.2, (args.batch, args.length + 1)) - 1, args.vocab - 1).astype(np.int32)

        @jax.jit
        def forward(params, inputs, targets):
            return forward_with_keys(nnx.merge(graphdef, params), inputs, targets, "ffn_input_after_ln")[0]

        inputs, targets = jnp.asarray(tokens[:, :-1]), jnp.asarray(tokens[:, 1:])
        logp = np.asarray(forward(params, inputs, targets))  # compiles
        seconds = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(forward(params, inputs, targets))
            seconds.append(time.perf_counter() - t0)
    finally:
        ModelConfig.precision = original
    median = statistics.median(seconds)
    return dict(logp=logp, seconds_median=median, tokens_per_s=args.batch * args.length / median)


if __name__ == "__main__":
    sys.exit(main())
