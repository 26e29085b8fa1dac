#!/usr/bin/env python
"""Multi-process builds on WikiText-2: 2 processes on localhost against 1, kill -9 and resume.

1. ``build.py`` with 1 process -> datastore ``one`` (keys/values only);
2. the same with 2 processes (jax.distributed over localhost, gloo) -> ``two``: concatenated
   shards must be byte-identical to ``one``;
3. 2 processes again -> ``killed``; after ``--kill-after`` seconds process 1 gets SIGKILL (and
   process 0, stuck at the end-of-build barrier or dead with the coordinator, is stopped too);
   the same command relaunched resumes both shards, which must equal ``one`` byte for byte.

Writes ``results/scale_build_wt2.json`` (``keys_identical``, ``vals_identical``,
``resumed_identical``, timings, progress at the kill). Needs a trained wt2-config run.

  python benchmarks/scale_build_wt2.py --workdir runs/wt2s --data_dir ../shared/data/wikitext-2
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
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
            "--datastore", name, "--no-index", "--no-progress", *extra]


def launch(cmd, processes: int, log_prefix: str):
    return local_processes.launch(cmd, processes, log_prefix, ROOT)


def wait_all(procs, timeout=None) -> list[int]:
    return [p.wait(timeout=timeout) for p in procs]


def sha(paths) -> str:
    """sha256 of the arrays' data (not their .npy headers), concatenated in order."""
    h = hashlib.sha256()
    for path in paths:
        array = np.load(path, mmap_mode="r")
        for i in range(0, len(array), 1 << 20):
            h.update(np.ascontiguousarray(array[i : i + (1 << 20)]).tobytes())
    return h.hexdigest()


def shard_files(directory: str, name: str) -> list[str]:
    with open(os.path.join(directory, "manifest.json")) as f:
        m = json.load(f)
    if m.get("layout") != "sharded":
        return [os.path.join(directory, name)]
    return [os.path.join(directory, f"shard-{p:05d}-of-{m['num_shards']:05d}", name) for p in range(m["num_shards"])]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="runs/wt2s")
    parser.add_argument("--data_dir", default="../shared/data/wikitext-2")
    parser.add_argument("--kill-after", type=float, default=150.0, help="seconds before process 1 is killed")
    parser.add_argument("--out", default="results/scale_build_wt2.json")
    args = parser.parse_args()
    stores = os.path.join(args.workdir, "datastores")
    logs = os.path.join(args.workdir, "scale_logs")
    os.makedirs(logs, exist_ok=True)
    result = {"workdir": args.workdir, "data_dir": args.data_dir}
    with open(os.path.join(args.workdir, "config.json")) as f:
        config = json.load(f)
    result["model"] = {k: config[k] for k in ("name", "num_layers", "d_model", "num_heads", "d_ff")}
    result["model"]["trained_steps"] = config.get("max_steps")

    timings = {}
    for name, processes in (("one", 1), ("two", 2)):
        t0 = time.time()
        codes = wait_all(launch(build_cmd(args, name, "--overwrite"), processes, os.path.join(logs, name)))
        timings[name] = time.time() - t0
        if any(codes):
            raise SystemExit(f"{name}: exit codes {codes}; see {logs}")
    with open(os.path.join(stores, "one", "manifest.json")) as f:
        n = json.load(f)["num_entries"]
    result.update(num_entries=n, seconds={"one_process": timings["one"], "two_processes": timings["two"]},
                  entries_per_s={"one_process": n / timings["one"], "two_processes": n / timings["two"]})

    ref = {name: sha(shard_files(os.path.join(stores, "one"), name)) for name in ("keys.npy", "vals.npy")}
    two = {name: sha(shard_files(os.path.join(stores, "two"), name)) for name in ("keys.npy", "vals.npy")}
    result.update(sha256_one_process=ref, sha256_two_processes=two, keys_identical=ref["keys.npy"] == two["keys.npy"],
                  vals_identical=ref["vals.npy"] == two["vals.npy"])

    # kill -9 one process mid-build, then relaunch the same command
    killed = os.path.join(stores, "killed")
    procs = launch(build_cmd(args, "killed", "--overwrite"), 2, os.path.join(logs, "killed.first"))
    time.sleep(args.kill_after)
    procs[1].kill()
    procs[1].wait()
    try:
        procs[0].wait(timeout=30)
    except subprocess.TimeoutExpired:
        procs[0].kill()
        procs[0].wait()
    at_kill = []
    for p in range(2):
        with open(os.path.join(killed, f"shard-{p:05d}-of-00002", "manifest.json")) as f:
            m = json.load(f)
        at_kill.append({"progress": m["progress"], "num_entries": m["num_entries"], "status": m["status"]})
    codes = wait_all(launch(build_cmd(args, "killed"), 2, os.path.join(logs, "killed.second")))
    resumed = []
    for p in range(2):
        with open(os.path.join(logs, f"killed.second.{p}.log")) as f:
            resumed += [line.strip() for line in f if line.startswith("resuming datastore")]
    again = {name: sha(shard_files(killed, name)) for name in ("keys.npy", "vals.npy")}
    result.update(kill_after_seconds=args.kill_after, shards_at_kill=at_kill, relaunch_exit_codes=codes,
                  resume_messages=resumed, sha256_killed_and_resumed=again,
                  resumed_identical=again == ref and not any(codes))
    command = "python benchmarks/scale_build_wt2.py " + " ".join(sys.argv[1:])
    write_json(args.out, result, command)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
