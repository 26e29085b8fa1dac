"""A run's evaluations: settings from a run's config, the checks a datastore must pass, one evaluation.

The application layer over :mod:`knnlm_jax.evaluation` (which knows nothing of runs): it reads
the splits in the run's vocabulary and records what was evaluated beside the results.
"""

from __future__ import annotations

import dataclasses
import os

from knnlm_jax import runs
from knnlm_jax.datastore.format import DatastoreError, build_command
from knnlm_jax.evaluation.settings import EvaluationError, Settings

CORPUS_OPTIONS = ("tfds_data_dir", "text_feature", "tokenize")  # how a corpus is read


def settings_for_store(settings: Settings, datastore, exact: bool | None, search: str) -> Settings:
    """``settings`` for this datastore: approximate when it keeps no keys and exactness was not asked for;
    a datastore without a FAISS index is searched only on the device."""
    if datastore.keys is None and exact is None:
        settings = dataclasses.replace(settings, exact=False)
    if search != "device" and not datastore.manifest.get("index"):
        raise DatastoreError(f"datastore {datastore.name} has no FAISS index; index it with: "
                             f"{build_command(datastore.directory, '--index-only')}")
    return settings


def settings_for(config, **given) -> Settings:
    """Evaluation :class:`~knnlm_jax.evaluation.settings.Settings`: ``given`` over the tool's defaults
    (λ and T tuned on valid) and the run's windows and batch size; checked."""
    from knnlm_jax.evaluation.settings import eval_window_sizes

    window, context = eval_window_sizes(config)
    values = dict(temperature=None, batch_size=int(config.eval_batch_size), window=window, context=context)
    values.update({key: value for key, value in given.items() if value is not None or key in ("lmbda", "temperature",
                                                                                            "cache_lambda", "nprobe")})
    settings = Settings(**values)
    settings.check()
    return settings


def check_store(ds, searcher, settings: Settings) -> None:
    """What an evaluation needs of the datastore ``ds``: keys for exact distances and pointers, enough
    entries, no more lists to probe than its searcher's index has (``searcher`` ``None``: not opened yet)."""
    if ds.keys is None:  # built with --keys none: only the index's codes
        if settings.min_pointers:
            raise DatastoreError(f"datastore {ds.name} keeps no keys (built with --keys none): --retomaton "
                                 "scores pointers by their stored keys")
        if settings.exact:
            raise DatastoreError(f"datastore {ds.name} keeps no keys (built with --keys none): exact re-ranking "
                                 "needs them; use --approximate")
    if settings.k > ds.size:
        raise EvaluationError(f"--k {settings.k}: datastore {ds.name} has only {ds.size} entries")
    lists = getattr(searcher, "lists", 0) if searcher is not None else 0
    if settings.nprobe is not None and lists and settings.nprobe > lists:
        raise EvaluationError(f"--nprobe {settings.nprobe}: the index of datastore {ds.name} has {lists} "
                              "inverted lists")


def with_datastore_options(manifest: dict, source: str, given: dict, log) -> dict:
    """``given`` completed by the options the datastore was built with when ``source`` is the datastore's
    corpus (the same directory or file, or the same TFDS dataset: its text feature, its data directory, its
    tokenisation); a given option that differs is said, not silently used."""
    from knnlm_jax.data.tfds_source import dataset_of

    built = manifest.get("corpus_options") or {}
    dataset, corpus = dataset_of(source), manifest.get("corpus")
    same_text = bool(corpus) and os.path.exists(source) and os.path.abspath(source) == os.path.abspath(corpus)
    if not same_text and (dataset is None or dataset != dataset_of(corpus)):
        return given
    for key in CORPUS_OPTIONS:
        if built.get(key) and given.get(key) and given[key] != built[key]:
            log(f"note: evaluating {source} with {key} {given[key]!r}; the datastore was built from its "
                f"{key} {built[key]!r}")
    return {**{key: built[key] for key in CORPUS_OPTIONS if built.get(key)}, **given}


def evaluate_store(lm, store, split: str, settings: Settings, *, corpus: str | None = None,
                   out: str | None = None, progress: bool = False, log=None, corpus_options: dict | None = None,
                   record: dict | None = None) -> dict:
    """One evaluation of ``store`` (process 0 of a launch): the splits it needs, read in the run's
    vocabulary, then :func:`~knnlm_jax.evaluation.evaluate.run`; returns the results."""
    from knnlm_jax.evaluation import evaluate as evaluation

    check_store(store.datastore, store.searcher, settings)
    source = corpus if corpus is not None else runs.run_corpus(lm.config)
    if corpus_options is None:  # what the run was trained with, for its own corpus
        recorded = runs.corpus_options(lm.config) if corpus is None else {}
        corpus_options = {key: recorded[key] for key in CORPUS_OPTIONS if recorded.get(key)}
    corpus_options = with_datastore_options(store.datastore.manifest, source, corpus_options, log or (lambda m: None))
    wanted = [split] + (["valid"] if settings.tunes and split != "valid" else [])
    splits = {s: runs.split_tokens(lm.workdir, lm.vocab, source, s, **corpus_options) for s in wanted}
    out_dir = out or os.path.join(lm.workdir, "eval", store.name)
    record = record or dict(workdir=os.path.abspath(lm.workdir),
                            model=dict(step=lm.trained.step, source=lm.trained.source,
                                       fingerprint=lm.trained.fingerprint),
                            config=lm.config.to_dict(), datastore_manifest=store.datastore.manifest,
                            settings=dict(vars(settings)))
    job = evaluation.EvalJob(lm.scorer(), store.datastore, store.searcher, lm.vocab, settings)
    return evaluation.run(out_dir, job, split, splits, progress=progress, log=log or (lambda msg: None),
                          record=record)
