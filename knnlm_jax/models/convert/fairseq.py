"""Convert a fairseq ``transformer_lm`` checkpoint into a run directory of this project.

The paper's base LM is Baevski & Auli's WikiText-103 model (fairseq arch
``transformer_lm_wiki103``: adaptive input and softmax, tied, cutoffs 20000/60000, factor 4,
16 pre-norm layers, d 1024, 8 heads, FFN 4096, sinusoidal positions, no final LayerNorm)::

    knnlm-convert-fairseq --checkpoint model.pt --dict dict.txt --workdir runs/wt103-fairseq \\
        --data_dir /path/to/wikitext-103
    python build.py --workdir runs/wt103-fairseq
    python evaluate.py --workdir runs/wt103-fairseq --datastore train --split test

Reading fairseq's files is :mod:`knnlm_jax.models.convert.fairseq_checkpoint` (a ``.pt`` file needs PyTorch, not
fairseq). The mapping works on plain NumPy: a fairseq state dict (name -> array) and its model
args (a dict) become this project's model fields (:mod:`~knnlm_jax.models.convert.fairseq_arch`)
and parameters (:mod:`~knnlm_jax.models.convert.fairseq_params`), both by :func:`convert`; this
module (with JAX) saves them as a run directory (``config.json``, ``vocab.txt``, ``best/<step>``)
that ``build.py`` and ``evaluate.py`` load (:func:`write_run`), and is the command line.

What fairseq does that the conversion reproduces (fairseq 0.12.2 sources):

- ids: fairseq's ``Dictionary`` puts ``<s> <pad> </s> <unk>`` first (ids 0-3), then the
  ``dict.txt`` words in file order, the same order as :class:`knnlm_jax.data.vocab.Vocab`: no
  permutation is needed.
- positions: ``make_positions`` numbers tokens from ``padding_idx + 1`` (= 2), and the
  sinusoid table is ``[sin | cos]`` halves with frequencies ``exp(-i log(10000) / (half - 1))``,
  this project's formula: ``ModelConfig.position_offset = 2`` selects fairseq's rows.
- LayerNorm epsilon 1e-5 (PyTorch's; flax's default is 1e-6): ``ModelConfig.layer_norm_eps``.
- embeddings scaled by ``sqrt(d)`` unless ``no_scale_embedding``; adaptive input band ``i``
  is ``embeddings.i.0`` (an ``nn.Embedding``) then ``embeddings.i.1`` (a bias-free
  ``nn.Linear(dim_i, d)``).
- attention: separate ``q_proj``/``k_proj``/``v_proj`` (with biases; older checkpoints'
  ``in_proj_weight`` is split as fairseq's upgrade does), ``q`` scaled by ``head_dim ** -0.5``,
  ``out_proj``; pre-norm layers (``self_attn_layer_norm``, ``final_layer_norm``), ReLU ``fc1``/``fc2``.
- adaptive softmax: the head scores band 0's words (tied: ``x @ embeddings.0.0.weight.T``)
  followed by one cluster row per tail (``head.class_proj``); a tail projects with
  band ``i+1``'s input projection (``tie_adaptive_proj``) or its own ``tail.i.0``, then scores
  band ``i+1``'s embeddings (tied) or ``tail.i.2``.
- a decoder ``version <= 2`` means no final LayerNorm, as fairseq's upgrade says.
- the architecture is ``args.arch`` (fairseq < 0.10) or ``cfg.model._name`` (fairseq >= 0.10).
- ``tokens_per_sample`` (the window the model was trained on, which sets the run's windows) is a
  task setting that no architecture defines: it comes from the checkpoint or ``--tokens-per-sample``,
  never from a default.

One numeric difference remains: fairseq computes the sinusoid table in float32 and this
project in float64 (then rounds to float32): over the positions of a 3072-token window
(d 1024) the tables differ by at most 3.2e-4 (4.6e-5 over the first 512), next to token
embeddings scaled by sqrt(d) = 32.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile

import numpy as np

from knnlm_jax.core.hashing import file_sha256
from knnlm_jax.data.vocab import Vocab
from knnlm_jax.models.convert.fairseq_arch import resolve_args, trained_window
from knnlm_jax.models.convert.fairseq_checkpoint import ConvertError, load_checkpoint, read_dict
from knnlm_jax.models.convert.fairseq_params import convert


# ---------------------------------------------------------------------------------
# JAX side: parameters into the model, and the run directory


def model_config(arch: dict, **speed):
    """:class:`ModelConfig` of converted model fields (``speed``: attention_impl, compute_dtype, remat)."""
    from knnlm_jax.models.transformer import ModelConfig

    return ModelConfig(**{**arch, "cutoffs": tuple(arch["cutoffs"]), **speed})


def params_state(cfg, params: dict[tuple, np.ndarray]):
    """An ``nnx.State`` of the model's parameters filled with ``params``; every parameter must be given."""
    import jax.numpy as jnp
    from flax import nnx

    from knnlm_jax.models.steps import abstract_model

    _, abstract = abstract_model(cfg)
    flat = nnx.to_flat_state(abstract)
    expected = {tuple(path): v.get_value() for path, v in flat}
    missing = sorted(map(str, set(expected) - set(params)))
    extra = sorted(map(str, set(params) - set(expected)))
    if missing or extra:
        raise ConvertError(f"converted parameters do not fit the model: missing {missing[:3]}, extra {extra[:3]}")
    for path, shape_dtype in expected.items():
        if tuple(params[path].shape) != tuple(shape_dtype.shape):
            raise ConvertError(f"parameter {path}: shape {params[path].shape}, the model has {shape_dtype.shape}")
    for path, v in flat:
        v.set_value(jnp.asarray(params[tuple(path)], dtype=v.get_value().dtype))
    return nnx.from_flat_state(flat)


def build_model(cfg, params: dict[tuple, np.ndarray]):
    """A :class:`TransformerLM` holding the converted parameters."""
    from flax import nnx

    from knnlm_jax.models.steps import abstract_model

    graphdef, _ = abstract_model(cfg)
    return nnx.merge(graphdef, params_state(cfg, params))


def run_config(arch: dict, vocab: Vocab, *, tokens_per_sample: int, data_dir: str = "",
               compute_dtype: str = "float32", source: dict | None = None) -> dict:
    """The run's ``config.json``: the ``wt103`` config with the converted model's fields and windows
    for its ``tokens_per_sample`` (see :func:`trained_window`)."""
    from knnlm_jax.configs import get_config

    config = get_config("wt103").to_dict()
    config.update({k: (list(v) if isinstance(v, tuple) else v) for k, v in arch.items()})
    config.update(compute_dtype=compute_dtype, data_dir=data_dir, vocab_size=len(vocab))
    if tokens_per_sample != config["tokens_per_sample"]:
        # windows the model was trained for: build half-context windows, evaluate with the last 512 scored
        config.update(tokens_per_sample=int(tokens_per_sample), eval_window=int(tokens_per_sample),
                      eval_context=max(int(tokens_per_sample) - 512, int(tokens_per_sample) // 2))
    config["derived"] = {"vocab_size": len(vocab), "corpus": data_dir, "fairseq": dict(source or {})}
    return config


def write_run(out: str, config: dict, vocab: Vocab, cfg, params: dict[tuple, np.ndarray], step: int = 0) -> str:
    """Write ``out/`` (``config.json``, ``vocab.txt``, ``best/<step>``) as train.py leaves a run.

    Written under a temporary name beside ``out`` and renamed when complete; an existing
    non-empty ``out`` is refused.
    """
    from knnlm_jax.core.checkpoint import Checkpointer

    out = os.path.abspath(out)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ConvertError(f"{out} already exists: choose another --out or remove it")
    state = params_state(cfg, params)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.", dir=parent)
    try:
        ckpt = Checkpointer(os.path.join(tmp, "best"), max_to_keep=1)
        ckpt.save(int(step), {"params": state}, {"source": "fairseq", **config["derived"].get("fairseq", {})})
        ckpt.close()
        vocab.save(os.path.join(tmp, "vocab.txt"))
        with open(os.path.join(tmp, "config.json"), "w") as f:  # last: only now does it look like a run
            json.dump(config, f, indent=2)
        if os.path.isdir(out):
            os.rmdir(out)  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


@dataclasses.dataclass(frozen=True)
class ConvertOptions:
    """What to convert and where: the checkpoint (``.pt`` or a ``.npz`` copy), its ``dict.txt``, the run
    directory to create, the corpus build and evaluate read by default, the compute dtype, and the
    window the model was trained on where the checkpoint's args do not say."""

    checkpoint: str
    dict_path: str
    workdir: str
    data_dir: str = ""
    compute_dtype: str = "float32"
    tokens_per_sample: int | None = None


def convert_checkpoint(options: ConvertOptions) -> str:
    """Write ``options.workdir`` as a run directory of the converted model; returns a one-line summary."""
    if options.data_dir and not os.path.isdir(options.data_dir):
        raise ConvertError(f"--data_dir {options.data_dir}: no such directory")
    if not os.path.isfile(options.dict_path):
        raise ConvertError(f"--dict {options.dict_path}: no such file")
    out = os.path.abspath(options.workdir)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ConvertError(f"--workdir {options.workdir} already exists: choose another or remove it")
    vocab = read_dict(options.dict_path)
    state, fairseq_args, num_updates = load_checkpoint(options.checkpoint)
    resolved = resolve_args(fairseq_args)
    window = trained_window(resolved, options.tokens_per_sample)
    arch, params = convert(state, fairseq_args, vocab)
    source = dict(checkpoint=os.path.abspath(options.checkpoint), sha256=file_sha256(options.checkpoint),
                  arch=str(resolved.get("arch", "")), num_updates=num_updates)
    data_dir = os.path.abspath(options.data_dir) if options.data_dir else ""
    config = run_config(arch, vocab, tokens_per_sample=window, data_dir=data_dir,
                        compute_dtype=options.compute_dtype, source=source)
    cfg = model_config(arch, attention_impl=config["attention_impl"], compute_dtype=options.compute_dtype)
    write_run(out, config, vocab, cfg, params, step=num_updates)
    n_params = sum(int(np.prod(a.shape)) for a in params.values())
    return (f"{out}: {arch['num_layers']} layers, d {arch['d_model']}, {arch['num_heads']} heads, FFN {arch['d_ff']}, "
            f"cutoffs {list(arch['cutoffs'])}, {len(vocab)} words, {n_params:,} parameters; step {num_updates}; "
            f"tokens_per_sample {window}")
