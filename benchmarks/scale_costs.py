#!/usr/bin/env python
"""Per-entry costs at the paper's key size (d = 1024) and what WikiText-103 and wiki3b need.

Measured here (this CPU, synthetic clustered 1024-dim keys, FAISS as the build uses it):
k-means + PQ training of IVF{nlist},PQ64, the index add rate, and IVF-PQ search speed
(queries/s and PQ codes scanned per second at nprobe 32, k 1024). Read from other results:
key extraction on a GPU (``results/gpu_wt103_step.json``), the multi-process WikiText-2
build (``results/scale_build_wt2.json``), the on-disk index's memory
(``results/ondisk_memory.json``), search speed against N at dim 64
(``results/scale_index.json``), bytes per entry of the WikiText-2 datastore files.

Projections (``projection.wt103``, ``projection.wiki3b``) for 1 and 8 hosts, a host being
what this project is lent: one H200 and 16 CPU cores. CPU-bound rates (index training,
adding, search) are scaled from this 2-core machine by cores (x8 per host), which FAISS's
OpenMP loops roughly achieve; forward time uses the H200's measured key extraction
(windows of 3072 with 1536 tokens of context: 2 forward tokens per entry). Every
assumption is written into the JSON next to the number it makes.

  python benchmarks/scale_costs.py [--n 100000] [--nlist 1024]
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

import faiss  # noqa: E402

from knnlm_jax.retrieval import index as faiss_index  # noqa: E402
from knnlm_jax.core.report import write_json  # noqa: E402

D = 1024
CODE, ID = 64, 8  # bytes per entry of IVF-PQ64 with 64-bit ids
SIZES = {"wt103": 103_227_021, "wiki3b": 2_870_000_000}
HOST_CORES, HERE_CORES = 16, os.cpu_count() or 2
KMEANS_ITERS = 10  # FAISS's default niter for IVF coarse k-means


def clustered(n: int, centers: np.ndarray, rng) -> np.ndarray:
    """Keys near random centres (a mixture, so IVF lists are uneven as for real keys)."""
    which = rng.integers(len(centers), size=n)
    return (centers[which] + rng.normal(scale=0.5, size=(n, D))).astype(np.float32)


def median_time(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def read(path: str) -> dict | None:
    path = os.path.join(ROOT, path)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000, help="keys added and searched")
    parser.add_argument("--nlist", type=int, default=1024, help="IVF lists of the measured index")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--out", default="results/scale.json")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    faiss.omp_set_num_threads(HERE_CORES)
    centers = rng.normal(scale=3.0, size=(4 * args.nlist, D))
    factory = f"IVF{args.nlist},PQ64"
    train = clustered(40 * args.nlist, centers, rng)
    kmeans = faiss.Kmeans(D, args.nlist, niter=KMEANS_ITERS, seed=0, max_points_per_centroid=10**9)
    t0 = time.perf_counter()
    kmeans.train(train)  # the coarse quantizer's k-means alone: its cost grows as points x lists
    kmeans_s = time.perf_counter() - t0
    kmeans_flop = len(train) * args.nlist * D * 2 * KMEANS_ITERS  # multiply-adds of the assignment steps
    t0 = time.perf_counter()
    index = faiss_index.train_index(train, factory, D, seed=0)
    train_s = time.perf_counter() - t0
    keys = clustered(args.n, centers, rng)
    t0 = time.perf_counter()
    faiss_index.add_keys(index, keys, progress=False)
    add_rate = args.n / (time.perf_counter() - t0)
    queries = clustered(args.queries, centers, rng)
    faiss_index.set_nprobe(index, 32)
    search_s = median_time(lambda: index.search(queries, 1024))
    ivf = faiss.extract_index_ivf(index)
    sizes = np.asarray([ivf.invlists.list_size(i) for i in range(ivf.nlist)])
    probed = []
    _, lists = ivf.quantizer.search(queries, 32)
    probed = sizes[lists].sum(axis=1)
    scan_rate = float(probed.sum() / search_s)  # PQ codes scored per second (all cores)
    measured = {
        "key_dim": D, "index": factory, "train_keys": len(train), "train_seconds": train_s,
        "kmeans_seconds": kmeans_s, "kmeans_multiply_adds_per_s": kmeans_flop / kmeans_s,
        "pq_and_rest_train_seconds": max(0.0, train_s - kmeans_s),
        "add_entries_per_s": add_rate, "search": {"entries": args.n, "nprobe": 32, "k": 1024,
                                                   "queries_per_s": args.queries / search_s,
                                                   "codes_scanned_per_query": float(probed.mean()),
                                                   "codes_scanned_per_s": scan_rate},
        "cores": HERE_CORES,
    }

    gpu = read("results/gpu_wt103_step.json")
    gpu_tokens = gpu["batch_4"]["key_extraction_tokens_per_s"] if gpu else None
    build = read("results/scale_build_wt2.json")
    ondisk = read("results/ondisk_memory.json")
    index_scale = read("results/scale_index.json")
    wt2 = os.path.join(ROOT, "runs", "wt2s", "datastores", "one")
    bytes_per_entry = {
        "fp16": {"keys": 2 * D, "vals": 4, "index_codes_and_ids": CODE + ID},
        "none": {"keys": 0, "vals": 4, "index_codes_and_ids": CODE + ID},
    }
    for mode in bytes_per_entry:
        bytes_per_entry[mode]["total"] = sum(bytes_per_entry[mode].values())
    measured_files = None
    if os.path.isdir(wt2):
        n = len(np.load(os.path.join(wt2, "vals.npy"), mmap_mode="r"))
        measured_files = {name: os.path.getsize(os.path.join(wt2, name)) / n
                          for name in ("keys.npy", "vals.npy", "index.faiss") if os.path.isfile(os.path.join(wt2, name))}
    entries_per_s_gpu = gpu_tokens / 2 if gpu_tokens else None  # window 3072, context 1536: 2 tokens per entry

    def project(name: str, nlist: int) -> dict:
        n = SIZES[name]
        per_query = 32 * n / nlist
        train_keys = min(n, max(faiss_index.MAX_TRAIN, 64 * nlist))
        out = {"entries": n, "index": faiss_index.auto_factory(n, D), "lists_assumed": nlist,
               "disk_GB": {m: n * b["total"] / 1e9 for m, b in bytes_per_entry.items()},
               "index_RAM_GB_in_memory": n * (CODE + ID) / 1e9,
               "train_keys": train_keys}
        out["index_RAM_on_disk_search"] = ("bounded by the page cache the kernel allows: lists are memory-mapped "
                                           "(see ondisk_memory)")
        for hosts in (1, 8):
            speedup = HOST_CORES / HERE_CORES
            hours = {
                "forward": n / (entries_per_s_gpu * hosts) / 3600 if entries_per_s_gpu else None,
                "index_training": (train_keys * nlist * D * 2 * KMEANS_ITERS / measured["kmeans_multiply_adds_per_s"]
                                   + measured["pq_and_rest_train_seconds"] * train_keys / len(train))
                / speedup / 3600,  # once, on one host
                "index_add": n / (add_rate * speedup * hosts) / 3600,
            }
            hours["total"] = sum(v for v in hours.values() if v is not None)
            out[f"{hosts}_host{'s' if hosts > 1 else ''}"] = {
                "hours": hours,
                "disk_per_host_GB": {m: v / hosts for m, v in out["disk_GB"].items()},
                "search_queries_per_s": scan_rate * speedup * hosts / per_query,
            }
        out["codes_scanned_per_query"] = per_query
        return out

    result = {
        "measured": measured,
        "bytes_per_entry_d1024": bytes_per_entry,
        "bytes_per_entry_wt2_files_d256": measured_files,
        "gpu_key_extraction_tokens_per_s": gpu_tokens,
        "gpu_entries_per_s_per_device": entries_per_s_gpu,
        "cpu_build_wt2": build and {k: build.get(k) for k in ("entries_per_s", "num_entries", "seconds")},
        "ondisk_memory": ondisk and {"entries": ondisk["entries"], "in_ram_bytes": ondisk["in_ram_bytes"],
                                     **{name: run["peak_rss_kB"] for name, run in ondisk["runs"].items()},
                                     "completed": {name: run["completed"] for name, run in ondisk["runs"].items()}},
        "index_search_by_n_dim64": index_scale and index_scale.get("search_by_n"),
        "projection": {"wt103": project("wt103", 4096), "wiki3b": project("wiki3b", 65536)},
        "assumptions": [
            "host = 1 H200 + 16 CPU cores (the lent machine); CPU rates scaled from this machine by cores",
            "forward: H200 key extraction of the wt103 model (results/gpu_wt103_step.json, batch 4), "
            "2 forward tokens per entry (window 3072, context 1536); data-parallel over hosts",
            "index training: one host; coarse k-means cost = train keys x lists x d x 2 x 10 iterations at "
            "the measured multiply-add rate, plus the measured PQ training time scaled by train keys",
            "index add: each host adds its shard's codes at the measured rate; merge_ondisk is I/O bound, "
            "not counted",
            "search: nprobe 32, k 1024; cost = codes scanned per query at the measured scan rate, lists of "
            "N / nlist entries; hosts search their shards in parallel (each scans its share)",
            "disk: keys fp16 2d bytes, values 4, IVF-PQ64 codes 64 + ids 8 per entry",
        ],
        "machine_note": "2-core shared CPU; other jobs may have run at the same time",
    }
    write_json(os.path.join(ROOT, args.out), result, "python benchmarks/scale_costs.py " + " ".join(sys.argv[1:]))
    print(json.dumps(result["projection"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
