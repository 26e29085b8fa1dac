"""Prepare a TFDS corpus on disk (ArrayRecord, no TensorFlow) for build.py and evaluate.py.

  python -m knnlm_jax.cli.prepare wiki3b --tfds-data-dir DIR        # TFDS wikipedia/20230601.en
  python -m knnlm_jax.cli.prepare tfds:NAME[/CONFIG] --tfds-data-dir DIR [--builder-code FILE]

wiki3b needs network, apache-beam, mwparserfromhell and mwxml (pip install 'knnlm-jax[wiki3b]'),
about 45 GiB of disk (20.5 GiB of dump downloads, about as much prepared) and a Beam pipeline over
6.67M articles: TFDS warns that some Beam datasets take weeks on a single machine, so give a
distributed runner with --beam-options (e.g. Dataflow) for it. Nothing is done where the dataset
is already prepared.
"""

import argparse
import sys


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="knnlm-prepare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", metavar="SPEC", help="wiki3b or tfds:NAME[/CONFIG]")
    p.add_argument("--tfds-data-dir", "--tfds_data_dir", dest="tfds_data_dir", required=True, metavar="DIR",
                   help="where to write the prepared dataset (then give build.py the same --tfds-data-dir)")
    p.add_argument("--builder-code", default=None, metavar="FILE",
                   help="a Python file defining the dataset's TFDS builder (a dataset outside TFDS's catalog)")
    p.add_argument("--download-dir", default=None, metavar="DIR", help="where downloads go (default DIR/downloads)")
    p.add_argument("--beam-options", default=None, metavar="FLAGS",
                   help='Beam pipeline flags for Beam datasets, e.g. "--runner=DataflowRunner --project=P ..."')
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    from knnlm_jax.cli import user_errors

    with user_errors("knnlm-prepare"):
        from knnlm_jax.data.tfds_prepare import PrepareSpec, prepare

        done = prepare(PrepareSpec(args.dataset, args.tfds_data_dir, args.builder_code, args.download_dir,
                                   args.beam_options))
        splits = ", ".join(f"{s} {n:,}" for s, n in done["splits"].items())
        print(f"prepared {done['dataset']} in {done['directory']} ({splits} examples)")
        print(f"next: python build.py --corpus {args.dataset} --tfds-data-dir {args.tfds_data_dir} ...")
    return 0


if __name__ == "__main__":
    sys.exit(main())
