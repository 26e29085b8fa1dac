#!/usr/bin/env python
"""Peak memory of a datastore build: WikiText-2 train against its first quarter of lines.

Two ``build.py --no-index`` runs under ``/usr/bin/time -v`` (peak RSS, wall time), into
temporary datastores of the given run (removed afterwards). A streaming build's peak RSS
should barely grow with the corpus (keys and values go to memmaps, the corpus is streamed).

  python benchmarks/build_memory.py --workdir runs/wt2s --data_dir ../shared/data/wikitext-2
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from knnlm_jax.core.hashing import file_sha256  # noqa: E402


def timed_build(workdir: str, name: str, corpus: str) -> dict:
    cmd = ["/usr/bin/time", "-v", sys.executable, os.path.join(ROOT, "build.py"), "--workdir", workdir,
           "--datastore", name, "--corpus", corpus, "--split", "train", "--no-index", "--no-progress", "--overwrite"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        raise SystemExit(f"build failed ({out.returncode}): {out.stderr[-2000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", out.stderr).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", out.stderr).group(1)
    directory = os.path.join(workdir, "datastores", name)
    digest = {array: file_sha256(os.path.join(directory, f"{array}.npy")) for array in ("keys", "vals")}
    import json

    with open(os.path.join(directory, "manifest.json")) as f:
        entries = json.load(f)["num_entries"]
    shutil.rmtree(directory)
    return dict(entries=entries, max_rss_kb=rss, wall=wall, keys_sha256=digest["keys"], vals_sha256=digest["vals"],
                command=" ".join(cmd[2:]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="a trained wt2-config run")
    parser.add_argument("--data_dir", default="../shared/data/wikitext-2")
    parser.add_argument("--out", default=os.path.join(ROOT, "results", "build_memory_wt2.json"))
    args = parser.parse_args()
    from knnlm_jax.core.report import write_json

    train = os.path.join(args.data_dir, "train.txt")
    with open(train) as f:
        lines = f.readlines()
    with tempfile.TemporaryDirectory() as tmp:
        quarter = os.path.join(tmp, "quarter", "train.txt")
        os.makedirs(os.path.dirname(quarter))
        with open(quarter, "w") as f:
            f.writelines(lines[: len(lines) // 4])
        full = timed_build(args.workdir, "memory-full", os.path.abspath(args.data_dir))
        part = timed_build(args.workdir, "memory-quarter", os.path.dirname(quarter))
    payload = dict(what="peak RSS of a datastore build (no index): WikiText-2 train against its first quarter of "
                        "lines; /usr/bin/time -v", workdir=args.workdir, full=full, quarter=part,
                   difference_mib=round((full["max_rss_kb"] - part["max_rss_kb"]) / 1024, 1))
    write_json(args.out, payload)
    print(f"full {full['entries']:,} entries: {full['max_rss_kb']:,} kB; quarter {part['entries']:,}: "
          f"{part['max_rss_kb']:,} kB; +{payload['difference_mib']} MiB -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
