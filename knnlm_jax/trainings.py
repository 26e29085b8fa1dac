"""A run's training: one writer per run directory, ``--overwrite`` that never deletes work in progress,
a given vocabulary, the dry run: what ``train.py`` does around :func:`knnlm_jax.training.loop.train`."""

from __future__ import annotations

import dataclasses
import errno
import os
import shutil

from knnlm_jax.core.distributed import Launch
from knnlm_jax.core.errors import InputError


@dataclasses.dataclass(frozen=True)
class TrainOptions:
    """What ``train.py`` was asked for beyond the config."""

    overwrite: bool = False
    vocab: str | None = None  # a vocabulary to train with instead of one built from the training split
    progress: bool = True
    corpus_options: dict = dataclasses.field(default_factory=dict)
    dry_run: bool = False
    launch: Launch = Launch()


def train_tool(config, workdir: str, options: TrainOptions) -> dict | None:
    """``train.py``: the dry run's text, or train under this launch; the result on process 0, ``None`` elsewhere."""
    from knnlm_jax.configs import validate
    from knnlm_jax.core import distributed

    validate(config)
    options.launch.check()
    if options.dry_run:
        return dict(dry_run=dry_run(config, options.corpus_options))
    processes = distributed.initialize(options.launch)
    result = train_run(config, workdir, options, processes)
    return result if processes.is_main else None


def train_run(config, workdir: str, options: TrainOptions, processes) -> dict:
    """Train ``config`` into ``workdir`` (one writer at a time), after ``--overwrite`` and ``--vocab``; the result."""
    from knnlm_jax.core import distributed
    from knnlm_jax.core import locks

    claims = [(locks.lock_path(workdir), f"run directory {workdir}")] if processes.is_main else []
    try:
        with distributed.held_locks(claims):  # one writer of a run directory at a time
            if options.overwrite and processes.is_main:
                refuse_if_written(workdir)
                shutil.rmtree(workdir, ignore_errors=True)
            if options.vocab and processes.is_main:
                given_vocab(options.vocab, workdir)
            distributed.barrier("overwrite")
            from knnlm_jax.training.loop import train

            return train(config, workdir, progress=options.progress, corpus_options=options.corpus_options)
    except OSError as err:  # full disk, read-only run directory, a file where a directory goes
        reason = f"[Errno {err.errno}] {err.strerror}" if err.strerror else str(err)
        if err.errno in (errno.EROFS, errno.ENOSPC):  # only writes fail so
            raise InputError(f"cannot write {err.filename or workdir}: {reason}; fix it and run the same "
                            "command again") from None
        if err.filename and not _inside(err.filename, workdir):  # an input, not the run directory
            if isinstance(err, FileNotFoundError):
                raise  # user_errors says which
            raise InputError(f"cannot read {err.filename}: {reason}") from None
        raise InputError(f"cannot write {err.filename or workdir}: {reason}") from None


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
    from knnlm_jax.training.run_data import save_vocab
    from knnlm_jax.data.vocab import Vocab

    try:
        vocab = Vocab.load(path)
    except (OSError, ValueError) as err:
        raise InputError(f"--vocab {path}: not a readable vocabulary ({err})") from None
    target = os.path.join(workdir, "vocab.txt")
    if os.path.isfile(target):
        if Vocab.load(target) != vocab:
            raise InputError(f"--vocab {path}: {workdir} already has another vocabulary; pass --overwrite to start "
                            "that run again")
        return
    save_vocab(workdir, vocab, {"given": os.path.abspath(path)})


def _inside(path, directory: str) -> bool:
    return bool(path) and os.path.abspath(str(path)).startswith(os.path.abspath(directory) + os.sep)


def dry_run(config, options: dict) -> str:
    """The resolved config, the vocabulary size and the exact parameter count (computed abstractly)."""
    from knnlm_jax.models.transformer import ModelConfig, count_params

    vocab_size = config.vocab_size
    if not vocab_size:
        from knnlm_jax.data import corpus
        from knnlm_jax.data.vocab import Vocab

        vocab_size = len(Vocab.build(corpus.read_split(config.data_dir, "train", **options).lines()))
    cfg = ModelConfig.from_config(config, vocab_size=vocab_size)
    return f"{config.to_json(indent=2)}\nvocab_size: {vocab_size}\nparameters: {count_params(cfg)}"
