#!/usr/bin/env python
"""Per-token log-probs of a pretrained LM here against Hugging Face ``transformers`` (PyTorch, CPU) on the same weights.

  python benchmarks/pretrained_parity.py --hf-python /path/to/venv/bin/python [--model FILE.gguf] [--tokens 2000]

The model (default: the embedded SmolLM2-135M-Instruct GGUF) is loaded here (dequantised by
the ``gguf`` package, llama.cpp's query/key rows un-permuted) and by ``transformers`` in
another interpreter (``--hf-python``: one with torch, transformers and gguf installed;
transformers dequantises the same file). Both score the same token ids: the first
``--tokens`` of WikiText-2 test, tokenised here; whether ``transformers``' own tokenizer
gives the same ids is recorded. The ``transformers`` model is then saved with its own
``save_pretrained`` (safetensors) and that directory loaded here: the safetensors path
checked the same way. Writes ``results/pretrained_parity.json`` (``max_abs_diff`` for each
path, versions) and the CI reference ``tests/fixtures/smollm2_parity.npz`` (the first
``--reference-tokens`` ids and transformers' log-probs for them).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

HF_SIDE = r"""
import json, sys, numpy as np, torch, transformers, gguf
from transformers import AutoModelForCausalLM, AutoTokenizer
gguf_path, ids_path, text_path, out_path, save_dir = sys.argv[1:6]
d, name = gguf_path.rsplit("/", 1)
torch.set_num_threads(2)
model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32).eval()
tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
ids = np.load(ids_path)
text = open(text_path, encoding="utf-8").read()
hf_ids = tok(text, add_special_tokens=False)["input_ids"][: len(ids)]
with torch.no_grad():
    logits = model(torch.tensor(ids[None], dtype=torch.long)).logits.float()
logp = torch.log_softmax(logits, -1)[0, :-1].gather(-1, torch.tensor(ids[1:, None])).squeeze(-1).numpy()
config = model.config  # a GGUF-loaded model refuses save_pretrained: the same tensors in a plain model
if hasattr(config, "quantization_config"):
    del config.quantization_config
plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
plain.load_state_dict(model.state_dict())
plain.save_pretrained(save_dir, safe_serialization=True)
tok.save_pretrained(save_dir)
np.savez(out_path, logp=logp, hf_ids=np.asarray(hf_ids))
print(json.dumps(dict(torch=torch.__version__, transformers=transformers.__version__,
                      gguf=getattr(gguf, "__version__", None))))
"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-python", required=True, help="an interpreter with torch, transformers and gguf")
    parser.add_argument("--model", default=None, help="a .gguf file (default: the embedded SmolLM2)")
    parser.add_argument("--corpus", default=os.path.join(ROOT, "..", "shared", "data", "wikitext-2"))
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--reference-tokens", type=int, default=128)
    parser.add_argument("--out", default=os.path.join(ROOT, "results", "pretrained_parity.json"))
    parser.add_argument("--reference", default=os.path.join(ROOT, "tests", "fixtures", "smollm2_parity.npz"))
    args = parser.parse_args(argv)

    import importlib.metadata as md

    import jax
    import jax.numpy as jnp
    import numpy as np

    from knnlm_jax.data import corpus
    from knnlm_jax.models.convert.pretrained import load_pretrained, smollm2_path
    from knnlm_jax.core.report import write_json

    path = args.model or smollm2_path()
    model, tokenizer, info = load_pretrained(path)
    lines = corpus.read_split(args.corpus, "test").lines()
    text, ids = "", []
    for line in lines:  # WikiText-2 test as written (its spaced tokenisation included), line by line
        text += line + "\n"
        ids = tokenizer.encode(text).ids
        if len(ids) >= args.tokens:
            break
    ids = np.asarray(ids[: args.tokens], np.int64)

    def ours(m) -> np.ndarray:
        logp = m.full_log_probs(m(jnp.asarray(ids[None])))[0, :-1]
        return np.asarray(jnp.take_along_axis(logp, jnp.asarray(ids[1:, None]), axis=-1)[:, 0])

    with tempfile.TemporaryDirectory() as tmp:
        np.save(os.path.join(tmp, "ids.npy"), ids)
        with open(os.path.join(tmp, "text.txt"), "w", encoding="utf-8") as f:
            f.write(text)
        out = subprocess.run([args.hf_python, "-c", HF_SIDE, os.path.abspath(path), os.path.join(tmp, "ids.npy"),
                              os.path.join(tmp, "text.txt"), os.path.join(tmp, "hf.npz"), os.path.join(tmp, "hf")],
                             capture_output=True, text=True)
        if out.returncode:
            print(out.stderr[-3000:], file=sys.stderr)
            return 1
        versions = json.loads(out.stdout.strip().splitlines()[-1])
        hf = np.load(os.path.join(tmp, "hf.npz"))
        logp_gguf = ours(model)
        st_model, _, _ = load_pretrained(os.path.join(tmp, "hf"))
        logp_st = ours(st_model)
    hf_logp, hf_ids = hf["logp"], hf["hf_ids"]
    n_ref = args.reference_tokens
    os.makedirs(os.path.dirname(args.reference), exist_ok=True)
    np.savez(args.reference, ids=ids[:n_ref], logp=hf_logp[: n_ref - 1])
    payload = dict(
        model=os.path.basename(path), model_sha256=None if args.model else
        __import__("knnlm_jax.models.convert.pretrained", fromlist=["SMOLLM2_SHA256"]).SMOLLM2_SHA256,
        corpus="WikiText-2 test (first lines, as written)", tokens=int(len(ids)), scored=int(len(hf_logp)),
        max_abs_diff=float(np.max(np.abs(logp_gguf - hf_logp))),
        mean_abs_diff=float(np.mean(np.abs(logp_gguf - hf_logp))),
        max_abs_diff_safetensors=float(np.max(np.abs(logp_st - hf_logp))),
        tolerance=1e-3, within_tolerance=bool(np.max(np.abs(logp_gguf - hf_logp)) <= 1e-3
                                              and np.max(np.abs(logp_st - hf_logp)) <= 1e-3),
        token_ids_equal_to_transformers=bool(len(hf_ids) >= len(ids) and np.array_equal(hf_ids[: len(ids)], ids)),
        first_token_id_difference=(None if np.array_equal(hf_ids[: len(ids)], ids) else
                                   int(np.flatnonzero(hf_ids[: len(ids)] != ids[: len(hf_ids)])[0])
                                   if len(hf_ids) else 0),
        nll_per_token=float(-np.mean(logp_gguf)), reference_file=os.path.relpath(args.reference, ROOT),
        reference_tokens=n_ref,
        versions=dict(versions, jax=jax.__version__, flax=md.version("flax"), tokenizers=md.version("tokenizers")),
        command="python benchmarks/pretrained_parity.py --hf-python HF_PYTHON"
                + (f" --model {args.model}" if args.model else "") + f" --tokens {args.tokens}")
    write_json(args.out, payload)
    print(json.dumps(payload, indent=2))
    return 0 if payload["within_tolerance"] else 1


if __name__ == "__main__":
    sys.exit(main())
