#!/usr/bin/env python
"""Peak memory of a datastore build: WikiText-2 train against its first part of lines.

Two ``build.py`` runs (peak RSS from ``wait4``, wall time), into temporary
datastores of the given run (removed afterwards). A streaming build's peak RSS should barely
grow with the corpus: keys and values go to memmaps, the corpus is streamed, and a
``--keys none`` build appends its codes to disk in segments of ``--codes-memory`` MiB and
assembles its index from them a group of lists at a time.

  python benchmarks/build_memory.py --workdir runs/wt2s --data_dir ../shared/data/wikitext-2
  python benchmarks/build_memory.py --workdir runs/wt2 --keys none --fraction 0.1 --codes-memory 16 \
      --index IVF2048,PQ64 --train-keys 200000
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from corpus_part import first_lines  # noqa: E402
from knnlm_jax.core.hashing import file_sha256  # noqa: E402


def _status_kb(pid: int, field: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))
    except (OSError, StopIteration):
        return None


def _watch(proc, directory: str, phase: dict) -> None:
    """Once the trained index is written (``--keys none``), reset the process's peak RSS (Linux
    ``clear_refs`` 5) and follow it: the peak of encoding, appending and assembling codes alone."""
    while proc.poll() is None:
        if "reset" not in phase and os.path.isfile(os.path.join(directory, "trained.faiss")):
            time.sleep(1.0)  # training's arrays are freed when it returns
            with open(f"/proc/{proc.pid}/clear_refs", "w") as f:
                f.write("5")
            phase["reset"] = _status_kb(proc.pid, "VmRSS")
        if "reset" in phase:
            phase["peak"] = max(phase.get("peak", 0), _status_kb(proc.pid, "VmHWM") or 0)
        time.sleep(0.02)


def timed_build(workdir: str, name: str, corpus: str, extra: list[str]) -> dict:
    cmd = [sys.executable, os.path.join(ROOT, "build.py"), "--workdir", workdir, "--datastore", name, "--corpus",
           corpus, "--split", "train", "--no-progress", "--overwrite", *extra]
    directory = os.path.join(workdir, "datastores", name)
    t0, phase = time.time(), {}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    watcher = threading.Thread(target=_watch, args=(proc, directory, phase))
    watcher.start()
    _, status, usage = os.wait4(proc.pid, 0)  # ru_maxrss: the whole build's peak RSS, in kB
    proc.returncode = os.waitstatus_to_exitcode(status)
    watcher.join()
    err = proc.stderr.read()
    if proc.returncode:
        raise SystemExit(f"build failed ({proc.returncode}): {err[-2000:]}")
    stored = [f for f in ("keys.npy", "vals.npy", "index.ivfdata") if os.path.isfile(os.path.join(directory, f))]
    digest = {f"{f.split('.')[0]}_sha256": file_sha256(os.path.join(directory, f)) for f in stored}
    with open(os.path.join(directory, "manifest.json")) as f:
        manifest = json.load(f)
    shutil.rmtree(directory)
    codes = dict(rss_at_reset_kb=phase["reset"], peak_rss_kb=phase["peak"]) if "peak" in phase else None
    return dict(entries=manifest["num_entries"], max_rss_kb=usage.ru_maxrss, codes_phase=codes,
                wall_s=round(time.time() - t0, 1), **digest,
                index={k: manifest["index"][k] for k in ("factory", "segments", "ivfdata_bytes")
                       if k in (manifest.get("index") or {})}, command=" ".join(cmd[1:]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="a trained wt2-config run")
    parser.add_argument("--data_dir", default="../shared/data/wikitext-2")
    parser.add_argument("--fraction", type=float, default=0.25, help="the smaller corpus: this first part of lines")
    parser.add_argument("--keys", default="fp16", choices=("fp16", "none"),
                        help="fp16: keys and values, no index; none: codes only, index assembled")
    parser.add_argument("--codes-memory", default=None, help="build.py --codes-memory (with --keys none)")
    parser.add_argument("--index", default=None, help="FAISS factory for both builds (with --keys none)")
    parser.add_argument("--train-keys", default=None, help="build.py --train-keys: the same training sample in both")
    parser.add_argument("--out", default=None, help="default results/build_memory_wt2.json, or "
                                                    "results/build_memory_codes_wt2.json with --keys none")
    args = parser.parse_args()
    from knnlm_jax.core.report import write_json

    out = args.out or os.path.join(ROOT, "results", "build_memory_codes_wt2.json" if args.keys == "none"
                                   else "build_memory_wt2.json")
    extra = ["--no-index"] if args.keys == "fp16" else ["--keys", "none"]
    extra += ["--codes-memory", args.codes_memory] if args.codes_memory else []
    extra += ["--index", args.index] if args.index else []
    extra += ["--train-keys", args.train_keys] if args.train_keys else []
    with tempfile.TemporaryDirectory() as tmp:
        part_dir = first_lines(args.data_dir, args.fraction, os.path.join(tmp, "part"))
        full = timed_build(args.workdir, "memory-full", os.path.abspath(args.data_dir), extra)
        part = timed_build(args.workdir, "memory-part", part_dir, extra)
    kind = "no index" if args.keys == "fp16" else (f"--keys none, index assembled, --codes-memory {args.codes_memory}, "
                                                   f"--train-keys {args.train_keys}")
    payload = dict(what=f"peak RSS of a datastore build ({kind}): WikiText-2 train against its first "
                        f"{args.fraction:g} of lines (max_rss_kb: the whole build, wait4's ru_maxrss; codes_phase: "
                        "the peak after the trained index is written, VmHWM reset then)",
                   workdir=args.workdir, full=full, part=part,
                   entries_ratio=round(full["entries"] / part["entries"], 2),
                   difference_mib=round((full["max_rss_kb"] - part["max_rss_kb"]) / 1024, 1))
    if full["codes_phase"] and part["codes_phase"]:
        payload["codes_phase_difference_mib"] = round(
            (full["codes_phase"]["peak_rss_kb"] - part["codes_phase"]["peak_rss_kb"]) / 1024, 1)
    write_json(out, payload)
    print(f"full {full['entries']:,} entries: {full['max_rss_kb']:,} kB; part {part['entries']:,}: "
          f"{part['max_rss_kb']:,} kB; {payload['difference_mib']:+.1f} MiB"
          + (f"; codes phase {payload['codes_phase_difference_mib']:+.1f} MiB" if "codes_phase_difference_mib" in payload
             else "") + f" -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
