#!/usr/bin/env python
"""Peak memory of training against the corpus size: WikiText-2 train against its first part of lines.

Two short ``train.py --config wt2`` runs (the same model: the vocabulary capped at ``--vocab``
words, which both corpora have; ``--steps`` updates and the final validation), each in a
fresh temporary run directory, peak RSS from ``wait4``. Training reads each step's blocks from
the token file (no copy of the corpus, nothing of it resident), so the peak should not grow
with the corpus. The smaller corpus is a temporary directory: the first lines of train.txt,
with valid.txt and test.txt linked, not copied.

  python benchmarks/train_memory.py --data_dir ../shared/data/wikitext-2 --fraction 0.1
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def timed_train(corpus: str, workdir: str, steps: int, vocab: int) -> dict:
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--config", "wt2", "--workdir", workdir, "--data_dir",
           corpus, "--no-progress", "--set", f"max_steps={steps}", "--set", f"vocab_size={vocab}",
           "--set", f"eval_every={steps}", "--set", f"checkpoint_every={steps}", "--set", "warmup_steps=1"]
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    out, err = proc.stdout.read(), proc.stderr.read()
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"training failed: {err[-2000:]}")
    tokens = [f for f in os.listdir(os.path.join(workdir, "tokens")) if f.startswith("train-")]
    n = os.path.getsize(os.path.join(workdir, "tokens", tokens[0])) // 4 - 32  # 128-byte .npy header
    return dict(train_tokens=n, max_rss_kb=usage.ru_maxrss, wall_s=round(time.time() - t0, 1),
                last_line=out.strip().splitlines()[-1] if out.strip() else "", command=" ".join(cmd[1:]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default="../shared/data/wikitext-2")
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--vocab", type=int, default=10000)
    parser.add_argument("--out", default=os.path.join(ROOT, "results", "train_memory_wt2.json"))
    args = parser.parse_args()
    from corpus_part import first_lines
    from knnlm_jax.core.report import write_json

    data_dir = os.path.abspath(args.data_dir)
    with tempfile.TemporaryDirectory() as tmp:
        part = first_lines(data_dir, args.fraction, os.path.join(tmp, "part"))
        full = timed_train(data_dir, os.path.join(tmp, "run-full"), args.steps, args.vocab)
        small = timed_train(part, os.path.join(tmp, "run-part"), args.steps, args.vocab)
    payload = dict(what=f"peak RSS of {args.steps} training updates and the final validation (wt2 config, "
                        f"vocabulary {args.vocab}): WikiText-2 train against its first {args.fraction:g} of lines; "
                        "wait4's ru_maxrss", full=full, part=small,
                   tokens_ratio=round(full["train_tokens"] / small["train_tokens"], 2),
                   difference_mib=round((full["max_rss_kb"] - small["max_rss_kb"]) / 1024, 1))
    write_json(args.out, payload)
    print(f"full {full['train_tokens']:,} tokens: {full['max_rss_kb']:,} kB; part {small['train_tokens']:,}: "
          f"{small['max_rss_kb']:,} kB; {payload['difference_mib']:+.1f} MiB -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
