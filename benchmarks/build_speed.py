#!/usr/bin/env python
"""Key-extraction throughput of a datastore build against the plain forward pass.

Both run the same model over the same windows with the same batch size and compiled
shapes; the build path is the real one (``building.build_datastore``: forward with sown
keys, fp16 keys to host, memmap writes, manifest updates), the baseline a jitted forward
that returns only the summed target log-probs. Medians of ``--repeats`` runs, measured
in one process, written to ``results/build_speed.json``.

  python benchmarks/build_speed.py --workdir runs/wt2 --data_dir ../shared/data/wikitext-2
"""

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--data_dir", default=None, help="where the run's corpus is now (default: as trained)")
    parser.add_argument("--tokens", type=int, default=200_000, help="corpus prefix to process")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="results/build_speed.json")
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from knnlm_jax import runs
    from knnlm_jax.datastore.building import BuildSpec, CorpusInfo, KeyComputer, build_datastore, window_sizes
    from knnlm_jax.models.adaptive import build_capacities
    from knnlm_jax.data.windows import WindowSpec, windows
    from knnlm_jax.core.report import write_json

    config = runs.run_config(args.workdir)
    vocab = runs.load_vocab(args.workdir, config)
    data, tokens = runs.split_tokens(args.workdir, vocab, args.data_dir or runs.run_corpus(config), "train")
    tokens = tokens[: args.tokens]
    trained = runs.load_model(args.workdir, config, vocab)
    window, context = window_sizes(config)
    batch = config.eval_batch_size
    wins = windows(len(tokens), window, context)
    keys_computer = KeyComputer(trained, config.key_type, tokens, vocab.eos, window, batch)
    caps = build_capacities(tokens, wins, batch, keys_computer.edges, window)

    graphdef = trained.graphdef

    @jax.jit
    def plain(params, inputs, targets, mask):
        model = nnx.merge(graphdef, params)
        logp = model.target_log_probs(model(inputs), targets, capacities=caps)
        return -jnp.sum(jnp.where(mask, logp, 0.0))

    from knnlm_jax.data.windows import window_batch

    batches = [window_batch(keys_computer.stream, wins[i : i + batch], window, vocab.eos, rows=batch)
               for i in range(0, len(wins), batch)]
    batches = [tuple(jax.device_put(a, keys_computer.sharding) for a in b) for b in batches]

    def run_plain() -> float:
        t = time.perf_counter()
        out = [plain(trained.params, *b) for b in batches]
        jax.block_until_ready(out)
        return time.perf_counter() - t

    tmp = tempfile.mkdtemp(prefix="build_speed_")

    def run_build() -> float:
        shutil.rmtree(os.path.join(tmp, "ds"), ignore_errors=True)
        t = time.perf_counter()
        spec = BuildSpec(CorpusInfo(data.corpus, data.sha256, "train"), WindowSpec(window, context), batch,
                         progress=False)
        build_datastore(os.path.join(tmp, "ds"), trained, runs.signature(config, vocab, trained.fingerprint,
                        trained.step), tokens, vocab.eos, spec, log=lambda *a: None)
        return time.perf_counter() - t

    run_plain(), run_build()  # compile both
    plain_s, build_s = [], []
    for _ in range(args.repeats):  # interleaved, so machine noise hits both alike
        plain_s.append(run_plain())
        build_s.append(run_build())
    shutil.rmtree(tmp, ignore_errors=True)
    n = len(tokens)
    forward_tokens = int(sum((w[0] + window > 0) * window for w in wins))  # every window is a full forward
    result = {
        "entries": n, "windows": len(wins), "window": window, "context": context, "batch_size": batch,
        "forward_tokens": forward_tokens, "devices": jax.device_count(),
        "plain_forward_seconds": plain_s, "build_seconds": build_s,
        "plain_forward_entries_per_s": n / statistics.median(plain_s),
        "build_entries_per_s": n / statistics.median(build_s),
    }
    result["ratio_build_over_plain"] = result["build_entries_per_s"] / result["plain_forward_entries_per_s"]
    write_json(args.out, result)
    print(f"plain forward {result['plain_forward_entries_per_s']:,.0f} entries/s, build "
          f"{result['build_entries_per_s']:,.0f} entries/s: ratio {result['ratio_build_over_plain']:.3f} "
          f"(median of {args.repeats}) -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
