#!/usr/bin/env python
"""Memory of searching an index merged on disk against the same index in RAM, with and without a memory cap.

Builds a 10M-entry IVF-PQ from 3 shards (synthetic clustered keys), merges it on disk
(``index_shards.merge_on_disk``) and also keeps it whole in RAM (one file, read fully).
Each search runs in a fresh process under ``/usr/bin/time -v`` (peak RSS): free, and inside
a cgroup-v1 memory cap below the in-RAM index's size. Mapped list pages are page cache: the
kernel drops them under the cap, so the on-disk search keeps working in a fraction of the
index's size, while reading the index into RAM cannot fit. Needs root (cgroup v1 memory).
Writes ``results/ondisk_memory.json``.

  python benchmarks/ondisk_memory.py [--n 10000000] [--cap-mb 256]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from knnlm_jax.retrieval import index as ix  # noqa: E402
from knnlm_jax.retrieval import index_shards  # noqa: E402
from knnlm_jax.core.report import write_json  # noqa: E402

CGROUP = "/sys/fs/cgroup/memory/knnlm_ondisk_memory"


def keys(n: int, dim: int, seed: int, centers: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (centers[rng.integers(len(centers), size=n)] + rng.normal(scale=0.6, size=(n, dim))).astype(np.float32)


def child(args) -> int:
    """Open the index, search the queries once, print what it found (runs in the measured process)."""
    t0 = time.time()
    index = ix.read_index(args.child, nprobe=args.nprobe, mmap=args.mmap)
    queries = np.load(args.queries)
    dists, ids = ix.search(index, queries, args.k)
    print(f"ok {index.ntotal} {int((ids >= 0).sum())} {time.time() - t0:.2f}")
    return 0


def evict(path: str) -> None:
    """Drop a file's pages from the page cache, so the next reader faults them in (and is charged for them)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def measure(path: str, queries: str, args, *, mmap: bool, cap_mb: int | None) -> dict:
    directory = os.path.dirname(path)
    for name in os.listdir(directory):  # a cold start: the writer's pages are not the reader's
        if name.endswith((".faiss", ".ivfdata")):
            evict(os.path.join(directory, name))
    cmd = ["/usr/bin/time", "-v", sys.executable, os.path.abspath(__file__), "--child", path, "--queries", queries,
           "--nprobe", str(args.nprobe), "--k", str(args.k)] + (["--mmap"] if mmap else [])
    if cap_mb is not None:
        os.makedirs(CGROUP, exist_ok=True)
        with open(os.path.join(CGROUP, "memory.limit_in_bytes"), "w") as f:
            f.write(str(cap_mb << 20))
        cmd = ["sh", "-c", f'echo $$ > {CGROUP}/cgroup.procs && exec "$@"', "sh", *cmd]
    done = subprocess.run(cmd, capture_output=True, text=True)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    return dict(mmap=mmap, cap_mb=cap_mb, exit_status=done.returncode, completed=done.stdout.startswith("ok"),
                peak_rss_kB=int(rss.group(1)) if rss else None, output=done.stdout.strip()[-200:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=10_000_000)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--nlist", type=int, default=1024)
    parser.add_argument("--codes", default="SQ8", help="code of each entry (SQ8: d bytes, fast to encode; PQ32...)")
    parser.add_argument("--queries", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--n-queries", type=int, default=64)
    parser.add_argument("--nprobe", type=int, default=32)
    parser.add_argument("--k", type=int, default=1024)
    parser.add_argument("--cap-mb", type=int, default=256)
    parser.add_argument("--mmap", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", default="/tmp/knnlm_ondisk_memory")
    parser.add_argument("--out", default="results/ondisk_memory.json")
    args = parser.parse_args()
    if args.child:
        return child(args)
    shutil.rmtree(args.workdir, ignore_errors=True)
    os.makedirs(args.workdir)
    centers = np.random.default_rng(0).normal(scale=3.0, size=(4 * args.nlist, args.dim))
    factory = f"IVF{args.nlist},{args.codes}"
    t0 = time.time()
    trained = ix.train_index(keys(64 * args.nlist, args.dim, 1, centers), factory, args.dim, seed=0)
    train_s = time.time() - t0
    sizes = [args.n // 10, 2 * args.n // 10, args.n - 3 * args.n // 10]
    paths, first, t0 = [], 0, time.time()
    whole = ix.copy_index(trained)
    for s, size in enumerate(sizes):
        shard = ix.copy_index(trained)
        for a in range(0, size, 1_000_000):
            chunk = keys(min(1_000_000, size - a), args.dim, 100 + s * 1000 + a // 1_000_000, centers)
            ix.add_keys(shard, chunk, first_id=first + a, progress=False)
        paths.append(os.path.join(args.workdir, f"shard{s}.faiss"))
        ix.write_index(shard, paths[-1])
        whole.merge_from(shard, 0)
        del shard
        first += size
    add_s = time.time() - t0
    merged = os.path.join(args.workdir, "merged", "index.faiss")
    os.makedirs(os.path.dirname(merged))
    merge = index_shards.merge_on_disk(trained, paths, merged, os.path.join(args.workdir, "merged", "index.ivfdata"))
    ram = os.path.join(args.workdir, "ram.faiss")
    ix.write_index(whole, ram)
    del whole
    queries = os.path.join(args.workdir, "queries.npy")
    np.save(queries, keys(args.n_queries, args.dim, 7, centers))
    runs = {
        "on_disk": measure(merged, queries, args, mmap=True, cap_mb=None),
        "in_ram": measure(ram, queries, args, mmap=False, cap_mb=None),
        "on_disk_capped": measure(merged, queries, args, mmap=True, cap_mb=args.cap_mb),
        "in_ram_capped": measure(ram, queries, args, mmap=False, cap_mb=args.cap_mb),
    }
    code = ix.faiss.extract_index_ivf(trained).code_size
    result = dict(entries=args.n, dim=args.dim, index=factory, nprobe=args.nprobe, k=args.k, queries=args.n_queries,
                  in_ram_bytes=args.n * (code + 8), ivfdata_bytes=merge["ivfdata_bytes"], train_seconds=train_s,
                  add_seconds=add_s, add_entries_per_s=args.n / add_s, merge_seconds=merge["seconds"], runs=runs,
                  note="peak RSS counts mapped list pages (page cache) the search touched; under the cap the kernel "
                       "drops them, so the on-disk search completes in far less memory than the index, while the "
                       "in-RAM index cannot be loaded. Shared 2-core machine: times are indicative.")
    write_json(os.path.join(ROOT, args.out), result, "python benchmarks/ondisk_memory.py " + " ".join(sys.argv[1:]))
    shutil.rmtree(args.workdir, ignore_errors=True)
    print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
