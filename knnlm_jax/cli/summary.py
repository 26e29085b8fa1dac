"""Summarise a training run as JSON: its config, the curve (step, tokens/s, loss, valid perplexity), the end.

  knnlm-summary runs/wt2 --out results/train_wt2.json --command "bash benchmarks/train_wt2.sh"
  python -m knnlm_jax.cli.summary runs/wt2 --out results/train_wt2.json
"""

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdir", help="the run directory")
    parser.add_argument("--out", required=True, metavar="PATH", help="the JSON file to write")
    parser.add_argument("--command", default=None, help="the command that produced the run")
    parser.add_argument("--note", default=None)
    args = parser.parse_args(argv)
    from knnlm_jax.cli import user_errors
    from knnlm_jax.core.report import summarize_training, write_json

    with user_errors("knnlm-summary"):
        summary = summarize_training(args.workdir)
        if args.note:
            summary["note"] = args.note
        write_json(args.out, summary, args.command)
    for point in summary["curve"]:
        print(f"step {point['step']:>6}  valid ppl {point['valid_ppl']:8.2f}  "
              f"tokens/s {point['tokens_per_s'] or 0:8.0f}  minutes {point['minutes'] or 0:6.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
