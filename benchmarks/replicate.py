"""The paper's checkable claims at small scale, by one command: ``make replicate``.

  python benchmarks/replicate.py             # run or resume the suite, then write docs/RESULTS.md
  python benchmarks/replicate.py --list      # the steps, and which are done
  python benchmarks/replicate.py --report    # only rewrite results/replicate/ and docs/RESULTS.md
  python benchmarks/replicate.py --step ngram  # only that step (skipped if done: delete <root>/done/ngram.json), no report

Each step is one command of this project's tools (``train.py``, ``build.py``, ``evaluate.py``,
run in this process) or one function here. A finished step leaves ``<root>/done/<step>.json`` and is skipped by a
rerun; every tool resumes its own work (checkpoints, partial datastores, per-token files), so
a killed suite, ``kill -9`` included, goes on where it stopped. Logs: ``<root>/logs/<step>.log``.

Experiments (``--scale full``: WikiText-2 as "Wikipedia", the ``wt2`` model; see docs/RESULTS.md):
Table 1 (+ cache) and exact vs approximate distances; Table 5 (the five key types); Table 3 and
Figure 2 (an LM trained on a quarter of WikiText-2 train, datastores over 1/8 ... all of it);
Table 4 and Figure 5 (domain adaptation to Tiny Shakespeare and Python docs, in-domain LMs in
the same vocabulary); Figure 7 (Kneser-Ney n-grams interpolated instead of the kNN-LM);
Figures 4 and 5 (k and λ sweeps on valid).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import os
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.dirname(os.path.abspath(__file__))]

WIKI = "wikitext-2"
DOMAINS = ("tinyshakespeare", "python-docs")
KEY_TYPES = ("ffn_input_after_ln", "ffn_input_before_ln", "attn_output", "block_output", "final_output")
FRACTIONS = (("1_8", 1 / 8), ("1_4", 1 / 4), ("1_2", 1 / 2), ("all", 1.0))
LM_FRACTIONS = (("1_16", 1 / 16), ("1_8", 1 / 8), ("1_4", 1 / 4), ("1_2", 1 / 2))  # Table 3 as a mechanism
MEMORISED = "1_8"  # Figure 8: the slice a dropout-free LM memorises
MEMORISE_K = 8  # only the memorising LM's own log-probs are read: a small k keeps its search and re-ranking cheap
STRONG_DOMAIN = "ptb"  # the strong LM's domain: Penn Treebank as the LM benchmark ships it (lower case, no
# punctuation, <unk> and N for numbers), a form of text web pretraining rarely holds even where its news does


@dataclasses.dataclass(frozen=True)
class Scale:
    """How big the suite's models and evaluations are."""

    name: str
    lm: tuple  # train.py arguments of every LM (config and overrides)
    quarter_steps: int  # updates of the LM trained on a quarter of the Wikipedia corpus
    domain_steps: int  # updates of each in-domain LM
    k: int
    sweep_tokens: int  # valid tokens of the key-type and datastore-size comparisons (0: all)
    ngram_orders: tuple
    key_types: tuple  # Table 5's key types (the first is the default, with the main datastore)
    pq_factory: str  # the index at the paper's code precision (16 key dimensions per byte)
    pq_tokens: int  # valid and test tokens of that comparison
    sweep_lm: tuple  # train.py overrides of the Table 3 sweep's LMs: evaluated often, stopped once valid stalls
    memorise_steps: int  # updates of Figure 8's dropout-free LM on its slice (valid scored only at the end)
    strong_tokens: int  # the strong LM's evaluations: valid tokens tuned on and test tokens scored (0: all)
    strong_window: tuple  # its long-context evaluation: (window, context), the context at least the cache's 1,024
    strong_pq: str  # its index at the paper's code precision (16 key dimensions per byte: PQ36 for 576)


FULL = Scale("full", ("--config", "wt2"), quarter_steps=1000, domain_steps=600, k=1024, sweep_tokens=50_000,
             ngram_orders=(2, 3, 4, 5), key_types=KEY_TYPES, pq_factory="IVF2048,PQ16", pq_tokens=40_000,
             sweep_lm=("--set", "eval_every=100", "--set", "patience=3"), memorise_steps=4000, strong_tokens=100_000,
             strong_window=(2048, 1024), strong_pq="IVF4096,PQ36")
TINY = Scale("tiny", ("--config", "tiny", "--set", "num_layers=1", "--set", "d_model=16", "--set", "num_heads=2",
                      "--set", "d_ff=32", "--set", "cutoffs=8,20", "--set", "tokens_per_sample=16", "--set",
                      "batch_size=4", "--set", "eval_batch_size=4", "--set", "max_steps=4", "--set", "warmup_steps=2",
                      "--set", "eval_every=4", "--set", "checkpoint_every=4", "--set", "log_every=1"),
             quarter_steps=2, domain_steps=2, k=8, sweep_tokens=300, ngram_orders=(2, 3), key_types=KEY_TYPES[:2],
             pq_factory="PQ1", pq_tokens=300, sweep_lm=("--set", "eval_every=2", "--set", "patience=1"),
             memorise_steps=4, strong_tokens=300, strong_window=(32, 16), strong_pq="PQ1")  # the test's: every step kind, fewer of some
SCALES = {s.name: s for s in (FULL, TINY)}


@dataclasses.dataclass
class Step:
    name: str
    what: str
    argv: list | None = None  # a tool: [script, args...] run with this Python
    func: object = None  # or a function of the suite (no arguments)
    ready: object = None  # () -> bool: its work is found done (a datastore complete and indexed)
    shown: list | None = None  # a function step's equivalent command line
    prune: str | None = None  # an evaluation whose neighbour files the report never reads: removed once done


def pruned(step: Step) -> Step:
    """``step`` (an evaluate.py step) with its per-token neighbour files removed once it is done: the
    report reads only its results.json and log-prob file, and at k = 1024 a whole split's files take ~2.5 GB."""
    return dataclasses.replace(step, prune=step.argv[step.argv.index("--out") + 1])


def tool(script: str, *args) -> list:
    return [script, *[str(a) for a in args], "--no-progress"]


def build(workdir: str, name: str, *args) -> dict:
    """A build step's command, and its test for a datastore already complete and indexed (which
    ``build.py`` refuses to redo: a suite killed between the build's end and its marker)."""
    from knnlm_jax.datastore.format import read_manifest

    def ready() -> bool:
        m = read_manifest(os.path.join(workdir, "datastores", name))
        return bool(m and m.get("status") == "complete" and m.get("index"))

    return dict(argv=tool("build.py", "--workdir", workdir, "--datastore", name, *args), ready=ready)


def lm_config(scale: Scale):
    """The suite's LM config (``--config`` and ``--set`` of ``scale.lm``), resolved."""
    from knnlm_jax.configs import apply_overrides, get_config

    args = list(scale.lm)
    sets = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    return apply_overrides(get_config(args[args.index("--config") + 1]), sets)


def key_types(scale: Scale) -> tuple:
    """Table 5's key types with a datastore each: ``final_output`` is ``block_output`` itself without a final norm."""
    same = "final_output" in scale.key_types and not lm_config(scale).final_norm
    return tuple(k for k in scale.key_types if not (same and k == "final_output"))


def plan(scale: Scale, data: str, root: str, suite: tuple = (), strong: tuple | None = None) -> list[Step]:
    """Every step, in an order that meets their dependencies; ``suite``: the options that name this suite on a
    command line (``--scale``, ``--data``, ``--root``), for the commands shown for its function steps;
    ``strong``: ``(model, workdir)`` of the strong LM's experiments (``None``: none)."""

    def alone(name: str) -> list:  # a function step's command: the suite running that step only
        return ["benchmarks/replicate.py", *suite, "--step", name]

    wiki, quarter = os.path.join(root, "wiki"), os.path.join(root, "wiki-quarter")
    vocab = os.path.join(wiki, "vocab.txt")
    exact_vs_approximate = _exact_vs_approximate()
    pq16 = ["--workdir", wiki, "--factory", scale.pq_factory, "--max-tokens", str(scale.pq_tokens), "--k",
            str(scale.k), "--out", os.path.join(root, "exact_vs_approximate.json")]
    k = ("--k", scale.k)
    sweep = ("--max-tokens", scale.sweep_tokens) if scale.sweep_tokens else ()
    steps = [
        Step("train-wiki", "the Wikipedia LM on all of WikiText-2 train",
             tool("train.py", *scale.lm, "--workdir", wiki, "--data_dir", os.path.join(data, WIKI))),
        Step("build-wiki-train", "its datastore over WikiText-2 train", **build(wiki, "train")),
        Step("eval-table1", "Table 1: test, + kNN-LM, + cache (tuned on valid); k and λ sweeps on valid",
             tool("evaluate.py", "--workdir", wiki, "--datastore", "train", "--split", "test", "--cache", *k,
                  "--out", os.path.join(wiki, "eval", "table1"))),
        pruned(Step("eval-table1-approx", "exact vs approximate: FAISS's own distances, tuned on valid",
                    tool("evaluate.py", "--workdir", wiki, "--datastore", "train", "--split", "test",
                         "--approximate", *k, "--out", os.path.join(wiki, "eval", "table1-approx")))),
        Step("exact-vs-approx-pq16", f"exact vs approximate at the paper's code precision ({scale.pq_factory})",
             func=lambda: exact_vs_approximate.main(pq16), shown=["benchmarks/exact_vs_approximate.py", *pq16]),
    ]
    for key in key_types(scale):  # Table 5: one datastore per key type, the same valid tokens
        name = "train" if key == KEY_TYPES[0] else f"train-{key}"
        if key != KEY_TYPES[0]:
            steps.append(Step(f"build-key-{key}", f"a datastore of {key} keys",
                              **build(wiki, name, "--set", f"key_type={key}")))
        steps.append(Step(f"eval-key-{key}", f"Table 5: {key} keys on valid",
                          tool("evaluate.py", "--workdir", wiki, "--datastore", name, "--split", "valid",
                               "--set", f"key_type={key}", *k, *sweep,
                               "--out", os.path.join(wiki, "eval", f"key-{key}"))))
    steps.append(Step("data-fractions", "prefixes of WikiText-2 train (1/8, 1/4, 1/2)",
                      func=lambda: write_fractions(os.path.join(data, WIKI), os.path.join(root, "data")),
                      shown=alone("data-fractions")))
    steps.append(Step("train-wiki-quarter", "Table 3: an LM trained on the first quarter of WikiText-2 train",
                      tool("train.py", *scale.lm, "--set", f"max_steps={scale.quarter_steps}", "--workdir", quarter,
                           "--data_dir", fraction_dir(data, root, "1_4"), "--vocab", vocab)))
    for tag, _ in FRACTIONS:  # Figure 2: its datastore grows to the whole of train
        steps.append(Step(f"build-quarter-{tag}", f"its datastore over {tag.replace('_', '/')} of WikiText-2 train",
                          **build(quarter, f"wt2-{tag}", "--corpus", fraction_dir(data, root, tag))))
        steps.append(Step(f"eval-quarter-{tag}", f"Figure 2: perplexity and λ on valid, datastore {tag}",
                          tool("evaluate.py", "--workdir", quarter, "--datastore", f"wt2-{tag}", "--split", "valid",
                               *k, *sweep, "--out", os.path.join(quarter, "eval", f"fig2-{tag}"))))
    steps.append(pruned(Step("eval-table3", "Table 3: the quarter LM with the whole train datastore, on test",
                             tool("evaluate.py", "--workdir", quarter, "--datastore", "wt2-all", "--split", "test",
                                  *k, "--out", os.path.join(quarter, "eval", "table3")))))
    wikitext = ("--tokenize", "wikitext")  # domain text read as the Wikipedia LM's corpus was tokenised
    for domain in DOMAINS:  # Table 4 and Figure 5: the Wikipedia LM with another domain's datastore
        corpus, own = os.path.join(data, domain), os.path.join(root, domain)
        steps += [
            Step(f"build-wiki-{domain}", f"the Wikipedia LM's datastore over {domain} train",
                 **build(wiki, domain, "--corpus", corpus, *wikitext)),
            Step(f"eval-wiki-{domain}", f"Table 4: the Wikipedia LM + {domain} datastore on {domain} test",
                 tool("evaluate.py", "--workdir", wiki, "--datastore", domain, "--corpus", corpus, *wikitext,
                      "--split", "test", *k, "--out", os.path.join(wiki, "eval", domain))),
            Step(f"train-{domain}", f"Table 4: an in-domain LM on {domain}, in the Wikipedia vocabulary",
                 tool("train.py", *scale.lm, "--set", f"max_steps={scale.domain_steps}", "--workdir", own,
                      "--data_dir", corpus, *wikitext, "--vocab", vocab)),
            Step(f"build-{domain}", f"the in-domain LM's datastore over {domain} train", **build(own, "train")),
            Step(f"eval-{domain}", f"Table 4 and Figure 5: the in-domain LM (+ its datastore) on {domain} test",
                 tool("evaluate.py", "--workdir", own, "--datastore", "train", "--split", "test", *k,
                      "--out", os.path.join(own, "eval", "train"))),
        ]
    steps.append(Step("ngram", "Figure 7: Kneser-Ney n-grams interpolated with the Wikipedia LM",
                      func=lambda: ngram_experiment(wiki, os.path.join(wiki, "eval", "table1"), scale.ngram_orders,
                                                    os.path.join(root, "ngram.json")),
                      shown=alone("ngram")))
    if strong is not None:  # before the mechanism experiments: the strong LM tests more of the paper's claims
        steps += strong_steps(scale, data, root, *strong, alone)
    return steps + mechanism_steps(scale, data, root, alone)


def strong_steps(scale: Scale, data: str, root: str, model: str, run: str, alone) -> list[Step]:
    """A pretrained LM (``model``, run directory ``run``) with a WikiText-2 datastore: Table 1 with the
    default context (first: Figure 7 compares against it) and with one at least as long as the cache, exact
    vs approximate at the default index and at the paper's precision, Figure 7 over its tokens, and domain
    adaptation to ``STRONG_DOMAIN``."""
    wt2, domain = os.path.join(data, WIKI), os.path.join(data, STRONG_DOMAIN)
    budget = ("--max-tokens", scale.strong_tokens, "--tune-tokens", scale.strong_tokens) if scale.strong_tokens else ()
    test = ("--corpus", wt2, "--split", "test", "--k", scale.k, *budget)
    window, context = scale.strong_window
    long = ("--set", f"eval_window={window}", "--set", f"eval_context={context}")
    pq = ["--workdir", run, "--data_dir", wt2, "--factory", scale.strong_pq, "--max-tokens", str(scale.strong_tokens),
          "--k", str(scale.k), "--out", os.path.join(root, "exact_vs_approximate_strong.json")]
    exact_vs_approximate = _exact_vs_approximate()
    return [
        Step("build-strong-train", f"the strong LM ({model}) and its datastore over WikiText-2 train",
             **build(run, "train", "--model", model, "--corpus", wt2)),
        Step("eval-strong-table1-short", "Table 1, strong LM, with the default context (the cache reaches beyond it)",
             tool("evaluate.py", "--workdir", run, "--datastore", "train", *test, "--cache",
                  "--out", os.path.join(run, "eval", "table1-short"))),
        Step("ngram-strong", "Figure 7, strong LM: Kneser-Ney n-grams over its tokens of WikiText-2 train",
             func=lambda: ngram_experiment(run, os.path.join(run, "eval", "table1-short"), scale.ngram_orders,
                                           os.path.join(root, "ngram-strong.json"), wt2), shown=alone("ngram-strong")),
        Step("eval-strong-table1", f"the same with a context of {context} (at least the cache's)",
             tool("evaluate.py", "--workdir", run, "--datastore", "train", *test, "--cache", *long,
                  "--out", os.path.join(run, "eval", "table1-long"))),
        Step("eval-strong-approx", "exact vs approximate, strong LM: FAISS's own distances at the default index",
             tool("evaluate.py", "--workdir", run, "--datastore", "train", *test, "--approximate",
                  "--out", os.path.join(run, "eval", "table1-approx"))),
        Step("exact-vs-approx-strong", f"exact vs approximate, strong LM, at {scale.strong_pq}",
             func=lambda: exact_vs_approximate.main(pq), shown=["benchmarks/exact_vs_approximate.py", *pq]),
        Step("build-strong-domain", f"the strong LM's datastore over {STRONG_DOMAIN} train",
             **build(run, STRONG_DOMAIN, "--corpus", domain)),
        Step("eval-strong-domain", f"domain adaptation, strong LM: + {STRONG_DOMAIN} datastore on its test",
             tool("evaluate.py", "--workdir", run, "--datastore", STRONG_DOMAIN, "--corpus", domain, "--split", "test",
                  "--k", scale.k, *budget, "--out", os.path.join(run, "eval", STRONG_DOMAIN))),
    ]


def mechanism_steps(scale: Scale, data: str, root: str, alone) -> list[Step]:
    """Table 3 as a mechanism (LMs on 1/16 ... 1/2 of WikiText-2 train, each to its best valid, each with
    the all-train datastore) and Figure 8 (a dropout-free LM memorising a slice, interpolated with the
    Wikipedia LM, against the Wikipedia LM with a datastore of that slice)."""
    wiki = os.path.join(root, "wiki")
    vocab, k = os.path.join(wiki, "vocab.txt"), ("--k", scale.k)
    # the sweep's vocabulary is built from all of train as the Wikipedia LM's is, so the sweep runs without that LM
    sweep_vocab = os.path.join(root, "data", f"{WIKI}-vocab.txt")

    def sweep_data():
        write_fractions(os.path.join(data, WIKI), os.path.join(root, "data"), LM_FRACTIONS)
        write_vocab(os.path.join(data, WIKI), sweep_vocab, lm_config(scale).vocab_size)

    steps = [Step("data-lm-fractions", "prefixes of WikiText-2 train for the LM sweep (1/16 ... 1/2) and the "
                  "vocabulary of all of train", func=sweep_data, shown=alone("data-lm-fractions"))]
    for tag, _ in LM_FRACTIONS:
        run = os.path.join(root, f"wiki-lm-{tag}")
        steps += [
            Step(f"train-lm-{tag}", f"Table 3 sweep: an LM on {tag.replace('_', '/')} of WikiText-2 train, kept at "
                 "its best valid", tool("train.py", *scale.lm, *scale.sweep_lm, "--workdir", run, "--data_dir",
                                        fraction_dir(data, root, tag), "--vocab", sweep_vocab)),
            Step(f"build-lm-{tag}", "its datastore over all of WikiText-2 train",
                 **build(run, "wt2-all", "--corpus", os.path.join(data, WIKI))),
            pruned(Step(f"eval-lm-{tag}", "Table 3 sweep: it with and without that datastore on test (tuned on valid)",
                        tool("evaluate.py", "--workdir", run, "--datastore", "wt2-all", "--split", "test", *k,
                             "--out", os.path.join(run, "eval", "table3")))),
        ]
    memorise, part = os.path.join(root, "memorise"), fraction_dir(data, root, MEMORISED)
    no_dropout = ("--set", "dropout=0", "--set", "adaptive_softmax_dropout=0", "--set",
                  f"max_steps={scale.memorise_steps}", "--set", f"eval_every={scale.memorise_steps}")
    steps += [
        Step("train-memorise", f"Figure 8: an LM without dropout memorising {MEMORISED.replace('_', '/')} of "
             "WikiText-2 train (its last checkpoint: valid is scored only at the end)",
             tool("train.py", *scale.lm, *no_dropout, "--workdir", memorise, "--data_dir", part, "--vocab", vocab)),
        Step("build-memorise", "its datastore over that slice (for its per-token files)", **build(memorise, "slice")),
        Step("eval-memorise", "Figure 8: the memorising LM on valid and test",
             tool("evaluate.py", "--workdir", memorise, "--datastore", "slice", "--split", "test", "--k",
                  MEMORISE_K, "--out", os.path.join(memorise, "eval", "slice"))),
        Step("build-wiki-slice", "the Wikipedia LM's datastore over the same slice",
             **build(wiki, f"wt2-{MEMORISED}", "--corpus", part)),
        Step("eval-wiki-slice", "Figure 8: the Wikipedia LM + that datastore on test (tuned on valid)",
             tool("evaluate.py", "--workdir", wiki, "--datastore", f"wt2-{MEMORISED}", "--split", "test", *k,
                  "--out", os.path.join(wiki, "eval", "slice"))),
        Step("memorise", "Figure 8: the Wikipedia LM interpolated with the memorising LM (λ tuned on valid)",
             func=lambda: memorise_experiment(os.path.join(wiki, "eval", "table1"), os.path.join(memorise, "eval",
                                              "slice"), os.path.join(root, "memorise.json")),
             shown=alone("memorise")),
    ]
    return steps


def memorise_experiment(wiki_eval: str, memorise_eval: str, out: str) -> None:
    """Figure 8: ``(1 - λ) p_wiki + λ p_memorised`` with λ tuned on valid, from both LMs' per-token files."""
    import numpy as np

    from knnlm_jax.evaluation.mixing import mix, nll_table
    from knnlm_jax.evaluation.settings import LAMBDAS, perplexity
    from knnlm_jax.evaluation.token_files import open_token_files

    wiki = {s: open_token_files(os.path.join(wiki_eval, f"tokens-{s}")) for s in ("valid", "test")}
    memo = {s: open_token_files(os.path.join(memorise_eval, f"tokens-{s}")) for s in ("valid", "test")}
    for s in wiki:
        if not np.array_equal(wiki[s].targets, memo[s].targets):
            raise RuntimeError(f"the two LMs scored other {s} tokens")
    table = nll_table(wiki["valid"].logp_lm, np.asarray(memo["valid"].logp_lm)[None], LAMBDAS)[0]
    best = float(LAMBDAS[int(np.argmin(table))])
    result = dict(lmbda=best, valid_ppl=float(np.exp(table.min())),
                  test_ppl=perplexity(mix(wiki["test"].logp_lm, memo["test"].logp_lm, best)),
                  wiki_valid_ppl=perplexity(wiki["valid"].logp_lm), wiki_test_ppl=perplexity(wiki["test"].logp_lm),
                  memorised_valid_ppl=perplexity(memo["valid"].logp_lm),
                  memorised_test_ppl=perplexity(memo["test"].logp_lm),
                  lambda_grid=dict(lmbda=[float(x) for x in LAMBDAS], valid_ppl=np.exp(table).tolist()))
    with open(out + ".tmp", "w") as f:
        json.dump(result, f, indent=2)
    os.replace(out + ".tmp", out)


def _exact_vs_approximate():
    import exact_vs_approximate

    return exact_vs_approximate


def fraction_dir(data: str, root: str, tag: str) -> str:
    return os.path.join(data, WIKI) if tag == "all" else os.path.join(root, "data", f"{WIKI}-{tag}")


def write_fractions(source: str, out_root: str, fractions=FRACTIONS) -> None:
    """``<out_root>/wikitext-2-<tag>/``: the first fraction of train's lines; valid and test as they are."""
    with open(os.path.join(source, "train.txt"), encoding="utf-8") as f:
        lines = f.readlines()
    for tag, fraction in fractions:
        if fraction == 1.0:
            continue
        directory = os.path.join(out_root, f"{WIKI}-{tag}")
        os.makedirs(directory, exist_ok=True)
        for split in ("valid", "test"):
            shutil.copyfile(os.path.join(source, f"{split}.txt"), os.path.join(directory, f"{split}.txt"))
        with open(os.path.join(directory, "train.txt.tmp"), "w", encoding="utf-8") as f:
            f.writelines(lines[: int(len(lines) * fraction)])
        os.replace(os.path.join(directory, "train.txt.tmp"), os.path.join(directory, "train.txt"))


def write_vocab(source: str, path: str, max_size) -> None:
    """``path``: the vocabulary train.py builds from ``source``'s train split (at most ``max_size`` words)."""
    from knnlm_jax.data import corpus
    from knnlm_jax.data.vocab import Vocab

    Vocab.build(corpus.read_split(source, "train").lines(), max_size=max_size).save(path)  # atomic


def ngram_experiment(workdir: str, eval_dir: str, orders, out: str, corpus: str | None = None) -> None:
    """Figure 7: the LM interpolated with an n-gram LM of each order (λ tuned on valid), beside the kNN-LM;
    the n-grams are counted over ``corpus``'s train split (default: the run's corpus) in the LM's tokens.
    Beside ``out`` (a JSON), ``<out>.npz``: the best order's interpolation per test token."""
    import numpy as np

    from knnlm_jax import runs
    from knnlm_jax.evaluation.settings import LAMBDAS, perplexity
    from knnlm_jax.evaluation.mixing import mix
    from knnlm_jax.evaluation.ngram import KneserNey
    from knnlm_jax.evaluation.token_files import open_token_files

    config = runs.run_config(workdir)
    vocab = runs.load_vocab(workdir, config)
    _, train = runs.split_tokens(workdir, vocab, corpus or runs.run_corpus(config), "train")
    files = {s: open_token_files(os.path.join(eval_dir, f"tokens-{s}")) for s in ("valid", "test")}
    lm = {s: np.asarray(f.logp_lm, np.float64) for s, f in files.items()}
    rows, logp = [], {}
    for n in orders:
        model = KneserNey.fit(np.asarray(train), n, len(vocab))
        ng = {s: model.log_probs(np.asarray(f.targets)) for s, f in files.items()}
        grid = {float(l): perplexity(mix(lm["valid"], ng["valid"], float(l))) for l in LAMBDAS}
        best = min(grid, key=grid.get)
        rows.append(dict(n=n, ngram_valid_ppl=perplexity(ng["valid"]), ngram_test_ppl=perplexity(ng["test"]),
                         lmbda=best, valid_ppl=grid[best], test_ppl=perplexity(mix(lm["test"], ng["test"], best))))
        if grid[best] <= min(r["valid_ppl"] for r in rows):  # the best order's, for where its gain lies
            logp = dict(n=np.int64(n), test_mixed=mix(lm["test"], ng["test"], best))
    with open(os.path.join(eval_dir, "results.json")) as f:
        table1 = json.load(f)
    saved = os.path.splitext(out)[0] + ".npz"
    with open(saved + ".tmp", "wb") as f:
        np.savez(f, **logp)
    os.replace(saved + ".tmp", saved)
    result = dict(base_valid_ppl=perplexity(lm["valid"]), base_test_ppl=perplexity(lm["test"]),
                  knn_test_ppl=next(r["ppl"] for r in table1["rows"] if r["name"] == "+kNN-LM"), orders=rows,
                  logprobs=saved)
    with open(out + ".tmp", "w") as f:
        json.dump(result, f, indent=2)
    os.replace(out + ".tmp", out)


# ---------------------------------------------------------------------------------
# running


def near(path: str) -> str:
    """``path`` relative to the checkout when it lies beside it (``../shared/data``), else absolute."""
    path = os.path.abspath(path)
    return os.path.relpath(path, ROOT) if path.startswith(os.path.dirname(ROOT) + os.sep) else path


def command_line(step: Step) -> str:
    """The step as a command to paste in the checkout (paths relative to it)."""
    argv = step.argv or step.shown
    if argv is None:
        return f"(a function of benchmarks/replicate.py: {step.name})"
    return "python " + " ".join(near(a) if os.path.isabs(a) else a for a in argv)


def run_step(step: Step, root: str) -> float:
    """Run one step to completion (its log in ``<root>/logs``); raises on failure."""
    os.makedirs(os.path.join(root, "logs"), exist_ok=True)
    start = time.time()
    log = os.path.join(root, "logs", f"{step.name}.log")
    with open(log, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        print(f"\n$ {command_line(step)}", flush=True)
        try:
            if step.argv is not None:  # the tool's main() in this process: JAX starts once for the whole suite
                module = importlib.import_module(f"knnlm_jax.cli.{step.argv[0][: -len('.py')]}")
                code = module.main(step.argv[1:])
            else:
                code = step.func()
        except SystemExit as exit:
            code = exit.code
    if code:
        raise RuntimeError(f"step {step.name} failed (exit {code}); see {log}, then run the suite again")
    return time.time() - start


def done_path(root: str, name: str) -> str:
    return os.path.join(root, "done", f"{name}.json")


def run_all(steps: list[Step], root: str, log=print) -> None:
    os.makedirs(os.path.join(root, "done"), exist_ok=True)
    for i, step in enumerate(steps, 1):
        marker = done_path(root, step.name)
        if os.path.isfile(marker):
            log(f"[{i}/{len(steps)}] {step.name}: done before, skipped")
            prune(step)
            continue
        log(f"[{i}/{len(steps)}] {step.name}: {step.what}")
        seconds = 0.0 if step.ready is not None and step.ready() else run_step(step, root)
        with open(marker + ".tmp", "w") as f:
            json.dump(dict(step=step.name, what=step.what, command=command_line(step), seconds=seconds,
                           finished=time.strftime("%Y-%m-%d %H:%M:%S")), f, indent=2)
        os.replace(marker + ".tmp", marker)
        prune(step)
        log(f"    {seconds / 60:.1f} min")


def prune(step: Step) -> None:
    """A done step's neighbour files that nothing reads (``Step.prune``): removed, the rest of its output kept."""
    for split in ("valid", "test") if step.prune else ():
        shutil.rmtree(os.path.join(step.prune, f"tokens-{split}"), ignore_errors=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", default="full", choices=sorted(SCALES))
    default_data = os.path.join(os.path.dirname(ROOT), "shared", "data")
    parser.add_argument("--data", default=default_data,
                        help="the shared corpora (default ../shared/data)")
    parser.add_argument("--root", default=None, help="where runs, datastores and logs go (default runs/replicate)")
    parser.add_argument("--strong-lm", default=None, metavar="MODEL",
                        help="the strong LM's experiments with this pretrained LM (--model of build.py; default: "
                             "smollm2 at --scale full, none at tiny; 'none' leaves them out)")
    parser.add_argument("--strong-workdir", default=None, metavar="DIR",
                        help="its run directory (default runs/smollm2 for smollm2, shared with "
                             "benchmarks/eval_smollm2.sh and its datastore; else <root>/strong)")
    parser.add_argument("--results", default=os.path.join(ROOT, "results", "replicate"),
                        help="where the experiments' JSON go")
    parser.add_argument("--doc", default=os.path.join(ROOT, "docs", "RESULTS.md"), help="the report (figures beside it)")
    only = parser.add_mutually_exclusive_group()
    only.add_argument("--list", action="store_true", help="list the steps and whether each is done")
    only.add_argument("--report", action="store_true", help="only write the JSON and the report")
    only.add_argument("--step", action="append", metavar="NAME",
                      help="run only this step (repeatable; see --list); no report (--report writes it)")
    args = parser.parse_args(argv)
    scale = SCALES[args.scale]
    os.chdir(ROOT)  # paths near the checkout are given relative to it: the commands shown are the ones run
    root = near(args.root or os.path.join(ROOT, "runs", "replicate" if scale is FULL else "replicate-tiny"))
    data = near(args.data)
    wanted = (WIKI, *DOMAINS) + ((STRONG_DOMAIN,) if (args.strong_lm or ("smollm2" if scale is FULL else "none"))
                                 != "none" else ())
    missing = [c for c in wanted if not os.path.isfile(os.path.join(data, c, "train.txt"))]
    if missing:
        print(f"replicate.py: error: {data} lacks {', '.join(missing)} (train.txt, valid.txt, test.txt each)",
              file=sys.stderr)
        return 2
    suite = ["--scale", args.scale] if scale is not FULL else []  # the options a pasted command needs
    suite += ["--data", data] if args.data != default_data else []
    suite += ["--root", root] if args.root else []
    model = args.strong_lm or ("smollm2" if scale is FULL else "none")
    strong = None if model == "none" else (
        model, near(args.strong_workdir or (os.path.join(ROOT, "runs", "smollm2") if model == "smollm2"
                                            else os.path.join(root, "strong"))))
    suite += ["--strong-lm", model] if args.strong_lm else []
    suite += ["--strong-workdir", strong[1]] if args.strong_workdir and strong else []
    steps = plan(scale, data, root, tuple(suite), strong)
    unknown = sorted(set(args.step or ()) - {s.name for s in steps})
    if unknown:
        print(f"replicate.py: error: no step {', '.join(unknown)} (python benchmarks/replicate.py --list names them)",
              file=sys.stderr)
        return 2
    if args.list:
        for step in steps:
            print(f"{'done' if os.path.isfile(done_path(root, step.name)) else '    '}  {step.name:28} {step.what}")
        return 0
    if not args.report:
        try:
            run_all([s for s in steps if s.name in args.step] if args.step else steps, root)
        except RuntimeError as err:
            print(f"replicate.py: error: {err}", file=sys.stderr)
            return 1
        if args.step:
            return 0
    import replicate_report

    try:
        replicate_report.write(root, steps, scale, args.results, args.doc)
    except FileNotFoundError as err:  # a done step's output the report needs is gone or from an older version
        print(f"replicate.py: error: {err}", file=sys.stderr)
        return 1
    print(f"report: {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
