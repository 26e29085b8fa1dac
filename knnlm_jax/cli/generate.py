"""Generate text with a trained LM, alone or as a kNN-LM over a datastore.

  python generate.py --prompt "The game was"                          # the latest run, LM alone, greedy
  python generate.py --datastore train --prompt "The game was" --explain  # kNN-LM; where each token came from
  python generate.py --datastore train --prompt "The" --sampling-temperature 0.8 --top-p 0.9 --seed 1
  python generate.py --model smollm2 --prompt "The game was"      # the embedded pretrained SmolLM2-135M

Words are the run's vocabulary (unknown ones become <unk>), or a pretrained LM's (--model)
tokens; the context starts at a line start, as in training. With a datastore, each new token
searches it once; lambda and the kNN softmax temperature (--temperature, as in evaluate.py)
default to the values tuned on valid by the last ``evaluate.py`` of that datastore
(``<workdir>/eval/<NAME>/results.json``), else 0.25 and 1. ``--explain`` prints, per token,
p_LM, p_kNN and the mixture, and its nearest neighbours' values.
"""

import argparse
import sys


def parser() -> argparse.ArgumentParser:
    from knnlm_jax.cli import add_config_args

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p, default=None, model=True)
    p.add_argument("--prompt", required=True, help="the text to continue (whitespace-separated words)")
    p.add_argument("--datastore", default=None, metavar="NAME", help="datastore to retrieve from (default: none, "
                                                                     "the LM alone)")
    p.add_argument("--max-new-tokens", "--max_new_tokens", dest="max_new_tokens", type=int, default=30)
    mixing = p.add_argument_group("mixing (with --datastore)")
    mixing.add_argument("--lmbda", "--lambda", dest="lmbda", type=float, default=None,
                        help="weight of p_kNN in [0, 1] (default: tuned by evaluate.py, else 0.25; 0: the LM alone)")
    mixing.add_argument("--temperature", "--knn-temperature", "--knn_temperature", dest="temperature", type=float,
                        default=None, help="kNN softmax temperature over -distance (default: tuned, else 1)")
    mixing.add_argument("--k", type=int, default=1024, help="neighbours per search (default 1024)")
    mixing.add_argument("--nprobe", type=int, default=None, help="inverted lists to probe (default: the index's)")
    sampling = p.add_argument_group("sampling")
    sampling.add_argument("--sampling-temperature", "--sampling_temperature", dest="sampling_temperature",
                          type=float, default=0.0, help="sampling temperature (default 0: greedy)")
    sampling.add_argument("--top-k", "--top_k", dest="top_k", type=int, default=0,
                          help="sample among the k most likely tokens (0: all)")
    sampling.add_argument("--top-p", "--top_p", dest="top_p", type=float, default=1.0,
                          help="nucleus sampling mass (1: all)")
    sampling.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop-at-line-end", "--stop_at_line_end", dest="stop_at_line_end", action="store_true",
                   help="stop at the first </s>")
    p.add_argument("--explain", action="store_true", help="per token: p_LM, p_kNN, the mixture, neighbours")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    from knnlm_jax.cli import program, run_choice, user_errors

    with user_errors(program("generate")):
        from knnlm_jax.api import GenerateOptions, generate_text

        options = GenerateOptions(args.prompt, args.datastore, args.max_new_tokens, args.k, args.lmbda,
                                  args.temperature, args.sampling_temperature, args.top_k, args.top_p, args.seed,
                                  args.stop_at_line_end, args.nprobe)
        lm, result = generate_text(run_choice(args), options)
        print(result.text)
        if args.explain:
            print(explanation(lm.vocab, result.steps, result.mixing))
    return 0


def explanation(vocab, steps, mixing) -> str:
    """Per token: p_LM, p_kNN, the mixture, which share was larger, and the nearest neighbours' values."""
    import math

    shown = vocab.shown_token
    lines = [f"\n# per token: p_LM, p_kNN, the mixture (lambda {mixing.lmbda:g}, kNN temperature "
             f"{mixing.temperature:.4g}); source: the larger share of the mixture"]
    for s in steps:
        p_lm = math.exp(s.logp_lm)
        p_knn = None if s.logp_knn is None else math.exp(s.logp_knn)
        source = "LM" if p_knn is None or (1 - mixing.lmbda) * p_lm >= mixing.lmbda * p_knn else "kNN"
        near = ", ".join(f"{shown(v)}@{d:.3g}" for _, v, d in s.neighbours)
        knn_text = "-" if p_knn is None else f"{p_knn:.4f}"
        lines.append(f"{shown(s.token):>16}  p_LM {p_lm:.4f}  p_kNN {knn_text:>6}  mixed {math.exp(s.logp):.4f}  "
                     f"{source:>3}" + (f"  nearest: {near}" if near else ""))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
