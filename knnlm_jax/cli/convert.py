"""Convert a fairseq transformer_lm checkpoint (e.g. the paper's WikiText-103 model) into a run directory
for build.py and evaluate.py.

  knnlm-convert-fairseq --checkpoint model.pt --dict dict.txt --workdir runs/wt103-fairseq \\
      --data_dir /path/to/wikitext-103
  python -m knnlm_jax.cli.convert ...     # the same, without installing the package
"""

import argparse
import sys


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="knnlm-convert-fairseq", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="fairseq model.pt (needs PyTorch), or a .npz copy")
    p.add_argument("--dict", required=True, dest="dict_path", help="the checkpoint's dict.txt")
    p.add_argument("--workdir", required=True, help="the run directory to create (must not exist)")
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)  # the old spelling: refused with a hint
    p.add_argument("--data_dir", "--data-dir", default="",
                   help="the WikiText-103 directory build.py and evaluate.py read by default (else pass "
                        "--data_dir to them)")
    p.add_argument("--compute-dtype", "--compute_dtype", dest="compute_dtype", default="float32",
                   choices=("float32", "bfloat16"),
                   help="the run's compute_dtype (float32: fairseq's numerics, matmuls at full float32 "
                        "precision; --set overrides it later)")
    p.add_argument("--tokens-per-sample", "--tokens_per_sample", dest="tokens_per_sample", type=int, default=None,
                   help="the window the model was trained on, where the checkpoint's args do not say "
                        "(3072 for the paper's WikiText-103 model); it sets the run's windows")
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--out" in argv or any(a.startswith("--out=") for a in argv):
        print("knnlm-convert-fairseq: error: --out is now --workdir (the run directory to create)", file=sys.stderr)
        return 2
    args = parser().parse_args(argv)
    from knnlm_jax.cli import user_errors

    with user_errors("knnlm-convert-fairseq"):
        from knnlm_jax.models.convert.fairseq import ConvertOptions, convert_checkpoint

        print(convert_checkpoint(ConvertOptions(args.checkpoint, args.dict_path, args.workdir, args.data_dir,
                                                args.compute_dtype, args.tokens_per_sample)))
        if not args.data_dir:
            print("no --data_dir given: pass --data_dir /path/to/wikitext-103 to build.py and evaluate.py")
    return 0


if __name__ == "__main__":
    sys.exit(main())
