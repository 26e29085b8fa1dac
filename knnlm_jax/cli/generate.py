"""Generate text with a trained LM, alone or as a kNN-LM over a datastore.

  python generate.py --prompt "The game was"                          # the latest run, LM alone, greedy
  python generate.py --datastore train --prompt "The game was" --explain  # kNN-LM; where each token came from
  python generate.py --datastore train --prompt "The" --temperature 0.8 --top-p 0.9 --seed 1
  python generate.py --model smollm2 --prompt "The game was"      # the embedded pretrained SmolLM2-135M

Words are the run's vocabulary (unknown ones become <unk>), or a pretrained LM's (--model)
tokens; the context starts at a line start, as in training. With a datastore, each new token searches it once; lambda and the
kNN temperature default to the values tuned on valid by the last ``evaluate.py`` of that
datastore (``<workdir>/eval/<NAME>/results.json``), else 0.25 and 1. ``--explain`` prints,
per token, p_LM, p_kNN and the mixture, and its nearest neighbours' values.
"""

import argparse
import os
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    from knnlm_jax.cli import add_config_args, program, user_errors

    add_config_args(parser, default=None, model=True)
    parser.add_argument("--prompt", required=True, help="the text to continue (whitespace-separated words)")
    parser.add_argument("--datastore", default=None, metavar="NAME", help="datastore to retrieve from (default: none, "
                                                                          "the LM alone)")
    parser.add_argument("--max-new-tokens", type=int, default=30)
    parser.add_argument("--lmbda", "--lambda", dest="lmbda", type=float, default=None,
                        help="weight of p_kNN in [0, 1] (default: tuned by evaluate.py, else 0.25; 0: the LM alone)")
    parser.add_argument("--knn-temperature", type=float, default=None,
                        help="temperature of p_kNN's softmax over -distance (default: tuned, else 1)")
    parser.add_argument("--k", type=int, default=1024, help="neighbours per search (default 1024)")
    parser.add_argument("--nprobe", type=int, default=None, help="inverted lists to probe (default: the index's)")
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0: greedy)")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stop-at-line-end", action="store_true", help="stop at the first </s>")
    parser.add_argument("--explain", action="store_true", help="per token: p_LM, p_kNN, the mixture, neighbours")
    args = parser.parse_args(argv)

    with user_errors(program("generate")):
        return generate_main(args)


def check_mixing(lmbda: float, knn_temperature: float) -> None:
    from knnlm_jax.cli import UserError

    if not 0.0 <= lmbda <= 1.0:
        raise UserError(f"--lmbda {lmbda}: must be in [0, 1]")
    if knn_temperature <= 0:
        raise UserError(f"--knn-temperature {knn_temperature}: must be positive")


def generate_main(args) -> int:
    import numpy as np

    from knnlm_jax import runs
    from knnlm_jax.cli import UserError, load_run
    from knnlm_jax.generation import Sampling, generate

    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed)
    sampling.check()
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens {args.max_new_tokens}: must be at least 1")
    if args.k < 1:
        raise UserError(f"--k {args.k}: must be at least 1")
    config, workdir = load_run(args)
    vocab = runs.load_vocab(workdir, config)
    subword = runs.is_pretrained(config)  # a pretrained LM: its tokenizer, not whitespace words
    words = vocab.encode_text(args.prompt) if subword else args.prompt.split()
    if not words:
        raise UserError("--prompt is empty: give at least one word")
    context = [vocab.eos] + (words if subword else [vocab.index.get(w, vocab.unk) for w in words])
    limit = int(config.tokens_per_sample)
    if len(context) + args.max_new_tokens > limit:
        raise UserError(f"the prompt ({len(words)} {'tokens' if subword else 'words'}) and --max-new-tokens "
                        f"{args.max_new_tokens} exceed the model's context of {limit} tokens: shorten one")
    search_fn, vals, lmbda, knn_temperature = None, None, 0.0, 1.0
    if args.datastore:
        from knnlm_jax.datastore.format import find_datastore, open_datastore
        from knnlm_jax.evaluation.outputs import tuned
        from knnlm_jax.retrieval.policies import exact_distances, nearest
        from knnlm_jax.datastore.search import open_searcher, search

        store = open_datastore(find_datastore(workdir, args.datastore), runs.signature(config, vocab))
        if not store.manifest.get("index"):
            from knnlm_jax.datastore.format import build_command

            raise UserError(f"datastore {store.name} has no FAISS index; index it with: "
                            f"{build_command(store.directory, '--index-only')}")
        k = min(args.k, store.size)
        found = tuned(os.path.join(workdir, "eval", store.name))
        lmbda = args.lmbda if args.lmbda is not None else found.get("lmbda", 0.25)
        knn_temperature = args.knn_temperature if args.knn_temperature is not None else found.get("temperature", 1.0)
        check_mixing(lmbda, knn_temperature)  # before the model loads
        trained = runs.load_model(workdir, config, vocab)
        from knnlm_jax.datastore.reader import open_for_model

        store = open_for_model(store.directory, runs.signature(config, vocab, trained.fingerprint, trained.step),
                               log=lambda msg: print(msg, file=sys.stderr))
        index = open_searcher(store)

        def retrieve(query_1xD):
            dists, ids = search(index, query_1xD, k, args.nprobe)
            if store.keys is not None:  # exact distances, as evaluate.py's default
                dists = exact_distances(store.keys, query_1xD, ids)
            return nearest(dists, ids, k)

        search_fn, vals = retrieve, store.vals
    elif args.lmbda:
        raise UserError("--lmbda needs --datastore NAME (the datastore to retrieve from)")
    check_mixing(lmbda, knn_temperature)
    if search_fn is None:
        trained = runs.load_model(workdir, config, vocab)
    steps = generate(trained, context, args.max_new_tokens, key_type=config.key_type, retrieve=search_fn,
                     vals_N=vals, lmbda=lmbda, knn_temperature=knn_temperature, sampling=sampling,
                     stop=vocab.eos if args.stop_at_line_end else None)
    if subword:
        print((args.prompt + vocab.decode([s.token for s in steps])).rstrip())
    else:
        text = " ".join("\n" if s.token == vocab.eos else vocab.words[s.token] for s in steps).replace(" \n ", "\n")
        print(f"{args.prompt} {text}".rstrip())
    shown = (lambda t: repr(vocab.words[t])) if subword else (lambda t: vocab.words[t])  # noqa: E731
    if args.explain:
        print(f"\n# per token: p_LM, p_kNN, the mixture (lambda {lmbda:g}, kNN temperature {knn_temperature:.4g});"
              " source: the larger share of the mixture")
        for s in steps:
            p_lm = float(np.exp(s.logp_lm))
            p_knn = None if s.logp_knn is None else float(np.exp(s.logp_knn))
            source = "LM" if p_knn is None or (1 - lmbda) * p_lm >= lmbda * p_knn else "kNN"
            near = ", ".join(f"{shown(v)}@{d:.3g}" for _, v, d in s.neighbours)
            knn_text = "-" if p_knn is None else f"{p_knn:.4f}"
            print(f"{shown(s.token):>16}  p_LM {p_lm:.4f}  p_kNN {knn_text:>6}  mixed {np.exp(s.logp):.4f}  "
                  f"{source:>3}" + (f"  nearest: {near}" if near else ""))
    return 0
