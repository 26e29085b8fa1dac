"""Pretrained LMs in the pipeline: ``build.py`` / ``evaluate.py --model`` on a tiny random GGUF.

The stored keys and values and the evaluated log-probs are compared with a direct forward of
the model over the corpus as the ``tokenizers`` library encodes it (one window covers a
split); per-word perplexity is the summed NLL over the corpus's word count. Bad input: a
model directory missing a file, an unsupported architecture, a datastore built with another
model, one built with another tokenizer, a trained run's directory: one line each, exit 2.
"""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from helpers import write_corpus
from helpers.llama_fixture import MERGES, tiny_tokenizer_parts, tiny_weights, write_gguf, write_hf_dir

pytestmark = pytest.mark.slow(5)

WINDOW = ["--set", "tokens_per_sample=4096"]  # one window covers each split: the reference is one forward


@pytest.fixture
def setup(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", 40, 8, 8)
    write_gguf(tmp_path / "tiny.gguf", tiny_weights())
    return tmp_path, corpus, str(tmp_path / "tiny.gguf"), str(tmp_path / "run")


def tool(name, capsys, *args):
    """``(exit status, stdout, stderr)`` of a tool's ``main`` run in this process."""
    module = __import__(name)
    try:
        status = module.main([*(["--no-progress"] if name != "generate" else []), *args])
    except SystemExit as exit:
        status = exit.code
    out = capsys.readouterr()
    return status, out.out, out.err


def one_line_error(capsys, name, *args) -> str:
    status, _, err = tool(name, capsys, *args)
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def reference(corpus: str, split: str):
    """``(ids, words)``: the split's whole text encoded by the tokenizers library from the fixture's own
    vocabulary and merges, and its word-level token count."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokens, merges = tiny_tokenizer_parts()
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    with open(os.path.join(corpus, f"{split}.txt"), encoding="utf-8") as f:
        lines = f.read().split("\n")[:-1]
    ids = tok.encode("".join(line + "\n" for line in lines)).ids
    return np.asarray(ids), sum(len(line.split()) + 1 for line in lines)


def forward(path: str, ids):
    """Target log-probs and ``ffn_input_after_ln`` keys of one forward over ``"\\n" + ids[:-1]``."""
    from knnlm_jax.models.transformer import forward_with_keys
    from knnlm_jax.models.convert.pretrained import load_pretrained

    model, tok, _ = load_pretrained(path)
    newline = tok.encode("\n").ids[0]
    inputs = jnp.asarray([np.concatenate([[newline], ids[:-1]])], jnp.int32)
    logp, keys = forward_with_keys(model, inputs, jnp.asarray([ids], jnp.int32), "ffn_input_after_ln")
    return np.asarray(logp[0]), np.asarray(keys[0])


def test_build_and_evaluate_a_gguf_model_as_its_direct_forward(setup, capsys):
    tmp, corpus, gguf, run = setup
    status, out, err = tool("build", capsys, "--model", gguf, "--workdir", run, "--data_dir", corpus, *WINDOW)
    assert status == 0, err
    store = os.path.join(run, "datastores", "train")
    with open(os.path.join(store, "manifest.json")) as f:
        manifest = json.load(f)
    ids, _ = reference(corpus, "train")
    assert manifest["num_entries"] == len(ids) and manifest["dim"] == 32 and manifest["checkpoint"] == "pretrained"
    assert manifest["lm_scored"] is False and "perplexity not computed (keys only" in out  # no softmax in builds
    np.testing.assert_array_equal(np.load(os.path.join(store, "vals.npy")), ids)
    _, keys = forward(gguf, ids)
    np.testing.assert_allclose(np.load(os.path.join(store, "keys.npy")).astype(np.float32), keys, rtol=4e-3,
                               atol=4e-3)
    with open(os.path.join(run, "config.json")) as f:
        assert json.load(f)["model"] == os.path.abspath(gguf)  # later calls need no --model

    status, out, err = tool("build", capsys, "--workdir", run, "--check", "train", "--sample", "16", *WINDOW)
    assert status == 0 and "datastore train ok" in out, err

    status, out, err = tool("evaluate", capsys, "--workdir", run, "--datastore", "train", "--split", "test",
                            "--k", "16", "--lmbda", "0.3", "--temperature", "1", "--html", str(tmp / "x.html"),
                            "--show", "3", *WINDOW)
    assert status == 0, err
    ids, words = reference(corpus, "test")
    logp, _ = forward(gguf, ids)
    with open(os.path.join(run, "eval", "train", "results.json")) as f:
        results = json.load(f)
    lm = np.load(results["files"]["logprobs"])["lm"]
    np.testing.assert_allclose(lm, logp, atol=1e-4)
    assert results["tokens"] == len(ids) and results["unit"] == "token" and results["words"] == words
    base = results["rows"][0]
    assert base["ppl"] == pytest.approx(np.exp(-logp.mean()), rel=1e-4)
    assert base["word_ppl"] == pytest.approx(np.exp(-logp.sum() / words), rel=1e-4)
    assert f"over the text's {words} words" in out and "per word" in out
    page = (tmp / "x.html").read_text()
    assert '"subword": true' in page and '"w": " cat"' in page  # tokens as they decode, spaces kept
    assert '"s": "\\u2423cat"' in page  # ... and shown with the space visible
    shown = out[out.index("[1] position"):]  # --show: each example's context and neighbours on one line each
    assert all(line.startswith(("[", "    context:", "    neighbour")) for line in shown.splitlines()[:12]), shown
    assert "\u21b5" in shown  # the line ends inside them, visible


def test_pretrained_bad_input_is_one_line(setup, capsys):
    tmp, corpus, gguf, run = setup
    assert tool("build", capsys, "--model", gguf, "--workdir", run, "--data_dir", corpus, "--set",
                "tokens_per_sample=256")[0] == 0

    write_hf_dir(tmp / "hf", tiny_weights())
    os.remove(tmp / "hf" / "tokenizer.json")
    assert "has no tokenizer.json" in one_line_error(capsys, "build", "--model", str(tmp / "hf"), "--workdir",
                                                      str(tmp / "hf-run"))
    write_gguf(tmp / "gpt2.gguf", tiny_weights(), arch="gpt2")
    assert "architecture 'gpt2' is not supported" in one_line_error(
        capsys, "evaluate", "--model", str(tmp / "gpt2.gguf"), "--workdir", str(tmp / "gpt2-run"), "--datastore", "train")
    line = one_line_error(capsys, "build", "--model", "HuggingFaceTB/SmolLM2-135M", "--workdir", str(tmp / "hub"))
    assert "never downloaded from a hub" in line and "smollm2" in line
    os.makedirs(tmp / "trained")
    (tmp / "trained" / "config.json").write_text(json.dumps(dict(name="tiny")))
    assert "is a trained run" in one_line_error(capsys, "build", "--model", gguf, "--workdir", str(tmp / "trained"))
    for refused in ("hf-run", "gpt2-run", "hub"):  # a refused model leaves no run directory half set up
        assert not os.path.exists(tmp / refused)

    # a datastore built with another model: other weights, the same tokenizer
    write_gguf(tmp / "other.gguf", tiny_weights(seed=1))
    line = one_line_error(capsys, "evaluate", "--model", str(tmp / "other.gguf"), "--workdir", run, "--datastore",
                          "train", "--lmbda", "0.3", "--temperature", "1")
    assert "datastore train was built with other model weights" in line
    # ... and with another tokenizer (one merge more): refused before the model is loaded
    write_gguf(tmp / "other-tok.gguf", tiny_weights(), merges=MERGES + (("Ġ", "t"),))
    line = one_line_error(capsys, "evaluate", "--model", str(tmp / "other-tok.gguf"), "--workdir", run,
                          "--datastore", "train", "--lmbda", "0.3", "--temperature", "1")
    assert "datastore train was built with vocabulary (tokenizer)" in line


def test_generation_with_a_pretrained_lm_is_its_greedy_full_forward(setup, capsys):
    """λ = 0: each token is the argmax of a full forward without a cache over the text so far."""
    from knnlm_jax import runs
    from knnlm_jax.generation import generate

    tmp, corpus, gguf, run = setup
    runs.setup_pretrained(run, gguf, corpus)
    config = runs.run_config(run)
    vocab = runs.load_vocab(run, config)
    trained = runs.load_model(run, config, vocab)
    context = [vocab.eos] + vocab.encode_text("the cat sat on")
    steps = generate(trained, context, 6, key_type="ffn_input_after_ln")
    model, seq = trained.model(), list(context)
    for s in steps:
        logp = np.asarray(model.full_log_probs(model(jnp.asarray([seq]))))[0, -1]
        assert s.token == int(np.argmax(logp)) and abs(s.logp_lm - logp[s.token]) < 1e-5
        seq.append(s.token)
    # the command line: the prompt continued by the decoded tokens, and where each came from
    assert tool("build", capsys, "--workdir", run, "--set", "tokens_per_sample=256")[0] == 0
    status, out, err = tool("generate", capsys, "--workdir", run, "--prompt", "the cat sat on", "--datastore", "train",
                            "--max-new-tokens", "4", "--lmbda", "0.5", "--explain")
    assert status == 0, err
    assert out.startswith("the cat sat on") and "p_kNN" in out
