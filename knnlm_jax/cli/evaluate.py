"""Evaluate a trained LM with a kNN datastore (kNN-LM), optionally with a continuous cache.

  python evaluate.py --datastore train                      # valid split, lambda tuned on valid
  python evaluate.py --datastore train --split test         # tune on valid, report on test
  python evaluate.py --datastore train --lmbda 0.25 --temperature 1 --cache --show 5
  python evaluate.py --datastore wiki3b --split test        # the paper's 3B-token Wikipedia datastore

The run is --workdir, else runs/<--config>, else the latest run; the datastore is
<workdir>/datastores/<NAME>. "auto" parameters are tuned on the valid split (never on
test) from its saved per-token quantities. Outputs go to <workdir>/eval/<NAME>/:
results.json, per-token log-probs (.npz), sweeps over k and lambda (JSON and PNG).

A sharded datastore (built by P processes) is searched through its merged on-disk index,
or, launched as P processes (--coordinator/--num_processes/--process_id), each process
searches its own shard: process 0 evaluates, the others answer its searches.
"""

import argparse
import os
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    from knnlm_jax.cli import add_config_args, program, user_errors
    from knnlm_jax.core.distributed import add_process_args

    add_config_args(parser, default=None, model=True)
    add_process_args(parser)
    parser.add_argument("--datastore", required=True, metavar="NAME", help="datastore in <workdir>/datastores/")
    parser.add_argument("--split", default="valid", help="split to evaluate: valid (default) or test")
    parser.add_argument("--corpus", default=None, metavar="SPEC",
                        help="WikiText-format directory or wiki-offline (default: the run's corpus)")
    parser.add_argument("--k", type=int, default=1024, help="neighbours per query (default 1024)")
    parser.add_argument("--lmbda", "--lambda", dest="lmbda", default="auto",
                        help="interpolation weight of p_kNN in [0, 1], or auto: tuned on valid (default)")
    parser.add_argument("--temperature", default="auto",
                        help="softmax temperature of -distance (the paper: 1), or auto: tuned on valid (default)")
    parser.add_argument("--nprobe", type=int, default=None, help="inverted lists to probe (default: the index's)")
    parser.add_argument("--search", default="auto", choices=("auto", "merged", "shards", "device"),
                        help="a sharded datastore: its merged on-disk index, or its shards' indexes (one per "
                             "process under a multi-process launch); auto: shards under several processes, "
                             "else merged. device: exact search of the stored keys on the accelerators "
                             "(JAX, sharded over the local devices), the same neighbours as a Flat index")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--exact", dest="exact", action="store_true", default=None,
                      help="re-rank FAISS's candidates by full-precision L2 to the stored keys (default, unless the "
                           "datastore keeps no keys: --keys none)")
    mode.add_argument("--approximate", dest="exact", action="store_false", help="use FAISS's distances as they are")
    parser.add_argument("--retomaton", type=int, default=0, metavar="N",
                        help="follow RetoMaton pointers (Alon et al. 2022): a token whose predecessor's matching "
                             "neighbours leave at least N successor entries uses them without a search (0: off)")
    parser.add_argument("--retrieve-fraction", type=float, default=1.0, metavar="F",
                        help="adaptive retrieval (He et al. 2021): a gate fitted on half of valid lets only the "
                             "fraction F of tokens search; the others use the LM alone (1: off)")
    parser.add_argument("--cache", action="store_true", help="also evaluate the continuous cache (Grave et al. 2017)")
    parser.add_argument("--cache-size", type=int, default=1024,
                        help="cache memory: the last N evaluated tokens, across windows (default 1024)")
    parser.add_argument("--cache-lambda", default="auto", help="cache interpolation weight in [0, 1], or auto")
    parser.add_argument("--cache-theta", default="auto", help="cache flatness theta: a number, a comma list "
                                                              "(tuned on valid) or auto (a grid)")
    parser.add_argument("--drop-self", default="auto", metavar="auto|yes|no",
                        help="drop the neighbour that is the query's own entry when the evaluated split is the "
                             "datastore's own text (auto: when detected by sha256)")
    parser.add_argument("--max-tokens", type=int, default=0, help="evaluate only the first N targets of each split")
    parser.add_argument("--tune-tokens", type=int, default=0, metavar="N",
                        help="tune auto parameters on only the first N valid tokens when another split is reported "
                             "(a large valid split; default: all of it)")
    parser.add_argument("--show-skip", default="", metavar="WORDS",
                        help="comma-separated words --show leaves out, e.g. '<unk>' (out-of-domain text gains most "
                             "on <unk>)")
    parser.add_argument("--show", type=int, default=0, metavar="N",
                        help="print the N tokens kNN helped most, with their neighbours' datastore text")
    parser.add_argument("--html", default=None, metavar="PATH",
                        help="also write a self-contained HTML explorer of the evaluated text (tokens coloured by "
                             "how much kNN helped; click one for its neighbours)")
    parser.add_argument("--html-tokens", type=int, default=2000, metavar="N",
                        help="tokens the explorer shows, from the start of the split (default 2000)")
    parser.add_argument("--batch-size", type=int, default=None, help="windows per forward (default eval_batch_size)")
    parser.add_argument("--out", default=None, metavar="DIR", help="output directory (default <workdir>/eval/<NAME>)")
    parser.add_argument("--recompute", action="store_true", help="do not reuse saved per-token files")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    with user_errors(program("evaluate")):
        return evaluate(args)


def number_or_auto(text: str, flag: str):
    from knnlm_jax.evaluation.settings import EvaluationError

    if str(text).strip().lower() == "auto":
        return None
    try:
        return float(text)
    except ValueError:
        raise EvaluationError(f"{flag} {text!r}: expected a number or auto") from None


def settings_from(args, config):
    from knnlm_jax.evaluation.settings import CACHE_THETAS, EvaluationError, Settings, eval_window_sizes

    if args.cache_theta.strip().lower() == "auto":
        thetas = CACHE_THETAS
    else:
        try:
            thetas = tuple(float(t) for t in args.cache_theta.split(",") if t.strip())
        except ValueError:
            raise EvaluationError(f"--cache-theta {args.cache_theta!r}: expected numbers or auto") from None
    window, context = eval_window_sizes(config)
    settings = Settings(k=args.k, lmbda=number_or_auto(args.lmbda, "--lmbda"),
                        temperature=number_or_auto(args.temperature, "--temperature"), nprobe=args.nprobe,
                        exact=args.exact is not False, cache=args.cache, cache_size=args.cache_size,
                        cache_lambda=number_or_auto(args.cache_lambda, "--cache-lambda"), cache_thetas=thetas,
                        drop_self=args.drop_self, max_tokens=args.max_tokens, tune_tokens=args.tune_tokens,
                        batch_size=config.eval_batch_size if args.batch_size is None else args.batch_size,
                        window=window, context=context,
                        recompute=args.recompute, show=args.show,
                        show_skip=tuple(w for w in args.show_skip.split(",") if w), min_pointers=args.retomaton,
                        retrieve_fraction=args.retrieve_fraction)
    settings.check()
    return settings


def evaluate(args) -> int:
    from knnlm_jax import runs
    from knnlm_jax.cli import check_data_dir, command, load_run
    from knnlm_jax.datastore.format import DatastoreError, find_datastore, open_datastore

    from knnlm_jax.core.distributed import check_process_args, initialize_from
    from knnlm_jax.evaluation.settings import EvaluationError
    from knnlm_jax.datastore.search import inverted_lists, open_searcher

    check_process_args(args.coordinator, args.num_processes, args.process_id)
    config, workdir = load_run(args)
    settings = settings_from(args, config)  # bad numbers are refused before anything is loaded
    if args.search == "device" and args.exact is False:
        raise EvaluationError("--search device computes exact distances to the stored keys: --approximate does "
                              "not apply (drop it, or search a FAISS index with --search merged)")
    if args.html and args.html_tokens < 1:
        raise EvaluationError(f"--html-tokens {args.html_tokens}: must be at least 1")
    vocab = runs.load_vocab(workdir, config)
    check_data_dir(args.data_dir)
    directory = find_datastore(workdir, args.datastore)
    store = open_datastore(directory, runs.signature(config, vocab))
    if store.keys is None:  # built with --keys none: only the index's codes
        if args.exact:
            raise DatastoreError(f"datastore {store.name} keeps no keys (built with --keys none): exact re-ranking "
                                 "needs them; use --approximate")
        if settings.min_pointers:
            raise DatastoreError(f"datastore {store.name} keeps no keys (built with --keys none): --retomaton "
                                 "scores pointers by their stored keys")
        settings.exact = False
    if args.search != "device" and not store.manifest.get("index"):
        raise DatastoreError(f"datastore {store.name} has no FAISS index; index it with: "
                             f"{command('build')} --workdir {workdir} --datastore {store.name} --index-only")
    if settings.k > store.size:
        raise EvaluationError(f"--k {settings.k}: datastore {store.name} has only {store.size} entries")
    processes = initialize_from(args)
    index = open_searcher(store, processes, mode=args.search)
    lists = inverted_lists(index)
    if settings.nprobe is not None and lists and settings.nprobe > lists:
        raise EvaluationError(f"--nprobe {settings.nprobe}: the index of datastore {store.name} has {lists} "
                              "inverted lists")
    trained = runs.load_model(workdir, config, vocab)  # every process: orbax restores collectively
    if not processes.is_main:  # this process's shard answers process 0's searches
        served = index.serve()
        print(f"process {processes.index}: served {served} searches", file=sys.stderr)
        return 0
    try:
        return evaluate_main(args, config, workdir, vocab, directory, settings, index, trained)
    finally:
        close = getattr(index, "close", None)
        if close is not None:
            close()


def evaluate_main(args, config, workdir, vocab, directory, settings, index, trained) -> int:
    from knnlm_jax import runs
    from knnlm_jax.cli import corpus_options
    from knnlm_jax.datastore.reader import open_for_model
    source = args.corpus if args.corpus is not None else (args.data_dir or runs.run_corpus(config))
    options = corpus_options(args, runs.corpus_options(config) if args.corpus is None else None)
    wanted = [args.split] + (["valid"] if settings.tunes and args.split != "valid" else [])
    splits = {}
    for split in wanted:
        splits[split] = runs.split_tokens(workdir, vocab, source, split, **options)

    from knnlm_jax.evaluation import report as eval_report
    from knnlm_jax.evaluation import evaluate as evaluation

    log = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
    store = open_for_model(directory, runs.signature(config, vocab, trained.fingerprint, trained.step), log=print)
    out_dir = args.out or os.path.join(workdir, "eval", store.name)
    record = dict(workdir=os.path.abspath(workdir), model=dict(step=trained.step, source=trained.source,
                                                               fingerprint=trained.fingerprint),
                  config=config.to_dict(), datastore_manifest=store.manifest,
                  settings={k: v for k, v in vars(settings).items()})
    results = evaluation.run(out_dir, split=args.split, splits=splits, settings=settings, trained=trained,
                             key_type=str(config.key_type), store=store, index=index, vocab=vocab,
                             progress=not args.no_progress, log=log, record=record)
    path = os.path.join(out_dir, "results.json")
    print(eval_report.format_table(results))
    print(describe_tuning(results))
    if results["examples"]:
        if settings.show_skip:
            print(f"(--show skips the targets {', '.join(settings.show_skip)})")
        print(eval_report.format_examples(results["examples"]))
    print(f"results: {path}")
    if args.html:
        write_explorer(args.html, args.html_tokens, results, vocab, store, args.split)
        print(f"explorer: {args.html}")
    return 0


def write_explorer(path: str, n: int, results: dict, vocab, store, split: str) -> None:
    import numpy as np

    from knnlm_jax.evaluation import explorer
    from knnlm_jax.evaluation.token_files import open_token_files

    files = open_token_files(results["files"]["tokens"][split])
    logprobs = np.load(results["files"]["logprobs"])
    knn = results["knn"]
    records = explorer.token_records(files, logprobs["knn"], logprobs["mixed"], vocab, store.vals,
                                     knn["temperature"], n)
    explorer.write_html(path, title=f"kNN-LM on {split} ({len(records)} tokens), datastore {store.name}",
                        records=records, rows=results["rows"], lmbda=knn["lmbda"], temperature=knn["temperature"],
                        sweep_pngs=[p for p in results["files"]["sweeps"] if p.endswith(".png")],
                        subword=hasattr(vocab, "count_words"))


def describe_tuning(r) -> str:
    knn = r["knn"]
    parts = [f"kNN-LM: lambda {knn['lmbda']:.2f} ({knn['lmbda_source']}), T {knn['temperature']:.3g} "
             f"({knn['temperature_source']}), k {knn['k']}"]
    for name, c in (r.get("cache") or {}).items():
        parts.append(f"{'cache' if name == 'cache' else 'kNN-LM+cache'}: lambda_c {c['lmbda']:.2f} "
                     f"({c['lmbda_source']}), theta {c['theta']:.3g} ({c['theta_source']}), size {c['size']}")
    if r.get("valid"):
        v = r["valid"]
        parts.append(f"valid ({v['tokens']} tokens): base {v['base_ppl']:.3f}"
                     + "".join(f", {k} {v[k]['ppl']:.3f}" for k in ("knn", "cache", "knn_cache") if k in v))
        if v.get("words"):
            w = v["word_ppl"]
            parts.append(f"valid per word ({v['words']} words): base {w['base']:.3f}"
                         + "".join(f", {k} {w[k]:.3f}" for k in ("knn", "cache", "knn_cache") if k in w))
    for split, speed in r["speed"].items():
        parts.append(f"{split}: {speed['seconds']:.1f}s, {speed['tokens_per_s']:,.0f} tokens/s "
                     "(forward, search, re-ranking and per-token files, compilation included)")
    ret = r.get("retrieval") or {}
    if ret.get("policy", "full") != "full":
        parts.append(f"retrieval: {ret['policy']} (--retomaton {ret['min_pointers']}, --retrieve-fraction "
                     f"{ret['retrieve_fraction']:g}); saved searches (FoSS) "
                     + ", ".join(f"{s} {f:.1%}" for s, f in ret["foss"].items()))
    if r.get("self_dropped"):
        parts.append(f"dropped {r['self_dropped']} self-retrievals (the split is the datastore's own text)")
    return "\n".join(parts)


if __name__ == "__main__":
    sys.exit(main())
