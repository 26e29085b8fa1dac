#!/usr/bin/env python
"""Build a kNN datastore (keys, values, manifest) and its FAISS index with a trained model.

  python build.py                                  # the latest run's training corpus -> datastore "train"
  python build.py --datastore NAME --corpus SPEC   # any corpus: WikiText dir (+ --split), text file, wiki-offline
  python build.py --datastore NAME --index-only --index IVF256,PQ16   # re-index an existing datastore
  python build.py --check NAME                     # verify files and recompute a sample of entries

Datastores live in <workdir>/datastores/<NAME>/. A killed build resumes where it stopped.
"""

import argparse
import os
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    from knnlm_jax.cli import add_config_args, load_run, user_errors

    add_config_args(parser, default=None)
    parser.add_argument("--datastore", default=None, metavar="NAME",
                        help="datastore name (default: the split, e.g. train; with --corpus: <corpus>-<split>)")
    parser.add_argument("--corpus", default=None, metavar="SPEC",
                        help="WikiText-format directory, plain text file or wiki-offline "
                             "(default: the run's training corpus; --data_dir says where it is now)")
    parser.add_argument("--split", default="train", help="split of the corpus (default train)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing datastore")
    parser.add_argument("--index-only", action="store_true", help="rebuild the index of an existing datastore")
    parser.add_argument("--index", default=None, metavar="FACTORY",
                        help="FAISS factory string, e.g. Flat or IVF4096,PQ64 (default: Flat below 200k keys, "
                             "else IVF-PQ as in the paper)")
    parser.add_argument("--nprobe", type=int, default=None, help="inverted lists to probe (default 32)")
    parser.add_argument("--no-index", action="store_true", help="build keys and values only (index later with "
                                                                "--index-only)")
    parser.add_argument("--check", default=None, metavar="NAME",
                        help="verify datastore NAME: files against the manifest, every value, a sample of keys")
    parser.add_argument("--sample", type=int, default=64, help="entries whose keys --check recomputes")
    parser.add_argument("--batch-size", type=int, default=None, help="windows per forward (default eval_batch_size)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    with user_errors("build.py"):
        from knnlm_jax import runs
        from knnlm_jax.datastore import datastore_dir, open_datastore

        config, workdir = load_run(args)
        vocab = runs.load_vocab(workdir, config)
        if args.data_dir is not None and not os.path.isdir(args.data_dir):
            raise FileNotFoundError(f"--data_dir {args.data_dir}: no such directory")
        if args.check:
            return check(args, config, workdir, vocab)
        name = args.datastore or default_name(args)
        directory = datastore_dir(workdir, name)
        if args.index_only:
            store = open_datastore(directory, runs.signature(config, vocab))
            return index(args, store)
        return build(args, config, workdir, vocab, directory)


def default_name(args) -> str:
    if args.corpus is None:
        return args.split
    from knnlm_jax.corpus import EMBEDDED

    base = os.path.basename(os.path.normpath(args.corpus)) if args.corpus else EMBEDDED
    return os.path.splitext(base)[0] if os.path.isfile(args.corpus) else f"{base}-{args.split}"


def build(args, config, workdir, vocab, directory) -> int:
    from knnlm_jax import runs
    from knnlm_jax.datastore import check_writable

    check_writable(directory, args.overwrite)  # before paying for the model
    source = args.corpus if args.corpus is not None else (args.data_dir or runs.run_corpus(config))
    data, tokens = runs.split_tokens(workdir, vocab, source, args.split)

    from knnlm_jax.building import build_datastore, perplexity, window_sizes

    trained = runs.load_model(workdir, config, vocab)
    window, context = window_sizes(config)
    manifest = build_datastore(
        directory, trained, runs.signature(config, vocab, trained.fingerprint, trained.step), tokens, vocab.eos,
        corpus=data.corpus, corpus_sha256=data.sha256, split=data.split, window=window, context=context,
        batch_size=args.batch_size or config.eval_batch_size, overwrite=args.overwrite,
        progress=not args.no_progress, log=lambda msg: print(msg, file=sys.stderr))
    print(f"datastore {os.path.basename(directory)}: {manifest['num_entries']} entries, {manifest['dim']}-dim "
          f"float16 {manifest['key_type']} keys (window {window}, context >= {context}), "
          f"{data.corpus} {data.split}; model step {trained.step} ({trained.source}); "
          f"LM perplexity on these entries {perplexity(manifest):.2f}")
    store = open_checked(directory, config, vocab, trained)
    return 0 if args.no_index else index(args, store)


def open_checked(directory, config, vocab, trained=None):
    from knnlm_jax import runs
    from knnlm_jax.datastore import open_datastore

    fingerprint, step = (trained.fingerprint, trained.step) if trained is not None else (None, None)
    return open_datastore(directory, runs.signature(config, vocab, fingerprint, step))


def index(args, store) -> int:
    from knnlm_jax.building import index_datastore
    from knnlm_jax.index import DEFAULT_NPROBE

    nprobe = args.nprobe or (store.manifest.get("index") or {}).get("nprobe") or DEFAULT_NPROBE
    info = index_datastore(store, args.index, nprobe=nprobe, progress=not args.no_progress)
    print(f"index {info['factory']} over {info['ntotal']} keys (nprobe {info['nprobe']}) in {info['seconds']:.1f}s "
          f"-> {os.path.join(store.directory, info['file'])}")
    return 0


def check(args, config, workdir, vocab) -> int:
    from knnlm_jax import runs
    from knnlm_jax.datastore import DatastoreError, datastore_dir

    directory = datastore_dir(workdir, args.check)
    store = open_checked(directory, config, vocab)  # files and shapes against the manifest, model fields
    m = store.manifest
    data, tokens = runs.split_tokens(workdir, vocab, m["corpus"], m["split"])
    if data.sha256 != m["corpus_sha256"]:
        raise DatastoreError(f"datastore {args.check} was built from a different version of {m['corpus']} {m['split']}")
    if store.index_path:
        from knnlm_jax.index import read_index

        ntotal = read_index(store.index_path, mmap=True).ntotal
        if ntotal != store.size:
            raise DatastoreError(f"datastore {args.check}: the index holds {ntotal} keys, the datastore {store.size}")
    from knnlm_jax.building import check_datastore

    trained = runs.load_model(workdir, config, vocab)
    store = open_checked(directory, config, vocab, trained)  # now also the weights
    report = check_datastore(store, trained, tokens, vocab.eos, sample=args.sample)
    print(f"datastore {args.check} ok: {report['values_checked']} values equal the corpus tokens; "
          f"{report['entries_checked']} recomputed keys agree (max difference {report['max_key_difference']:.2g}); "
          f"index {'present' if store.index_path else 'missing'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
