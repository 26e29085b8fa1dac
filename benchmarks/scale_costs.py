#!/usr/bin/env python
"""Per-entry costs at the paper's key size (d = 1024) and what WikiText-103 and wiki3b need.

Measured here (this CPU, synthetic clustered 1024-dim keys, FAISS as the build uses it):
k-means + PQ training of IVF{nlist},PQ64; encoding keys into codes (what a build does per
entry: coarse assignment + PQ, ``index.encode_codes``) at the list counts each projection
uses (IVF4096 with a flat quantizer, IVF65536 with an HNSW32 quantizer, its centroids a key
sample: the assignment cost, not k-means quality, is what is timed); IVF-PQ search speed;
tokenising WikiText-2 train with its word vocabulary; sequential disk writes (synced). Read
from other results: key extraction on a GPU (``results/gpu_wt103_step.json``), the 2-process
WikiText-2 build, the on-disk index's memory, search against N at dim 64.

Projections (``projection.wt103``, ``projection.wiki3b``) for 1 and 8 hosts, a host being
what this project is lent: one H200 and 16 CPU cores. CPU-bound rates are scaled from this
2-core machine by cores (x8 per host), which FAISS's OpenMP loops roughly achieve; tokenising
runs one process per host. Training samples are what FAISS uses of them: the coarse k-means
at most 256 keys per list, PQ at most 65,536 keys. Disk counts every copy at its peak (the
token array, segments and the assembled lists both exist while the index is assembled) and
after. Every assumption is written into the JSON next to the number it makes.

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


FAISS_KMEANS_PER_LIST, FAISS_PQ_SAMPLES = 256, 65536  # what FAISS trains on at most (it subsamples the rest)
SEGMENT_BYTES = CODE + ID + 8  # a --keys none segment: code, id, and the list number while sorting (upper bound)


def encode_rate(nlist: int, hnsw: bool, centers: np.ndarray, rng, n: int = 20_000) -> dict:
    """Keys/s of ``index.encode_codes`` (a build's per-entry FAISS work) with ``nlist`` lists."""
    centroids = clustered(nlist, centers, rng)
    quantizer = faiss.IndexHNSWFlat(D, 32) if hnsw else faiss.IndexFlatL2(D)
    t0 = time.perf_counter()
    quantizer.add(centroids)  # centroids given: the assignment's cost is timed, not k-means
    quantizer_s = time.perf_counter() - t0
    index = faiss.IndexIVFPQ(quantizer, D, nlist, CODE, 8)
    index.train(clustered(16_384, centers, rng))  # PQ only: the quantizer holds its nlist centroids
    keys = clustered(n, centers, rng)
    t0 = time.perf_counter()
    faiss_index.encode_codes(index, keys)
    seconds = time.perf_counter() - t0
    return {"nlist": nlist, "quantizer": "HNSW32" if hnsw else "Flat", "keys": n,
            "entries_per_s": n / seconds, "quantizer_build_seconds": quantizer_s}


def tokenize_rate(corpus: str) -> dict | None:
    """Tokens/s of one process encoding WikiText-2 train with its own word vocabulary."""
    from knnlm_jax.data.vocab import Vocab

    path = os.path.join(corpus, "train.txt")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    vocab = Vocab.build(lines)
    t0 = time.perf_counter()
    n = sum(len(chunk) for chunk in vocab.encode_chunks(lines))
    return {"tokens": n, "tokens_per_s": n / (time.perf_counter() - t0), "corpus": path}


def disk_write_rate(directory: str, size: int = 512 << 20) -> float:
    """Bytes/s of a sequential write of ``size`` bytes, synced (this machine's disk)."""
    block = np.random.default_rng(0).integers(0, 255, 4 << 20, dtype=np.uint8).tobytes()
    path = os.path.join(directory, ".scale_costs_write_test")
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(size // len(block)):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - t0
    os.remove(path)
    return size / seconds


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
    parser.add_argument("--corpus", default=os.path.join(ROOT, "..", "shared", "data", "wikitext-2"),
                        help="a WikiText directory whose train.txt is tokenised to time encoding")
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

    encode = {name: encode_rate(nlist, nlist > faiss_index.MAX_CENTROIDS, centers, rng)
              for name, nlist in (("wt103", 4096), ("wiki3b", 65536))}
    tokens = tokenize_rate(args.corpus)
    disk_rate = disk_write_rate(os.path.join(ROOT, "results"))
    pq_measured_on = min(len(train), FAISS_PQ_SAMPLES)

    def project(name: str, nlist: int) -> dict:
        n = SIZES[name]
        per_query = 32 * n / nlist
        train_keys = min(n, max(faiss_index.MAX_TRAIN, 64 * nlist))
        kmeans_keys, pq_keys = min(train_keys, FAISS_KMEANS_PER_LIST * nlist), min(train_keys, FAISS_PQ_SAMPLES)
        tokens_file = 4 * n
        disk = {"fp16_one_process": n * (2 * D + 4 + CODE + ID) + tokens_file,
                "fp16_sharded": n * (2 * D + 4 + 2 * (CODE + ID)) + tokens_file,  # shard indexes + merged lists
                "none_while_assembling": n * (4 + SEGMENT_BYTES + CODE + ID) + tokens_file,
                "none_after": n * (4 + CODE + ID) + tokens_file}
        out = {"entries": n, "index": faiss_index.auto_factory(n, D), "lists_assumed": nlist,
               "disk_GB": {m: b / 1e9 for m, b in disk.items()},
               "train_keys": train_keys, "kmeans_keys_used_by_faiss": kmeans_keys, "pq_keys_used_by_faiss": pq_keys,
               "train_sample_RAM_GB_process_0": train_keys * D * (2 + 4) / 1e9,  # float16 sample + float32 copy
               "encode_entries_per_s_here": encode[name]["entries_per_s"],
               "index_RAM_on_disk_search": "bounded by the page cache the kernel allows: lists are memory-mapped "
                                           "(see ondisk_memory)"}
        for hosts in (1, 8):
            speedup = HOST_CORES / HERE_CORES
            hours = {
                "tokenize": n / (tokens["tokens_per_s"] * hosts) / 3600 if tokens else None,
                "forward": n / (entries_per_s_gpu * hosts) / 3600 if entries_per_s_gpu else None,
                "index_training": (kmeans_keys * nlist * D * 2 * KMEANS_ITERS / measured["kmeans_multiply_adds_per_s"]
                                   + measured["pq_and_rest_train_seconds"] * pq_keys / pq_measured_on
                                   + encode[name]["quantizer_build_seconds"]) / speedup / 3600,  # once, one host
                "encode_codes": n / (encode[name]["entries_per_s"] * speedup * hosts) / 3600,
                "segment_writes": n * SEGMENT_BYTES / (disk_rate * hosts) / 3600,
                "assemble_lists": n * (SEGMENT_BYTES + CODE + ID) / (disk_rate * hosts) / 3600,
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
        "cpu_build_wt2": build and {"num_entries": build.get("num_entries"), "seconds": build.get("seconds"),
                                    "entries_per_s": {mode: build["num_entries"] / seconds  # index included
                                                      for mode, seconds in (build.get("seconds") or {}).items()}},
        "ondisk_memory": ondisk and {"entries": ondisk["entries"], "in_ram_bytes": ondisk["in_ram_bytes"],
                                     **{name: run["peak_rss_kB"] for name, run in ondisk["runs"].items()},
                                     "completed": {name: run["completed"] for name, run in ondisk["runs"].items()}},
        "index_search_by_n_dim64": index_scale and index_scale.get("search_by_n"),
        "encode_codes_d1024": encode,
        "tokenize": tokens,
        "disk_write_bytes_per_s": disk_rate,
        "projection": {"wt103": project("wt103", 4096), "wiki3b": project("wiki3b", 65536)},
        "assumptions": [
            "host = 1 H200 + 16 CPU cores (the lent machine); CPU rates scaled from this machine by cores",
            "tokenize: one process per host, each its share of the text (the word vocabulary's rate here)",
            "forward: H200 key extraction of the wt103 model (results/gpu_wt103_step.json, batch 4), "
            "2 forward tokens per entry (window 3072, context 1536); data-parallel over hosts",
            "index training: one host; coarse k-means on what FAISS uses of the sample (at most 256 keys per "
            "list) x lists x d x 2 x 10 iterations at the measured multiply-add rate; PQ on what FAISS uses "
            "(at most 65,536 keys), scaled from the measured PQ training; plus building the HNSW quantizer",
            "encode codes: each host encodes its shard's keys at the rate measured with the projection's own "
            "list count and quantizer (IVF4096 flat; IVF65536 HNSW32)",
            "segment writes and list assembly (--keys none): sequential writes at this machine's measured "
            "rate, each host its share; assembling reads every segment byte and writes every list byte",
            "search: nprobe 32, k 1024; cost = codes scanned per query at the measured scan rate, lists of "
            "N / nlist entries; hosts search their shards in parallel (each scans its share)",
            "disk: every copy at its peak: token array 4 B/token, keys fp16 2d, values 4, IVF-PQ64 codes 64 + "
            "ids 8; sharded fp16 builds keep each shard's index and the merged lists (twice); --keys none "
            "holds segments and the assembled lists at once while assembling, then the lists only",
            "not counted: reading the corpus, checkpoints, the evaluation",
        ],
        "machine_note": "2-core shared CPU; other jobs may have run at the same time",
    }
    write_json(os.path.join(ROOT, args.out), result, "python benchmarks/scale_costs.py " + " ".join(sys.argv[1:]))
    print(json.dumps(result["projection"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
