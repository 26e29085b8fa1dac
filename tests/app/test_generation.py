"""Generation: the KV-cache step against the full forward, sampling, kNN-LM continuation, the CLI."""

import faiss
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from knnlm_jax.datastore.retriever import Neighbours
from knnlm_jax.generation import Mixing, Sampling, choose, generate
from knnlm_jax.models.transformer import forward_with_keys


class SearchOf:
    """A retriever over ``search(query_1xD) -> (dists, ids)`` and values ``vals_N`` (what generation asks of one)."""

    def __init__(self, search, vals_N):
        self.search, self.vals_N = search, np.asarray(vals_N)

    def nearest(self, queries_QxD):
        dists, ids = self.search(queries_QxD)
        found = ids >= 0
        return Neighbours(dists, ids, self.vals_N[np.where(found, ids, 0)], found)


def context_of(ev, n=5):
    return [ev.vocab.eos] + [int(t) for t in ev.splits["valid"][1][:n]]


def full_forward_greedy(ev, context, n):
    """The reference: each new token from a whole forward over everything so far (no cache).

    One compiled forward of fixed length: the padding after the last real token cannot reach
    it (causal attention), so its log-probs are those of the unpadded sequence.
    """
    length = len(context) + n

    @jax.jit
    def last_log_probs(params, tokens_1xL, last):
        model = nnx.merge(ev.trained.graphdef, params)
        return model.full_log_probs(model(tokens_1xL))[0, last]

    tokens, logps = list(context), []
    for _ in range(n):
        padded = np.full((1, length), ev.vocab.eos, np.int32)
        padded[0, : len(tokens)] = tokens
        logp_V = np.asarray(last_log_probs(ev.trained.params, padded, len(tokens) - 1))
        tokens.append(int(np.argmax(logp_V)))
        logps.append(float(logp_V[tokens[-1]]))
    return tokens[len(context):], logps


def keys_of(ev, inputs, targets):
    """The full forward's query keys (jitted: one compile instead of op-by-op dispatch)."""

    @jax.jit
    def run(params, inputs_1xT, targets_1xT):
        return forward_with_keys(nnx.merge(ev.trained.graphdef, params), inputs_1xT, targets_1xT,
                                 ev.config.key_type)[1]

    return run(ev.trained.params, jnp.asarray([inputs], jnp.int32), jnp.asarray([targets], jnp.int32))


def test_lambda_zero_is_the_lms_own_greedy_continuation(ev):
    context = context_of(ev)
    steps = generate(ev.trained, context, 8, key_type=ev.config.key_type)
    want, logps = full_forward_greedy(ev, context, 8)
    assert [s.token for s in steps] == want
    np.testing.assert_allclose([s.logp_lm for s in steps], logps, atol=1e-5)
    assert all(s.logp == s.logp_lm and s.logp_knn is None for s in steps)


def test_each_search_gets_the_full_forwards_query_key(ev):
    context = context_of(ev)
    queries = []

    def retrieve(query_1xD):
        queries.append(query_1xD[0].copy())
        return np.zeros((1, 1), np.float32), np.full((1, 1), -1)  # nothing found: p_kNN is zero

    steps = generate(ev.trained, context, 4, key_type=ev.config.key_type, retriever=SearchOf(retrieve, ev.store.vals),
                     mixing=Mixing(0.5))
    tokens = context + [s.token for s in steps]
    keys = keys_of(ev, tokens[:-1], tokens[1:])
    np.testing.assert_allclose(np.stack(queries), np.asarray(keys[0, len(context) - 1:]), atol=1e-5)
    assert all(np.isneginf(s.logp_knn) for s in steps)  # no neighbour: the mixture is (1 - λ) p_LM
    np.testing.assert_allclose([s.logp for s in steps], [s.logp_lm + np.log(0.5) for s in steps], atol=1e-5)


def test_seeded_sampling_is_deterministic(ev):
    context = context_of(ev)

    def sample(seed):
        steps = generate(ev.trained, context, 10, key_type=ev.config.key_type,
                         sampling=Sampling(temperature=1.5, top_k=40, top_p=0.95, seed=seed))
        return [s.token for s in steps]

    assert sample(3) == sample(3)
    assert len({tuple(sample(seed)) for seed in range(4)}) > 1


def test_choose_greedy_top_k_and_top_p():
    rng = np.random.default_rng(0)
    logp = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    assert choose(logp, Sampling(), rng) == 0
    assert {choose(logp, Sampling(temperature=1.0, top_k=2), rng) for _ in range(300)} == {0, 1}
    assert {choose(logp, Sampling(temperature=1.0, top_p=0.7), rng) for _ in range(300)} == {0, 1}  # 0.5+0.3 >= 0.7
    assert {choose(logp, Sampling(temperature=1.0, top_p=0.1), rng) for _ in range(50)} == {0}
    assert {choose(logp, Sampling(temperature=1.0), rng) for _ in range(2000)} == {0, 1, 2, 3}
    for bad in (Sampling(temperature=-1), Sampling(top_k=-1), Sampling(top_p=0)):
        with pytest.raises(ValueError):
            bad.check()


def test_a_datastore_of_a_distinctive_text_is_continued_where_the_lm_alone_is_not(ev):
    """Keys of one unusual word sequence: the kNN-LM reproduces its continuation from its start."""
    rng = np.random.default_rng(7)
    words = rng.choice(np.arange(5, len(ev.vocab)), size=12, replace=False).astype(np.int32)
    inputs = np.concatenate([[ev.vocab.eos], words[:-1]]).astype(np.int32)
    keys = keys_of(ev, inputs, words)
    index = faiss.IndexFlatL2(keys.shape[-1])
    index.add(np.asarray(keys[0], np.float32))

    def retrieve(query_1xD):
        return index.search(np.asarray(query_1xD, np.float32), 8)

    context = [ev.vocab.eos] + [int(w) for w in words[:4]]
    knn = generate(ev.trained, context, 7, key_type=ev.config.key_type, retriever=SearchOf(retrieve, words),
                   mixing=Mixing(0.9, 1.0))
    lm = generate(ev.trained, context, 7, key_type=ev.config.key_type)
    assert [s.token for s in knn] == [int(w) for w in words[4:11]]
    assert [s.token for s in lm] != [int(w) for w in words[4:11]]
    assert all(s.neighbours[0][1] == w and s.neighbours[0][2] < 1e-3 for s, w in zip(knn, words[4:11]))


def test_generate_cli_explains_each_token_and_refuses_bad_input(ev, capsys):
    from knnlm_jax.cli.generate import main  # the console form runs in test_package.py

    prompt = " ".join(ev.vocab.words[t] for t in ev.splits["valid"][1][:4])
    assert main(["--workdir", ev.workdir, "--datastore", "train", "--prompt", prompt, "--max-new-tokens", "4",
                 "--lmbda", "0.5", "--temperature", "2", "--k", "8", "--explain"]) == 0
    stdout = capsys.readouterr().out
    lines = stdout.splitlines()
    assert lines[0].startswith(prompt)
    table = [line for line in lines if "p_LM" in line and "nearest:" in line]
    assert len(table) == 4 and "lambda 0.5" in stdout

    for args, message in ((("--datastore", "nope"), "nope"), (("--lmbda", "0.5"), "needs --datastore"),
                          (("--datastore", "train", "--lmbda", "2"), "must be in [0, 1]"),
                          (("--max-new-tokens", "1000"), "exceed the model's context of 16 tokens"),
                          (("--sampling-temperature", "-1"), "must be >= 0"), (("--top-p", "0"), "must be in (0, 1]"),
                          (("--temperature", "0.8"), "--temperature is the kNN softmax temperature and needs "
                                                      "--datastore NAME; the sampling temperature is "
                                                      "--sampling-temperature"),
                          (("--datastore", "train", "--temperature", "0"), "must be positive")):
        with pytest.raises(SystemExit) as exit_info:  # refused before the model loads: in this process
            main(["--workdir", ev.workdir, "--prompt", prompt, "--max-new-tokens", "4", *args])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1, err
        assert err.startswith("generate.py: error:") and message in err, err


def deep_model(seed=3):
    """A fixed-seed model with what converted fairseq runs have: 3 layers, a final LayerNorm, positions
    offset by 2; weights scaled up so that attention is sharp and every layer's cache matters."""
    from knnlm_jax.models.transformer import ModelConfig
    from knnlm_jax.runs import TrainedModel
    from knnlm_jax.models.steps import init_model

    cfg = ModelConfig(vocab_size=48, num_layers=3, d_model=32, num_heads=4, d_ff=64, cutoffs=(12, 30),
                      final_norm=True, position_offset=2)
    graphdef, params = init_model(cfg, seed)
    params = jax.tree_util.tree_map(lambda x: x * 2.0, params)
    return TrainedModel(cfg, graphdef, params, 0, "fixed seed", "deep")


def test_cached_decode_of_a_deep_model_equals_full_forwards_at_every_position():
    """Teacher-forced: each position's cached one-step distribution against the full forward's row."""
    from knnlm_jax.generation import empty_cache, make_decode_step

    trained = deep_model()
    tokens = np.random.default_rng(0).integers(0, 48, 20).astype(np.int32)
    model = trained.model()
    full_TxV = np.asarray(model.full_log_probs(model(jnp.asarray(tokens[None])))[0])
    step = make_decode_step(trained.graphdef, "ffn_input_after_ln", len(tokens))
    cache = empty_cache(trained, 1, len(tokens))
    for pos, token in enumerate(tokens):
        logp, _, cache = step(trained.params, cache, jnp.asarray([token], jnp.int32), pos)
        np.testing.assert_allclose(np.asarray(logp[0]), full_TxV[pos], rtol=1e-4, atol=1e-4, err_msg=f"position {pos}")
    # the context matters at this scale: the last distribution is not the one-token forward's
    alone = np.asarray(model.full_log_probs(model(jnp.asarray(tokens[None, -1:])))[0, 0])
    assert np.abs(alone - full_TxV[-1]).max() > 0.1


def test_greedy_generation_of_a_deep_model_is_its_full_forward_greedy():
    trained = deep_model(seed=5)
    ev = type("Ev", (), {"trained": trained, "vocab": type("V", (), {"eos": 2})})()
    context = [2, 7, 19, 33, 4, 11]
    steps = generate(trained, context, 10, key_type="ffn_input_after_ln")
    want, logps = full_forward_greedy(ev, context, 10)
    assert [s.token for s in steps] == want and len(set(want)) >= 2
    np.testing.assert_allclose([s.logp_lm for s in steps], logps, rtol=1e-5, atol=1e-4)


def test_every_matmul_of_a_float32_decode_step_asks_for_highest_precision():
    """Read from the lowered step (CPU ignores precision; a GPU would multiply in TF32 without it)."""
    import re

    from knnlm_jax.generation import empty_cache, make_decode_step

    trained = deep_model()
    step = make_decode_step(trained.graphdef, "ffn_input_after_ln", 8)
    text = step.lower(trained.params, empty_cache(trained, 1, 8), jnp.asarray([3], jnp.int32), 0).as_text()
    dots = re.findall(r"stablehlo\.dot_general.*", text)
    assert len(dots) >= 3 * 6 and all("precision = [HIGHEST, HIGHEST]" in d for d in dots), dots
