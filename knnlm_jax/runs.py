"""A trained run directory: find the latest, read its config and vocabulary, restore its weights.

Everything but :func:`load_model` is light (no JAX import), so commands reject bad input
before paying for JAX.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

from ml_collections import ConfigDict

from knnlm_jax.configs import NAMES, ConfigError, apply_overrides, get_config
from knnlm_jax.data.corpus import is_spec, read_split
from knnlm_jax.datastore.format import ModelSignature
from knnlm_jax.data.embedded_corpus import EMBEDDED
from knnlm_jax.data.vocab import Vocab
from knnlm_jax.core.errors import KnnlmError

RUNS_ROOT = "runs"
# config fields a trained model fixes (ModelConfig's, spelled out to keep this module JAX-free)
MODEL_FIELDS = ("num_layers", "d_model", "num_heads", "d_ff", "cutoffs", "adaptive_factor", "tie_adaptive_weights",
                "tie_adaptive_proj", "final_norm", "scale_embedding", "vocab_size", "position_offset", "layer_norm_eps")


class RunError(KnnlmError, ValueError):
    """A run directory that is missing or unusable."""


def is_corpus_spec(data_dir: str) -> bool:
    """A corpus named rather than a directory: ``tfds:...``, ``wiki3b``, ``wiki-offline``, the embedded one."""
    return is_spec(data_dir) or data_dir == EMBEDDED


def has_checkpoint(directory: str) -> bool:
    return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))


def is_run_dir(workdir: str) -> bool:
    """Whether ``workdir`` is a run directory: a trained run's (config and checkpoint) or a pretrained LM's."""
    return _is_run(workdir)


def _is_run(workdir: str) -> bool:
    return os.path.isfile(os.path.join(workdir, "config.json")) and (
        has_checkpoint(os.path.join(workdir, "best")) or has_checkpoint(os.path.join(workdir, "checkpoints"))
        or _saved_name(workdir) == PRETRAINED)


def _saved_name(workdir: str) -> str | None:
    try:
        with open(os.path.join(workdir, "config.json")) as f:
            return json.load(f).get("name")
    except (OSError, ValueError, AttributeError):
        return None


def _mtime(workdir: str) -> float:
    parts = ("config.json", "metrics.jsonl", "best", "checkpoints")
    return max(os.path.getmtime(os.path.join(workdir, p)) for p in parts if os.path.exists(os.path.join(workdir, p)))


def latest_run(root: str = RUNS_ROOT) -> str:
    """The most recently modified run directory under ``root`` with a config and a checkpoint."""
    runs = [os.path.join(root, d) for d in sorted(os.listdir(root))] if os.path.isdir(root) else []
    runs = [d for d in runs if _is_run(d)]
    if not runs:
        raise RunError(f"no trained run under {root}/ (train one with train.py, or pass --workdir)")
    return max(runs, key=_mtime)


# ---------------------------------------------------------------------------------
# a pretrained LM's run directory (--model): no checkpoint, its config names the model

PRETRAINED = "pretrained"
_PEEKED: dict = {}  # (model path, mtime, size) -> (LlamaConfig, tokenizer): read once per process


def is_pretrained(config) -> bool:
    return config.get("name") == PRETRAINED


def model_run_name(model: str) -> str:
    """``runs/<this>`` for ``--model``: the file's or directory's name without ``.gguf``."""
    base = os.path.basename(os.path.normpath(model))
    return base[: -len(".gguf")] if base.lower().endswith(".gguf") else base


def setup_pretrained(workdir: str, model: str, data_dir: str | None) -> None:
    """Make ``workdir`` the run directory of pretrained ``model`` (a path or ``smollm2``) if it is not one yet.

    Its ``config.json`` records the model and the corpus (``--data_dir``, else the embedded
    one); a later call may omit ``--model``. A trained run's directory is refused.
    """
    peek_model(model)  # a model that cannot be read is refused before anything is written
    path = os.path.join(workdir, "config.json")
    if os.path.isfile(path):
        name = _saved_name(workdir)
        if name != PRETRAINED:
            raise RunError(f"{workdir} is a trained run (config {name}): give --model another --workdir")
        return
    from knnlm_jax.configs.pretrained import get_config as pretrained_config
    from knnlm_jax.models.convert.pretrained import EMBEDDED_MODEL

    config = pretrained_config()
    config.model = model if model == EMBEDDED_MODEL else os.path.abspath(model)
    if data_dir:
        config.data_dir = data_dir if is_spec(data_dir) or data_dir == EMBEDDED else os.path.abspath(data_dir)
    os.makedirs(workdir, exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump({k: v for k, v in config.to_dict().items() if k not in ("d_model", "vocab_size")}, f, indent=2)
    os.replace(path + ".tmp", path)


def peek_model(model: str):
    """``(LlamaConfig, tokenizer)`` of ``model`` (a path or ``smollm2``), headers only, cached."""
    from knnlm_jax.models.convert.pretrained import peek, resolve

    path = resolve(model)
    stat = os.stat(path) if os.path.exists(path) else None
    key = (os.path.abspath(path), stat and stat.st_mtime_ns, stat and stat.st_size)  # a replaced file is read again
    if key not in _PEEKED:
        _PEEKED[key] = peek(path)
    return _PEEKED[key]


LEGACY_NUMERICS = dict(attention_impl="explicit", compute_dtype="float32", remat=False)


def run_config(workdir: str, overrides=(), model: str | None = None) -> ConfigDict:
    """The run's saved ``config.json`` over its named config's defaults, then ``overrides``.

    Fields added to the configs after the run was trained take their defaults, except the
    speed fields, which take the numerics such a run was trained with; ``derived``
    (corpus, sha256, vocabulary size) is kept. Overrides may not change the trained model.
    A pretrained LM's run uses ``model`` (``--model``) if given, else the one it records.
    """
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise RunError(f"{workdir}: not a trained run (no config.json); train one with train.py or pass --workdir")
    with open(path) as f:
        saved = json.load(f)
    derived = saved.pop("derived", {})
    if saved.get("name") == PRETRAINED:
        return _pretrained_config(saved, overrides, model)
    config = get_config(saved["name"]) if saved.get("name") in NAMES else ConfigDict()
    with config.ignore_type():
        for key, value in LEGACY_NUMERICS.items():  # a run saved before these fields was trained with these
            if key not in saved and key in config:
                config[key] = value
        for key, value in saved.items():
            config[key] = tuple(value) if isinstance(value, list) else value
    before = {k: config.get(k) for k in MODEL_FIELDS}
    apply_overrides(config, overrides)
    changed = [k for k in MODEL_FIELDS if config.get(k) != before[k]]
    if changed:
        raise ConfigError(f"--set cannot change the trained model's {', '.join(changed)}")
    config.derived = ConfigDict(derived)
    return config


def _pretrained_config(saved: dict, overrides, model: str | None) -> ConfigDict:
    from knnlm_jax.configs.pretrained import get_config as pretrained_config

    config = pretrained_config()
    for key, value in saved.items():
        if key in config:
            config[key] = value
    apply_overrides(config, overrides)
    if model:
        config.model = model
    cfg, _ = peek_model(config.model)
    config.d_model, config.vocab_size = int(cfg.d_model), int(cfg.vocab_size)
    config.derived = ConfigDict()
    return config


def run_corpus(config) -> str:
    """The run's training corpus: its spec (``wiki-offline``, ``tfds:...``, ``wiki3b``) or path where that
    still exists, else the config's ``data_dir``."""
    corpus = config.derived.get("corpus", "") if "derived" in config else ""
    return corpus if corpus == EMBEDDED or (corpus and is_spec(corpus)) or os.path.exists(corpus) else config.data_dir


def corpus_options(config) -> dict:
    """The corpus options (``tfds_data_dir``, ``text_feature``, ``tokenize``) the run was trained with."""
    return dict(config.derived.get("corpus_options") or {}) if "derived" in config else {}


def split_tokens(workdir: str, vocab: Vocab, source: str, split: str, *, tfds_data_dir: str | None = None,
                 text_feature: str = "text", tokenize: str | None = None, share=None):
    """``(Split, int32 tokens memory-mapped)`` of a corpus split in the run's vocabulary.

    Token arrays and the corpus fingerprint cache live in ``<workdir>/tokens/``; ``tfds_data_dir`` and
    ``text_feature`` (see :func:`cli.corpus_options`) apply to ``tfds:`` and ``wiki3b`` sources; ``tokenize``
    (``"wikitext"``) to every source. A
    ``share`` (:class:`~knnlm_jax.data.token_cache.Share`) encodes it with every process of a launch.
    """
    from knnlm_jax.data import token_cache  # NumPy

    cache = os.path.join(workdir, "tokens")
    data = read_split(source, split, tfds_data_dir=tfds_data_dir, text_feature=text_feature, tokenize=tokenize,
                      cache_dir=cache)
    return data, token_cache.load_tokens(cache, data, vocab, share)


def load_vocab(workdir: str, config=None):
    """The run's :class:`Vocab`, or a pretrained LM's :class:`~knnlm_jax.data.subword.SubwordVocab`."""
    if config is not None and is_pretrained(config):
        from knnlm_jax.data.subword import SubwordVocab

        return SubwordVocab(peek_model(config.model)[1], int(config.vocab_size))
    path = os.path.join(workdir, "vocab.txt")
    if not os.path.isfile(path):
        raise RunError(f"{workdir}: no vocab.txt")
    vocab = Vocab.load(path)
    expected = config.derived.get("vocab_size") if config is not None and "derived" in config else None
    if expected and expected != len(vocab):
        raise RunError(f"{path} has {len(vocab)} words but the run was trained with {expected}")
    return vocab


def signature(config, vocab: Vocab, fingerprint: str | None = None, step: int | None = None) -> ModelSignature:
    """What a datastore must match; without ``fingerprint`` the weights are not compared."""
    return ModelSignature(dim=int(config.d_model), key_type=str(config.key_type),
                          vocab_fingerprint=vocab.fingerprint(), vocab_size=len(vocab),
                          fingerprint=fingerprint, step=step)


# ---------------------------------------------------------------------------------
# weights (imports JAX)


@dataclasses.dataclass
class TrainedModel:
    cfg: object  # ModelConfig
    graphdef: object
    params: object  # nnx.State of the parameters, replicated over the mesh
    step: int
    source: str  # "best" or "checkpoints"
    fingerprint: str

    def model(self):
        from flax import nnx

        return nnx.merge(self.graphdef, self.params)


def trained_from_module(model, step: int = 0, source: str = "module") -> TrainedModel:
    """A model object (e.g. a user's own, :mod:`knnlm_jax.models.protocol`) as a :class:`TrainedModel`,
    its parameters replicated over this process's devices."""
    import jax
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P

    from knnlm_jax.core.distributed import local_mesh

    graphdef, params = nnx.split(model)
    params = jax.device_put(params, NamedSharding(local_mesh(), P()))
    return TrainedModel(model.cfg, graphdef, params, step, source, params_fingerprint(params))


def params_fingerprint(params) -> str:
    """sha256 over every parameter's path, dtype, shape and bytes: identifies trained weights."""
    import jax
    import numpy as np

    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        array = np.ascontiguousarray(jax.device_get(leaf))
        h.update(f"{jax.tree_util.keystr(path)}|{array.dtype}|{array.shape}\n".encode())
        h.update(array.tobytes())
    return h.hexdigest()


def load_model(workdir: str, config, vocab: Vocab) -> TrainedModel:
    """Restore the run's best checkpoint (else its latest), parameters replicated over the mesh."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from knnlm_jax.core.checkpoint import CheckpointError, Checkpointer
    from knnlm_jax.models.transformer import ModelConfig
    from knnlm_jax.training.optim import make_optimizer
    from knnlm_jax.core.distributed import local_mesh
    from knnlm_jax.models.steps import abstract_model

    replicated = NamedSharding(local_mesh(), P())
    if is_pretrained(config):
        from flax import nnx

        from knnlm_jax.models.convert.pretrained import load_pretrained, resolve

        model, _, _ = load_pretrained(resolve(config.model))
        graphdef, params = nnx.split(model)
        params = jax.device_put(params, replicated)
        return TrainedModel(model.cfg, graphdef, params, 0, "pretrained", params_fingerprint(params))
    cfg = ModelConfig.from_config(config, vocab_size=len(vocab))
    graphdef, abstract = abstract_model(cfg)

    def placed(tree):
        return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), tree)

    best, latest = os.path.join(workdir, "best"), os.path.join(workdir, "checkpoints")
    if has_checkpoint(best):
        source, target = "best", {"params": abstract}
    elif has_checkpoint(latest):  # the full training state: params, optimizer, step, rng
        opt_state = jax.eval_shape(make_optimizer(config).init, abstract)
        target = dict(params=abstract, opt_state=opt_state, step=jax.ShapeDtypeStruct((), jnp.int32),
                      rng=jax.ShapeDtypeStruct((2,), jnp.uint32))
        source = "checkpoints"
    else:
        raise CheckpointError(f"{workdir}: no checkpoint to load (train the model first)")
    ckpt = Checkpointer(os.path.join(workdir, source))
    step = ckpt.latest_step()
    tree, _ = ckpt.restore(placed(target), step)
    ckpt.close()
    params = tree["params"]
    return TrainedModel(cfg, graphdef, params, int(step), source, params_fingerprint(params))
