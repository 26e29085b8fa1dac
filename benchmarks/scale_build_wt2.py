#!/usr/bin/env python
"""Multi-process builds on WikiText-2: 2 processes on localhost against 1, kills and relaunches.

1. ``build.py`` with 1 process -> datastore ``one`` (keys, values, its own index);
2. the same with 2 processes (jax.distributed over localhost, gloo) -> ``two``, its index trained
   independently: concatenated shards must be byte-identical to ``one``, and the index the same
   (coarse centroids and PQ codebooks bit for bit, the same neighbours and distances for a sample
   of queries);
3. two runs that ``kill -9`` process 1 (the command as launched; its work dies with it):
   ``after_coordinator_shard`` when shard 0 is nearly done and shard 1 (its process niced) is not (process 0 then
   completes its shard before it learns of the death), ``during_merge`` once process 0 has
   begun merging the shards' lists. The survivor must exit by itself (its exit status, seconds
   and last line, and the shards' statuses at the kill and after, are recorded); the same two
   commands relaunched must finish the datastore with the bytes and neighbours of ``one``.

Writes ``results/scale_build_wt2.json``. Needs a trained run (default ``runs/wt2``).

  python benchmarks/scale_build_wt2.py --workdir runs/wt2 --data_dir ../shared/data/wikitext-2
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from knnlm_jax.core.report import write_json  # noqa: E402

import local_processes  # noqa: E402


def build_cmd(args, name, *extra):
    return [sys.executable, os.path.join(ROOT, "build.py"), "--workdir", args.workdir, "--data_dir", args.data_dir,
            "--datastore", name, "--no-progress", *extra]


def sha(paths) -> str:
    """sha256 of the arrays' data (not their .npy headers), concatenated in order."""
    h = hashlib.sha256()
    for path in paths:
        array = np.load(path, mmap_mode="r")
        for i in range(0, len(array), 1 << 20):
            h.update(np.ascontiguousarray(array[i : i + (1 << 20)]).tobytes())
    return h.hexdigest()


def manifest(directory: str) -> dict:
    with open(os.path.join(directory, "manifest.json")) as f:
        return json.load(f)


def shard_files(directory: str, name: str) -> list[str]:
    m = manifest(directory)
    if m.get("layout") != "sharded":
        return [os.path.join(directory, name)]
    return [os.path.join(directory, f"shard-{p:05d}-of-{m['num_shards']:05d}", name) for p in range(m["num_shards"])]


def data_hashes(directory: str) -> dict:
    return {name: sha(shard_files(directory, name)) for name in ("keys.npy", "vals.npy")}


def index_answers(directory: str, queries_QxD: np.ndarray, k: int = 64) -> dict:
    """The index's trained parts' hash and its neighbours of ``queries`` (at the manifest's nprobe)."""
    from knnlm_jax.retrieval import index as faiss_index

    m = manifest(directory)
    index = faiss_index.read_index(os.path.join(directory, m["index"]["file"]), mmap=True)
    ivf = faiss_index.faiss.extract_index_ivf(index)
    centroids = ivf.quantizer.reconstruct_n(0, ivf.nlist)
    pq = faiss_index.faiss.vector_to_array(faiss_index.faiss.downcast_index(ivf).pq.centroids)
    dists, ids = faiss_index.search(index, queries_QxD, k, m["index"]["nprobe"])
    trained = hashlib.sha256(centroids.tobytes() + pq.tobytes()).hexdigest()
    return dict(trained=trained, dists=dists, ids=ids, factory=m["index"]["factory"])


def same_index(a: dict, b: dict) -> bool:
    return (a["trained"] == b["trained"] and a["factory"] == b["factory"] and np.array_equal(a["ids"], b["ids"])
            and np.array_equal(a["dists"], b["dists"]))


def wait_for(condition, procs, timeout: float = 3600) -> None:
    deadline = time.time() + timeout
    while not condition():
        if any(p.poll() is not None for p in procs) or time.time() > deadline:
            raise SystemExit("the build ended (or took too long) before the moment to kill it")
        time.sleep(0.2)


def killed_and_relaunched(args, name: str, moment, logs: str, niceness=None) -> dict:
    """Kill process 1 at ``moment``, let process 0 notice, relaunch both; what happened."""
    directory = os.path.join(args.workdir, "datastores", name)
    shutil.rmtree(directory, ignore_errors=True)  # an earlier run's files must not trigger the kill
    procs = local_processes.launch(build_cmd(args, name), 2, os.path.join(logs, f"{name}.first"), ROOT, niceness)
    try:
        wait_for(lambda: moment(directory), procs)
    except SystemExit:
        for proc in procs:  # nothing it started outlives it
            proc.kill()
            proc.wait()
        raise
    at_kill = {f"shard {p}": manifest(os.path.join(directory, f"shard-{p:05d}-of-00002")).get("status")
               for p in range(2)}
    killed = time.time()
    procs[1].send_signal(signal.SIGKILL)
    procs[1].wait()
    try:
        survivor_status = procs[0].wait(timeout=120)
    except subprocess.TimeoutExpired:
        survivor_status = None
        procs[0].kill()
        procs[0].wait()
    survivor_seconds = time.time() - killed
    after = {f"shard {p}": manifest(os.path.join(directory, f"shard-{p:05d}-of-00002")).get("status")
             for p in range(2)}
    with open(os.path.join(logs, f"{name}.first.0.log")) as f:
        lines = [line.rstrip() for line in f if line.strip()]
    t0 = time.time()
    codes = [p.wait() for p in local_processes.launch(build_cmd(args, name), 2, os.path.join(logs, f"{name}.second"),
                                                       ROOT)]
    relaunch_seconds = time.time() - t0
    kept = []
    for p in range(2):
        with open(os.path.join(logs, f"{name}.second.{p}.log")) as f:
            kept += [line.strip() for line in f if "complete, kept" in line or line.startswith("resuming")
                     or "indexing it" in line or "nothing to do" in line]
    return dict(statuses_at_kill=at_kill, statuses_after_survivor_exit=after, survivor_exit_status=survivor_status,
                survivor_exit_seconds=round(survivor_seconds, 1), survivor_last_line=lines[-1] if lines else "",
                relaunch_exit_codes=codes, relaunch_seconds=round(relaunch_seconds, 1), relaunch_messages=kept,
                directory=directory)


def coordinator_nearly_done(directory: str, fraction: float = 0.985) -> bool:
    """Shard 0 within its last 1.5% (a few seconds) and shard 1 not complete (process 1 runs at niceness 19,
    so it is well behind)."""
    shards = [os.path.join(directory, f"shard-{p:05d}-of-00002") for p in range(2)]
    if not all(os.path.exists(os.path.join(d, "manifest.json")) for d in shards):
        return False
    m0, m1 = (manifest(d) for d in shards)
    return m0.get("progress", 0) >= fraction * m0["num_entries"] and m1.get("status") != "complete"


def merging(directory: str) -> bool:
    """Process 0 is writing the merged lists (``index.ivfdata.tmp``, renamed when complete)."""
    return os.path.exists(os.path.join(directory, "index.ivfdata.tmp"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="runs/wt2")
    parser.add_argument("--data_dir", default="../shared/data/wikitext-2")
    parser.add_argument("--queries", type=int, default=2000, help="stored keys searched to compare indexes")
    parser.add_argument("--out", default="results/scale_build_wt2.json")
    parser.add_argument("--keep-builds", action="store_true",
                        help="reuse complete datastores one and two of an earlier run (their build times too)")
    args = parser.parse_args()
    stores = os.path.join(args.workdir, "datastores")
    logs = os.path.join(args.workdir, "scale_logs")
    os.makedirs(logs, exist_ok=True)
    with open(os.path.join(args.workdir, "config.json")) as f:
        config = json.load(f)
    result = {"workdir": args.workdir, "data_dir": args.data_dir,
              "model": {k: config.get(k) for k in ("name", "num_layers", "d_model", "max_steps")}}

    seconds = {}
    for name, processes in (("one", 1), ("two", 2)):
        if args.keep_builds and os.path.exists(os.path.join(stores, name, "index.faiss")):
            with open(args.out) as f:
                seconds[name] = json.load(f)["seconds"][f"{'one' if processes == 1 else 'two'}_process"
                                                       + ("es" if processes == 2 else "")]
            continue
        t0 = time.time()
        codes = [p.wait() for p in local_processes.launch(build_cmd(args, name, "--overwrite"), processes,
                                                          os.path.join(logs, name), ROOT)]
        seconds[name] = round(time.time() - t0, 1)
        if any(codes):
            raise SystemExit(f"{name}: exit codes {codes}; see {logs}")
    n = manifest(os.path.join(stores, "one"))["num_entries"]
    rows = np.linspace(0, n - 1, args.queries).astype(np.int64)
    queries = np.asarray(np.load(os.path.join(stores, "one", "keys.npy"), mmap_mode="r")[rows], np.float32)
    ref, ref_index = data_hashes(os.path.join(stores, "one")), index_answers(os.path.join(stores, "one"), queries)
    two, two_index = data_hashes(os.path.join(stores, "two")), index_answers(os.path.join(stores, "two"), queries)
    result.update(num_entries=n, index=ref_index["factory"], seconds={"one_process": seconds["one"],
                                                                      "two_processes": seconds["two"]},
                  sha256_one_process=ref, keys_identical=ref["keys.npy"] == two["keys.npy"],
                  vals_identical=ref["vals.npy"] == two["vals.npy"],
                  index_identical_to_one_process=same_index(ref_index, two_index),
                  index_compared_on=f"trained centroids and PQ codebooks; top-64 ids and distances of {len(queries)} "
                                    "stored keys (independently trained indexes)")
    kills = {}
    for name, moment, niceness in (("after_coordinator_shard", coordinator_nearly_done, [0, 19]),
                                   ("during_merge", merging, None)):
        kill = killed_and_relaunched(args, name, moment, logs, niceness)
        directory = kill.pop("directory")
        kill.update(resumed_identical=not any(kill["relaunch_exit_codes"]) and data_hashes(directory) == ref
                    and same_index(index_answers(directory, queries), ref_index))
        kills[name] = kill
        print(name, json.dumps(kill, indent=2), flush=True)
    result.update(kills=kills, resumed_identical=all(k["resumed_identical"] for k in kills.values()))
    write_json(args.out, result, "python benchmarks/scale_build_wt2.py " + " ".join(sys.argv[1:]))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
