"""The kNN datastore on disk: its format, manifest and model signature, and a checked reader.

A datastore directory holds ``keys.npy`` (``N x D`` float16), ``vals.npy`` (``N`` int32),
``manifest.json`` and, once indexed, ``index.faiss``. Entry ``n`` pairs the model's key at
input position ``n`` of the stream ``[</s>] + tokens`` (context ``stream[:n+1]``) with the
value ``tokens[n]``: the key of a context is paired with the token that follows it.

A sharded datastore (one shard per process of the build) reads as one. The windows over
the stream are :mod:`knnlm_jax.data.windows`, the writer :mod:`knnlm_jax.datastore.writer`, the
content hashes :mod:`knnlm_jax.datastore.content_hash`. No JAX here: the evaluator and the index read this.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import time
from dataclasses import dataclass

import numpy as np

from knnlm_jax.core.hints import command
from knnlm_jax.core.locks import holder, lock_path
from knnlm_jax.core.errors import KnnlmError

FORMAT_VERSION = 1
KEYS, VALS, MANIFEST, INDEX = "keys.npy", "vals.npy", "manifest.json", "index.faiss"
KEY_DTYPE, VAL_DTYPE = np.float16, np.int32
KEY_MODES = ("fp16", "none")  # keys stored for exact re-ranking, or only as the index's codes
# what must be equal for a partial build to be resumed rather than started afresh
BUILD_IDENTITY = ("model_fingerprint", "key_type", "dim", "vocab_fingerprint", "corpus_sha256", "split",
                  "text_encoding", "num_entries", "window", "context", "batch_size")


class DatastoreError(KnnlmError, ValueError):
    """A datastore that is missing, damaged, unfinished or built for another model."""


# ---------------------------------------------------------------------------------
# manifest


@dataclass(frozen=True)
class ModelSignature:
    """What a datastore must agree on with the model that queries it.

    ``fingerprint`` (sha256 of the trained weights) is ``None`` when the weights were not
    loaded; it is then not checked.
    """

    dim: int
    key_type: str
    vocab_fingerprint: str
    vocab_size: int
    fingerprint: str | None = None
    step: int | None = None


def datastore_dir(workdir: str, name: str) -> str:
    """``<workdir>/datastores/<name>``; a name is a plain file name."""
    if not re.fullmatch(r"[A-Za-z0-9_.+-]+", name or "") or name in (".", ".."):
        raise DatastoreError(f"bad datastore name {name!r}: use letters, digits and . _ + -")
    return os.path.join(workdir, "datastores", name)


def find_datastore(workdir: str, name: str) -> str:
    """``<workdir>/datastores/<name>``, or an error listing what there is and the command that builds it."""
    from knnlm_jax.data.tfds_source import WIKI3B, WIKI3B_DATASET, WIKI3B_PREPARE, prepare_command

    directory = datastore_dir(workdir, name)
    if not os.path.isdir(directory):
        root = os.path.dirname(directory)
        have = sorted(os.listdir(root)) if os.path.isdir(root) else []
        hint = f"{command('build')} --workdir {workdir} --datastore {name}"
        if name == WIKI3B:
            hint += (f" --tfds-data-dir DIR (first prepare TFDS {WIKI3B_DATASET} in DIR, which {WIKI3B_PREPARE}: "
                     f"{prepare_command(WIKI3B, 'DIR')})")
        raise DatastoreError(f"no datastore {name} in {root} (" + (f"have: {', '.join(have)}" if have else "none yet")
                             + f"); build it with: {hint}")
    return directory


def read_manifest(directory: str) -> dict | None:
    """The manifest, or ``None`` when there is none."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise DatastoreError(f"{path}: unreadable manifest ({err})") from None


def write_manifest(directory: str, manifest: dict) -> None:
    """Write atomically: a killed process leaves the old manifest or the new one."""
    path = os.path.join(directory, MANIFEST)
    manifest = dict(manifest, updated=time.time())
    with open(path + ".tmp", "w") as f:
        json.dump(manifest, f, indent=2)
    os.replace(path + ".tmp", path)


def update_manifest(directory: str, **fields) -> dict:
    manifest = read_manifest(directory)
    if manifest is None:
        raise DatastoreError(f"{directory}: no {MANIFEST}")
    manifest.update(fields)
    write_manifest(directory, manifest)
    return manifest


def check_signature(manifest: dict, signature: ModelSignature, name: str) -> None:
    """Refuse a datastore built for another model, saying which field differs."""
    if manifest.get("dim") != signature.dim:
        raise DatastoreError(f"datastore {name} has key dimension {manifest.get('dim')} "
                             f"but the model's is {signature.dim}")
    if manifest.get("key_type") != signature.key_type:
        raise DatastoreError(f"datastore {name} has key type {manifest.get('key_type')!r} "
                             f"but the model's is {signature.key_type!r}")
    if manifest.get("vocab_fingerprint") != signature.vocab_fingerprint:
        raise DatastoreError(
            f"datastore {name} was built with vocabulary (tokenizer) {str(manifest.get('vocab_fingerprint'))[:12]} "
            f"({manifest.get('vocab_size')} ids) but the model's is {signature.vocab_fingerprint[:12]} "
            f"({signature.vocab_size} ids)")
    if signature.fingerprint is not None and manifest.get("model_fingerprint") != signature.fingerprint:
        raise DatastoreError(
            f"datastore {name} was built with other model weights (step {manifest.get('checkpoint_step')}, "
            f"{str(manifest.get('model_fingerprint'))[:12]}) than the model's (step {signature.step}, "
            f"{signature.fingerprint[:12]}); rebuild it with --overwrite")


def signature_fields(signature: ModelSignature) -> dict:
    """The manifest fields that describe the model."""
    return dict(model_fingerprint=signature.fingerprint, checkpoint_step=signature.step,
                key_type=signature.key_type, dim=signature.dim,
                vocab_fingerprint=signature.vocab_fingerprint, vocab_size=signature.vocab_size)


# ---------------------------------------------------------------------------------
# reader


@dataclass
class Datastore:
    """A complete datastore: read-only memmaps ``keys`` (``N x D`` float16) and ``vals`` (``N`` int32)."""

    directory: str
    manifest: dict
    keys: np.ndarray
    vals: np.ndarray
    shards: list | None = None  # the shards' own datastores, when sharded

    @property
    def name(self) -> str:
        return os.path.basename(os.path.normpath(self.directory))

    @property
    def size(self) -> int:
        return len(self.vals)

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def index_path(self) -> str | None:
        """Path of the FAISS index the manifest records, ``None`` when not indexed."""
        path = os.path.join(self.directory, INDEX)
        return path if self.manifest.get("index") and os.path.isfile(path) else None


def _load_array(directory: str, name: str, file: str, shape: tuple, dtype) -> np.ndarray:
    path = os.path.join(directory, file)
    if not os.path.isfile(path):
        raise DatastoreError(f"datastore {name}: {file} is missing")
    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as err:
        raise DatastoreError(f"datastore {name}: {file} is truncated or damaged ({err})") from None
    if array.shape != shape or array.dtype != np.dtype(dtype):
        raise DatastoreError(f"datastore {name}: {file} holds {array.dtype}{list(array.shape)} "
                             f"but the manifest says {np.dtype(dtype)}{list(shape)}")
    return array


def open_datastore(directory: str, signature: ModelSignature | None = None) -> Datastore:
    """Open a complete datastore read-only, checked against its manifest and ``signature``.

    A sharded datastore (built by several processes) reads as one: ``keys`` and ``vals``
    are :class:`RowConcat` views over its shards, in entry order.
    """
    name = os.path.basename(os.path.normpath(directory))
    manifest = read_manifest(directory)
    if manifest is None:
        raise DatastoreError(f"no datastore {name} ({directory} has no {MANIFEST})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DatastoreError(f"datastore {name} has format version {manifest.get('format_version')}; "
                             f"this code reads version {FORMAT_VERSION}")
    if manifest.get("status") != "complete":
        done = (f"a sharded build by {manifest.get('num_shards')} processes"
                if manifest.get("layout") == SHARDED else f"{manifest.get('progress')} of "
                                                          f"{manifest.get('num_entries')} entries")
        raise DatastoreError(f"datastore {name} is unfinished ({done}); " + unfinished_hint(directory))
    if signature is not None:
        check_signature(manifest, signature, name)
    n, d = int(manifest["num_entries"]), int(manifest["dim"])
    if manifest.get("layout") == SHARDED:
        shards = [open_shard(directory, manifest, p) for p in range(int(manifest["num_shards"]))]
        offsets = [lo for lo, _ in manifest["shard_entries"]] + [n]
        keys = RowConcat([s.keys for s in shards], offsets) if shards[0].keys is not None else None
        vals = RowConcat([s.vals for s in shards], offsets)
        return Datastore(directory, manifest, keys, vals, shards)
    keys = _load_array(directory, name, KEYS, (n, d), KEY_DTYPE) if stores_keys(manifest) else None
    vals = _load_array(directory, name, VALS, (n,), VAL_DTYPE)
    return Datastore(directory, manifest, keys, vals)


def unfinished_hint(directory: str) -> str:
    """What to do about an unfinished datastore: wait for the build running now, else resume it."""
    running = holder(lock_path(directory))
    if running:
        return f"it is being built now by {running}: wait for that build to finish"
    manifest = read_manifest(directory)
    if manifest.get("layout") == SHARDED:
        count = manifest.get("num_shards")
        return (f"no build is running: relaunch its {count} processes to resume it (the same build command on "
                f"each, with --num_processes {count} and its own --process_id)")
    return f"no build is running: resume it with {build_command(directory, *resume_flags(manifest))}"


def resume_flags(manifest: dict) -> list[str]:
    """The build flags that recreate an unfinished build's identity (its corpus, split and key mode)."""
    flags = ["--corpus", str(manifest["corpus"]), "--split", str(manifest["split"])] if manifest.get("corpus") else []
    options = manifest.get("corpus_options") or {}
    for key, flag in (("tfds_data_dir", "--tfds-data-dir"), ("text_feature", "--text-feature"),
                      ("tokenize", "--tokenize")):
        if options.get(key) is not None:
            flags += [flag, str(options[key])]
    if manifest.get("keys", "fp16") != "fp16":
        flags += ["--keys", str(manifest["keys"])]
    return flags


def stores_keys(manifest: dict) -> bool:
    """Whether the datastore keeps its keys (``keys.npy``) or only the index's codes (``--keys none``)."""
    return manifest.get("keys", "fp16") == "fp16"


# ---------------------------------------------------------------------------------
# sharded datastores: one shard per process of the build, contiguous entry ranges

SHARDED = "sharded"


def build_command(store_directory: str, *flags: str) -> str:
    """``python build.py --workdir W --datastore NAME FLAGS`` (or ``knnlm-build ...``): a hint that works when pasted."""
    workdir = os.path.dirname(os.path.dirname(os.path.normpath(store_directory)))
    return shlex.join([*command("build").split(), "--workdir", workdir, "--datastore", os.path.basename(
        os.path.normpath(store_directory)), *flags])


def shard_name(p: int, count: int) -> str:
    return f"shard-{p:05d}-of-{count:05d}"


def open_shard(directory: str, manifest: dict, p: int) -> "Datastore":
    """Shard ``p`` of a sharded datastore, checked against the top manifest."""
    name = os.path.basename(os.path.normpath(directory))
    count = int(manifest["num_shards"])
    sub = os.path.join(directory, shard_name(p, count))
    m = read_manifest(sub)
    if m is None:
        raise DatastoreError(f"datastore {name}: shard {shard_name(p, count)} is missing "
                             f"(the datastore was built by {count} processes)")
    lo, hi = manifest["shard_entries"][p]
    if m.get("status") != "complete" or m.get("num_entries") != hi - lo or m.get("entry_range") != [lo, hi]:
        running = holder(lock_path(directory, shard_name(p, count)))
        raise DatastoreError(f"datastore {name}: shard {shard_name(p, count)} is unfinished or does not hold "
                             f"entries [{lo}, {hi}); " + (f"it is being built now by {running}" if running else
                                                          f"no build is running: run build.py again with {count} "
                                                          "processes to finish it"))
    d = int(manifest["dim"])
    keys = _load_array(sub, f"{name}/{shard_name(p, count)}", KEYS, (hi - lo, d), KEY_DTYPE) if stores_keys(
        manifest) else None
    vals = _load_array(sub, f"{name}/{shard_name(p, count)}", VALS, (hi - lo,), VAL_DTYPE)
    return Datastore(sub, m, keys, vals)


class RowConcat:
    """Read-only rows of several arrays (shards) as one: ints, slices and integer arrays index it."""

    def __init__(self, parts, offsets):
        self.parts, self.offsets = list(parts), np.asarray(offsets, np.int64)
        self.shape = (int(self.offsets[-1]),) + tuple(self.parts[0].shape[1:])
        self.dtype = self.parts[0].dtype
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self[:], dtype)

    def __getitem__(self, item):
        if isinstance(item, (int, np.integer)):
            i = int(item) + (self.shape[0] if item < 0 else 0)
            p = int(np.searchsorted(self.offsets, i, side="right")) - 1
            return self.parts[p][i - self.offsets[p]]
        if isinstance(item, slice):
            start, stop, step = item.indices(self.shape[0])
            if step != 1:
                return self[np.arange(start, stop, step)]
            pieces = [part[max(start, lo) - lo : min(stop, hi) - lo]
                      for part, lo, hi in zip(self.parts, self.offsets[:-1], self.offsets[1:]) if start < hi and lo < stop]
            return np.concatenate(pieces) if pieces else np.zeros((0,) + self.shape[1:], self.dtype)
        ids = np.asarray(item)
        if ids.dtype == bool:
            ids = np.flatnonzero(ids)
        flat = ids.reshape(-1).astype(np.int64)
        flat = np.where(flat < 0, flat + self.shape[0], flat)
        owner = np.searchsorted(self.offsets, flat, side="right") - 1
        out = np.empty((len(flat),) + self.shape[1:], self.dtype)
        for p in np.unique(owner):
            at = owner == p
            out[at] = self.parts[p][flat[at] - self.offsets[p]]
        return out.reshape(ids.shape + self.shape[1:])
