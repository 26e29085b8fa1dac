"""Named configs: one module per name, each with ``get_config() -> ConfigDict``. Imports only ``core`` (no JAX)."""

import importlib
import math

from ml_collections import ConfigDict

from knnlm_jax.core.errors import KnnlmError, InputError

NAMES = ("tiny", "wt2", "wt103")


class ConfigError(KnnlmError, ValueError):
    """A user error in choosing or overriding a config."""


def get_config(name: str) -> ConfigDict:
    if name not in NAMES:
        raise ConfigError(f"unknown config {name!r}; choose one of: {', '.join(NAMES)}")
    module = importlib.import_module(f"knnlm_jax.configs.{name}")
    config = module.get_config()
    config.name = name
    return config


def _parse_value(text: str, current):
    """Parse ``text`` into the type of ``current`` (the field's default)."""
    if isinstance(current, bool):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise InputError(f"expected a boolean, got {text!r}")
    if isinstance(current, int):
        return int(text)
    if isinstance(current, float):
        return float(text)
    if isinstance(current, (tuple, list)):
        items = [t for t in text.replace(" ", "").split(",") if t]
        kind = type(current[0]) if current else int
        return tuple(kind(t) for t in items)
    if current is None:
        if text.lower() in ("none", "null", ""):
            return None
        return text
    return text


def apply_overrides(config: ConfigDict, overrides) -> ConfigDict:
    """Apply ``key=value`` strings (dotted keys for nested fields); unknown keys are errors."""
    for item in overrides or ():
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, text = item.split("=", 1)
        node = config
        parts = key.strip().split(".")
        for part in parts[:-1]:
            if part not in node or not isinstance(node[part], ConfigDict):
                raise ConfigError(f"unknown config key {key!r}")
            node = node[part]
        leaf = parts[-1]
        if leaf not in node or isinstance(node[leaf], ConfigDict):
            raise ConfigError(f"unknown config key {key!r}")
        try:
            value = _parse_value(text, node[leaf])
        except ValueError as err:
            raise ConfigError(f"bad value for {key}: {err}") from None
        with node.ignore_type():
            node[leaf] = value
    return config


POSITIVE_INTS = ("num_layers", "d_model", "num_heads", "d_ff", "adaptive_factor", "tokens_per_sample", "batch_size",
                 "eval_batch_size", "update_freq", "max_steps", "log_every", "eval_every", "checkpoint_every",
                 "keep_checkpoints")
NON_NEGATIVE = ("warmup_steps", "max_eval_tokens", "warmup_init_lr", "min_lr", "weight_decay", "clip_norm")
UNIT_INTERVAL = ("dropout", "attention_dropout", "activation_dropout", "adaptive_softmax_dropout", "momentum",
                 "beta1", "beta2")  # each in [0, 1)
MIN_VOCAB = 5
# model.ATTENTION_IMPLS and model.COMPUTE_DTYPES, spelled out to keep configs JAX-free
ATTENTION_IMPLS = ("explicit", "xla", "cudnn", "auto")
COMPUTE_DTYPES = ("float32", "bfloat16")


def validate(config: ConfigDict) -> ConfigDict:
    """Refuse training values that cannot work (``ConfigError`` naming the field), before anything is written."""

    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    for key, value in config.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key} = {value!r}: must be a finite number")
    for key in POSITIVE_INTS:
        if key in config and not (is_int(config[key]) and config[key] > 0):
            raise ConfigError(f"{key} = {config[key]!r}: must be a positive integer")
    for key in NON_NEGATIVE:
        if key in config and not config[key] >= 0:
            raise ConfigError(f"{key} = {config[key]!r}: must be >= 0")
    for key in UNIT_INTERVAL:
        if key in config and not 0 <= config[key] < 1:
            raise ConfigError(f"{key} = {config[key]!r}: must be in [0, 1)")
    if "patience" in config and not (is_int(config.patience) and config.patience >= 0):
        raise ConfigError(f"patience = {config.patience!r}: must be a non-negative integer (0: never stop early)")
    if "lr" in config and not config.lr > 0:
        raise ConfigError(f"lr = {config.lr!r}: must be > 0")
    if "vocab_size" in config and not (is_int(config.vocab_size) and (config.vocab_size == 0
                                                                       or config.vocab_size >= MIN_VOCAB)):
        raise ConfigError(f"vocab_size = {config.vocab_size!r}: must be 0 (the whole training vocabulary) "
                          f"or at least {MIN_VOCAB}")
    cutoffs = tuple(config.get("cutoffs", ()))
    if any(not is_int(c) or c <= 0 for c in cutoffs) or any(a >= b for a, b in zip(cutoffs, cutoffs[1:])):
        raise ConfigError(f"cutoffs = {','.join(map(str, cutoffs))}: must be positive and increasing")
    if "d_model" in config and "num_heads" in config and config.d_model % config.num_heads:
        raise ConfigError(f"d_model {config.d_model} is not divisible by num_heads {config.num_heads}")
    if "optimizer" in config and config.optimizer not in ("nag", "adamw"):
        raise ConfigError(f"optimizer = {config.optimizer!r}: choose nag or adamw")
    if "attention_impl" in config and config.attention_impl not in ATTENTION_IMPLS:
        raise ConfigError(f"attention_impl = {config.attention_impl!r}: choose one of {', '.join(ATTENTION_IMPLS)}")
    if "compute_dtype" in config and config.compute_dtype not in COMPUTE_DTYPES:
        raise ConfigError(f"compute_dtype = {config.compute_dtype!r}: choose one of {', '.join(COMPUTE_DTYPES)}")
    if config.get("attention_impl") == "cudnn" and config.get("compute_dtype") != "bfloat16":
        raise ConfigError(f"attention_impl = 'cudnn' needs compute_dtype = bfloat16 (cuDNN's flash attention "
                          f"takes no {config.get('compute_dtype', 'float32')}); use auto or xla")
    if "remat" in config and not isinstance(config.remat, bool):
        raise ConfigError(f"remat = {config.remat!r}: must be true or false")
    return config
