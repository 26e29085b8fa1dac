#!/usr/bin/env python
"""Recall@k of a datastore's approximate (IVF-PQ) index against exact search.

Also checks that exact search finds a sample of stored keys themselves at distance 0.
Queries are keys of held-out text (the valid split, computed by the same model the way
the evaluator computes them); exact neighbours come from brute-force L2 over all stored
keys (FAISS ``IndexFlatL2``). Writes ``results/index_recall.json``.

  python benchmarks/index_recall.py --workdir runs/wt2 --datastore train --data_dir ../shared/data/wikitext-2
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--datastore", default="train")
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=1024)
    parser.add_argument("--nprobe", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--out", default="results/index_recall.json")
    args = parser.parse_args()

    import faiss
    import numpy as np

    from knnlm_jax import runs
    from knnlm_jax.datastore.building import KeyComputer, window_sizes
    from knnlm_jax.datastore.format import datastore_dir, open_datastore
    from knnlm_jax.retrieval.index import read_index, search
    from knnlm_jax.core.report import write_json
    from knnlm_jax.data.windows import windows

    config = runs.run_config(args.workdir)
    vocab = runs.load_vocab(args.workdir, config)
    store = open_datastore(datastore_dir(args.workdir, args.datastore), runs.signature(config, vocab))
    if not store.index_path:
        raise SystemExit(f"datastore {args.datastore} has no index")
    index = read_index(store.index_path)
    _, tokens = runs.split_tokens(args.workdir, vocab, args.data_dir or runs.run_corpus(config), "valid")
    trained = runs.load_model(args.workdir, config, vocab)
    window, context = window_sizes(config)
    batch = config.eval_batch_size
    wins = windows(len(tokens), window, context)
    computer = KeyComputer(trained, store.manifest["key_type"], tokens, vocab.eos, window, batch)
    rng = np.random.default_rng(0)
    queries = []
    for i in range(0, len(wins), batch):
        _, keys, _, mask = computer.dispatch(wins[i : i + batch])
        queries.append(np.asarray(keys)[mask].astype(np.float32))
        if sum(len(q) for q in queries) >= 20 * args.queries:
            break
    pool = np.concatenate(queries)
    q = pool[np.sort(rng.choice(len(pool), size=args.queries, replace=False))]

    t = time.time()
    flat = faiss.IndexFlatL2(store.dim)
    for i in range(0, store.size, 1 << 18):
        flat.add(np.ascontiguousarray(store.keys[i : i + (1 << 18)], dtype=np.float32))
    _, exact_ids = flat.search(q, args.k)
    exact_seconds = time.time() - t
    # the flat index finds every sampled stored key itself, at distance 0 up to float32 round-off
    # (FAISS computes |x|^2 + |y|^2 - 2 x.y); an identical key elsewhere may tie with it
    own = np.sort(rng.choice(store.size, size=args.queries, replace=False))
    own_q = np.ascontiguousarray(store.keys[own], dtype=np.float32)
    own_d, own_ids = flat.search(own_q, 8)
    tol = 1e-5 * (own_q.astype(np.float64) ** 2).sum(1)
    zero = own_d <= tol[:, None]
    self_found = [bool(z[0] and i in ids[z]) for i, z, ids in zip(own, zero, own_ids)]
    self_check = {"sampled_stored_keys": int(len(own)), "nearest_is_itself_at_distance_0": int(sum(self_found)),
                  "tolerance": "1e-5 * |key|^2", "max_self_distance": float(own_d[:, 0].max()),
                  "median_key_norm_squared": float(np.median(tol) / 1e-5),
                  "min_second_distance": float(own_d[:, 1].min()),
                  "identical_key_ties": int(sum(z.sum() > 1 for z in zero))}
    print(f"flat self-retrieval: {sum(self_found)}/{len(own)} stored keys find themselves at distance 0 "
          f"(largest {own_d[:, 0].max():.2g}: float32 round-off; nearest other key {own_d[:, 1].min():.3g})")
    result = {"datastore": args.datastore, "entries": store.size, "factory": store.manifest["index"]["factory"],
              "queries": args.queries, "query_source": "valid-split keys", "k": args.k,
              "exact_seconds": exact_seconds, "flat_self_retrieval": self_check, "by_nprobe": []}
    for nprobe in args.nprobe:
        t = time.time()
        _, ids = search(index, q, args.k, nprobe)
        seconds = time.time() - t
        recall = float(np.mean([len(np.intersect1d(a[a >= 0], b)) / args.k for a, b in zip(ids, exact_ids)]))
        top1 = float(np.mean(ids[:, 0] == exact_ids[:, 0]))
        result["by_nprobe"].append({"nprobe": nprobe, "recall_at_k": recall, "top1_agreement": top1,
                                    "ms_per_query": 1000 * seconds / args.queries})
        print(f"nprobe {nprobe}: recall@{args.k} {recall:.3f}, top-1 agreement {top1:.3f}, "
              f"{1000 * seconds / args.queries:.2f} ms/query")
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
