#!/usr/bin/env python
"""FAISS at scale: train once, add per shard, merge on disk, search memory-mapped.

Synthetic keys: a seeded Gaussian mixture (clusters of unequal weight and spread, so IVF
lists are unbalanced as with real keys), generated in blocks of 100k rows, each from its
own seed, so any range is reproducible without storing keys. One IVF-PQ is trained on an
independent draw from the mixture (as good as a random sample of the keys, as rows are
i.i.d.) of ``index.train_size`` rows. Shards of N/10, 2N/10 and 7N/10 keys are added
(rate per shard) and merged on disk after 1, 2 and 3 shards (N/10, 3N/10, N entries).
Search q/s at each N (lists memory-mapped, page cache warm), bytes per entry, and at N
a fresh subprocess under ``/usr/bin/time -v`` with the lists memory-mapped against one
with the whole index in RAM (peak RSS, q/s). Writes ``results/scale_index.json``.

  python benchmarks/scale_index.py                  # 10M entries, dim 64, PQ32 (~10-15 min on 2 cores)
  python benchmarks/scale_index.py --n 200000 --out /tmp/smoke.json   # smoke run
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BLOCK = 100_000


class MixtureKeys:
    """Rows ``[0, n)`` of a seeded Gaussian mixture as float16, made on demand per slice."""

    def __init__(self, n: int, dim: int, seed: int, clusters: int = 1000, offset: int = 0):
        import numpy as np

        rng = np.random.default_rng([seed, 0])  # the mixture itself: the same for keys, sample, queries
        self.centers_CxD = rng.normal(size=(clusters, dim)).astype(np.float32) * 2.0
        self.spread_C = rng.uniform(0.3, 1.2, size=clusters).astype(np.float32)
        self.weights_C = rng.dirichlet(np.full(clusters, 0.5))
        self.shape, self.stream, self.offset = (n, dim), seed, offset
        self.generate_s = 0.0  # time spent making keys, to take out of add rates

    def _block(self, b: int):
        import numpy as np

        rng = np.random.default_rng([self.stream, 1, b])
        z = rng.choice(len(self.weights_C), size=BLOCK, p=self.weights_C)
        noise = rng.standard_normal((BLOCK, self.shape[1]), dtype=np.float32)
        return (self.centers_CxD[z] + noise * self.spread_C[z, None]).astype(np.float16)

    def __getitem__(self, rows: slice):
        import numpy as np

        t0 = time.time()
        start, stop, _ = rows.indices(self.shape[0])
        start, stop = start + self.offset, stop + self.offset
        out = [self._block(b)[max(start - b * BLOCK, 0) : stop - b * BLOCK] for b in range(start // BLOCK, -(-stop // BLOCK))]
        out = np.concatenate(out) if out else np.zeros((0, self.shape[1]), np.float16)
        self.generate_s += time.time() - t0
        return out

    def __len__(self):
        return self.shape[0]


def proc_status() -> dict:
    """Peak and current resident memory of this process (kB), anonymous and file-backed apart."""
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return {k: int(fields[k].split()[0]) for k in ("VmHWM", "VmRSS", "RssAnon", "RssFile")}


def search_child(args) -> int:
    """In a fresh process: open the index, search the queries (1 warm-up + runs), print JSON."""
    import numpy as np

    from knnlm_jax.retrieval import index as ix

    t0 = time.time()
    index = ix.read_index(args.child_search, nprobe=args.nprobe)
    open_s = time.time() - t0
    after_open = proc_status()
    queries_QxD = np.load(args.child_queries)
    times = []
    for _ in range(args.runs + 1):
        t0 = time.time()
        ix.search(index, queries_QxD, args.k)
        times.append(time.time() - t0)
    times = sorted(times[1:])
    print(json.dumps(dict(open_s=round(open_s, 3), after_open=after_open, at_end=proc_status(),
                          ondisk=ix.ondisk_lists(index) is not None, seconds=times,
                          queries_per_s=round(len(queries_QxD) / times[len(times) // 2], 1))))
    return 0


def run_search_child(path: str, queries_path: str, args) -> dict:
    command = ["/usr/bin/time", "-v", sys.executable, os.path.abspath(__file__), "--child-search", path,
               "--child-queries", queries_path, "--nprobe", str(args.nprobe), "--k", str(args.k), "--runs", str(args.runs)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["peak_rss_kB"] = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))
    return result


def median_qps(index, queries_QxD, k: int, runs: int) -> tuple[float, list]:
    from knnlm_jax.retrieval import index as ix

    ix.search(index, queries_QxD, k)  # warm-up
    times = []
    for _ in range(runs):
        t0 = time.time()
        ix.search(index, queries_QxD, k)
        times.append(time.time() - t0)
    return round(len(queries_QxD) / sorted(times)[runs // 2], 1), [round(t, 4) for t in times]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=10_000_000, help="entries in the full index (a multiple of 10 * 100k)")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--pq", type=int, default=32, help="PQ code bytes")
    parser.add_argument("--nlist", type=int, default=None, help="default: index.auto_factory's at N")
    parser.add_argument("--nprobe", type=int, default=32)
    parser.add_argument("--k", type=int, default=1024)
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--batch-queries", type=int, default=16,
                        help="queries of one evaluation batch, for the memory of one search (fresh processes)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default="/tmp/knnlm_scale_index")
    parser.add_argument("--keep", action="store_true", help="keep the index files in --workdir")
    parser.add_argument("--out", default="results/scale_index.json")
    parser.add_argument("--child-search", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-queries", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_search:
        return search_child(args)

    import faiss
    import numpy as np

    from knnlm_jax.retrieval import index as ix
    from knnlm_jax.retrieval import index_shards
    from knnlm_jax.core.report import write_json

    t_start = time.time()
    if args.n % (10 * BLOCK):
        parser.error(f"--n must be a multiple of {10 * BLOCK}")
    nlist = args.nlist or int(re.match(r"IVF(\d+)", ix.auto_factory(args.n, args.dim)).group(1))
    factory = f"IVF{nlist},PQ{args.pq}"
    sizes = [args.n // 10, 2 * args.n // 10, 7 * args.n // 10]
    if os.path.exists(args.workdir):
        shutil.rmtree(args.workdir)
    os.makedirs(args.workdir)

    train_rows = ix.train_size(args.n, factory)
    t0 = time.time()
    trained = ix.train_index(MixtureKeys(train_rows, args.dim, args.seed + 1)[:], factory, args.dim, seed=args.seed,
                             progress=True)
    train_s = time.time() - t0
    queries_QxD = MixtureKeys(args.queries, args.dim, args.seed + 2)[:].astype(np.float32)
    queries_path = os.path.join(args.workdir, "queries.npy")
    np.save(queries_path, queries_QxD)

    shard_paths, shard_results, first = [], [], 0
    for s, size in enumerate(sizes):
        shard = ix.copy_index(trained)
        part = MixtureKeys(size, args.dim, args.seed, offset=first)
        info = ix.add_keys(shard, part, first_id=first, progress=True)
        add_s = info["seconds"] - part.generate_s
        shard_paths.append(os.path.join(args.workdir, f"shard{s}.faiss"))
        ix.write_index(shard, shard_paths[-1])
        del shard
        shard_results.append(dict(first_id=first, entries=size, add_s=round(add_s, 3),
                                  generate_keys_s=round(part.generate_s, 3), add_keys_per_s=round(size / add_s, 1)))
        print(f"shard {s}: {size:,} keys at {size / add_s:,.0f}/s", file=sys.stderr, flush=True)
        first += size

    code_bytes = faiss.extract_index_ivf(trained).code_size
    by_n = []
    for count in range(1, len(sizes) + 1):
        n = sum(sizes[:count])
        directory = os.path.join(args.workdir, f"merged_{n}")
        os.makedirs(directory)
        index_path, ivfdata_path = os.path.join(directory, "index.faiss"), os.path.join(directory, "index.ivfdata")
        merge = index_shards.merge_on_disk(trained, shard_paths[:count], index_path, ivfdata_path)
        index = ix.read_index(index_path, nprobe=args.nprobe)
        qps, times = median_qps(index, queries_QxD, args.k, args.runs)
        del index
        disk = merge["index_bytes"] + merge["ivfdata_bytes"]
        by_n.append(dict(entries=n, shards=count, merge_s=merge["seconds"], index_file_bytes=merge["index_bytes"],
                         ivfdata_bytes=merge["ivfdata_bytes"], bytes_per_entry_on_disk=round(disk / n, 3),
                         codes_and_ids_bytes_per_entry=code_bytes + 8, queries_per_s=qps, search_seconds=times))
        print(f"N={n:,}: {qps:,.0f} q/s, {disk / n:.2f} bytes/entry on disk", file=sys.stderr, flush=True)

    # the full index in RAM, for the comparison: FAISS's in-memory merge of the shards (IndexIVF.merge_from)
    whole = ix.copy_index(trained)
    for path in shard_paths:
        whole.merge_from(ix.faiss.read_index(path), 0)
    ram_path = os.path.join(args.workdir, "index_ram.faiss")
    ix.write_index(whole, ram_path)
    del whole
    ondisk_path = os.path.join(args.workdir, f"merged_{args.n}", "index.faiss")
    mmap_child = run_search_child(ondisk_path, queries_path, args)
    ram_child = run_search_child(ram_path, queries_path, args)
    # one batch of queries touches only its probed lists: what a streaming evaluation holds at a time
    batch_path = os.path.join(args.workdir, "batch_queries.npy")
    np.save(batch_path, queries_QxD[: args.batch_queries])
    batch = dict(queries=args.batch_queries, mmap=run_search_child(ondisk_path, batch_path, args),
                 in_ram=run_search_child(ram_path, batch_path, args))

    payload = dict(
        config=dict(n=args.n, dim=args.dim, factory=factory, nlist=nlist, pq_bytes=args.pq, nprobe=args.nprobe,
                    k=args.k, queries=args.queries, runs=args.runs, seed=args.seed, train_rows=train_rows,
                    shard_sizes=sizes, keys="Gaussian mixture, 1000 clusters (Dirichlet(0.5) weights, spread 0.3-1.2), float16",
                    faiss=faiss.__version__, omp_threads=faiss.omp_get_max_threads()),
        train_s=round(train_s, 3),
        shards=shard_results,
        search_by_n=by_n,
        full_index=dict(entries=args.n, in_ram_codes_and_ids_bytes=args.n * (code_bytes + 8),
                        quantizer_bytes=nlist * args.dim * 4, mmap=mmap_child, in_ram=ram_child,
                        one_batch=batch),
        note=("Machine shared with other engineers' jobs at the same time (2 cores): timings are indicative. "
              "Add rates exclude generating the synthetic keys (generate_keys_s, timed apart). q/s by N are in this process with the page cache warm (the lists were just written). Peak RSS of a "
              "memory-mapped search counts the list pages it touched (RssFile), which the kernel can drop; "
              "RssAnon is the process's own memory."),
        total_s=round(time.time() - t_start, 1),
    )
    write_json(args.out, payload, command="python " + " ".join(sys.argv))
    print(json.dumps({k: payload[k] for k in ("search_by_n", "full_index")}, indent=1))
    if not args.keep:
        shutil.rmtree(args.workdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
