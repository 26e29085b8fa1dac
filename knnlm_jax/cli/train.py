"""Train the base Transformer LM: ``python train.py --config NAME [--set key=value ...]``.

Resumes automatically from the run directory's latest checkpoint. Data-parallel over several
processes (hosts) with ``--coordinator HOST:PORT --num_processes P --process_id I`` (one launch
per process; auto-detected on SLURM and TPU pods): every process feeds its devices' rows of each
global batch and the gradients are averaged across all devices.
"""

import argparse
import errno
import json
import os
import shutil
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    from knnlm_jax.cli import add_config_args, corpus_options, load_config, program, user_errors
    from knnlm_jax.configs import validate
    from knnlm_jax.core.distributed import add_process_args, check_process_args

    add_config_args(parser)
    add_process_args(parser)
    parser.add_argument("--dry-run", action="store_true",
                        help="print the resolved config and the exact parameter count, then exit")
    parser.add_argument("--overwrite", action="store_true", help="delete an existing run directory first")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--vocab", default=None, metavar="PATH",
                        help="train with this vocabulary (a run's vocab.txt) instead of one built from the training "
                             "split, e.g. to compare LMs trained on different corpora in one vocabulary")
    args = parser.parse_args(argv)

    with user_errors(program("train")):
        config, workdir = load_config(args)
        validate(config)
        check_process_args(args.coordinator, args.num_processes, args.process_id)
        if args.dry_run:
            return dry_run(config, corpus_options(args))
        from knnlm_jax.core import distributed

        processes = distributed.initialize_from(args)
        result = _train(args, config, workdir, processes)
        if not processes.is_main:
            return 0
        print(f"valid perplexity {result['valid_ppl']:.2f} (best {result['best_valid_ppl']:.2f} "
              f"at step {result['best_step']}); add-one unigram {result['unigram_valid_ppl']:.2f}; "
              f"ratio {result['valid_ppl'] / result['unigram_valid_ppl']:.3f}; "
              f"{result['valid_tokens']} valid tokens, word level")
        print(json.dumps(result, allow_nan=False))
    return 0


def _train(args, config, workdir: str, processes) -> dict:
    from knnlm_jax.core import distributed
    from knnlm_jax.core import locks
    from knnlm_jax.cli import UserError, corpus_options

    claims = [(locks.lock_path(workdir), f"run directory {workdir}")] if processes.is_main else []
    try:
        with distributed.held_locks(claims):  # one writer of a run directory at a time
            if args.overwrite and processes.is_main:
                refuse_if_written(workdir)
                shutil.rmtree(workdir, ignore_errors=True)
            if args.vocab and processes.is_main:
                given_vocab(args.vocab, workdir)
            distributed.barrier("overwrite")
            from knnlm_jax.training.loop import train

            return train(config, workdir, progress=not args.no_progress, corpus_options=corpus_options(args))
    except OSError as err:  # full disk, read-only run directory, a file where a directory goes
        reason = f"[Errno {err.errno}] {err.strerror}" if err.strerror else str(err)
        if err.errno in (errno.EROFS, errno.ENOSPC):  # only writes fail so
            raise UserError(f"cannot write {err.filename or workdir}: {reason}; fix it and run the same "
                            "command again") from None
        if err.filename and not _inside(err.filename, workdir):  # an input, not the run directory
            if isinstance(err, FileNotFoundError):
                raise  # user_errors says which
            raise UserError(f"cannot read {err.filename}: {reason}") from None
        raise UserError(f"cannot write {err.filename or workdir}: {reason}") from None


def refuse_if_written(workdir: str) -> None:
    """``--overwrite`` must not delete a datastore or an evaluation that another process is writing."""
    import glob

    from knnlm_jax.core import locks

    for path in sorted(glob.glob(os.path.join(glob.escape(workdir), "**", ".*.lock"), recursive=True)):
        running = locks.holder(path)
        if running:
            what = os.path.basename(path)[1:-len(".lock")]
            raise locks.LockedError(f"--overwrite would delete {os.path.join(os.path.dirname(path), what)}, which "
                                    f"is being written by {running}; wait for it to finish or stop it")


def given_vocab(path: str, workdir: str) -> None:
    """Put vocabulary ``path`` in the run directory (training then uses it); a different one there is refused."""
    from knnlm_jax.cli import UserError
    from knnlm_jax.training.run_data import save_vocab
    from knnlm_jax.data.vocab import Vocab

    try:
        vocab = Vocab.load(path)
    except (OSError, ValueError) as err:
        raise UserError(f"--vocab {path}: not a readable vocabulary ({err})") from None
    target = os.path.join(workdir, "vocab.txt")
    if os.path.isfile(target):
        if Vocab.load(target) != vocab:
            raise UserError(f"--vocab {path}: {workdir} already has another vocabulary; pass --overwrite to start "
                            "that run again")
        return
    save_vocab(workdir, vocab, {"given": os.path.abspath(path)})


def _inside(path, directory: str) -> bool:
    return bool(path) and os.path.abspath(str(path)).startswith(os.path.abspath(directory) + os.sep)


def dry_run(config, options: dict) -> int:
    from knnlm_jax.models.transformer import ModelConfig, count_params

    vocab_size = config.vocab_size
    if not vocab_size:
        from knnlm_jax.data import corpus
        from knnlm_jax.data.vocab import Vocab

        vocab_size = len(Vocab.build(corpus.read_split(config.data_dir, "train", **options).lines()))
    cfg = ModelConfig.from_config(config, vocab_size=vocab_size)
    print(config.to_json(indent=2))
    print(f"vocab_size: {vocab_size}")
    print(f"parameters: {count_params(cfg)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
