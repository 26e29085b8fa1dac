"""Train the base Transformer LM: ``python train.py --config NAME [--set key=value ...]``.

Resumes automatically from the run directory's latest checkpoint. Data-parallel over several
processes (hosts) with ``--coordinator HOST:PORT --num_processes P --process_id I`` (one launch
per process; auto-detected on SLURM and TPU pods): every process feeds its devices' rows of each
global batch and the gradients are averaged across all devices.
"""

import argparse
import json
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    from knnlm_jax.cli import add_config_args, corpus_options, load_config, program, supervised, user_errors
    from knnlm_jax.core.distributed import Launch, add_process_args

    add_config_args(parser)
    add_process_args(parser)
    parser.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                        help="print the resolved config and the exact parameter count, then exit")
    parser.add_argument("--overwrite", action="store_true", help="delete an existing run directory first")
    parser.add_argument("--no-progress", "--no_progress", dest="no_progress", action="store_true",
                        help="no progress bar")
    parser.add_argument("--vocab", default=None, metavar="PATH",
                        help="train with this vocabulary (a run's vocab.txt) instead of one built from the training "
                             "split, e.g. to compare LMs trained on different corpora in one vocabulary")
    args = parser.parse_args(argv)
    if (status := supervised("train", argv, args)) is not None:
        return status

    with user_errors(program("train")):
        config, workdir = load_config(args)
        from knnlm_jax.trainings import TrainOptions, train_tool

        options = TrainOptions(args.overwrite, args.vocab, not args.no_progress, corpus_options(args), args.dry_run,
                               Launch.from_args(args))
        result = train_tool(config, workdir, options)
        if result is None:
            return 0
        if "dry_run" in result:
            print(result["dry_run"])
            return 0
        stopped = f"stopped early at step {result['steps']}; " if result.get("stopped_early") else ""
        print(f"{stopped}valid perplexity {result['valid_ppl']:.2f} (best {result['best_valid_ppl']:.2f} "
              f"at step {result['best_step']}); add-one unigram {result['unigram_valid_ppl']:.2f}; "
              f"ratio {result['valid_ppl'] / result['unigram_valid_ppl']:.3f}; "
              f"{result['valid_tokens']} valid tokens, word level")
        print(json.dumps(result, allow_nan=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
