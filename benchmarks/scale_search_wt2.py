#!/usr/bin/env python
"""Three ways to search one WikiText-2 datastore give one answer.

With the same trained IVF-PQ (``trained.faiss`` of the 2-process datastore ``two``, built by
``benchmarks/scale_build_wt2.py``):

- monolithic: one in-RAM index over every key of the 1-process datastore ``one`` (same bytes);
- merged: ``two``'s shards' lists merged on disk (``index.faiss`` + ``index.ivfdata``), one process;
- sharded: 2 processes on localhost, each searching its shard; process 0 merges the top-k.

Each evaluates WikiText-2 test with the same fixed lambda and T and FAISS's distances
(``--approximate``: differences can only come from the search). The first 1,000 queries'
neighbour lists (ids and distances, from the per-token files) are compared: distances must be
equal, and ids equal as sets after dropping each query's neighbours at its k-th distance
(which of several equal-distance entries makes the cut is not defined). Perplexities must
agree to 1e-6 relative. Writes ``results/scale_search_wt2.json``.

  python benchmarks/scale_search_wt2.py --workdir runs/wt2s --data_dir ../shared/data/wikitext-2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from knnlm_jax.retrieval.index_shards import same_neighbours  # noqa: E402
from knnlm_jax.core.report import write_json  # noqa: E402

import local_processes  # noqa: E402


def run(script, args, processes=1, log=None):
    cmd = [sys.executable, os.path.join(ROOT, script), "--no-progress", *args]
    codes = [p.wait() for p in local_processes.launch(cmd, processes, log, ROOT)]
    if any(codes):
        raise SystemExit(f"{script} {' '.join(args)}: exit codes {codes} (logs {log}.*.log)")


def monolithic_index(workdir: str) -> dict:
    """``one``'s index: the clone of ``two``'s trained index with every key of ``one`` added in order."""
    from knnlm_jax.retrieval import index as faiss_index
    from knnlm_jax.datastore.format import INDEX, open_datastore, update_manifest

    two = open_datastore(os.path.join(workdir, "datastores", "two"))
    one = open_datastore(os.path.join(workdir, "datastores", "one"))
    index = faiss_index.read_index(os.path.join(two.directory, "trained.faiss"))
    t0 = time.time()
    faiss_index.add_keys(index, one.keys, progress=False)
    faiss_index.set_nprobe(index, two.manifest["index"]["nprobe"])
    faiss_index.write_index(index, os.path.join(one.directory, INDEX))
    info = dict(two.manifest["index"], shards=None, merged=None, seconds=round(time.time() - t0, 3),
                note="two's trained.faiss with every key of one added in order")
    update_manifest(one.directory, index=info)
    return info


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="runs/wt2s")
    parser.add_argument("--data_dir", default="../shared/data/wikitext-2")
    parser.add_argument("--lmbda", default="0.25")
    parser.add_argument("--temperature", default="10")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--index", default=None, help="FAISS factory (default: the automatic one for N)")
    parser.add_argument("--max-tokens", type=int, default=0, help="0: the whole test split")
    parser.add_argument("--out", default="results/scale_search_wt2.json")
    args = parser.parse_args()
    logs = os.path.join(args.workdir, "scale_logs")
    os.makedirs(logs, exist_ok=True)
    t0 = time.time()
    run("build.py", ["--workdir", args.workdir, "--data_dir", args.data_dir, "--datastore", "two", "--index-only"]
        + (["--index", args.index] if args.index else []), 2, os.path.join(logs, "index_two"))
    index_seconds = time.time() - t0
    mono = monolithic_index(args.workdir)
    evals, seconds = {}, {}
    common = ["--workdir", args.workdir, "--data_dir", args.data_dir, "--split", "test", "--lmbda", args.lmbda,
              "--temperature", args.temperature, "--approximate", "--max-tokens", str(args.max_tokens)]
    for name, store, processes, extra in (("monolithic", "one", 1, []), ("merged", "two", 1, ["--search", "merged"]),
                                          ("sharded", "two", 2, ["--search", "shards"])):
        out = os.path.join(args.workdir, "eval", f"scale-{name}")
        t0 = time.time()
        run("evaluate.py", common + ["--datastore", store, "--out", out, "--recompute", *extra], processes,
            os.path.join(logs, f"eval_{name}"))
        seconds[name] = time.time() - t0
        with open(os.path.join(out, "results.json")) as f:
            evals[name] = dict(json.load(f), out=out)
    ppl = {name: next(r["ppl"] for r in e["rows"] if r["name"] == "+kNN-LM") for name, e in evals.items()}
    base = {name: e["rows"][0]["ppl"] for name, e in evals.items()}
    ref = ppl["monolithic"]
    files = {name: os.path.join(e["out"], "tokens-test") for name, e in evals.items()}
    arrays = {name: (np.load(os.path.join(d, "dists.npy"), mmap_mode="r")[: args.queries],
                     np.load(os.path.join(d, "ids.npy"), mmap_mode="r")[: args.queries]) for name, d in files.items()}
    agree = {}
    for name in ("merged", "sharded"):
        d_ref, i_ref = arrays["monolithic"]
        d, i = arrays[name]
        same = [same_neighbours(d_ref[q], i_ref[q], d[q], i[q]) for q in range(len(d_ref))]
        agree[name] = {"queries": len(same), "same_neighbours": int(sum(same)),
                       "identical_ids_in_order": int(sum(np.array_equal(i_ref[q], i[q]) for q in range(len(d_ref)))),
                       "max_abs_distance_difference": float(np.abs(np.asarray(d_ref) - np.asarray(d)).max())}
    result = {
        "datastore_entries": evals["monolithic"]["datastore_manifest"]["num_entries"],
        "index": mono["factory"], "nprobe": mono["nprobe"], "k": evals["monolithic"]["knn"]["k"],
        "lambda": float(args.lmbda), "temperature": float(args.temperature), "distances": "approximate (FAISS's)",
        "test_tokens": evals["monolithic"]["tokens"],
        "base_ppl": base, "knn_ppl": ppl,
        "max_relative_ppl_difference": max(abs(p - ref) / ref for p in ppl.values()),
        "ppl_agree_1e-6": all(abs(p - ref) <= 1e-6 * ref for p in ppl.values()),
        "neighbours": agree,
        "ties": "distances compared exactly; ids compared as sets after dropping each query's neighbours at its "
                "k-th distance (FAISS does not define which of several equal-distance entries makes the cut)",
        "seconds": dict(seconds, index_two_processes=index_seconds, monolithic_add=mono["seconds"]),
    }
    command = "python benchmarks/scale_search_wt2.py " + " ".join(sys.argv[1:])
    write_json(os.path.join(ROOT, args.out), result, command)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
