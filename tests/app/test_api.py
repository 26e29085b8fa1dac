"""The Python API: the README's example as written, the same checks as the tools, and a user's own model
driven through build, evaluation, scoring and generation by the model protocol alone."""

import dataclasses
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import knnlm_jax as knnlm
from helpers import ROOT, write_corpus
from knnlm_jax.data.vocab import Vocab


def readme_example() -> str:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
    (example,) = [b for b in blocks if "knnlm.load(" in b]
    return example


def copied_run(ev, tmp_path) -> str:
    """A copy of the shared tiny run: what a test evaluates there never reaches the other tests."""
    workdir = str(tmp_path / "run")
    shutil.copytree(ev.workdir, workdir)
    return workdir


def test_the_readmes_example_runs_as_written(ev, tmp_path, capsys):
    example = readme_example()
    assert len(example.strip().splitlines()) < 10 and '"runs/demo"' in example
    workdir = copied_run(ev, tmp_path)
    namespace = {}
    exec(compile(example.replace('"runs/demo"', repr(workdir)), "README.md", "exec"), namespace)
    out = capsys.readouterr().out.splitlines()
    scores, results = namespace["scores"], namespace["results"]
    assert float(out[0].split()[0]) == pytest.approx(scores.perplexity)
    assert results["split"] == "test" and [r["name"] for r in results["rows"]] == [
        "base LM", "+kNN-LM", "+cache", "+kNN-LM+cache"]
    with open(os.path.join(workdir, "eval", "train", "results.json")) as f:
        assert '"rows"' in f.read()  # what evaluate.py writes, where it writes it


def test_score_agrees_with_the_evaluation_of_the_same_text(ev, tmp_path):
    """One split scored by ``LM.score`` and by the streaming evaluation: the same log-probs and neighbours."""
    lm = knnlm.load(copied_run(ev, tmp_path))
    store = lm.datastore("train")
    lines = open(os.path.join(ev.data_dir, "valid.txt"), encoding="utf-8").read().splitlines()
    scores = lm.score("\n".join(lines), store, k=8, lmbda=0.3, temperature=2.0)
    results = lm.evaluate(store, split="valid", k=8, lmbda=0.3, temperature=2.0)
    saved = np.load(results["files"]["logprobs"])
    np.testing.assert_array_equal(scores.ids, saved["targets"])
    np.testing.assert_allclose(scores.logp_lm, saved["lm"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(scores.logp, saved["mixed"], rtol=1e-5, atol=1e-5)
    assert scores.perplexity == pytest.approx(results["rows"][1]["ppl"], rel=1e-5)
    near = scores.neighbours(5)
    assert len(near) == 8 and [d for _, d, _, _ in near] == sorted(d for _, d, _, _ in near)
    entry, _, value, text = near[0]
    assert value == ev.vocab.words[int(store.datastore.vals[entry])] and text.endswith(f"[{value}]")


def test_the_api_refuses_what_the_tools_refuse(ev, tmp_path):
    lm = knnlm.load(copied_run(ev, tmp_path))
    store = lm.datastore("train")
    with pytest.raises(knnlm.KnnlmError, match="has only"):
        lm.score("the cat", store, k=store.size + 1)
    with pytest.raises(knnlm.KnnlmError, match="lambda 1.5"):
        lm.score("the cat", store, lmbda=1.5)
    with pytest.raises(knnlm.KnnlmError, match="has only"):
        lm.evaluate(store, k=store.size + 1)
    other = dataclasses.replace(lm.trained, fingerprint="0" * 64)
    with pytest.raises(knnlm.KnnlmError, match="other model weights"):
        knnlm.LM(lm.workdir, lm.config, lm.vocab, other).datastore("train")


def test_generate_matches_the_lm_alone_at_lambda_zero_and_reads_tuned_values(ev, tmp_path):
    lm = knnlm.load(copied_run(ev, tmp_path))
    store = lm.datastore("train")
    alone = lm.generate("the king", new_tokens=5)
    with_zero = lm.generate("the king", store, new_tokens=5, lmbda=0.0)
    assert [s.token for s in alone.steps] == [s.token for s in with_zero.steps]
    assert alone.text.startswith("the king ") and all(s.logp_knn is None for s in alone.steps)
    assert lm.mixing(store, None, None).lmbda == 0.25  # no evaluation yet: the defaults
    lm.evaluate(store, split="valid", k=8, temperature=1.0)
    tuned = lm.tuned(store)
    assert lm.mixing(store, None, None).lmbda == tuned["lmbda"]


# ---------------------------------------------------------------------------------
# a user's own model, defined only here: the model protocol is all the pipeline needs

@dataclasses.dataclass(frozen=True)
class BigramConfig:
    vocab_size: int
    d_model: int = 16
    cutoffs: tuple = ()


class BigramLM(nnx.Module):
    """A causal toy LM: position t's state mixes the embeddings of tokens t and t - 1."""

    def __init__(self, vocab_size: int, *, rngs: nnx.Rngs):
        self.cfg = BigramConfig(vocab_size)
        d = self.cfg.d_model
        self.embed = nnx.Embed(vocab_size, d, rngs=rngs)
        self.mix = nnx.Linear(2 * d, d, rngs=rngs)
        self.out = nnx.Linear(d, vocab_size, rngs=rngs)

    def states(self, x_BxTxD, prev_BxTxD):
        return jnp.tanh(self.mix(jnp.concatenate([x_BxTxD, prev_BxTxD], -1)))

    def __call__(self, tokens_BxT, *, key_type=None, rows_R=None):
        x = self.embed(tokens_BxT)
        h = self.states(x, jnp.pad(x, ((0, 0), (1, 0), (0, 0)))[:, :-1])
        if rows_R is not None:
            h = h.reshape(-1, h.shape[-1])[rows_R][None]
        for name in (key_type,) if isinstance(key_type, str) else (key_type or ()):
            self.sow(nnx.Intermediate, name, h)
        return h

    def full_log_probs(self, h_BxTxD, **_):
        return jax.nn.log_softmax(self.out(h_BxTxD), axis=-1)

    def target_log_probs(self, h_BxTxD, targets_BxT, **_):
        return jnp.take_along_axis(self.full_log_probs(h_BxTxD), targets_BxT[..., None], axis=-1)[..., 0]

    def head_features(self, h_BxTxD):
        logp = self.full_log_probs(h_BxTxD)
        return jnp.stack([-(jnp.exp(logp) * logp).sum(-1), logp.max(-1)], -1)

    def empty_cache(self, batch: int, max_len: int):
        return jnp.zeros((batch, self.cfg.d_model), jnp.float32)  # the previous token's embedding

    def decode_step(self, token_B, cache, pos):
        x = self.embed(token_B)
        h = self.states(x, cache)[:, None]
        return h, {name: h for name in ("ffn_input_after_ln", "final_output")}, x


def test_a_users_own_model_runs_the_whole_pipeline(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", n_train=60)
    lines = open(os.path.join(corpus, "train.txt"), encoding="utf-8").read().splitlines()
    vocab = Vocab.build(lines)
    model = BigramLM(len(vocab), rngs=nnx.Rngs(0))
    lm = knnlm.LM.from_module(model, vocab, str(tmp_path / "mine"), corpus=corpus, tokens_per_sample=16,
                              batch_size=2)
    store = lm.build_datastore("train")
    tokens = lm.encode("\n".join(lines))
    assert store.size == len(tokens)
    stream = jnp.asarray(np.concatenate([[vocab.eos], tokens[:-1]])[None], jnp.int32)
    reference = np.asarray(model(stream)[0])  # the state before each target (this model sows its output)
    np.testing.assert_allclose(np.asarray(store.datastore.keys, np.float32), reference, atol=2e-3)

    results = lm.evaluate(store, split="valid", k=4, lmbda=0.5, temperature=1.0)
    valid = lm.encode(open(os.path.join(corpus, "valid.txt"), encoding="utf-8").read())
    stream = jnp.asarray(np.concatenate([[vocab.eos], valid[:-1]])[None], jnp.int32)
    logp = np.asarray(model.target_log_probs(model(stream), jnp.asarray(valid[None])))[0]
    assert results["rows"][0]["ppl"] == pytest.approx(float(np.exp(-logp.mean())), rel=1e-5)
    assert results["rows"][1]["ppl"] != results["rows"][0]["ppl"]

    scores = lm.score(" ".join(vocab.words[t] for t in valid[:12]), store, k=4, lmbda=0.5, temperature=1.0)
    assert np.isfinite(scores.logp).all() and len(scores.neighbours(0)) == 4
    generated = lm.generate("the cat", store, new_tokens=4, k=4, lmbda=0.5)
    assert len(generated.steps) == 4 and all(s.logp_knn is not None for s in generated.steps)
    greedy = [int(np.argmax(np.asarray(model.full_log_probs(model(jnp.asarray([[vocab.eos,
              vocab.index["the"], vocab.index["cat"]]])))[0, -1])))]
    assert lm.generate("the cat", new_tokens=1).steps[0].token == greedy[0]
