"""The run directory's data and config: vocabulary, cached token arrays, ``config.json`` (no JAX).

Under several processes process 0 builds and writes them; the others then read its files.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass

import numpy as np

from knnlm_jax.data import corpus
from knnlm_jax.core import distributed
from knnlm_jax.data import token_cache
from knnlm_jax.data.vocab import Vocab
from knnlm_jax.core.errors import InputError


@dataclass
class RunData:
    vocab: Vocab
    train_ids: np.ndarray
    valid_ids: np.ndarray | None  # None when prepared without valid
    train_sha256: str
    corpus: str
    corpus_options: dict


def prepare_data(config, workdir: str, *, need_valid: bool = True, corpus_options: dict | None = None) -> RunData:
    """Vocabulary (built once from the train split, saved) and cached token arrays (memory-mapped).

    ``config.data_dir`` is any corpus spec; ``corpus_options`` (``tfds_data_dir``, ``text_feature``)
    apply to ``tfds:`` sources. The corpus is streamed, never held whole. Under several processes
    process 0 builds and caches them first; the others then read its files.
    """
    processes = distributed.current()
    if not processes.is_main:
        distributed.barrier("training data")
    data = _prepare_data(config, workdir, need_valid=need_valid, corpus_options=corpus_options)
    if processes.is_main:
        distributed.barrier("training data")
    return data


def _prepare_data(config, workdir: str, *, need_valid: bool, corpus_options: dict | None) -> RunData:
    cache = os.path.join(workdir, "tokens")
    options = dict(corpus_options or {}, cache_dir=cache)
    train = corpus.read_split(config.data_dir, "train", **options)
    vocab_path = os.path.join(workdir, VOCAB)
    max_size = int(config.vocab_size or 0)
    fresh = not _vocab_is_ours(workdir, train, max_size)
    if fresh:
        vocab = Vocab.build(train.lines(), max_size=config.vocab_size)
        save_vocab(workdir, vocab)
    else:
        vocab = Vocab.load(vocab_path)
    train_ids = token_cache.load_tokens(cache, train, vocab)  # hashes the split as it encodes it
    if fresh:
        write_vocab_source(workdir, vocab, _made_from(train, max_size))
    valid_ids = (token_cache.load_tokens(cache, corpus.read_split(config.data_dir, "valid", **options), vocab)
                 if need_valid else None)
    return RunData(vocab, train_ids, valid_ids, train.sha256, train.corpus, dict(corpus_options or {}))


VOCAB, VOCAB_SOURCE, CONFIG = "vocab.txt", "vocab-source.json", "config.json"


def save_vocab(workdir: str, vocab: Vocab, source: dict | None = None) -> None:
    """Save the run's vocabulary, with what it was made from when known (``{"given": path}`` for ``--vocab``).

    The old record goes first: a process killed before the new one is written leaves a vocabulary
    that no record vouches for.
    """
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, VOCAB_SOURCE)
    if os.path.exists(path):
        os.remove(path)
    vocab.save(os.path.join(workdir, VOCAB))
    if source is not None:
        write_vocab_source(workdir, vocab, source)


def write_vocab_source(workdir: str, vocab: Vocab, source: dict) -> None:
    """Record what the saved vocabulary was made from, naming its fingerprint."""
    path = os.path.join(workdir, VOCAB_SOURCE)
    with open(path + ".tmp", "w") as f:
        json.dump(dict(source, vocab_fingerprint=vocab.fingerprint()), f, indent=2)
    os.replace(path + ".tmp", path)


def _made_from(train, max_size: int) -> dict:
    return dict(corpus=train.corpus, train_sha256=train.sha256, max_size=max_size)


def _vocab_is_ours(workdir: str, train, max_size: int) -> bool:
    """Whether ``vocab.txt`` in the run directory belongs to this run.

    Once training has started (``config.json``), the saved config's corpus check decides. Before
    that, a vocabulary left by a run that failed early is kept only if it was given (``--vocab``)
    or made from this corpus; otherwise it is rebuilt, with a note, never silently reused.
    """
    vocab_path = os.path.join(workdir, VOCAB)
    if not os.path.isfile(vocab_path):
        return False
    if os.path.isfile(os.path.join(workdir, CONFIG)):
        return True
    try:
        with open(os.path.join(workdir, VOCAB_SOURCE)) as f:
            recorded = json.load(f)
    except (OSError, ValueError):
        recorded = None
    if isinstance(recorded, dict) and recorded.get("vocab_fingerprint") == Vocab.load(vocab_path).fingerprint():
        made_from = {k: v for k, v in recorded.items() if k != "vocab_fingerprint"}
        if recorded.get("given") or made_from == _made_from(train, max_size):  # hashes the split if not yet known
            return True
    made = (f"from {recorded.get('corpus')} ({recorded.get('max_size') or 'all'} words)"
            if isinstance(recorded, dict) else "by an unknown corpus")
    print(f"note: {vocab_path} was made {made} by a run that never started training; rebuilding it from "
          f"{train.corpus}", file=sys.stderr)
    return False


def resolved_config(config, data: RunData) -> dict:
    """The config as saved in the run directory, with what was derived from the data."""
    resolved = config.to_dict()
    resolved["cutoffs"] = list(resolved["cutoffs"])
    resolved["derived"] = {"vocab_size": len(data.vocab), "corpus": data.corpus, "train_sha256": data.train_sha256}
    if corpus.is_spec(data.corpus):  # a catalog corpus: where it was read from, for build and evaluate
        resolved["derived"]["corpus_options"] = data.corpus_options
    elif data.corpus_options.get("tokenize"):  # build and evaluate must read the text as the LM was trained on it
        resolved["derived"]["corpus_options"] = {"tokenize": data.corpus_options["tokenize"]}
    return resolved


TRAINING_NEUTRAL = ("build_", "eval_")


def check_run_config(workdir: str, resolved: dict, *, write: bool = True) -> None:
    """Save ``config.json`` (unless ``write`` is false), or refuse to continue a run whose saved config differs."""
    path = os.path.join(workdir, CONFIG)
    if os.path.isfile(path):
        with open(path) as f:
            saved = json.load(f)
        # fields added since the run started, and build/eval-time fields, do not change training
        diff = sorted(k for k in saved if not k.startswith(TRAINING_NEUTRAL) and saved[k] != resolved.get(k))
        if diff:
            raise InputError(
                f"{workdir} holds a run with a different config ({', '.join(diff)}); "
                "use another --workdir or --overwrite"
            )
        return
    if not write:
        return
    os.makedirs(workdir, exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(resolved, f, indent=2)
    os.replace(path + ".tmp", path)
