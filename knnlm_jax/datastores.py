"""A run's datastores: build (resumable, one shard per process), index, check: what ``build.py`` does.

The application layer over :mod:`knnlm_jax.datastore` (which knows nothing of runs): it reads
the run's corpus in its vocabulary, loads its weights only when needed, and says what it did
through ``options.say`` (results) and ``options.log`` (progress notes).
"""

from __future__ import annotations

import dataclasses
import os
import sys

import numpy as np

from knnlm_jax import runs
from knnlm_jax.core.distributed import Launch
from knnlm_jax.core.errors import InputError
from knnlm_jax.data.windows import WindowSpec


def corpus_options(args, recorded: dict | None = None) -> dict:
    """``tfds_data_dir``, ``text_feature`` and ``tokenize``: the options given, else ``recorded``, else the defaults."""
    options = dict(tfds_data_dir=None, text_feature="text", tokenize=None)
    options.update({k: v for k, v in (recorded or {}).items() if k in options and v is not None})
    options.update({k: getattr(args, k) for k in options if getattr(args, k, None) is not None})
    return options


@dataclasses.dataclass(frozen=True)
class BuildOptions:
    """What ``build.py`` was asked for (its flags by name)."""

    datastore: str | None = None
    corpus: str | None = None
    split: str = "train"
    data_dir: str | None = None  # where the run's corpus is now
    tfds_data_dir: str | None = None
    text_feature: str | None = None
    tokenize: str | None = None
    overwrite: bool = False
    index_only: bool = False
    index: str | None = None  # a FAISS factory string
    nprobe: int | None = None
    keys: str = "fp16"  # fp16 | none
    codes_memory: float | None = None  # MiB of codes a --keys none build holds at once
    train_keys: int | None = None  # --keys none: keys its index is trained on
    no_index: bool = False
    check: str | None = None  # a datastore to verify instead
    sample: int = 64
    batch_size: int | None = None
    no_progress: bool = False
    launch: Launch = Launch()
    say: object = print
    log: object = dataclasses.field(default=lambda msg: print(msg, file=sys.stderr))


@dataclasses.dataclass(frozen=True)
class RunContext:
    """A run's config, directory and vocabulary; its weights loaded by ``load`` when needed."""

    config: object
    workdir: str
    vocab: object
    load: object

    def trained(self):
        return self.load()


def build_tool(choice, options: BuildOptions) -> int:
    """``build.py``: build, index or check a datastore of the run ``choice`` selects."""
    options.launch.check()
    config, workdir = choice.resolve()
    vocab = runs.load_vocab(workdir, config)
    return run_build(RunContext(config, workdir, vocab, lambda: runs.load_model(workdir, config, vocab)), options)


def run_build(run: RunContext, options: BuildOptions) -> int:
    """Build, index or check under this launch's processes, one writer at a time."""
    from knnlm_jax.core.distributed import initialize
    from knnlm_jax.datastore.building import writing
    from knnlm_jax.datastore.format import datastore_dir, open_datastore

    processes = initialize(options.launch)
    if processes.multi:
        options.log(f"process {processes.index} of {processes.count}")
    if options.check:
        return check(options, run, processes)
    directory = datastore_dir(run.workdir, options.datastore or default_name(options))
    with writing(directory, processes):  # one writer at a time
        if options.index_only:
            return index(options, open_datastore(directory, runs.signature(run.config, run.vocab)), processes)
        return build(options, run, directory, processes)


def default_name(args) -> str:
    """The split (``train``), or ``<corpus>-<split>`` with a corpus given (a text file: its name)."""
    if args.corpus is None:
        return args.split
    from knnlm_jax.data.embedded_corpus import EMBEDDED

    base = os.path.basename(os.path.normpath(args.corpus)) if args.corpus else EMBEDDED
    return os.path.splitext(base)[0] if os.path.isfile(args.corpus) else f"{base}-{args.split}"


def build(args, run: RunContext, directory, processes) -> int:
    """Build (or resume) the datastore at ``directory`` and index it; an unindexed complete one is indexed."""
    from knnlm_jax.datastore.format import read_manifest
    from knnlm_jax.datastore.writer import check_writable

    config, vocab = run.config, run.vocab
    if args.batch_size is not None and args.batch_size < 1:
        raise InputError(f"--batch-size {args.batch_size}: must be a positive integer")
    WindowSpec.from_config(config, "build")  # a bad build_window or build_context, refused before any work
    done = read_manifest(directory)
    if (done is not None and done.get("status") == "complete" and not done.get("index") and not args.overwrite
            and not args.no_index and done.get("keys", "fp16") == "fp16"):
        # the build finished but its index step did not (killed): the same command finishes it
        args.log(f"datastore {os.path.basename(directory)} is complete but not indexed; indexing it")
        return index(args, open_checked(directory, config, vocab), processes)
    if args.keys == "none" and args.no_index:
        raise InputError("--keys none fills the index during the build: drop --no-index")
    if done is None or done.get("status") != "complete" or args.overwrite:
        check_writable(directory, args.overwrite)  # before paying for the model
    data, tokens, options = build_tokens(args, run, directory, processes)
    if done is not None and done.get("status") == "complete" and not args.overwrite:
        return already_built(args, run, directory, done, data, processes)
    manifest, trained = build_entries(args, run, directory, processes, (data, tokens, options))
    store = open_checked(directory, config, vocab, trained)
    if args.keys == "none":
        if processes.is_main:
            info = store.manifest["index"]
            args.say(f"index {info['factory']} over {info['ntotal']} keys (codes only, nprobe {info['nprobe']}) -> "
                     f"{os.path.join(store.directory, info['file'])}")
        return 0
    return 0 if args.no_index else index(args, store, processes)


def already_built(args, run: RunContext, directory: str, done: dict, data, processes) -> int:
    """The same build again (a relaunch after its processes were stopped at the very end): nothing to do.
    Another corpus, split or index for an existing name is refused."""
    from knnlm_jax.datastore.writer import check_writable

    same = (done.get("corpus_sha256"), done.get("split")) == (data.sha256, data.split)
    index = (done.get("index") or {}).get("factory")
    if not same or args.no_index or (args.index and args.index != index) or done.get("keys", "fp16") != args.keys:
        check_writable(directory, False)  # refuses, with the hints
    open_checked(directory, run.config, run.vocab)  # built for this run's model and vocabulary
    if processes.is_main and (done.get("index") or {}).get("ivfdata") and done.get("keys") == "none":
        from knnlm_jax.datastore.codes import remove_segments
        from knnlm_jax.datastore.format import shard_name

        count = int(done.get("num_shards", 1)) if done.get("shard_entries") else 1
        shards = [os.path.join(directory, shard_name(p, count)) for p in range(count)] if count > 1 else []
        remove_segments([directory, *shards])  # left if stopped between recording the index and removing them
    if processes.is_main:
        args.say(f"datastore {os.path.basename(directory)} is already complete ({done['num_entries']} entries, "
                 f"index {index}): nothing to do (--overwrite rebuilds it, --index-only re-indexes it)")
    return 0


def build_tokens(args, run: RunContext, directory: str, processes):
    """``(Split, tokens, corpus options)`` of the text to store; every process encodes its share of it."""
    from knnlm_jax.core import distributed
    from knnlm_jax.data.tfds_source import WIKI3B
    from knnlm_jax.data.token_cache import Share

    config = run.config
    source = args.corpus if args.corpus is not None else (args.data_dir or runs.run_corpus(config))
    if args.corpus is None and os.path.basename(directory) == WIKI3B:
        source = WIKI3B  # the paper's 3B-token Wikipedia datastore (TFDS wikipedia/20230601.en)
    options = corpus_options(args, runs.corpus_options(config) if args.corpus is None else None)
    share = Share(processes.index, processes.count, distributed.allgather, distributed.barrier)
    data, tokens = runs.split_tokens(run.workdir, run.vocab, source, args.split, share=share, **options)
    trained_on = config.derived.get("train_sha256") if "derived" in config else None
    if args.corpus is None and args.split == "train" and source != WIKI3B and trained_on and data.sha256 != trained_on:
        raise InputError(
            f"{source} train, read with corpus options {_shown(options)}, is not the text the run was trained on "
            f"(sha256 {data.sha256[:12]}, trained on {trained_on[:12]}): pass the options it was trained with "
            "(e.g. --tokenize wikitext), or --corpus to store other text")
    return data, tokens, options


def _shown(options: dict) -> str:
    given = {k: v for k, v in options.items() if v is not None and (k, v) != ("text_feature", "text")}
    return ", ".join(f"{k}={v}" for k, v in given.items()) or "none"


def build_entries(args, run: RunContext, directory: str, processes, text):
    """Write the datastore's keys and values (this process's shard); ``(manifest, trained weights)``."""
    from knnlm_jax.datastore.building import BuildSpec, CorpusInfo, IndexSpec, build_datastore, perplexity
    from knnlm_jax.retrieval.index import DEFAULT_NPROBE

    config, vocab = run.config, run.vocab
    data, tokens, options = text
    trained = run.trained()
    windows = WindowSpec.from_config(config, "build")
    window, context = windows.length, windows.context
    spec = BuildSpec(
        CorpusInfo(data.corpus, data.sha256, data.split, options, "text" if hasattr(vocab, "encode_text") else None),
        windows,
        batch_size=config.eval_batch_size if args.batch_size is None else args.batch_size,
        index=IndexSpec(args.keys, args.index, args.nprobe or DEFAULT_NPROBE,
                        args.codes_memory or IndexSpec.memory_mib, args.train_keys),
        score_lm=not runs.is_pretrained(config), overwrite=args.overwrite, progress=not args.no_progress)
    manifest = build_datastore(
        directory, trained, runs.signature(config, vocab, trained.fingerprint, trained.step), tokens, vocab.eos,
        spec, log=args.log, processes=processes)
    if processes.multi:
        args.log(f"process {processes.index}: shard of datastore {os.path.basename(directory)} complete")
    if processes.is_main:
        stored = "float16" if args.keys == "fp16" else "(as index codes only)"
        ppl = perplexity(manifest)
        scored = (f"LM perplexity on these entries {ppl:.2f}" if ppl is not None else
                  "LM perplexity not computed (keys only: a pretrained LM's softmax is a fifth of its forward; "
                  "evaluate.py reports it)")
        args.say(f"datastore {os.path.basename(directory)}: {manifest['num_entries']} entries, {manifest['dim']}-dim "
                 f"{manifest['key_type']} keys {stored} (window {window}, context >= {context}), "
                 f"{data.corpus} {data.split}; model step {trained.step} ({trained.source}); {scored}")
    return manifest, trained


def open_checked(directory, config, vocab, trained=None):
    """The datastore for this run's model (its weights too once they are loaded)."""
    from knnlm_jax.datastore.format import open_datastore

    fingerprint, step = (trained.fingerprint, trained.step) if trained is not None else (None, None)
    return open_datastore(directory, runs.signature(config, vocab, fingerprint, step))


def index(args, store, processes) -> int:
    """Index a complete datastore (its shards' indexes filled per process and merged)."""
    from knnlm_jax.datastore.indexing import index_datastore, index_sharded
    from knnlm_jax.datastore.format import DatastoreError
    from knnlm_jax.retrieval.index import DEFAULT_NPROBE

    nprobe = args.nprobe or (store.manifest.get("index") or {}).get("nprobe") or DEFAULT_NPROBE
    if store.keys is None:
        raise DatastoreError(f"datastore {store.name} stores no keys (--keys none): its index was filled during "
                             "the build; to change it, rebuild with --overwrite and --index")
    if store.shards is not None:
        info = index_sharded(store, args.index, nprobe=nprobe, processes=processes, progress=not args.no_progress)
    elif processes.multi:
        raise DatastoreError(f"datastore {store.name} was built by one process: index it with one process")
    else:
        info = index_datastore(store, args.index, nprobe=nprobe, progress=not args.no_progress)
    if not processes.is_main:
        return 0
    args.say(f"index {info['factory']} over {info['ntotal']} keys (nprobe {info['nprobe']}) in {info['seconds']:.1f}s "
          f"-> {os.path.join(store.directory, info['file'])}")
    return 0


def check(args, run: RunContext, processes) -> int:
    """``--check``: files against the manifest, every byte against the build's hashes, a sample of keys recomputed."""
    from knnlm_jax.core import distributed
    from knnlm_jax.datastore.content_hash import verify_content
    from knnlm_jax.datastore.format import DatastoreError, datastore_dir

    config, workdir, vocab = run.config, run.workdir, run.vocab
    directory = datastore_dir(workdir, args.check)
    store = open_checked(directory, config, vocab)  # files and shapes against the manifest, model fields
    m = store.manifest
    if processes.multi and (store.shards is None or len(store.shards) != processes.count):
        raise DatastoreError(f"datastore {args.check} has {len(store.shards or [None])} shard(s): check it with "
                             f"{len(store.shards or [None])} process(es) or with one")
    options = corpus_options(args, m.get("corpus_options"))
    data, tokens = runs.split_tokens(workdir, vocab, m["corpus"], m["split"], **options)
    if data.sha256 != m["corpus_sha256"]:
        raise DatastoreError(f"datastore {args.check} was built from a different version of {m['corpus']} {m['split']}")
    if store.index_path and processes.is_main:
        from knnlm_jax.retrieval.index import read_index

        ntotal = read_index(store.index_path, mmap=True).ntotal
        if ntotal != store.size:
            raise DatastoreError(f"datastore {args.check}: the index holds {ntotal} keys, the datastore {store.size}")
    from knnlm_jax.datastore.building import check_datastore

    trained = run.trained()
    store = open_checked(directory, config, vocab, trained)  # now also the weights
    entry_range = tuple(m["shard_entries"][processes.index]) if processes.multi else None
    failure, hashed = None, False
    try:
        mine = store.shards[processes.index] if processes.multi else store
        hashed = verify_content(mine)  # every byte against the hashes recorded at build time
        report = check_datastore(store, trained, tokens, vocab.eos, sample=args.sample, entry_range=entry_range)
    except DatastoreError as err:
        failure, report = err, dict(entries_checked=0, values_checked=0, max_key_difference=float("nan"))
    row = np.asarray([failure is not None, report["entries_checked"], report["values_checked"],
                      report["max_key_difference"]], np.float64)
    rows = distributed.allgather(row)
    if failure is not None:
        raise failure
    if rows[:, 0].any():
        raise DatastoreError(f"datastore {args.check}: process {int(np.argmax(rows[:, 0]))} found a disagreement "
                             "(its message says which)")
    if processes.is_main:
        args.say(f"datastore {args.check} ok: {int(rows[:, 2].sum())} values equal the corpus tokens; "
              f"{int(rows[:, 1].sum())} recomputed keys agree (max difference {rows[:, 3].max():.2g}); "
              f"index {'present' if store.index_path else 'missing'}; "
              + ("keys and values match the sha256 recorded at build time" if hashed
                 else "no content hash recorded (built by an older version)")
              + (f"; {processes.count} processes, one shard each" if processes.multi else ""))
    return 0
