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
import sys


def parser() -> argparse.ArgumentParser:
    from knnlm_jax.cli import add_config_args
    from knnlm_jax.core.distributed import add_process_args

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    run = p.add_argument_group("model and run")
    add_config_args(run, default=None, model=True)
    data = p.add_argument_group("data")
    data.add_argument("--datastore", required=True, metavar="NAME", help="datastore in <workdir>/datastores/")
    data.add_argument("--split", default="valid", help="split to evaluate: valid (default) or test")
    data.add_argument("--corpus", default=None, metavar="SPEC",
                      help="WikiText-format directory or wiki-offline (default: the run's corpus)")
    data.add_argument("--max-tokens", "--max_tokens", dest="max_tokens", type=int, default=0,
                      help="evaluate only the first N targets of each split")
    data.add_argument("--tune-tokens", "--tune_tokens", dest="tune_tokens", type=int, default=0, metavar="N",
                      help="tune auto parameters on only the first N valid tokens when another split is reported "
                           "(a large valid split; default: all of it)")
    data.add_argument("--drop-self", "--drop_self", dest="drop_self", default="auto", metavar="auto|yes|no",
                      help="drop the neighbour that is the query's own entry when the evaluated split is the "
                           "datastore's own text (auto: when detected by sha256)")
    retrieval_args(p.add_argument_group("retrieval"))
    mixing = p.add_argument_group("mixing")
    mixing.add_argument("--lmbda", "--lambda", dest="lmbda", default="auto",
                        help="interpolation weight of p_kNN in [0, 1], or auto: tuned on valid (default)")
    mixing.add_argument("--temperature", default="auto",
                        help="kNN softmax temperature of -distance (the paper: 1), or auto: tuned on valid (default)")
    cache = p.add_argument_group("continuous cache")
    cache.add_argument("--cache", action="store_true", help="also evaluate the continuous cache (Grave et al. 2017)")
    cache.add_argument("--cache-size", "--cache_size", dest="cache_size", type=int, default=1024,
                       help="cache memory: the last N evaluated tokens, across windows (default 1024)")
    cache.add_argument("--cache-lambda", "--cache_lambda", dest="cache_lambda", default="auto",
                       help="cache interpolation weight in [0, 1], or auto")
    cache.add_argument("--cache-theta", "--cache_theta", dest="cache_theta", default="auto",
                       help="cache flatness theta: a number, a comma list (tuned on valid) or auto (a grid)")
    speed = p.add_argument_group("speed")
    speed.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=None,
                       help="windows per forward (default eval_batch_size)")
    speed.add_argument("--recompute", action="store_true", help="do not reuse saved per-token files")
    output_args(p.add_argument_group("output"))
    add_process_args(p.add_argument_group("multi-process"))
    return p


def retrieval_args(group) -> None:
    group.add_argument("--k", type=int, default=1024, help="neighbours per query (default 1024)")
    group.add_argument("--nprobe", type=int, default=None, help="inverted lists to probe (default: the index's)")
    group.add_argument("--search", default="auto", choices=("auto", "merged", "shards", "device"),
                       help="a sharded datastore: its merged on-disk index, or its shards' indexes (one per "
                            "process under a multi-process launch); auto: shards under several processes, "
                            "else merged. device: exact search of the stored keys on the accelerators "
                            "(JAX, sharded over the local devices), the same neighbours as a Flat index")
    mode = group.add_mutually_exclusive_group()
    mode.add_argument("--exact", dest="exact", action="store_true", default=None,
                      help="re-rank FAISS's candidates by full-precision L2 to the stored keys (default, unless the "
                           "datastore keeps no keys: --keys none)")
    mode.add_argument("--approximate", dest="exact", action="store_false", help="use FAISS's distances as they are")
    group.add_argument("--retomaton", type=int, default=0, metavar="N",
                       help="follow RetoMaton pointers (Alon et al. 2022): a token whose predecessor's matching "
                            "neighbours leave at least N successor entries uses them without a search (0: off). "
                            "Pays only where FAISS search dominates and many neighbours continue the text: "
                            "1.2-1.3x at N 16 on a 903k-entry IVF-PQ store, 1.12x at N 64 (+0.9%% ppl) on the "
                            "2.1M WikiText-2 store, 1.06x (+1.8%%) with SmolLM2's 2.6M-entry store, where the "
                            "forward dominates; less with FastScan or --search device")
    group.add_argument("--retomaton-max-pointers", "--retomaton_max_pointers", dest="retomaton_max_pointers", type=int,
                       default=0, metavar="P", help="RetoMaton: pointers kept per token, the nearest hits' "
                                                    "successors first (0: up to k)")
    group.add_argument("--retrieve-fraction", "--retrieve_fraction", dest="retrieve_fraction", type=float,
                       default=1.0, metavar="F",
                       help="adaptive retrieval (He et al. 2021): a gate fitted on half of valid lets only the "
                            "fraction F of tokens search; the others use the LM alone (1: off). Measured at F 0.7: "
                            "1.40x at +2.4%% test ppl on the wt2 model's store, 1.14x at +7.0%% with SmolLM2's "
                            "(its gate, fitted on valid, skipped 43%% of test tokens); not worth it there")


def output_args(group) -> None:
    group.add_argument("--show", type=int, default=0, metavar="N",
                       help="print the N tokens kNN helped most, with their neighbours' datastore text")
    group.add_argument("--show-skip", "--show_skip", dest="show_skip", default="", metavar="WORDS",
                       help="comma-separated words --show leaves out, e.g. '<unk>' (out-of-domain text gains most "
                            "on <unk>)")
    group.add_argument("--html", default=None, metavar="PATH",
                       help="also write a self-contained HTML explorer of the evaluated text (tokens coloured by "
                            "how much kNN helped; click one for its neighbours)")
    group.add_argument("--html-tokens", "--html_tokens", dest="html_tokens", type=int, default=2000, metavar="N",
                       help="tokens the explorer shows, from the start of the split (default 2000)")
    group.add_argument("--out", default=None, metavar="DIR", help="output directory (default <workdir>/eval/<NAME>)")
    group.add_argument("--no-progress", "--no_progress", dest="no_progress", action="store_true",
                       help="no progress bars")


def number_or_auto(text: str, flag: str):
    from knnlm_jax.evaluation.settings import EvaluationError

    if str(text).strip().lower() == "auto":
        return None
    try:
        return float(text)
    except ValueError:
        raise EvaluationError(f"{flag} {text!r}: expected a number or auto") from None


def settings_given(args) -> dict:
    """The :class:`~knnlm_jax.evaluation.settings.Settings` fields the flags give (numbers parsed)."""
    from knnlm_jax.evaluation.settings import CACHE_THETAS, EvaluationError

    if args.cache_theta.strip().lower() == "auto":
        thetas = CACHE_THETAS
    else:
        try:
            thetas = tuple(float(t) for t in args.cache_theta.split(",") if t.strip())
        except ValueError:
            raise EvaluationError(f"--cache-theta {args.cache_theta!r}: expected numbers or auto") from None
    return dict(k=args.k, lmbda=number_or_auto(args.lmbda, "--lmbda"),
                temperature=number_or_auto(args.temperature, "--temperature"), nprobe=args.nprobe, exact=args.exact,
                cache=args.cache, cache_size=args.cache_size,
                cache_lambda=number_or_auto(args.cache_lambda, "--cache-lambda"), cache_thetas=thetas,
                drop_self=args.drop_self, max_tokens=args.max_tokens, tune_tokens=args.tune_tokens,
                batch_size=args.batch_size, recompute=args.recompute, show=args.show,
                show_skip=tuple(w for w in args.show_skip.split(",") if w), min_pointers=args.retomaton,
                max_pointers=args.retomaton_max_pointers,
                retrieve_fraction=args.retrieve_fraction)


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    from knnlm_jax.cli import corpus_options, program, run_choice, supervised, user_errors
    from knnlm_jax.core.distributed import Launch

    if (status := supervised("evaluate", argv, args)) is not None:
        return status
    with user_errors(program("evaluate")):
        from knnlm_jax.api import EvaluateOptions, evaluate_tool

        options = EvaluateOptions(args.datastore, args.split, args.corpus or args.data_dir,
                                  {k: v for k, v in corpus_options(args).items() if getattr(args, k, None)},
                                  args.search, args.out, args.html_tokens, not args.no_progress,
                                  Launch.from_args(args))
        done = evaluate_tool(run_choice(args), options, settings_given(args))
        if done is not None:
            report(args, *done)
    return 0


def report(args, lm, store, results) -> None:
    """The table, how λ/T were chosen, the examples, and where the results (and explorer) are."""
    import os

    from knnlm_jax.evaluation import explorer
    from knnlm_jax.evaluation import report as eval_report

    print(eval_report.format_table(results))
    print(eval_report.describe_tuning(results))
    if results["examples"]:
        if args.show_skip:
            print(f"(--show skips the targets {', '.join(w for w in args.show_skip.split(',') if w)})")
        print(eval_report.format_examples(results["examples"]))
    print(f"results: {os.path.join(args.out or os.path.join(lm.workdir, 'eval', store.name), 'results.json')}")
    if args.html:
        explorer.write_from_results(args.html, args.html_tokens, results, lm.vocab, store.datastore.vals)
        print(f"explorer: {args.html}")


if __name__ == "__main__":
    sys.exit(main())
