"""Named configs: one module per name, each with ``get_config() -> ConfigDict``."""

import importlib

from ml_collections import ConfigDict

NAMES = ("tiny", "wt2", "wt103")


class ConfigError(ValueError):
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
        raise ValueError(f"expected a boolean, got {text!r}")
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
