"""Build a kNN datastore (keys, values, manifest) and its FAISS index with a trained model.

  python build.py                                  # the latest run's training corpus -> datastore "train"
  python build.py --datastore NAME --corpus SPEC   # any corpus: WikiText dir (+ --split), text file, wiki-offline
  python build.py --datastore NAME --index-only --index IVF256,PQ16   # re-index an existing datastore
  python build.py --check NAME                     # verify files and recompute a sample of entries
  python build.py --datastore wiki3b --tfds-data-dir DIR   # the paper's 3B-token Wikipedia datastore (TFDS)

Datastores live in <workdir>/datastores/<NAME>/. A killed build resumes where it stopped.
Under P processes (--coordinator/--num_processes/--process_id, or SLURM/TPU auto-detection)
each writes one shard; the index is trained once, filled per shard and merged on disk.
"""

import argparse
import os
import sys

import numpy as np


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    from knnlm_jax.cli import add_config_args, check_data_dir, load_run, program, user_errors
    from knnlm_jax.core.distributed import add_process_args

    add_config_args(parser, default=None, model=True)
    add_process_args(parser)
    parser.add_argument("--datastore", default=None, metavar="NAME",
                        help="datastore name (default: the split, e.g. train; with --corpus: <corpus>-<split>); "
                             "wiki3b without --corpus: the paper's Wikipedia datastore")
    parser.add_argument("--corpus", default=None, metavar="SPEC",
                        help="WikiText-format directory, plain text file, wiki-offline, tfds:NAME[/CONFIG][:SPLIT] or wiki3b "
                             "(default: the run's training corpus; --data_dir says where it is now)")
    parser.add_argument("--split", default="train", help="split of the corpus (default train)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing datastore")
    parser.add_argument("--index-only", action="store_true", help="rebuild the index of an existing datastore")
    parser.add_argument("--index", default=None, metavar="FACTORY",
                        help="FAISS factory string, e.g. Flat or IVF4096,PQ64 (default: Flat below 200k keys, "
                             "else IVF-PQ as in the paper)")
    parser.add_argument("--nprobe", type=int, default=None, help="inverted lists to probe (default 32)")
    parser.add_argument("--keys", default="fp16", choices=("fp16", "none"),
                        help="fp16: store keys (N x D float16) for exact re-ranking (default); none: keep only the "
                             "index's codes, filled during the build (approximate distances; what billions of "
                             "entries on ordinary disks need)")
    parser.add_argument("--no-index", action="store_true", help="build keys and values only (index later with "
                                                                "--index-only)")
    parser.add_argument("--check", default=None, metavar="NAME",
                        help="verify datastore NAME: files against the manifest, every value, a sample of keys")
    parser.add_argument("--sample", type=int, default=64, help="entries whose keys --check recomputes")
    parser.add_argument("--batch-size", type=int, default=None, help="windows per forward (default eval_batch_size)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    with user_errors(program("build")):
        from knnlm_jax import runs
        from knnlm_jax.datastore.format import datastore_dir, open_datastore
        from knnlm_jax.core.distributed import check_process_args

        check_process_args(args.coordinator, args.num_processes, args.process_id)
        config, workdir = load_run(args)
        vocab = runs.load_vocab(workdir, config)
        check_data_dir(args.data_dir)
        processes = start_processes(args)
        if args.check:
            return check(args, config, workdir, vocab, processes)
        name = args.datastore or default_name(args)
        directory = datastore_dir(workdir, name)
        from knnlm_jax.datastore.building import writing

        with writing(directory, processes):  # one writer at a time
            if args.index_only:
                store = open_datastore(directory, runs.signature(config, vocab))
                return index(args, store, processes)
            return build(args, config, workdir, vocab, directory, processes)


def start_processes(args):
    from knnlm_jax.core.distributed import initialize_from

    processes = initialize_from(args)
    if processes.multi:
        print(f"process {processes.index} of {processes.count}", file=sys.stderr)
    return processes


def default_name(args) -> str:
    if args.corpus is None:
        return args.split
    from knnlm_jax.data.embedded_corpus import EMBEDDED

    base = os.path.basename(os.path.normpath(args.corpus)) if args.corpus else EMBEDDED
    return os.path.splitext(base)[0] if os.path.isfile(args.corpus) else f"{base}-{args.split}"


def build(args, config, workdir, vocab, directory, processes) -> int:
    from knnlm_jax import runs
    from knnlm_jax.core import distributed
    from knnlm_jax.cli import UserError, corpus_options
    from knnlm_jax.datastore.format import read_manifest
    from knnlm_jax.datastore.writer import check_writable
    from knnlm_jax.data.tfds_source import WIKI3B

    if args.batch_size is not None and args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size}: must be a positive integer")
    done = read_manifest(directory)
    if (done is not None and done.get("status") == "complete" and not done.get("index") and not args.overwrite
            and not args.no_index and done.get("keys", "fp16") == "fp16"):
        # the build finished but its index step did not (killed): the same command finishes it
        print(f"datastore {os.path.basename(directory)} is complete but not indexed; indexing it", file=sys.stderr)
        return index(args, open_checked(directory, config, vocab), processes)
    check_writable(directory, args.overwrite)  # before paying for the model
    source = args.corpus if args.corpus is not None else (args.data_dir or runs.run_corpus(config))
    if args.corpus is None and os.path.basename(directory) == WIKI3B:
        source = WIKI3B  # the paper's 3B-token Wikipedia datastore (TFDS wikipedia/20230601.en)
    if not processes.is_main:
        distributed.barrier("tokens")  # process 0 encodes the corpus once; the others read its cache
    options = corpus_options(args, runs.corpus_options(config) if args.corpus is None else None)
    data, tokens = runs.split_tokens(workdir, vocab, source, args.split, **options)
    if processes.is_main:
        distributed.barrier("tokens")

    from knnlm_jax.datastore.building import build_datastore, perplexity, window_sizes
    from knnlm_jax.retrieval.index import DEFAULT_NPROBE

    if args.keys == "none" and args.no_index:
        raise UserError("--keys none fills the index during the build: drop --no-index")

    trained = runs.load_model(workdir, config, vocab)
    window, context = window_sizes(config)
    manifest = build_datastore(
        directory, trained, runs.signature(config, vocab, trained.fingerprint, trained.step), tokens, vocab.eos,
        corpus=data.corpus, corpus_sha256=data.sha256, split=data.split, corpus_options=options, window=window,
        context=context, batch_size=config.eval_batch_size if args.batch_size is None else args.batch_size, overwrite=args.overwrite,
        keys=args.keys, index_factory=args.index, nprobe=args.nprobe or DEFAULT_NPROBE,
        score_lm=not runs.is_pretrained(config), progress=not args.no_progress,
        log=lambda msg: print(msg, file=sys.stderr), processes=processes)
    if processes.multi:
        print(f"process {processes.index}: shard of datastore {os.path.basename(directory)} complete", file=sys.stderr)
    if processes.is_main:
        stored = "float16" if args.keys == "fp16" else "(as index codes only)"
        ppl = perplexity(manifest)
        scored = (f"LM perplexity on these entries {ppl:.2f}" if ppl is not None else
                  "LM perplexity not computed (keys only: a pretrained LM's softmax is a fifth of its forward; "
                  "evaluate.py reports it)")
        print(f"datastore {os.path.basename(directory)}: {manifest['num_entries']} entries, {manifest['dim']}-dim "
              f"{manifest['key_type']} keys {stored} (window {window}, context >= {context}), "
              f"{data.corpus} {data.split}; model step {trained.step} ({trained.source}); {scored}")
    store = open_checked(directory, config, vocab, trained)
    if args.keys == "none":
        if processes.is_main:
            info = store.manifest["index"]
            print(f"index {info['factory']} over {info['ntotal']} keys (codes only, nprobe {info['nprobe']}) -> "
                  f"{os.path.join(store.directory, info['file'])}")
        return 0
    return 0 if args.no_index else index(args, store, processes)


def open_checked(directory, config, vocab, trained=None):
    from knnlm_jax import runs
    from knnlm_jax.datastore.format import open_datastore

    fingerprint, step = (trained.fingerprint, trained.step) if trained is not None else (None, None)
    return open_datastore(directory, runs.signature(config, vocab, fingerprint, step))


def index(args, store, processes) -> int:
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
    print(f"index {info['factory']} over {info['ntotal']} keys (nprobe {info['nprobe']}) in {info['seconds']:.1f}s "
          f"-> {os.path.join(store.directory, info['file'])}")
    return 0


def check(args, config, workdir, vocab, processes) -> int:
    from knnlm_jax import runs
    from knnlm_jax.core import distributed
    from knnlm_jax.cli import corpus_options
    from knnlm_jax.datastore.content_hash import verify_content
    from knnlm_jax.datastore.format import DatastoreError, datastore_dir

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

    trained = runs.load_model(workdir, config, vocab)
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
        print(f"datastore {args.check} ok: {int(rows[:, 2].sum())} values equal the corpus tokens; "
              f"{int(rows[:, 1].sum())} recomputed keys agree (max difference {rows[:, 3].max():.2g}); "
              f"index {'present' if store.index_path else 'missing'}; "
              + ("keys and values match the sha256 recorded at build time" if hashed
                 else "no content hash recorded (built by an older version)")
              + (f"; {processes.count} processes, one shard each" if processes.multi else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
