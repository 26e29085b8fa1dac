#!/usr/bin/env python
"""Peak memory of vocabulary + tokenization on a 2M- and a 20M-token corpus.

Corpora (written to a temp dir): ``small`` is WikiText-2 train as is (2.09M tokens with the
``</s>`` per line); ``large`` is it 10 times, where in repetition r = 1..9 every word whose
crc32 is divisible by 4 gets the suffix ``_r`` (so the vocabulary grows too, 33k -> ~100k
words, as a real larger corpus's does). Each is processed in a fresh subprocess under
``/usr/bin/time -v``: ``Vocab.build(read_split(path).lines())`` then ``load_tokens`` (chunked
encoding into an int32 .npy, hashing in the same pass), which returns a memmap that the child
does not read through. Peak RSS of both, their difference, tokens, seconds, the command and the
machine go to ``results/corpus_memory.json``. Target: the 20M peak exceeds the 2M peak by
< 256 MiB (it would be ~20x the 2M working set if the corpus were held whole).

  python benchmarks/corpus_memory.py [--wikitext ../shared/data/wikitext-2/train.txt]
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CHILD = """
import json, sys, time
from knnlm_jax.data import corpus
from knnlm_jax.data import token_cache
from knnlm_jax.data.vocab import Vocab
t = time.perf_counter()
data = corpus.read_split(sys.argv[1], "train", cache_dir=sys.argv[2])
vocab = Vocab.build(data.lines())
ids = token_cache.load_tokens(sys.argv[2], data, vocab)
print(json.dumps(dict(tokens=len(ids), vocab=len(vocab), last=int(ids[-1]), sha256=data.sha256,
                      seconds=time.perf_counter() - t)))
"""


def varied(line: str, r: int) -> str:
    """Repetition ``r`` of a line: words with crc32 % 4 == 0 get the suffix ``_r`` (r = 0: unchanged)."""
    if r == 0:
        return line
    return " ".join(w + f"_{r}" if w and zlib.crc32(w.encode()) % 4 == 0 else w for w in line.split(" "))


def write_corpora(source: str, directory: str) -> dict:
    with open(source, encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f]
    paths = {"small": os.path.join(directory, "small.txt"), "large": os.path.join(directory, "large.txt")}
    with open(paths["small"], "w", encoding="utf-8") as f:
        f.writelines(line + "\n" for line in lines)
    with open(paths["large"], "w", encoding="utf-8") as f:
        for r in range(10):
            f.writelines(varied(line, r) + "\n" for line in lines)
    return paths


def measure(path: str, cache: str) -> dict:
    cmd = ["/usr/bin/time", "-v", sys.executable, "-c", CHILD, path, cache]
    t = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", out.stderr).group(1))
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return dict(result, peak_rss_kb=peak_kb, wall_seconds=wall, bytes=os.path.getsize(path))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wikitext", default=os.path.join(os.path.dirname(ROOT), "shared", "data", "wikitext-2",
                                                           "train.txt"))
    parser.add_argument("--out", default="results/corpus_memory.json")
    args = parser.parse_args()
    if not os.path.isfile(args.wikitext):
        print(f"corpus_memory.py: {args.wikitext} is absent", file=sys.stderr)
        return 2
    from knnlm_jax.core.report import write_json

    with tempfile.TemporaryDirectory() as tmp:
        paths = write_corpora(args.wikitext, tmp)
        runs = {name: measure(path, os.path.join(tmp, f"cache-{name}")) for name, path in paths.items()}
    small, large = runs["small"], runs["large"]
    diff_mib = (large["peak_rss_kb"] - small["peak_rss_kb"]) / 1024
    payload = dict(
        what="peak RSS of Vocab.build(read_split(file).lines()) + load_tokens, each in a fresh process "
             "(/usr/bin/time -v); large = WikiText-2 train x10, repetitions 1-9 with words of crc32 % 4 == 0 "
             "suffixed _r so the vocabulary grows",
        source=os.path.abspath(args.wikitext), small=small, large=large,
        peak_rss_difference_mib=round(diff_mib, 1), target_mib=256, met=diff_mib < 256,
        child_script=CHILD.strip())
    write_json(os.path.join(ROOT, args.out) if not os.path.isabs(args.out) else args.out, payload,
               command="python benchmarks/corpus_memory.py " + " ".join(sys.argv[1:]))
    for name, r in runs.items():
        print(f"{name}: {r['tokens']:,} tokens, vocabulary {r['vocab']:,}, peak RSS {r['peak_rss_kb'] / 1024:.1f} MiB, "
              f"{r['seconds']:.1f} s")
    print(f"difference {diff_mib:.1f} MiB (target < 256): {'met' if diff_mib < 256 else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
