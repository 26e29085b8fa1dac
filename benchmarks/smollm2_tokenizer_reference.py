#!/usr/bin/env python
"""Hugging Face ``transformers``' token ids for the SmolLM2 parity text and a mixed sample, for the tests.

  python benchmarks/smollm2_tokenizer_reference.py --hf-python /path/to/venv/bin/python [--corpus DIR]

``--hf-python`` is an interpreter with ``transformers`` and ``gguf`` (torch is not needed): it
builds the tokenizer from the embedded SmolLM2 GGUF with ``transformers``' own conversion
(``convert_gguf_tokenizer``, what ``AutoTokenizer.from_pretrained(..., gguf_file=...)`` runs; the
file's tokenizer metadata read with the ``gguf`` package, as ``transformers``' reader needs torch)
and encodes each text without special tokens added. The texts: the start of WikiText-2 test,
line by line as ``benchmarks/pretrained_parity.py`` builds it, until it holds the parity
reference's tokens; and a sample of digits, contractions, runs of spaces, tabs and newlines,
non-ASCII text and the chat control tokens. Writes ``tests/fixtures/smollm2_tokenizer.json``.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MIXED = ("Numbers: 3.14159, 1,234,567 and 2024-06-01; 10% of $5.99 is 0.599.\n"
         "Contractions: don't, I'll, we've, she's, it's; 'quoted' and \"double\".\n"
         "Spaces:   three,\ttab, trailing   \n\n\n  indented\r\nCRLF line\n"
         "Unicode: café naïve Zürich — “smart quotes” … 東京 🙂 Ελληνικά\n"
         "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|><|endoftext|>\n"
         "Code: def f(x):\n    return x**2  # square\n")

HF_SIDE = r"""
import json, sys
import gguf, tokenizers, transformers
from importlib.metadata import version
from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer
gguf_path, texts_path = sys.argv[1:3]
reader = gguf.GGUFReader(gguf_path)
metadata = {key: field.contents() for key, field in reader.fields.items()}
tokenizer_dict = {name: metadata[f"tokenizer.{key}"] for key, name in GGUF_TOKENIZER_MAPPING["tokenizer"].items()
                  if f"tokenizer.{key}" in metadata}
tok, _ = convert_gguf_tokenizer(metadata["general.architecture"], tokenizer_dict)
texts = json.load(open(texts_path, encoding="utf-8"))
print(json.dumps(dict(ids=[tok.encode(t, add_special_tokens=False).ids for t in texts],
                      versions=dict(transformers=transformers.__version__, tokenizers=tokenizers.__version__,
                                    gguf=version("gguf")))))
"""


def parity_text(corpus: str, tokenizer, n_tokens: int) -> str:
    """WikiText-2 test's first lines, each with its line end, until they hold ``n_tokens`` tokens."""
    from knnlm_jax.data import corpus as corpora

    text = ""
    for line in corpora.read_split(corpus, "test").lines():
        text += line + "\n"
        if len(tokenizer.encode(text).ids) >= n_tokens:
            return text
    raise SystemExit(f"{corpus}: test has fewer than {n_tokens} tokens")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-python", required=True, help="an interpreter with transformers and gguf")
    parser.add_argument("--corpus", default=os.path.join(ROOT, "..", "shared", "data", "wikitext-2"))
    parser.add_argument("--parity", default=os.path.join(ROOT, "tests", "fixtures", "smollm2_parity.npz"))
    parser.add_argument("--out", default=os.path.join(ROOT, "tests", "fixtures", "smollm2_tokenizer.json"))
    args = parser.parse_args(argv)

    import numpy as np

    from knnlm_jax.models.convert.pretrained import SMOLLM2_SHA256, peek, smollm2_path

    path = smollm2_path()
    _, tokenizer = peek(path)
    texts = dict(wikitext2_test=parity_text(args.corpus, tokenizer, len(np.load(args.parity)["ids"])), mixed=MIXED)
    with tempfile.TemporaryDirectory() as tmp:
        texts_path = os.path.join(tmp, "texts.json")
        with open(texts_path, "w", encoding="utf-8") as f:
            json.dump(list(texts.values()), f)
        out = subprocess.run([args.hf_python, "-c", HF_SIDE, path, texts_path], capture_output=True, text=True)
    if out.returncode:
        print(out.stderr[-3000:], file=sys.stderr)
        return 1
    hf = json.loads(out.stdout.strip().splitlines()[-1])
    payload = dict(model=os.path.basename(path), model_sha256=SMOLLM2_SHA256,
                   method="transformers.integrations.gguf convert_gguf_tokenizer on the file's tokenizer metadata; "
                          "encode(text, add_special_tokens=False)",
                   versions=hf["versions"],
                   command="python benchmarks/smollm2_tokenizer_reference.py --hf-python HF_PYTHON",
                   texts=[dict(name=name, text=text, ids=ids) for (name, text), ids in zip(texts.items(), hf["ids"])])
    text = json.dumps(payload, ensure_ascii=False, indent=1)
    with open(args.out, "w", encoding="utf-8") as f:  # each id list on one line
        f.write(re.sub(r"\[[\d,\s]*\]", lambda m: json.dumps(json.loads(m.group(0))), text) + "\n")
    for (name, text), ids in zip(texts.items(), hf["ids"]):
        same = tokenizer.encode(text).ids == ids
        print(f"{name}: {len(ids)} tokens; ours {'equal' if same else 'DIFFER'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
