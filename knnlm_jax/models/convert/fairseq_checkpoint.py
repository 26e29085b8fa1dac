"""Reading a fairseq checkpoint's files: a ``.pt`` checkpoint (or its ``.npz`` copy), ``dict.txt``, the model args.

Reading a ``.pt`` file needs PyTorch (and, for checkpoints saved by fairseq >= 0.10, omegaconf);
fairseq itself is not needed: the classes it pickles (meters, old configs) are read as stubs.
A ``.npz`` copy (:func:`save_npz`) needs only NumPy. No JAX here: :mod:`knnlm_jax.models.convert.fairseq`
maps what is read to this project's model.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import types

import numpy as np

from knnlm_jax.data.vocab import SPECIALS, Vocab
from knnlm_jax.core.errors import KnnlmError

ARGS_KEY = "__fairseq_args__"  # the model args (JSON) inside a .npz checkpoint
INTERPOLATION = re.compile(r"\$\{(\w+)\.(\w+)\}")  # omegaconf's "${task.tokens_per_sample}", left unresolved


class ConvertError(KnnlmError, ValueError):
    """A checkpoint, dictionary or output directory this converter cannot use (one line)."""


# ---------------------------------------------------------------------------------
# the dictionary


def read_dict(path: str) -> Vocab:
    """fairseq's ``dict.txt`` (``word count [#fairseq:overwrite]`` lines) as a :class:`Vocab`.

    fairseq prepends ``<s> <pad> </s> <unk>`` (ids 0-3) and numbers the file's words from 4
    in file order, exactly as :class:`Vocab` orders its words, so ids are unchanged.
    """
    words, counts = list(SPECIALS), [0] * len(SPECIALS)
    seen = set(words)
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                parts = line.rstrip().rsplit(" ", 1)
                if len(parts) == 2 and parts[1] == "#fairseq:overwrite":
                    raise ConvertError(f"{path} line {n}: '#fairseq:overwrite' entries (repeated words) are not "
                                       "supported")
                if len(parts) != 2 or not parts[0] or not re.fullmatch(r"-?\d+", parts[1]):
                    raise ConvertError(f"{path} line {n}: expected '<word> <count>', got {line.rstrip()[:60]!r}")
                word, count = parts[0], int(parts[1])
                if word in seen:
                    raise ConvertError(f"{path} line {n}: repeated word {word!r}")
                seen.add(word)
                words.append(word)
                counts.append(count)
    except UnicodeDecodeError:
        raise ConvertError(f"{path}: not UTF-8 text (a fairseq dict.txt?)") from None
    if len(words) == len(SPECIALS):
        raise ConvertError(f"{path}: no words")
    return Vocab(words, counts)


# ---------------------------------------------------------------------------------
# model args


def model_args(checkpoint: dict) -> dict:
    """The model's args (plain dict) of a loaded fairseq checkpoint: ``cfg.model`` (fairseq >= 0.10,
    the architecture under ``_name``) or ``args`` (older), whichever holds the architecture."""
    cfg = checkpoint.get("cfg")
    new, old = _plain(_get(cfg, "model")), _plain(checkpoint.get("args"))
    if _names_a_model(new):
        return _with_task_fields(new, cfg)
    if _names_a_model(old):
        return old
    raise ConvertError("the checkpoint has no model args (neither cfg.model nor args)")


def _names_a_model(args: dict) -> bool:
    return any(k in args for k in ("arch", "_name", "decoder_layers", "decoder_embed_dim"))


def _with_task_fields(args: dict, cfg) -> dict:
    """``cfg.model`` with its ``${section.field}`` references read from ``cfg``: fairseq's model config
    takes ``tokens_per_sample`` from the task (``II("task.tokens_per_sample")``), which a saved config
    may leave unresolved or (an unresolvable one) leave out."""
    out = {}
    for key, value in args.items():
        ref = INTERPOLATION.fullmatch(value) if isinstance(value, str) else None
        out[key] = _get(_get(cfg, ref.group(1)), ref.group(2)) if ref else value
    if out.get("tokens_per_sample") is None:
        out["tokens_per_sample"] = _get(_get(cfg, "task"), "tokens_per_sample")
    return {k: v for k, v in out.items() if v is not None}


def _get(obj, key):
    if obj is None:
        return None
    try:
        return obj[key]
    except (KeyError, TypeError, AttributeError):
        return getattr(obj, key, None)


def _plain(obj) -> dict:
    """A Namespace, dict or omegaconf DictConfig as a dict of its readable fields."""
    if obj is None:
        return {}
    if isinstance(obj, dict):
        return dict(obj)
    if hasattr(obj, "__dict__") and not hasattr(obj, "keys"):  # argparse.Namespace
        return dict(vars(obj))
    out = {}
    for key in obj.keys():  # a DictConfig: read field by field (an interpolation may not resolve)
        try:
            out[key] = obj[key]
        except Exception:  # noqa: BLE001 - an unresolvable interpolation, e.g. ${task.tokens_per_sample}
            continue
    return out


# ---------------------------------------------------------------------------------
# reading checkpoint files (the edge: PyTorch here only)


class _Stub:
    """Stands in for a fairseq class (meters, old configs) when fairseq is not installed."""

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.__dict__["state"] = state


class _StubUnpickler(pickle.Unpickler):
    """An unpickler that replaces classes of an absent ``fairseq`` by :class:`_Stub` subclasses."""

    def find_class(self, module, name):
        try:
            return super().find_class(module, name)
        except Exception:  # noqa: BLE001 - absent, or (fairseq 0.12 on Python >= 3.11) failing to import
            if module.split(".")[0] not in ("fairseq", "fairseq_cli"):
                raise
            return type(name, (_Stub,), {"__module__": module})


_stub_pickle = types.SimpleNamespace(  # a ``pickle_module`` for torch.load
    __name__="pickle", Unpickler=_StubUnpickler, load=lambda f, **kw: _StubUnpickler(f, **kw).load(),
    loads=lambda b, **kw: _StubUnpickler(io.BytesIO(b), **kw).load())


def load_checkpoint(path: str) -> tuple[dict, dict, int]:
    """``(state dict of NumPy arrays, model args, num_updates)`` of a fairseq ``.pt`` checkpoint
    (needs PyTorch), or of a ``.npz`` holding the state dict and the args as JSON under
    ``__fairseq_args__`` (see :func:`save_npz`)."""
    if not os.path.isfile(path):
        raise ConvertError(f"--checkpoint {path}: no such file")
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as z:
            if ARGS_KEY not in z.files:
                raise ConvertError(f"{path}: no {ARGS_KEY} entry (the model args as JSON)")
            args = json.loads(str(z[ARGS_KEY]))
            state = {k: z[k] for k in z.files if k != ARGS_KEY}
        return state, args, int(args.pop("__num_updates__", 0))
    try:
        import torch
    except ImportError:
        raise ConvertError("reading a fairseq .pt checkpoint needs PyTorch: pip install torch "
                           "(the CPU build is enough)") from None
    try:  # fairseq pickles args/cfg (and, in old checkpoints, its meters): not a weights-only file
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_stub_pickle)
        except TypeError:  # a PyTorch older than weights_only
            checkpoint = torch.load(path, map_location="cpu", pickle_module=_stub_pickle)
    except ModuleNotFoundError as err:
        raise ConvertError(f"{path}: unpickling needs the module {err.name!r} (fairseq >= 0.10 checkpoints: "
                           "pip install omegaconf)") from None
    except Exception as err:  # noqa: BLE001 - torch raises many types for a file that is not a checkpoint
        raise ConvertError(f"{path}: not a readable PyTorch checkpoint ({type(err).__name__}: "
                           f"{str(err).splitlines()[0][:120] if str(err) else ''})") from None
    if not isinstance(checkpoint, dict) or "model" not in checkpoint:
        raise ConvertError(f"{path}: not a fairseq checkpoint (no 'model' entry)")
    state = {k: v.detach().cpu().float().numpy() if v.is_floating_point() else v.detach().cpu().numpy()
             for k, v in checkpoint["model"].items() if hasattr(v, "detach")}
    history = checkpoint.get("optimizer_history") or [{}]
    return state, model_args(checkpoint), int(history[-1].get("num_updates", 0) or 0)


def save_npz(path: str, state: dict, args: dict, num_updates: int = 0) -> None:
    """A torch-free copy of a checkpoint: the state dict's arrays plus the args (JSON-able fields)."""
    plain = {k: v for k, v in args.items() if isinstance(v, (str, int, float, bool, type(None), list, tuple))}
    plain["__num_updates__"] = int(num_updates)
    np.savez(path, **{k: np.asarray(v) for k, v in state.items()}, **{ARGS_KEY: np.asarray(json.dumps(plain))})
