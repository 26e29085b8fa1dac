"""Tiny run directories made without training, their datastores, and the two shared tiny projects.

``built_datastore`` and ``tiny_project`` are the bodies of conftest's session fixtures ``built`` and ``ev``.
"""

import os
from types import SimpleNamespace

import jax
import jax.numpy as jnp

from helpers import tiny_config, write_corpus
from knnlm_jax import runs
from knnlm_jax.data import corpus
from knnlm_jax.data import token_cache
from knnlm_jax.data.windows import WindowSpec
from knnlm_jax.datastore.building import BuildSpec, CorpusInfo, IndexSpec, build_datastore, window_sizes
from knnlm_jax.datastore.format import open_datastore
from knnlm_jax.datastore.indexing import index_datastore
from knnlm_jax.datastore.retriever import Retriever
from knnlm_jax.evaluation.streaming import CacheSpec, Scorer, StreamSpec, evaluate_tokens
from knnlm_jax.retrieval.policies import Policy
from knnlm_jax.retrieval.index import read_index


def make_run(data_dir, workdir, layout="best", corpus_options=None, **overrides):
    """A run directory laid out as train.py leaves it, with freshly initialised weights.

    ``layout``: ``best`` (params only) or ``checkpoints`` (the full training state); ``corpus_options``
    as ``train.py``'s flags give them (``{"tokenize": "wikitext"}``).
    Training itself is skipped: compiling the train step costs ~40 s of CPU.
    """
    from knnlm_jax.core.checkpoint import Checkpointer
    from knnlm_jax.models.transformer import ModelConfig
    from knnlm_jax.training.optim import make_optimizer
    from knnlm_jax.training.run_data import check_run_config, prepare_data, resolved_config
    from knnlm_jax.models.steps import init_model

    config = tiny_config(data_dir, **overrides)
    data = prepare_data(config, workdir, need_valid=False, corpus_options=corpus_options)
    check_run_config(workdir, resolved_config(config, data))
    _, params = init_model(ModelConfig.from_config(config, vocab_size=len(data.vocab)), config.seed)
    if layout == "best":
        tree, meta = {"params": params}, {"best_valid_ppl": 99.0, "best_step": 3}
    else:
        tree = dict(params=params, opt_state=make_optimizer(config).init(params), step=jnp.array(3, jnp.int32),
                    rng=jax.random.PRNGKey(config.seed + 1))
        meta = {"best_valid_ppl": 99.0, "best_step": 3, "epoch": 0, "position": 3, "step": 3}
    ckpt = Checkpointer(os.path.join(workdir, layout))
    ckpt.save(3, tree, meta)
    ckpt.close()
    return config


def build_store(b, directory, *, batch_size=4, keys="fp16", index_factory=None, nprobe=IndexSpec.nprobe,
                memory_mib=IndexSpec.memory_mib, train_keys=None, **kw):
    """A datastore of the tiny run ``b`` at ``directory`` (no index unless asked): build_datastore's manifest."""
    spec = BuildSpec(CorpusInfo(b.split.corpus, b.split.sha256, "train"), WindowSpec(b.window, b.context), batch_size,
                     IndexSpec(keys, index_factory, nprobe, memory_mib, train_keys), progress=False)
    args = dict(log=lambda *a: None)
    args.update(kw)
    return build_datastore(str(directory), b.trained, b.signature, b.tokens, b.vocab.eos, spec, **args)


def built_datastore(root):
    """A tiny run in ``root`` and its complete train datastore, not indexed (conftest's ``built``)."""
    data_dir = write_corpus(root / "corpus")
    workdir = str(root / "run")
    make_run(data_dir, workdir)
    config = runs.run_config(workdir)
    vocab = runs.load_vocab(workdir, config)
    trained = runs.load_model(workdir, config, vocab)
    split = corpus.read_split(runs.run_corpus(config), "train")
    tokens = token_cache.load_tokens(os.path.join(workdir, "tokens"), split, vocab)
    window, context = window_sizes(config)
    b = SimpleNamespace(root=root, data_dir=data_dir, workdir=workdir, config=config, vocab=vocab, trained=trained,
                        split=split, tokens=tokens, window=window, context=context,
                        signature=runs.signature(config, vocab, trained.fingerprint, trained.step))
    b.directory = str(root / "run" / "datastores" / "train")
    b.manifest = build_store(b, b.directory)
    b.store = open_datastore(b.directory, b.signature)
    return b


def tiny_project(root):
    """A tiny run in ``root``, its train datastore with a Flat index, and its train/valid/test token arrays
    (conftest's ``ev``)."""
    data_dir = write_corpus(root / "corpus", n_train=80)
    workdir = str(root / "run")
    make_run(data_dir, workdir)
    config = runs.run_config(workdir)
    vocab = runs.load_vocab(workdir, config)
    trained = runs.load_model(workdir, config, vocab)
    splits = {}
    for name in ("train", "valid", "test"):
        data = corpus.read_split(data_dir, name)
        splits[name] = (data, token_cache.load_tokens(os.path.join(workdir, "tokens"), data, vocab))
    window, context = window_sizes(config)
    b = SimpleNamespace(root=root, data_dir=data_dir, workdir=workdir, config=config, vocab=vocab, trained=trained,
                        split=splits["train"][0], tokens=splits["train"][1], window=window, context=context,
                        signature=runs.signature(config, vocab, trained.fingerprint, trained.step))
    directory = os.path.join(workdir, "datastores", "train")
    build_store(b, directory)
    store = open_datastore(directory, b.signature)
    index_datastore(store, progress=False)
    b.store, b.splits = store, splits
    b.index = read_index(store.index_path)
    return b


def run_tokens(ev, tmp_path, tokens, name="files", **kw):
    """``evaluate_tokens`` on the tiny project ``ev`` (its Flat index, k 8); the files go to ``tmp_path/name``.

    Keywords as the pass's parts: ``window``/``context``, ``batch_size``, the cache (``cache_thetas``,
    ``cache_size``), ``drop_self``, ``policy``, ``overlap``; the retriever's ``index`` (``None``: the LM
    alone), ``k``, ``exact``, ``nprobe``; and ``capacities``, ``on_queries``.
    """
    # capacities that fit any batch (4 windows x 16): one compiled forward for every call with the same options
    args = dict(window=16, context=8, batch_size=4, index=ev.index, k=8, capacities=(64, 64))
    args.update(kw)
    return stream_tokens(ev.trained, ev.config.key_type, ev.vocab.eos, str(tmp_path / name), tokens, store=ev.store,
                         **args)


def stream_tokens(trained, key_type, eos, directory, tokens, *, window, context, batch_size, index=None, store=None,
                  k=8, exact=True, nprobe=None, cache_thetas=(), cache_size=0, drop_self=False, policy=Policy(),
                  overlap=True, capacities=None, on_queries=None):
    """One streaming pass from plain keywords (the value objects built here)."""
    retriever = Retriever(store, index, k, exact, nprobe) if index is not None else None
    cache = CacheSpec(tuple(cache_thetas), cache_size) if cache_thetas else None
    spec = StreamSpec(WindowSpec(window, context), batch_size, cache=cache, drop_self=drop_self, policy=policy,
                      progress=False, overlap=overlap)
    return evaluate_tokens(directory, Scorer(trained, key_type, eos), tokens, spec, retriever, capacities=capacities,
                           on_queries=on_queries)


def eval_job(ev, settings, *, trained=None, key_type=None, store=None, index=None):
    """The tiny project's :class:`~knnlm_jax.evaluation.evaluate.EvalJob` (its weights, datastore, Flat index)."""
    from knnlm_jax.evaluation.evaluate import EvalJob

    scorer = Scorer(trained or ev.trained, key_type or ev.config.key_type, ev.vocab.eos)
    return EvalJob(scorer, store or ev.store, ev.index if index is None else index, ev.vocab, settings)
