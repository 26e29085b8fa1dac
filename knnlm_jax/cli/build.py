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
import sys


def _positive_mib(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of MiB, not {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, not {text}")
    return value


def parser() -> argparse.ArgumentParser:
    from knnlm_jax.cli import add_config_args
    from knnlm_jax.core.distributed import add_process_args

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p, default=None, model=True)
    add_process_args(p)
    p.add_argument("--datastore", default=None, metavar="NAME",
                        help="datastore name (default: the split, e.g. train; with --corpus: <corpus>-<split>); "
                             "wiki3b without --corpus: the paper's Wikipedia datastore")
    p.add_argument("--corpus", default=None, metavar="SPEC",
                        help="WikiText-format directory, plain text file, wiki-offline, tfds:NAME[/CONFIG][:SPLIT] or wiki3b "
                             "(default: the run's training corpus; --data_dir says where it is now)")
    p.add_argument("--split", default="train", help="split of the corpus (default train)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing datastore")
    p.add_argument("--index-only", "--index_only", dest="index_only", action="store_true", help="rebuild the index of an existing datastore")
    p.add_argument("--index", default=None, metavar="FACTORY",
                        help="FAISS factory string, e.g. Flat or IVF4096,PQ64 (default: Flat below 200k keys, "
                             "else IVF-PQ as in the paper)")
    p.add_argument("--nprobe", type=int, default=None, help="inverted lists to probe (default 32)")
    p.add_argument("--keys", default="fp16", choices=("fp16", "none"),
                        help="fp16: store keys (N x D float16) for exact re-ranking (default); none: keep only the "
                             "index's codes, filled during the build (approximate distances; what billions of "
                             "entries on ordinary disks need)")
    p.add_argument("--codes-memory", type=_positive_mib, default=None, metavar="MIB",
                   help="--keys none: MiB of codes held at once (default 256; about twice that at peak); each "
                        "process appends its codes to disk in segments of this size and assembles the index "
                        "from them as many lists at a time")
    p.add_argument("--train-keys", type=_positive_int, default=None, metavar="N",
                   help="--keys none: keys the index is trained on, from evenly spread batches (default "
                        "max(1M, 64 per list), at most the datastore)")
    p.add_argument("--no-index", "--no_index", dest="no_index", action="store_true", help="build keys and values only (index later with "
                                                                "--index-only)")
    p.add_argument("--check", default=None, metavar="NAME",
                        help="verify datastore NAME: files against the manifest, every value, a sample of keys")
    p.add_argument("--sample", type=int, default=64, help="entries whose keys --check recomputes")
    p.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=None, help="windows per forward (default eval_batch_size)")
    p.add_argument("--no-progress", "--no_progress", dest="no_progress", action="store_true", help="no progress bars")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    from knnlm_jax.cli import program, run_choice, supervised, user_errors
    from knnlm_jax.core.distributed import Launch

    if (status := supervised("build", argv, args)) is not None:
        return status
    with user_errors(program("build")):
        from knnlm_jax.datastores import BuildOptions, build_tool

        fields = {f: getattr(args, f) for f in BuildOptions.__dataclass_fields__ if hasattr(args, f)}
        options = BuildOptions(**fields, launch=Launch.from_args(args))
        return build_tool(run_choice(args), options)


if __name__ == "__main__":
    sys.exit(main())
