#!/usr/bin/env python
"""Evaluation speed: kNN-LM against base-LM tokens/s, and FAISS inside the pipeline against bare FAISS.

  python benchmarks/eval_speed.py --workdir runs/wt2 --datastore train [--split valid] [--max-tokens N]
                                  [--repeats 3] [--k 1024] [--approximate] [--out results/eval_speed.json]
                                  [--variants-datastore train-fs --variants-approximate] [--reuse DIR]

One process, after a warm-up pass of each kind (compilation excluded), ``--repeats`` passes of:
  - the base-LM evaluation (the same streaming pass, no search): tokens/s;
  - the kNN-LM evaluation (forward, FAISS search, exact re-ranking, per-token files): tokens/s;
  - bare ``index.search`` over the very query batches of the kNN-LM pass, back to back;
  - a diagnostic kNN-LM pass without overlap (each forward finishes before its search).
Medians are reported, with the search stage's time inside the pipeline against the bare
search (pipeline overhead %: what running FAISS beside the device's forward costs it).

Variants (``variants``): ``full`` is the full kNN-LM as above (the baseline); ``full-fast``
the full kNN-LM on ``--variants-datastore`` (another index of the same keys, e.g. a FastScan
``IVF2048,PQ128x4fs``: cheaper searches, not fewer) with ``--variants-approximate`` distances;
``retomaton``, ``adaptive`` and ``both`` save searches there (pointers always with exact
distances). Their knobs are chosen on valid (its first ``--choose-tokens`` targets): the
RetoMaton threshold from ``--retomaton-grid`` and the adaptive gate's retrieve fraction from
``--fraction-grid`` (the gate fitted on ``full-fast``'s files), each the one saving the most
searches at a valid perplexity within ``--budget-pct`` of the baseline full kNN-LM's (each
setting with its own λ and T tuned there); "both" combines the two choices. Every variant is
compared like with like: its ``baseline`` is the full kNN-LM on the same index in the same
exact/approximate mode (``full``, ``full-fast``, or ``full-fast-exact`` for pointers beside
approximate variants), measured in the same repeats; ``speedup_over_baseline`` is the median of
the per-repeat ratios. Each variant's test perplexity is then that of ``evaluate.py --split test`` with
those options (λ, T tuned on all of valid; per-token files in ``--variants-dir``, reused
from ``--reuse`` where they answer the same question), and its speed is measured in the
same repeats as the full kNN-LM's: ratios paired within each repeat, then their median.
Where the "device" is the host CPU, the overlapped forward competes with FAISS for the
same cores, so its CPU time shows up in the search stage; the pass without overlap
separates that from the pipeline's own cost (copies, conversions, bookkeeping).
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="a trained run directory")
    parser.add_argument("--datastore", required=True, help="an indexed datastore of that run")
    parser.add_argument("--split", default="valid")
    parser.add_argument("--corpus", default=None, help="the text to evaluate (default: the run's corpus), e.g. "
                                                       "a WikiText directory for a pretrained LM's run")
    parser.add_argument("--max-tokens", type=int, default=0, help="first N targets of the split (0: all)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--k", type=int, default=1024)
    parser.add_argument("--nprobe", type=int, default=None)
    parser.add_argument("--approximate", action="store_true", help="FAISS distances, no exact re-ranking")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--out", default=os.path.join(ROOT, "results", "eval_speed.json"))
    parser.add_argument("--section", default=None, metavar="NAME",
                        help="write this run's results under NAME in --out, keeping the file's other sections "
                             "(e.g. wt2 and smollm2 in results/eval_speed.json)")
    parser.add_argument("--no-variants", dest="variants", action="store_false", help="only the full kNN-LM")
    parser.add_argument("--variants-datastore", default=None, metavar="NAME",
                        help="another index of the same keys (e.g. build.py --index-only --index "
                             "IVF2048,PQ128x4fs into a copy) that every variant but full searches (default: --datastore)")
    parser.add_argument("--variants-approximate", action="store_true",
                        help="the variants use FAISS's distances (RetoMaton's pointers still need exact ones)")
    parser.add_argument("--retomaton-grid", default="1,4,16,64")
    parser.add_argument("--fraction-grid", default="0.3,0.4,0.5,0.6,0.7")
    parser.add_argument("--budget-pct", type=float, default=1.0,
                        help="largest valid perplexity increase over the full kNN-LM when choosing knobs")
    parser.add_argument("--choose-tokens", type=int, default=50_000, help="valid targets used to choose knobs")
    parser.add_argument("--variant-tokens", type=int, default=0,
                        help="first N targets of valid and test for the variants' perplexities (0: all)")
    parser.add_argument("--variants-dir", default=None, help="per-token files of the variants "
                                                             "(default <workdir>/eval/variants)")
    parser.add_argument("--reuse", default=None, metavar="DIR",
                        help="an evaluation directory whose tokens-valid/tokens-test (full kNN-LM) may be reused")
    args = parser.parse_args(argv)

    from knnlm_jax.cli import user_errors

    with user_errors("eval_speed.py"):
        return run(args)


def run(args) -> int:
    import jax

    from knnlm_jax import runs
    from knnlm_jax.retrieval import index as faiss_index
    from knnlm_jax.models.adaptive import band_edges
    from knnlm_jax.models.adaptive import build_capacities
    from knnlm_jax.datastore.format import datastore_dir, open_datastore
    from knnlm_jax.data.windows import WindowSpec
    from knnlm_jax.datastore.retriever import Retriever
    from knnlm_jax.evaluation.streaming import Scorer, StreamSpec, evaluate_tokens
    from knnlm_jax.evaluation.settings import eval_window_sizes
    from knnlm_jax.data.windows import windows
    from knnlm_jax.core.report import write_json

    config = runs.run_config(args.workdir)
    vocab = runs.load_vocab(args.workdir, config)
    trained = runs.load_model(args.workdir, config, vocab)
    store = open_datastore(datastore_dir(args.workdir, args.datastore),
                           runs.signature(config, vocab, trained.fingerprint, trained.step))
    if not store.index_path:
        raise ValueError(f"datastore {store.name} has no FAISS index")
    index = faiss_index.read_index(store.index_path)
    nprobe = args.nprobe or (store.manifest.get("index") or {}).get("nprobe")
    _, tokens = runs.split_tokens(args.workdir, vocab, args.corpus or runs.run_corpus(config), args.split)
    tokens = tokens[: args.max_tokens] if args.max_tokens else tokens
    window, context = eval_window_sizes(config)
    batch_size = args.batch_size or config.eval_batch_size
    caps = build_capacities(tokens, windows(len(tokens), window, context), batch_size,
                            band_edges(trained.cfg.vocab_size, trained.cfg.cutoffs), window)
    exact = not args.approximate

    from knnlm_jax.retrieval.policies import Policy

    vstore, vindex = store, index
    if args.variants_datastore and args.variants_datastore != store.name:
        vstore = open_datastore(datastore_dir(args.workdir, args.variants_datastore),
                                runs.signature(config, vocab, trained.fingerprint, trained.step))
        if not vstore.index_path or vstore.manifest.get("content") != store.manifest.get("content"):
            raise ValueError(f"--variants-datastore {vstore.name}: not an indexed copy of {store.name}'s keys "
                             f"(their content hashes differ, or it has no index)")
        vindex = faiss_index.read_index(vstore.index_path)
    variants = (choose_and_score_variants(args, config, vocab, trained, (store, index), (vstore, vindex), exact)
                if args.variants else [])
    policies = {v["name"]: (v["policy"], v["exact"]) for v in variants if v["name"] != "full"}

    with tempfile.TemporaryDirectory() as tmp:
        def once(search: bool, on_queries=None, overlap: bool = True, policy=Policy(), variant: bool = False,
                 row_exact: bool | None = None) -> dict:
            row_exact = (variant_exact(args, policy) if variant else exact) if row_exact is None else row_exact
            retriever = Retriever(vstore if variant else store, vindex if variant else index, args.k,
                                  row_exact, nprobe) if search else None
            spec = StreamSpec(WindowSpec(window, context), batch_size, policy=policy, progress=False, overlap=overlap)
            files = evaluate_tokens(os.path.join(tmp, "tokens"), Scorer(trained, config.key_type, vocab.eos), tokens,
                                    spec, retriever, capacities=caps, on_queries=on_queries)
            return files.meta

        once(False)  # warm-up: compile both kinds of pass
        once(True)
        for policy, row_exact in policies.values():
            once(True, policy=policy, variant=True, row_exact=row_exact)  # warm-up: the variants' index into memory
        base, knn, sequential, bare = [], [], [], []
        fewer = {name: [] for name in policies}
        for _ in range(args.repeats):
            base.append(once(False))
            queries = []
            knn.append(once(True, queries.append))
            sequential.append(once(True, overlap=False))  # each forward finishes before its search starts
            t0 = time.perf_counter()
            for batch in queries:
                faiss_index.search(index, batch, args.k, nprobe)
            bare.append(time.perf_counter() - t0)
            for name, (policy, row_exact) in policies.items():
                fewer[name].append(once(True, policy=policy, variant=True, row_exact=row_exact))

    med = statistics.median
    base_tps = med(m["tokens_per_s"] for m in base)
    knn_tps = med(m["tokens_per_s"] for m in knn)
    in_pipeline = med(m["timings"]["search"] for m in knn)
    bare_search = med(bare)
    in_sequential = med(m["timings"]["search"] for m in sequential)
    payload = dict(
        workdir=os.path.abspath(args.workdir), datastore=store.name, datastore_entries=store.size,
        index=(store.manifest.get("index") or {}).get("factory"), nprobe=nprobe, k=args.k, exact=exact,
        split=args.split, tokens=len(tokens), window=window, context=context, batch_size=batch_size,
        repeats=args.repeats, device=str(jax.devices()[0].device_kind), device_count=jax.device_count(),
        base_lm_tokens_per_s=base_tps, knn_lm_tokens_per_s=knn_tps, knn_over_base_speed=knn_tps / base_tps,
        # the bound: the base LM's pass over the same windows (forward, the LM's log-probs, per-token files)
        pipeline_over_forward_bound=knn_tps / base_tps,
        search_seconds_in_pipeline=in_pipeline, search_seconds_bare=bare_search,
        pipeline_search_overhead_pct=100.0 * (in_pipeline - bare_search) / bare_search,
        knn_stage_seconds={k: med(m["timings"][k] for m in knn) for k in knn[0]["timings"]},
        knn_seconds=med(m["seconds"] for m in knn), base_seconds=med(m["seconds"] for m in base),
        # diagnostic: the same pass with no overlap, so the search shares the CPU with nothing
        search_seconds_without_overlap=in_sequential,
        pipeline_search_overhead_without_overlap_pct=100.0 * (in_sequential - bare_search) / bare_search,
        knn_seconds_without_overlap=med(m["seconds"] for m in sequential),
        runs=dict(base=[m["seconds"] for m in base], knn=[m["seconds"] for m in knn], bare_search=bare,
                  knn_without_overlap=[m["seconds"] for m in sequential]))
    if variants:
        speed = {v["name"]: [m["tokens_per_s"] for m in (knn if v["name"] == "full" else fewer[v["name"]])]
                 for v in variants}
        by_name = {v["name"]: v for v in variants}
        for v in variants:
            tps, base_tps_runs = speed[v["name"]], speed[v["baseline"]]
            metas = knn if v["name"] == "full" else fewer[v["name"]]
            v.update(tokens_per_s=med(tps), speed_runs_tokens_per_s=tps,
                     speedup_over_baseline=med(t / b for t, b in zip(tps, base_tps_runs)),  # paired per repeat
                     speedup_over_full=med(t / f for t, f in zip(tps, speed["full"])),
                     test_ppl_over_baseline=v["test_ppl"] / by_name[v["baseline"]]["test_ppl"],
                     test_ppl_over_full=v["test_ppl"] / variants[0]["test_ppl"],
                     foss_speed_pass=med(m.get("foss") or 0.0 for m in metas))
        for v in variants:
            v.pop("policy")
        payload["variants"] = variants
        payload["variants_note"] = ("tokens_per_s and foss_speed_pass: the first tokens of the speed split; test_ppl "
                                    "and foss: evaluate.py --split test with the variant's options (tuned on valid)")
    if args.section:
        sections = {}
        if os.path.exists(args.out):
            with open(args.out) as f:
                sections = json.load(f)
            sections = {} if "workdir" in sections else {  # an unsectioned file is replaced whole
                k: v for k, v in sections.items() if k not in ("command", "machine")}
        payload = dict(payload, command=" ".join(sys.argv))
        write_json(args.out, dict(sections, **{args.section: payload}), command="see each section's command")
    else:
        write_json(args.out, payload)
    print(f"{len(tokens)} tokens, k {args.k}, {'exact' if exact else 'approximate'}, {payload['index']} "
          f"over {store.size} keys, on {payload['device']}:")
    print(f"  base LM {base_tps:,.0f} tokens/s; kNN-LM {knn_tps:,.0f} tokens/s "
          f"({payload['knn_over_base_speed']:.3f} of the base speed)")
    print(f"  FAISS search {in_pipeline:.3f}s inside the pipeline, {bare_search:.3f}s bare "
          f"({payload['pipeline_search_overhead_pct']:+.1f}%)")
    print(f"  without overlap: search {in_sequential:.3f}s "
          f"({payload['pipeline_search_overhead_without_overlap_pct']:+.1f}%), whole pass "
          f"{payload['knn_seconds_without_overlap']:.2f}s against {payload['knn_seconds']:.2f}s overlapped")
    for v in payload.get("variants", []):
        print(f"  {v['name']:>15}: {v['tokens_per_s']:,.0f} tokens/s ({v['speedup_over_baseline']:.2f}x "
              f"{v['baseline']}), test ppl {v['test_ppl']:.3f} ({100 * (v['test_ppl_over_baseline'] - 1):+.2f}%), "
              f"FoSS {v['foss']:.1%}")
    print(f"-> {args.out}")
    return 0


def variant_exact(args, policy) -> bool:
    """Exact distances for a variant: unless ``--variants-approximate``; always with pointers (they need the keys)."""
    return policy.min_pointers > 0 or not args.variants_approximate


def choose_and_score_variants(args, config, vocab, trained, today, fast, exact) -> list[dict]:
    """The variants with their knobs chosen on valid and their test perplexity (see the module doc).

    ``today``: ``(store, index)`` of the full kNN-LM as measured today (``exact`` distances);
    ``fast``: those every other variant searches (``--variants-datastore``).
    """
    import dataclasses
    import shutil

    from knnlm_jax import runs
    from knnlm_jax.evaluation import evaluate as evaluation
    from knnlm_jax.data.windows import WindowSpec
    from knnlm_jax.datastore.retriever import Retriever
    from knnlm_jax.evaluation.streaming import Scorer, StreamSpec, evaluate_tokens
    from knnlm_jax.evaluation.settings import Settings, eval_window_sizes
    from knnlm_jax.evaluation.mixing import tune_knn
    from knnlm_jax.retrieval.policies import Gate, Policy
    from knnlm_jax.evaluation.token_files import open_token_files

    out_dir = args.variants_dir or os.path.join(args.workdir, "eval", "variants")
    os.makedirs(out_dir, exist_ok=True)
    if args.reuse:  # hard links of full kNN-LM files: split_files still checks they answer the same question
        for split in ("valid", "test"):
            src, dst = os.path.join(args.reuse, f"tokens-{split}"), os.path.join(out_dir, "full", f"tokens-{split}")
            if os.path.isdir(src) and not os.path.isdir(dst):
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                shutil.copytree(src, dst, copy_function=os.link)
    window, context = eval_window_sizes(config)
    source = args.corpus or runs.run_corpus(config)
    splits = {s: runs.split_tokens(args.workdir, vocab, source, s) for s in ("valid", "test")}
    base = dict(k=args.k, nprobe=args.nprobe, batch_size=args.batch_size or config.eval_batch_size,
                window=window, context=context, max_tokens=args.variant_tokens)
    nprobe = args.nprobe or (today[0].manifest.get("index") or {}).get("nprobe")
    log = lambda msg: print(msg, file=sys.stderr)  # noqa: E731

    def evaluate(name: str, where, row_exact=None, **options) -> dict:
        """``evaluate.py --split test`` for one variant; its files in ``out_dir/name`` (reused when they answer)."""
        policy = Policy(options.get("min_pointers", 0))
        if row_exact is None:
            row_exact = exact if where is today else variant_exact(args, policy)
        settings = Settings(lmbda=None, temperature=None, **base, **options, exact=row_exact)
        store, index = where
        job = evaluation.EvalJob(Scorer(trained, config.key_type, vocab.eos), store, index, vocab, settings)
        return evaluation.run(os.path.join(out_dir, name), job, "test", splits, log=log)

    def valid_prefix(name: str):
        files = open_token_files(os.path.join(out_dir, name, "tokens-valid"))
        return dataclasses.replace(files.head(min(args.choose_tokens, files.n)), cache=None)

    results = {"full": evaluate("full", today)}
    prefix = valid_prefix("full")
    n = prefix.n
    full_valid_ppl = tune_knn(prefix)["ppl"]
    limit = full_valid_ppl * (1 + args.budget_pct / 100)
    choice = dict(tokens=n, full_valid_ppl=full_valid_ppl, limit=limit, retomaton=[], fraction=[])
    fast_exact = not args.variants_approximate
    same_index = fast[0].name == today[0].name
    if not same_index or fast_exact != exact:  # the full kNN-LM on the variants' index (and distances)
        results["full-fast"] = evaluate("full-fast", fast)
        prefix = valid_prefix("full-fast")
        choice["full_fast_valid_ppl"] = tune_knn(prefix)["ppl"]
    valid_tokens = splits["valid"][1][:n]
    with tempfile.TemporaryDirectory() as tmp:
        for tau in (int(t) for t in args.retomaton_grid.split(",")):
            spec = StreamSpec(WindowSpec(window, context), base["batch_size"], policy=Policy(min_pointers=tau),
                              progress=False)
            files = evaluate_tokens(os.path.join(tmp, "reto"), Scorer(trained, config.key_type, vocab.eos),
                                    valid_tokens, spec, Retriever(fast[0], fast[1], args.k, True, nprobe))
            choice["retomaton"].append(dict(min_pointers=tau, valid_ppl=tune_knn(files)["ppl"],
                                            foss=files.meta["foss"]))
            log(f"retomaton {tau}: {choice['retomaton'][-1]}")
    for fraction in (float(f) for f in args.fraction_grid.split(",")):
        gate, _ = evaluation.fit_adaptive_gate(prefix, Settings(temperature=None, retrieve_fraction=fraction))
        gated = dataclasses.replace(prefix, retrieved=gate.retrieve(prefix.features))
        choice["fraction"].append(dict(retrieve_fraction=fraction, valid_ppl=tune_knn(gated)["ppl"],
                                       foss=float(1 - gated.retrieved.mean())))
        log(f"adaptive {fraction}: {choice['fraction'][-1]}")

    def best(rows, key):
        ok = [r for r in rows if r["valid_ppl"] <= limit]
        return max(ok, key=lambda r: r["foss"])[key] if ok else None

    tau, fraction = best(choice["retomaton"], "min_pointers"), best(choice["fraction"], "retrieve_fraction")
    choice.update(chosen_min_pointers=tau, chosen_retrieve_fraction=fraction)
    tau = tau or int(args.retomaton_grid.split(",")[-1])  # none within budget: the most conservative setting
    fraction = fraction or max(float(f) for f in args.fraction_grid.split(","))
    options = {"full": {}, "full-fast": {}, "retomaton": dict(min_pointers=tau),
               "adaptive": dict(retrieve_fraction=fraction),
               "both": dict(min_pointers=tau, retrieve_fraction=fraction)}
    for name in ("retomaton", "adaptive", "both"):
        results[name] = evaluate(name, fast, **options[name])
    if args.variants_approximate and not (same_index and exact):  # pointers' baseline: the same index, exact
        options["full-fast-exact"] = {}
        results["full-fast-exact"] = evaluate("full-fast-exact", fast, row_exact=True)
    out = []
    for name, r in results.items():
        gate = (r["retrieval"] or {}).get("gate")
        policy = Policy(options[name].get("min_pointers", 0),
                        Gate(**{f.name: gate[f.name] for f in dataclasses.fields(Gate)}) if gate else None)
        store = (today if name == "full" else fast)[0]
        row_exact = exact if name == "full" else True if name == "full-fast-exact" else variant_exact(args, policy)
        flags = [f"--{k.replace('min_pointers', 'retomaton').replace('_', '-')} {val}"
                 for k, val in options[name].items()] + ([] if row_exact else ["--approximate"])
        out.append(dict(name=name, options=options[name], policy=policy, datastore=store.name,
                        index=(store.manifest.get("index") or {}).get("factory"), exact=row_exact, nprobe=nprobe,
                        test_ppl=r["rows"][1]["ppl"], test_base_ppl=r["rows"][0]["ppl"],
                        foss=(r["retrieval"] or {}).get("foss", {}).get("test", 0.0),
                        valid_foss=(r["retrieval"] or {}).get("foss", {}).get("valid"), lmbda=r["knn"]["lmbda"],
                        temperature=r["knn"]["temperature"], valid_ppl=(r["valid"] or {}).get("knn", {}).get("ppl"),
                        command=" ".join([f"python evaluate.py --workdir {args.workdir} --datastore {store.name} "
                                          "--split test", *flags])))
    for row in out:  # like with like: the full kNN-LM on the same datastore's index, in the same mode
        row["baseline"] = next(b["name"] for b in out if b["policy"].full and b["datastore"] == row["datastore"]
                               and b["exact"] == row["exact"])
    out[0]["choice_on_valid"] = choice
    return out


if __name__ == "__main__":
    sys.exit(main())
