"""fairseq transformer_lm checkpoints -> this project's model and run directory (knnlm_jax/models/convert/fairseq_checkpoint.py
reads the files, knnlm_jax/models/convert/fairseq.py maps them).

The checkpoints are built (``helpers/fairseq_numpy.py``) with the parameter names and shapes fairseq
0.12.2's ``TransformerLanguageModel.state_dict()`` has (adaptive input / softmax, tied duplicates and
buffers included), random weights, and compared against ``fairseq_log_probs`` there, a NumPy
re-implementation of fairseq's forward written from its source (``make_positions``,
``SinusoidalPositionalEmbedding``, ``AdaptiveInput``, pre-norm ``TransformerDecoderLayer``,
``MultiheadAttention``, ``AdaptiveSoftmax.get_log_prob``) that shares no code with the model.
"""

import dataclasses
import importlib
import json
import os
import re
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from helpers import ROOT, write_corpus
from helpers.fairseq_numpy import PAD, fairseq_log_probs, fairseq_state
from knnlm_jax.models.convert import fairseq_checkpoint as fck
from knnlm_jax.models.convert import fairseq as fc
from knnlm_jax.data.vocab import Vocab

WIKI103_LIKE = dict(arch="transformer_lm_wiki103", decoder_layers=2, decoder_embed_dim=16, decoder_ffn_embed_dim=32,
                    decoder_attention_heads=2, adaptive_input_cutoff="8,20", adaptive_softmax_cutoff="8,20",
                    adaptive_input_factor=4.0, adaptive_softmax_factor=4.0, tokens_per_sample=64)
CASES = {  # name: (state-dict options, args beyond WIKI103_LIKE)
    "wiki103": (dict(), dict()),  # tied weights and projections, no final LayerNorm (the paper's model)
    "tied-own-proj-final-norm": (dict(tie_proj=False, final_norm=True),
                                 dict(tie_adaptive_proj=False, no_decoder_final_norm=False)),
    "untied": (dict(tied=False, tie_proj=False), dict(tie_adaptive_weights=False, tie_adaptive_proj=False)),
    "plain-shared": (dict(adaptive=False, final_norm=True),
                     dict(arch="transformer_lm", adaptive_input=False, adaptive_input_cutoff=None,
                          adaptive_softmax_cutoff=None, tie_adaptive_weights=False, tie_adaptive_proj=False,
                          share_decoder_input_output_embed=True)),
}


def convert_cli(argv) -> int:
    """The converter's command line (``knnlm-convert-fairseq``) in this process: its exit status."""
    from knnlm_jax.cli.convert import main

    try:
        return main(argv)
    except SystemExit as exit_info:
        return exit_info.code


def case(name, seed=0):
    options, args = CASES[name]
    return fairseq_state(seed, **options), {**WIKI103_LIKE, **args}


def vocab_of(size=40) -> Vocab:
    return Vocab(["<s>", "<pad>", "</s>", "<unk>"] + [f"w{i}" for i in range(size - 4)])


def tokens(seed=1, b=2, t=12, vocab_size=40):
    """Ids from every band, never <pad> (this project never feeds it)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab_size, (b, t))
    return np.where(ids == PAD, 2, ids).astype(np.int32)


# ---------------------------------------------------------------------------------


def flax_log_probs(cfg, params, toks):
    model = fc.build_model(cfg, params)
    return np.asarray(model.full_log_probs(model(jnp.asarray(toks)))), model


def decoder_log_probs(cfg, params, x_BxTxD):
    """The converted model's log-probabilities of decoder inputs (embedding skipped)."""
    model = fc.build_model(cfg, params)
    return np.asarray(model.full_log_probs(model.decode(jnp.asarray(x_BxTxD, jnp.float32))))


@pytest.mark.parametrize("name", list(CASES))
def test_converted_model_matches_fairseqs_forward(name):
    sd, args = case(name)
    arch, params = fc.convert(sd, args, vocab_of())
    assert arch["position_offset"] == 2 and arch["layer_norm_eps"] == 1e-5
    cfg = fc.model_config(arch)
    toks = tokens()
    ref = fairseq_log_probs(sd, args, toks)
    np.testing.assert_allclose(np.exp(ref).sum(-1), 1.0, atol=1e-9)  # the reference is a distribution
    got, model = flax_log_probs(cfg, params, toks)
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
    targets = np.roll(toks, -1, axis=1)
    target_lp = np.asarray(model.target_log_probs(model(jnp.asarray(toks)), jnp.asarray(targets)))
    np.testing.assert_allclose(target_lp, np.take_along_axis(ref, targets[..., None], -1)[..., 0], atol=1e-4)


@pytest.mark.parametrize("arch_key", ["arch", "_name"])  # fairseq < 0.10: args.arch; >= 0.10: cfg.model._name
def test_the_paper_architecture_is_read_from_the_args_and_weights(arch_key):
    sd, args = case("wiki103")
    minimal = {arch_key: "transformer_lm_wiki103", "decoder_attention_heads": 2, "adaptive_input_cutoff": "8,20",
               "adaptive_softmax_cutoff": "8,20"}  # the rest: transformer_lm_wiki103 defaults
    arch, _ = fc.convert(sd, minimal, vocab_of())
    assert arch == dict(
        vocab_size=40, num_layers=2, d_model=16, num_heads=2, d_ff=32, cutoffs=(8, 20), adaptive_factor=4,
        tie_adaptive_weights=True, tie_adaptive_proj=True, final_norm=False, scale_embedding=True,
        position_offset=2, layer_norm_eps=1e-5, dropout=0.3, attention_dropout=0.1, activation_dropout=0.1,
        adaptive_softmax_dropout=0.2)


def test_fairseq_positions_and_epsilon_matter():
    """Without fairseq's position offset (2) or LayerNorm epsilon (1e-5) the model is measurably
    different from fairseq's forward: the comparison can see either going wrong."""
    sd, args = case("wiki103")
    arch, params = fc.convert(sd, args, vocab_of())
    toks = tokens()
    ref = fairseq_log_probs(sd, args, toks)
    shifted, _ = flax_log_probs(fc.model_config({**arch, "position_offset": 0}), params, toks)
    assert np.abs(shifted - ref).max() > 1e-2
    flax_eps, _ = flax_log_probs(fc.model_config({**arch, "layer_norm_eps": 1e-6}), params, toks)
    assert np.abs(flax_eps - ref).max() > 1e-4  # the comparison tests' tolerance (3.5e-4 here)
    # epsilon counts next to the LayerNorm input's variance (~1 for embedded tokens): decoder
    # inputs of variance ~1e-5 show the difference in gross
    x_BxTxD = np.random.default_rng(2).normal(size=(2, 12, 16)) * 10**-2.5
    ref_x = fairseq_log_probs(sd, args, toks, x_BxTxD)
    fairseq_eps = decoder_log_probs(fc.model_config(arch), params, x_BxTxD)
    flax_eps = decoder_log_probs(fc.model_config({**arch, "layer_norm_eps": 1e-6}), params, x_BxTxD)
    np.testing.assert_allclose(fairseq_eps, ref_x, atol=1e-4, rtol=0)
    assert np.abs(flax_eps - ref_x).max() > 1e-2


def test_older_checkpoint_names_are_upgraded_as_fairseq_does():
    """in_proj_weight (q|k|v), layer_norms.0/.2, the old sinusoid buffer and a version-2 decoder."""
    sd, args = case("tied-own-proj-final-norm")
    _, new = fc.convert(sd, args, vocab_of())
    old = dict(sd)
    for i in range(2):
        p = f"decoder.layers.{i}."
        old[p + "self_attn.in_proj_weight"] = np.concatenate([old.pop(p + f"self_attn.{n}_proj.weight") for n in "qkv"])
        old[p + "self_attn.in_proj_bias"] = np.concatenate([old.pop(p + f"self_attn.{n}_proj.bias") for n in "qkv"])
        for j, name in (("0", "self_attn_layer_norm"), ("2", "final_layer_norm")):
            for what in ("weight", "bias"):
                old[p + f"layer_norms.{j}.{what}"] = old.pop(p + f"{name}.{what}")
    old["decoder.embed_positions.weights"] = np.zeros((10, 16), np.float32)
    arch, converted = fc.convert(old, args, vocab_of())
    assert converted.keys() == new.keys() and all(np.array_equal(converted[k], new[k]) for k in new)
    old["decoder.version"] = np.array([2.0], np.float32)  # fairseq: "earlier checkpoints did not normalize after"
    arch, converted = fc.convert(old, args, vocab_of())
    assert not arch["final_norm"] and ("final_ln", "scale") not in converted


@pytest.mark.parametrize("change, message", [
    (lambda sd, a: a.update(activation_fn="gelu"), "activation_fn 'gelu'"),
    (lambda sd, a: sd.update({"decoder.embed_positions.weight": np.zeros((66, 16))}), "learned positions"),
    (lambda sd, a: sd.update({"decoder.layers.0.self_attn.bias_k": np.zeros((1, 1, 16))}),
     "unsupported fairseq parameters: decoder.layers.0.self_attn.bias_k"),
    (lambda sd, a: sd.update({"decoder.adaptive_softmax.tail.0.2.weight": np.zeros((12, 4), np.float32)}),
     "differs from decoder.embed_tokens.embeddings.1.0.weight"),
    (lambda sd, a: sd.pop("decoder.layers.1.fc2.bias"), "no decoder.layers.1.fc2.bias"),
    (lambda sd, a: sd.update({"decoder.layers.1.fc2.bias": np.zeros(5)}), "has shape (5,), expected (16,)"),
    (lambda sd, a: a.update(adaptive_softmax_cutoff="8,24"), "adaptive_softmax_cutoff 8,24"),
])
def test_unsupported_or_damaged_checkpoints_are_refused_in_one_line(change, message):
    sd, args = case("wiki103")
    change(sd, args)
    with pytest.raises(fck.ConvertError, match=message.replace("(", r"\(").replace(")", r"\)")):
        fc.convert(sd, args, vocab_of())


def test_dict_txt_keeps_fairseqs_ids(tmp_path):
    path = tmp_path / "dict.txt"
    path.write_text("the 100\n, 90\nmadeupword0000 0\n", encoding="utf-8")
    vocab = fck.read_dict(str(path))
    assert vocab.words == ("<s>", "<pad>", "</s>", "<unk>", "the", ",", "madeupword0000")
    assert (vocab.bos, vocab.pad, vocab.eos, vocab.unk) == (0, 1, 2, 3) and vocab.index["the"] == 4
    for text, message in (("the 1\nthe 2\n", "line 2: repeated word 'the'"), ("the\n", "line 1: expected"),
                          ("<unk> 5\n", "repeated word '<unk>'"), ("x 1 #fairseq:overwrite\n", "overwrite")):
        path.write_text(text, encoding="utf-8")
        with pytest.raises(fck.ConvertError, match=message):
            fck.read_dict(str(path))
    sd, args = case("wiki103")
    with pytest.raises(fck.ConvertError, match="the dictionary has 39 words .* 40 rows"):
        fc.convert(sd, args, vocab_of(39))


def test_model_args_from_old_and_new_checkpoints():
    import argparse

    assert fck.model_args({"args": argparse.Namespace(arch="transformer_lm_wiki103", decoder_layers=16)})["arch"] == \
        "transformer_lm_wiki103"
    assert fck.model_args({"args": None, "cfg": {"model": {"_name": "transformer_lm", "decoder_layers": 2}}})[
        "decoder_layers"] == 2
    with pytest.raises(fck.ConvertError, match="no model args"):
        fck.model_args({"model": {}})
    old = fc.resolve_args({"arch": "transformer_lm_wiki103", "no_tie_adaptive_proj": False})
    assert old["tie_adaptive_proj"] and old["no_decoder_final_norm"] and old["adaptive_input_cutoff"] == "20000,60000"


def test_fairseq_0_10_configs_name_the_arch_and_take_the_window_from_the_task():
    """cfg.model has ``_name`` and ``tokens_per_sample = ${task.tokens_per_sample}``, resolved or not."""
    model = {"_name": "transformer_lm_wiki103", "decoder_layers": 2}
    for saved in ({**model, "tokens_per_sample": "${task.tokens_per_sample}"}, model):
        args = fck.model_args({"args": None, "cfg": {"model": saved, "task": {"tokens_per_sample": 3072}}})
        resolved = fc.resolve_args(args)
        assert resolved["arch"] == "transformer_lm_wiki103" and resolved["adaptive_softmax_dropout"] == 0.2
        assert fc.trained_window(resolved) == 3072
    args = fck.model_args({"args": None, "cfg": {"model": {**model, "tokens_per_sample": 512}}})
    assert fc.trained_window(fc.resolve_args(args)) == 512


def test_a_missing_window_is_refused_never_guessed():
    """No tokens_per_sample in the args: a clear error, or the --tokens-per-sample given."""
    resolved = fc.resolve_args({"_name": "transformer_lm_wiki103"})
    assert "tokens_per_sample" not in resolved  # no architecture default supplies one
    with pytest.raises(fck.ConvertError, match="no tokens_per_sample .*pass --tokens-per-sample N"):
        fc.trained_window(resolved)
    assert fc.trained_window(resolved, 3072) == 3072
    assert fc.trained_window({"tokens_per_sample": 64}, 64) == 64
    for args, given, message in (({"tokens_per_sample": 64}, 128, "--tokens-per-sample 128 differs .* 64"),
                                 ({"tokens_per_sample": "${task.tokens_per_sample}"}, None, "not a positive number"),
                                 ({"tokens_per_sample": 0}, None, "not a positive number")):
        with pytest.raises(fck.ConvertError, match=message):
            fc.trained_window(args, given)


def test_unpickling_stubs_classes_of_an_absent_fairseq(monkeypatch):
    """Old checkpoints pickle fairseq objects (meters) beside the weights: read them without fairseq."""
    import pickle
    import types

    module = types.ModuleType("fairseq.gone_meters")

    class AverageMeter:
        def __init__(self):
            self.avg = 1.5

    AverageMeter.__module__, AverageMeter.__qualname__ = module.__name__, "AverageMeter"
    module.AverageMeter = AverageMeter
    monkeypatch.setitem(sys.modules, "fairseq", types.ModuleType("fairseq"))  # never the real one, if installed
    monkeypatch.setitem(sys.modules, module.__name__, module)
    blob = pickle.dumps({"args": {"arch": "transformer_lm_wiki103"}, "extra_state": {"loss": AverageMeter()}})
    monkeypatch.delitem(sys.modules, module.__name__)
    loaded = fck._stub_pickle.loads(blob)
    assert loaded["args"]["arch"] == "transformer_lm_wiki103" and loaded["extra_state"]["loss"].avg == 1.5
    with pytest.raises(ModuleNotFoundError):  # only fairseq's classes are stubbed
        fck._stub_pickle.loads(blob.replace(b"fairseq.gone_meters", b"fairxeq.gone_meters"))


def test_run_directory_round_trip(tmp_path):
    """write_run leaves a run that runs.load_model restores to the same log-probs."""
    from knnlm_jax import runs

    sd, args = case("wiki103")
    vocab = vocab_of()
    arch, params = fc.convert(sd, args, vocab)
    cfg = fc.model_config(arch)
    config = fc.run_config(arch, vocab, tokens_per_sample=64, source={"arch": "transformer_lm_wiki103"})
    out = fc.write_run(str(tmp_path / "runs" / "fs"), config, vocab, cfg, params, step=7)
    assert sorted(os.listdir(tmp_path / "runs")) == ["fs"]  # no temporary directory left
    config = runs.run_config(out)
    assert (config.position_offset, config.layer_norm_eps, config.eval_window, config.eval_context) == (2, 1e-5, 64, 32)
    assert runs.latest_run(str(tmp_path / "runs")) == out
    loaded_vocab = runs.load_vocab(out, config)
    assert loaded_vocab == vocab
    trained = runs.load_model(out, config, loaded_vocab)
    assert (trained.step, trained.source) == (7, "best")
    assert trained.cfg == dataclasses.replace(cfg, attention_impl="auto")  # wt103's speed fields
    toks = jnp.asarray(tokens())
    model = trained.model()
    expected, _ = flax_log_probs(trained.cfg, params, np.asarray(toks))
    np.testing.assert_array_equal(np.asarray(model.full_log_probs(model(toks))), expected)
    np.testing.assert_allclose(expected, fairseq_log_probs(sd, args, np.asarray(toks)), atol=1e-4, rtol=0)
    with pytest.raises(fck.ConvertError, match="already exists"):
        fc.write_run(out, fc.run_config(arch, vocab, tokens_per_sample=64), vocab, cfg, params)


def test_cli_converts_an_npz_copy_and_refuses_bad_input_in_one_line(tmp_path, capsys):
    sd, args = case("wiki103")
    fck.save_npz(str(tmp_path / "model.npz"), sd, args, num_updates=3)
    (tmp_path / "dict.txt").write_text("".join(f"w{i} {100 - i}\n" for i in range(36)), encoding="utf-8")
    base = ["--checkpoint", str(tmp_path / "model.npz"), "--dict", str(tmp_path / "dict.txt")]
    assert convert_cli([*base, "--workdir", str(tmp_path / "run")]) == 0
    assert "2 layers, d 16, 2 heads" in capsys.readouterr().out
    with open(tmp_path / "run" / "config.json") as f:
        saved = json.load(f)
    assert saved["derived"]["fairseq"]["num_updates"] == 3 and saved["compute_dtype"] == "float32"
    bad = [
        ([*base, "--workdir", str(tmp_path / "run")], "already exists"),
        (["--checkpoint", str(tmp_path / "none.pt"), "--dict", str(tmp_path / "dict.txt"), "--workdir",
          str(tmp_path / "r2")], "no such file"),
        ([*base[:3], str(tmp_path / "missing.txt"), "--workdir", str(tmp_path / "r3")], "--dict .*: no such file"),
    ]
    for argv, message in bad:
        assert convert_cli(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("knnlm-convert-fairseq: error:")
        assert re.search(message, err), err
    (tmp_path / "model.pt").write_bytes(b"not a checkpoint")
    assert convert_cli(["--checkpoint", str(tmp_path / "model.pt"), *base[2:], "--workdir", str(tmp_path / "r4")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ("needs PyTorch" in err or "not a readable PyTorch checkpoint" in err)
    assert not (tmp_path / "r4").exists()
    assert convert_cli([*base, "--out", str(tmp_path / "r5")]) == 2  # the old spelling, with the new one named
    assert "--out is now --workdir" in capsys.readouterr().err and not (tmp_path / "r5").exists()


def test_cli_needs_the_window_of_a_checkpoint_whose_args_lack_it(tmp_path, capsys):
    """A fairseq >= 0.10 checkpoint (``_name``) without tokens_per_sample: refused in one line, then
    converted with --tokens-per-sample, whose windows the run gets."""
    sd, args = case("wiki103")
    args = {("_name" if k == "arch" else k): v for k, v in args.items() if k != "tokens_per_sample"}
    fck.save_npz(str(tmp_path / "model.npz"), sd, args)
    (tmp_path / "dict.txt").write_text("".join(f"w{i} 1\n" for i in range(36)), encoding="utf-8")
    base = ["--checkpoint", str(tmp_path / "model.npz"), "--dict", str(tmp_path / "dict.txt"), "--workdir"]
    assert convert_cli([*base, str(tmp_path / "r1")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no tokens_per_sample" in err and "--tokens-per-sample" in err
    assert not (tmp_path / "r1").exists()
    assert convert_cli([*base, str(tmp_path / "r2"), "--tokens-per-sample", "64"]) == 0
    with open(tmp_path / "r2" / "config.json") as f:
        saved = json.load(f)
    assert (saved["tokens_per_sample"], saved["eval_window"], saved["eval_context"]) == (64, 64, 32)
    assert saved["derived"]["fairseq"]["arch"] == "transformer_lm_wiki103" and saved["adaptive_softmax_dropout"] == 0.2


def test_build_py_runs_on_a_converted_run(tmp_path):
    """build.py finds the converted run's corpus (--data_dir at conversion) and builds its datastore."""
    corpus = write_corpus(tmp_path / "corpus", n_train=20)
    words = Vocab.build(open(os.path.join(corpus, "train.txt"), encoding="utf-8").read().splitlines())
    (tmp_path / "dict.txt").write_text("".join(f"{w} {c}\n" for w, c in zip(words.words[4:], words.counts[4:])),
                                       encoding="utf-8")
    fck.save_npz(str(tmp_path / "model.npz"), fairseq_state(vocab_size=len(words)), WIKI103_LIKE)
    assert convert_cli(["--checkpoint", str(tmp_path / "model.npz"), "--dict", str(tmp_path / "dict.txt"),
                    "--workdir", str(tmp_path / "run"), "--data_dir", corpus]) == 0
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    out = subprocess.run([sys.executable, os.path.join(ROOT, "build.py"), "--workdir", str(tmp_path / "run"),
                          "--no-progress"], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "datastore train:" in out.stdout and "(window 64, context >= 32)" in out.stdout


# ---------------------------------------------------------------------------------
# optional: fairseq itself (skipped unless importable here or in the interpreter FAIRSEQ_PYTHON names)

FAIRSEQ_SCRIPT = r"""
import sys, json, argparse
import numpy as np, torch
from fairseq.data import Dictionary
from fairseq.models.transformer_lm import TransformerLanguageModel, transformer_lm_baevski_wiki103
out, tied_proj = sys.argv[1], sys.argv[2] == "1"
torch.manual_seed(0)
d = Dictionary()
for i in range(36):
    d.add_symbol(f"w{i}")
args = argparse.Namespace(arch="transformer_lm_wiki103", decoder_layers=2, decoder_embed_dim=16,
    decoder_ffn_embed_dim=32, decoder_attention_heads=2, adaptive_input_cutoff="8,20",
    adaptive_softmax_cutoff="8,20", tokens_per_sample=64, tie_adaptive_proj=tied_proj)
transformer_lm_baevski_wiki103(args)
task = argparse.Namespace(source_dictionary=d, target_dictionary=d)
model = TransformerLanguageModel.build_model(args, task).eval()
with torch.no_grad():  # non-trivial LayerNorm parameters
    for name, p in model.named_parameters():
        if "layer_norm" in name:
            p.add_(0.1 * torch.randn_like(p))
toks = torch.tensor(np.random.default_rng(1).integers(2, 40, (2, 12)))
with torch.no_grad():
    lp = model.get_normalized_probs(model(toks), log_probs=True)
sd = {k: v.numpy() for k, v in model.state_dict().items()}
keep = {k: getattr(args, k) for k in vars(args) if isinstance(getattr(args, k), (str, int, float, bool))}
np.savez(out, tokens=toks.numpy(), log_probs=lp.numpy(), args=json.dumps(keep), **{"sd." + k: v for k, v in sd.items()})
# the same model as fairseq checkpoint files: args (as the public WikiText-103 model) and cfg (fairseq >= 0.10)
from knnlm_jax.models.convert import fairseq_checkpoint as fck
history = [{"num_updates": 5}]
torch.save({"args": args, "model": model.state_dict(), "optimizer_history": history}, out + ".args.pt")
torch.save({"args": None, "cfg": {"model": vars(args)}, "model": model.state_dict(), "optimizer_history": history},
           out + ".cfg.pt")
loaded = [fck.load_checkpoint(out + ext) for ext in (".args.pt", ".cfg.pt")]
for state, a, n in loaded:
    assert n == 5 and a["arch"] == "transformer_lm_wiki103" and state.keys() == sd.keys()
    assert all(np.array_equal(state[k], sd[k]) for k in sd)
fck.save_npz(out + ".copy.npz", *loaded[0])
"""


def fairseq_python():
    try:
        for name in ("torch", "fairseq"):
            importlib.import_module(name)
        return sys.executable
    except Exception:  # noqa: BLE001 - not installed, or fairseq 0.12 failing on this Python
        return os.environ.get("FAIRSEQ_PYTHON")


@pytest.mark.parametrize("tied_proj", [True, False])
def test_matches_fairseq_itself(tmp_path, tied_proj):
    python = fairseq_python()
    if not python:
        pytest.skip("fairseq is not importable (set FAIRSEQ_PYTHON to an interpreter that has fairseq and torch)")
    out = tmp_path / "fairseq.npz"
    run = subprocess.run([python, "-c", FAIRSEQ_SCRIPT, str(out), "1" if tied_proj else "0"], capture_output=True,
                         text=True, timeout=300, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
    assert run.returncode == 0, run.stderr[-2000:]
    z = np.load(out)
    sd = {k[3:]: z[k] for k in z.files if k.startswith("sd.")}
    args = json.loads(str(z["args"]))
    ours = fairseq_state(tie_proj=tied_proj)  # the layout this file's checkpoints assume is fairseq's
    assert {k: v.shape for k, v in sd.items()} == {k: np.shape(v) for k, v in ours.items()}
    arch, params = fc.convert(sd, args, vocab_of())
    assert arch["tie_adaptive_proj"] == tied_proj and not arch["final_norm"]
    got, _ = flax_log_probs(fc.model_config(arch), params, z["tokens"])
    np.testing.assert_allclose(got, z["log_probs"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(fairseq_log_probs(sd, args, z["tokens"]), z["log_probs"], atol=1e-4, rtol=0)
    # the command line on the checkpoint file (its torch-free copy), then the run as build/evaluate load it
    from knnlm_jax import runs

    (tmp_path / "dict.txt").write_text("".join(f"w{i} 1\n" for i in range(36)), encoding="utf-8")
    assert convert_cli(["--checkpoint", f"{out}.copy.npz", "--dict", str(tmp_path / "dict.txt"),
                    "--workdir", str(tmp_path / "run")]) == 0
    config = runs.run_config(str(tmp_path / "run"))
    trained = runs.load_model(str(tmp_path / "run"), config, runs.load_vocab(str(tmp_path / "run"), config))
    model = trained.model()
    assert trained.step == 5 and config.tokens_per_sample == 64
    lp = model.full_log_probs(model(jnp.asarray(z["tokens"])))
    np.testing.assert_allclose(np.asarray(lp), z["log_probs"], atol=1e-4, rtol=0)
