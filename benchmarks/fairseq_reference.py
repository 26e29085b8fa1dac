#!/usr/bin/env python
"""A tiny fairseq ``transformer_lm_wiki103`` made and scored by fairseq itself, for the tests.

  /path/to/fairseq-venv/bin/python benchmarks/fairseq_reference.py --fairseq-src /path/to/fairseq

The interpreter needs torch and fairseq's own requirements (hydra-core 1.0, omegaconf 2.0,
regex, sacrebleu, bitarray, cython, scikit-learn, tqdm), not fairseq installed: ``--fairseq-src``
is a checkout of facebookresearch/fairseq. fairseq 0.12's dataclass configs (and hydra 1.0's)
predate Python 3.11's ban on mutable dataclass defaults, so a copy of both in a temporary
directory is patched (``x: C = C()`` becomes ``field(default_factory=C)``) and the two Cython
modules fairseq's data pipeline needs are compiled there; nothing of fairseq enters this
repository but the files fairseq writes.

What runs is what a fairseq user types, in fairseq's own code:

1. ``fairseq-preprocess --only-source``: a random word-level corpus (60 words, Zipf-like, one
   out-of-vocabulary word in test) binarized; fairseq writes ``dict.txt`` (count-sorted).
2. ``fairseq-train --arch transformer_lm_wiki103`` shrunk (2 layers, d 32, 4 heads, FFN 64,
   cutoffs 16,40, factor 4; the architecture's pre-norm layers, sinusoidal positions, tied
   adaptive input/softmax weights and projections, no final LayerNorm), ``adaptive_loss``,
   a few Adam updates at a large learning rate so that no LayerNorm or bias keeps its constant
   initial value; fairseq's trainer writes the checkpoint (``cfg`` with ``tokens_per_sample``,
   ``model``, ``optimizer_history``, meters).
3. ``fairseq-eval-lm`` on test with ``--context-window`` (blocks of ``tokens_per_sample -
   context_window`` tokens, each after up to ``context_window`` earlier ones, as in the paper),
   eval mode, float32. Its ``SequenceScorer`` is tapped to keep each batch's inputs, the
   scored log-probs (``positional_scores``) and the full distribution
   (``get_normalized_probs(..., log_probs=True)``).

Writes ``tests/fixtures/fairseq_tiny/``: ``checkpoint.pt``, ``dict.txt``, ``reference.npz`` and
``reference.json`` (the command, fairseq commit, versions, fairseq's command lines, sha256s).
"""

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from importlib.metadata import version

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PACKAGES = ("torch", "numpy", "hydra-core", "omegaconf", "cython")  # the versions reference.json records
N_WORDS = 60  # + fairseq's 4 specials = 64 ids, a multiple of fairseq-preprocess's padding factor 8
TOKENS_PER_SAMPLE = 40  # the trained window; not the wt103 default 3072, so a test can tell them apart
CONTEXT_WINDOW = 20  # eval-lm: blocks of 20 tokens, each scored after up to 20 earlier ones
TEST_TOKENS = 100  # a whole number of blocks, </s> of each line included
ARCH = ["--arch", "transformer_lm_wiki103", "--decoder-layers", "2", "--decoder-embed-dim", "32",
        "--decoder-ffn-embed-dim", "64", "--decoder-attention-heads", "4",
        "--adaptive-input-cutoff", "16,40", "--adaptive-softmax-cutoff", "16,40"]
TRAIN = ["--task", "language_modeling", "--tokens-per-sample", str(TOKENS_PER_SAMPLE), "--sample-break-mode", "none",
         "--criterion", "adaptive_loss", "--ddp-backend", "legacy_ddp",  # adaptive_loss refuses pytorch_ddp
         "--optimizer", "adam", "--lr", "0.05", "--lr-scheduler", "fixed", "--max-update", "4", "--seed", "1",
         # fairseq drops a last batch whose size is not a multiple of this (default 8): here, every batch
         "--batch-size", "2", "--required-batch-size-multiple", "1",
         "--cpu", "--num-workers", "0", "--no-progress-bar", "--save-dir", "checkpoints", "--no-epoch-checkpoints"]
PREPROCESS = ["--only-source", "--trainpref", "text/train.txt", "--validpref", "text/valid.txt", "--testpref",
              "text/test.txt", "--destdir", "data-bin/tiny", "--workers", "1"]
EVAL = ["--path", "checkpoints/checkpoint_last.pt", "--gen-subset", "test", "--tokens-per-sample",
        str(TOKENS_PER_SAMPLE), "--context-window", str(CONTEXT_WINDOW), "--max-tokens", "36000", "--cpu",
        "--num-workers", "0", "--no-progress-bar"]


# ---------------------------------------------------------------------------------
# fairseq on this Python: a patched copy


def patch_dataclass_defaults(package_dir: str) -> None:
    """Rewrite ``name: C = C()`` and ``field(default=C())`` as ``default_factory`` (Python >= 3.11
    refuses unhashable dataclass defaults), and the one place fairseq reads such a ``.default``."""
    for root, _, files in os.walk(package_dir):
        for name in (n for n in files if n.endswith(".py")):
            path = os.path.join(root, name)
            with open(path, encoding="utf-8") as f:
                text = f.read()
            new = re.sub(r"^(\s+\w+: (\w+) = )\2\(\)\s*$", r"\1field(default_factory=\2)", text, flags=re.M)
            new = re.sub(r"field\(default=(\w+)\(\)\)", r"field(default_factory=\1)", new)
            new = new.replace(  # fairseq.dataclass.initialize.hydra_init stores each section's default
                "v = FairseqConfig.__dataclass_fields__[k].default\n",
                "f = FairseqConfig.__dataclass_fields__[k]; "
                "v = f.default_factory() if callable(f.default_factory) else f.default\n")
            if new != text:
                with open(path, "w", encoding="utf-8") as f:
                    f.write(new)


def build_cython(root: str) -> None:
    """Compile the two Cython modules of fairseq's data pipeline (token blocks, batching) in place,
    with the flags of fairseq's setup.py."""
    from Cython.Build import cythonize
    from setuptools import Extension
    from setuptools.dist import Distribution

    names = ("fairseq.data.data_utils_fast", "fairseq.data.token_block_utils_fast")
    extensions = [Extension(n, [os.path.join(root, *n.split(".")) + ".pyx"], include_dirs=[np.get_include()],
                            language="c++", extra_compile_args=["-std=c++11", "-O3"]) for n in names]
    dist = Distribution({"ext_modules": cythonize(extensions, quiet=True)})
    build = dist.get_command_obj("build_ext")
    build.build_lib, build.build_temp = root, os.path.join(root, ".build")
    build.ensure_finalized()
    build.run()


def patched_fairseq(src: str, tmp: str) -> str:
    """A directory to put first on the path: patched copies of ``fairseq``, ``fairseq_cli`` and ``hydra``."""
    import importlib.util

    hydra_dir = os.path.dirname(importlib.util.find_spec("hydra").origin)  # hydra 1.0 fails to import on 3.11
    root = os.path.join(tmp, "fairseq-patched")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.so")
    for name, origin in (("fairseq", os.path.join(src, "fairseq")), ("fairseq_cli", os.path.join(src, "fairseq_cli")),
                         ("hydra", hydra_dir)):
        shutil.copytree(origin, os.path.join(root, name), ignore=ignore)
        patch_dataclass_defaults(os.path.join(root, name))
    build_cython(root)
    return root


def fairseq_commit(src: str, given: str | None) -> str:
    if given:
        return given
    out = subprocess.run(["git", "-C", src, "rev-parse", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else "unknown"


# ---------------------------------------------------------------------------------
# the corpus and fairseq's command lines


def corpus(seed: int = 0) -> dict[str, list[str]]:
    """Train, valid and test lines of random words (Zipf-like, so that the bands and the count-sorted
    dictionary are non-trivial); train holds every word, test one out-of-vocabulary word (<unk>)
    and exactly ``TEST_TOKENS`` tokens with each line's </s>."""
    rng = np.random.default_rng(seed)
    words = [f"w{i:02d}" for i in range(N_WORDS)]
    p = 1.0 / np.arange(1, N_WORDS + 1)
    p /= p.sum()

    def lines(n_tokens):
        out, total = [], 0
        while total < n_tokens:
            line = list(rng.choice(words, size=int(rng.integers(5, 15)), p=p))
            out.append(line[: n_tokens - total - 1] or line[:1])
            total += len(out[-1]) + 1
        return [" ".join(line) for line in out]

    train = [" ".join(rng.permutation(words))] + lines(200)
    test = lines(TEST_TOKENS)
    test[1] = "zzz-unseen " + test[1].split(" ", 1)[1]  # <unk> (the token count stays the same)
    return dict(train=train, valid=lines(60), test=test)


def run_fairseq(module: str, argv: list[str], cwd: str, pythonpath: str) -> None:
    """One fairseq command line (``python -m fairseq_cli.<module>``, what ``fairseq-<module>`` runs)."""
    env = dict(os.environ, PYTHONPATH=pythonpath, CUDA_VISIBLE_DEVICES="")
    out = subprocess.run([sys.executable, "-m", f"fairseq_cli.{module}", *argv], cwd=cwd, env=env,
                         capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"fairseq_cli.{module} failed:\n{out.stderr[-4000:]}")


# ---------------------------------------------------------------------------------
# fairseq-eval-lm, tapped


def eval_lm_tapped(work: str):
    """Run ``fairseq-eval-lm`` (its ``main``) in this process; returns ``(results, records)`` where
    each record is one batch's sample, the scorer's hypotheses and the full log-probs."""
    import torch
    from fairseq import distributed_utils, options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq_cli import eval_lm

    records = []

    class TappedScorer(eval_lm.SequenceScorer):
        def generate(self, models, sample, **kwargs):
            hypos = super().generate(models, sample, **kwargs)
            (model,) = models
            with torch.no_grad():
                full = model.get_normalized_probs(model(**sample["net_input"]), log_probs=True, sample=None)
            records.append(dict(sample=sample, hypos=hypos, full=full.float()))
            return hypos

    eval_lm.SequenceScorer = TappedScorer
    args = options.parse_args_and_arch(options.get_eval_lm_parser(), ["data-bin/tiny", *EVAL])
    cwd = os.getcwd()
    os.chdir(work)  # the relative paths of the command line
    try:
        results = {}
        distributed_utils.call_main(convert_namespace_to_omegaconf(args),
                                    lambda cfg: results.update(eval_lm.main(cfg)))
    finally:
        os.chdir(cwd)
    return results, records


def reference_arrays(records: list[dict], pad: int) -> dict[str, np.ndarray]:
    """The tapped batches as arrays: inputs ``BxT`` (right-padded with <pad>), targets, the first
    scored position of each row, full log-probs ``BxTxV``, and the scored log-probs in stream order."""
    if len(records) != 1:
        raise SystemExit(f"expected one eval-lm batch, got {len(records)}")
    rec = records[0]
    ids = rec["sample"]["id"].numpy()
    order = np.argsort(ids)  # dataset order = stream order
    starts = np.asarray(rec["sample"].get("start_indices", [0] * len(ids)))[order]
    src_BxT = rec["sample"]["net_input"]["src_tokens"].numpy()[order]
    target_BxT = rec["sample"]["target"].numpy()[order]
    scored = [rec["hypos"][i][0]["positional_scores"].float().numpy() for i in order]
    stream = [target_BxT[row, s : s + len(lp)] for row, (s, lp) in enumerate(zip(starts, scored))]
    if any((t == pad).any() for t in stream):
        raise SystemExit("a scored target is <pad>")
    return dict(src_tokens_BxT=src_BxT.astype(np.int32), target_BxT=target_BxT.astype(np.int32),
                start_B=starts.astype(np.int32), log_probs_BxTxV=rec["full"].numpy()[order].astype(np.float32),
                targets_N=np.concatenate(stream).astype(np.int32),
                target_log_probs_N=np.concatenate(scored).astype(np.float32))


# ---------------------------------------------------------------------------------


def fairseq_version(src: str) -> str:
    with open(os.path.join(src, "fairseq", "version.txt")) as f:
        return f.read().strip()


def sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def make_reference(fairseq_src: str, out: str) -> tuple[dict, dict, dict]:
    """Run fairseq's three commands in a temporary directory; copy the checkpoint and dict.txt to
    ``out``. Returns ``(eval-lm results, reference arrays, the command lines)``."""
    with tempfile.TemporaryDirectory() as tmp:
        path = patched_fairseq(os.path.abspath(fairseq_src), tmp)
        sys.path.insert(0, path)
        work = os.path.join(tmp, "work")
        os.makedirs(os.path.join(work, "text"))
        for split, lines in corpus().items():
            with open(os.path.join(work, "text", f"{split}.txt"), "w", encoding="utf-8") as f:
                f.write("\n".join(lines) + "\n")
        commands = dict(preprocess=PREPROCESS, train=["data-bin/tiny", *TRAIN, *ARCH])
        run_fairseq("preprocess", commands["preprocess"], work, path)
        run_fairseq("train", commands["train"], work, path)
        results, records = eval_lm_tapped(work)
        from fairseq.data import Dictionary

        pad = Dictionary.load(os.path.join(work, "data-bin", "tiny", "dict.txt")).pad()
        os.makedirs(out, exist_ok=True)
        shutil.copyfile(os.path.join(work, "checkpoints", "checkpoint_last.pt"), os.path.join(out, "checkpoint.pt"))
        shutil.copyfile(os.path.join(work, "data-bin", "tiny", "dict.txt"), os.path.join(out, "dict.txt"))
    commands = {f"fairseq-{name.replace('_', '-')}": argv for name, argv in
                dict(**commands, eval_lm=["data-bin/tiny", *EVAL]).items()}
    return results, reference_arrays(records, pad), commands


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fairseq-src", required=True, help="a checkout of facebookresearch/fairseq (not installed)")
    parser.add_argument("--fairseq-commit", help="its commit, where the checkout is not a git repository")
    parser.add_argument("--out", default=os.path.join(ROOT, "tests", "fixtures", "fairseq_tiny"))
    args = parser.parse_args(argv)

    results, arrays, commands = make_reference(args.fairseq_src, args.out)
    mean_nll_base2 = float(-arrays["target_log_probs_N"].astype(np.float64).mean() / np.log(2))
    if abs(mean_nll_base2 - float(results["loss"])) > 1e-5:  # the tapped scores are all eval-lm scored
        raise SystemExit(f"tapped scores give loss {mean_nll_base2}, eval-lm {results['loss']}")
    np.savez_compressed(os.path.join(args.out, "reference.npz"), **arrays)
    meta = dict(
        command="python benchmarks/fairseq_reference.py --fairseq-src FAIRSEQ_SRC"
                + (f" --fairseq-commit {args.fairseq_commit}" if args.fairseq_commit else ""),
        fairseq_commit=fairseq_commit(args.fairseq_src, args.fairseq_commit),
        fairseq_version=fairseq_version(args.fairseq_src),
        versions=dict(python=sys.version.split()[0], **{name: version(name) for name in PACKAGES}),
        fairseq_commands={name: " ".join(argv) for name, argv in commands.items()},
        tokens_per_sample=TOKENS_PER_SAMPLE, context_window=CONTEXT_WINDOW,
        eval_lm_loss_base2=float(results["loss"]), eval_lm_perplexity=float(results["perplexity"]),
        sha256={name: sha256(os.path.join(args.out, name)) for name in ("checkpoint.pt", "dict.txt", "reference.npz")},
    )
    with open(os.path.join(args.out, "reference.json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    sizes = {name: os.path.getsize(os.path.join(args.out, name)) for name in sorted(os.listdir(args.out))}
    print(f"{args.out}: {sizes}; eval-lm loss (base 2) {results['loss']:.4f}, perplexity {results['perplexity']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
