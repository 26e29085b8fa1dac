#!/usr/bin/env python
"""Evaluation speed: kNN-LM against base-LM tokens/s, and FAISS inside the pipeline against bare FAISS.

  python benchmarks/eval_speed.py --workdir runs/wt2 --datastore train [--split valid] [--max-tokens N]
                                  [--repeats 3] [--k 1024] [--approximate] [--out results/eval_speed.json]

One process, after a warm-up pass of each kind (compilation excluded), ``--repeats`` passes of:
  - the base-LM evaluation (the same streaming pass, no search): tokens/s;
  - the kNN-LM evaluation (forward, FAISS search, exact re-ranking, per-token files): tokens/s;
  - bare ``index.search`` over the very query batches of the kNN-LM pass, back to back;
  - a diagnostic kNN-LM pass without overlap (each forward finishes before its search).
Medians are reported, with the search stage's time inside the pipeline against the bare
search (pipeline overhead %: what running FAISS beside the device's forward costs it).
Where the "device" is the host CPU, the overlapped forward competes with FAISS for the
same cores, so its CPU time shows up in the search stage; the pass without overlap
separates that from the pipeline's own cost (copies, conversions, bookkeeping).
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="a trained run directory")
    parser.add_argument("--datastore", required=True, help="an indexed datastore of that run")
    parser.add_argument("--split", default="valid")
    parser.add_argument("--max-tokens", type=int, default=0, help="first N targets of the split (0: all)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--k", type=int, default=1024)
    parser.add_argument("--nprobe", type=int, default=None)
    parser.add_argument("--approximate", action="store_true", help="FAISS distances, no exact re-ranking")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--out", default=os.path.join(ROOT, "results", "eval_speed.json"))
    args = parser.parse_args(argv)

    from knnlm_jax.cli import user_errors

    with user_errors("eval_speed.py"):
        return run(args)


def run(args) -> int:
    import jax

    from knnlm_jax import runs
    from knnlm_jax import index as faiss_index
    from knnlm_jax.adaptive import band_edges
    from knnlm_jax.building import build_capacities
    from knnlm_jax.datastore import datastore_dir, open_datastore, windows
    from knnlm_jax.eval_pass import evaluate_tokens
    from knnlm_jax.eval_settings import eval_window_sizes
    from knnlm_jax.report import write_json

    config = runs.run_config(args.workdir)
    vocab = runs.load_vocab(args.workdir, config)
    trained = runs.load_model(args.workdir, config, vocab)
    store = open_datastore(datastore_dir(args.workdir, args.datastore),
                           runs.signature(config, vocab, trained.fingerprint, trained.step))
    if not store.index_path:
        raise ValueError(f"datastore {store.name} has no FAISS index")
    index = faiss_index.read_index(store.index_path)
    nprobe = args.nprobe or (store.manifest.get("index") or {}).get("nprobe")
    _, tokens = runs.split_tokens(args.workdir, vocab, runs.run_corpus(config), args.split)
    tokens = tokens[: args.max_tokens] if args.max_tokens else tokens
    window, context = eval_window_sizes(config)
    batch_size = args.batch_size or config.eval_batch_size
    caps = build_capacities(tokens, windows(len(tokens), window, context), batch_size,
                            band_edges(trained.cfg.vocab_size, trained.cfg.cutoffs), window)
    exact = not args.approximate

    with tempfile.TemporaryDirectory() as tmp:
        def once(search: bool, on_queries=None, overlap: bool = True) -> dict:
            files = evaluate_tokens(os.path.join(tmp, "tokens"), trained, tokens, vocab.eos, key_type=config.key_type,
                                    window=window, context=context, batch_size=batch_size,
                                    index=index if search else None, store=store, k=args.k, exact=exact,
                                    nprobe=nprobe, capacities=caps, progress=False, on_queries=on_queries,
                                    overlap=overlap)
            return files.meta

        once(False)  # warm-up: compile both kinds of pass
        once(True)
        base, knn, sequential, bare = [], [], [], []
        for _ in range(args.repeats):
            base.append(once(False))
            queries = []
            knn.append(once(True, queries.append))
            sequential.append(once(True, overlap=False))  # each forward finishes before its search starts
            t0 = time.perf_counter()
            for batch in queries:
                faiss_index.search(index, batch, args.k, nprobe)
            bare.append(time.perf_counter() - t0)

    med = statistics.median
    base_tps = med(m["tokens_per_s"] for m in base)
    knn_tps = med(m["tokens_per_s"] for m in knn)
    in_pipeline = med(m["timings"]["search"] for m in knn)
    bare_search = med(bare)
    in_sequential = med(m["timings"]["search"] for m in sequential)
    payload = dict(
        workdir=os.path.abspath(args.workdir), datastore=store.name, datastore_entries=store.size,
        index=(store.manifest.get("index") or {}).get("factory"), nprobe=nprobe, k=args.k, exact=exact,
        split=args.split, tokens=len(tokens), window=window, context=context, batch_size=batch_size,
        repeats=args.repeats, device=str(jax.devices()[0].device_kind), device_count=jax.device_count(),
        base_lm_tokens_per_s=base_tps, knn_lm_tokens_per_s=knn_tps, knn_over_base_speed=knn_tps / base_tps,
        search_seconds_in_pipeline=in_pipeline, search_seconds_bare=bare_search,
        pipeline_search_overhead_pct=100.0 * (in_pipeline - bare_search) / bare_search,
        knn_stage_seconds={k: med(m["timings"][k] for m in knn) for k in knn[0]["timings"]},
        knn_seconds=med(m["seconds"] for m in knn), base_seconds=med(m["seconds"] for m in base),
        # diagnostic: the same pass with no overlap, so the search shares the CPU with nothing
        search_seconds_without_overlap=in_sequential,
        pipeline_search_overhead_without_overlap_pct=100.0 * (in_sequential - bare_search) / bare_search,
        knn_seconds_without_overlap=med(m["seconds"] for m in sequential),
        runs=dict(base=[m["seconds"] for m in base], knn=[m["seconds"] for m in knn], bare_search=bare,
                  knn_without_overlap=[m["seconds"] for m in sequential]))
    write_json(args.out, payload)
    print(f"{len(tokens)} tokens, k {args.k}, {'exact' if exact else 'approximate'}, {payload['index']} "
          f"over {store.size} keys, on {payload['device']}:")
    print(f"  base LM {base_tps:,.0f} tokens/s; kNN-LM {knn_tps:,.0f} tokens/s "
          f"({payload['knn_over_base_speed']:.3f} of the base speed)")
    print(f"  FAISS search {in_pipeline:.3f}s inside the pipeline, {bare_search:.3f}s bare "
          f"({payload['pipeline_search_overhead_pct']:+.1f}%)")
    print(f"  without overlap: search {in_sequential:.3f}s "
          f"({payload['pipeline_search_overhead_without_overlap_pct']:+.1f}%), whole pass "
          f"{payload['knn_seconds_without_overlap']:.2f}s against {payload['knn_seconds']:.2f}s overlapped")
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
