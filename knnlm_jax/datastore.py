"""The kNN datastore on disk: windows over a token stream, a resumable writer and a checked reader.

A datastore directory holds ``keys.npy`` (``N x D`` float16), ``vals.npy`` (``N`` int32),
``manifest.json`` and, once indexed, ``index.faiss``. Entry ``n`` pairs the model's key at
input position ``n`` of the stream ``[</s>] + tokens`` (context ``stream[:n+1]``) with the
value ``tokens[n]``: the key of a context is paired with the token that follows it.

The writer streams chunks into memmaps; after each chunk it flushes them and atomically
advances ``progress`` in the manifest, so a killed build resumes where it stopped and ends
byte-identical to an uninterrupted one. No JAX here: the evaluator and the index read this.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass

import numpy as np

FORMAT_VERSION = 1
KEYS, VALS, MANIFEST, INDEX = "keys.npy", "vals.npy", "manifest.json", "index.faiss"
KEY_DTYPE, VAL_DTYPE = np.float16, np.int32
KEY_MODES = ("fp16", "none")  # keys stored for exact re-ranking, or only as the index's codes
# what must be equal for a partial build to be resumed rather than started afresh
BUILD_IDENTITY = ("model_fingerprint", "key_type", "dim", "vocab_fingerprint", "corpus_sha256", "split",
                  "num_entries", "window", "context", "batch_size")


class DatastoreError(ValueError):
    """A datastore that is missing, damaged, unfinished or built for another model."""


# ---------------------------------------------------------------------------------
# windows: which positions each forward pass scores


def windows(n_tokens: int, length: int, context: int) -> np.ndarray:
    """``W x 3`` int64 rows ``(input_start, span_start, span_end)`` covering entries ``[0, n_tokens)``.

    A window feeds ``stream[input_start : input_start + length]`` and keeps the entries
    ``[span_start, span_end)``. The first window keeps ``[0, length)``; each later one keeps
    the next ``length - context`` entries with ``input_start = span_end - length``, so every
    kept entry sees at least ``context`` earlier tokens. The last span stops at
    ``n_tokens`` (its input starts at ``max(0, n_tokens - length)``). Spans tile
    ``[0, n_tokens)`` exactly: one entry per target token.
    """
    if length < 1 or not 0 <= context < length:
        raise ValueError(f"need 0 <= context < window, got window {length} and context {context}")
    if n_tokens <= 0:
        return np.zeros((0, 3), np.int64)
    stride = length - context
    n_later = -(-max(0, n_tokens - length) // stride)
    ends = np.minimum(length + stride * np.arange(n_later + 1, dtype=np.int64), n_tokens)
    starts = np.concatenate([[0], ends[:-1]])
    return np.stack([np.maximum(ends - length, 0), starts, ends], axis=1)


def window_of(windows_Wx3: np.ndarray, entries) -> np.ndarray:
    """Index of the window whose span holds each entry id."""
    return np.searchsorted(windows_Wx3[:, 2], np.asarray(entries), side="right")


def window_batch(stream: np.ndarray, windows_Wx3: np.ndarray, length: int, pad_id: int, rows: int = 0):
    """``(inputs BxL, targets BxL, mask BxL)`` for windows of ``stream = [</s>] + tokens``.

    ``mask`` marks each window's span; unmasked targets are set to ``pad_id`` (they are not
    entries, and a head-band id keeps adaptive-softmax capacities exact). ``rows`` pads the
    batch with fully masked rows so that every batch has one shape.
    """
    b = max(rows, len(windows_Wx3))
    inputs = np.full((b, length), pad_id, np.int32)
    targets = np.full((b, length), pad_id, np.int32)
    mask = np.zeros((b, length), bool)
    for i, (start, lo, hi) in enumerate(windows_Wx3):
        seg = stream[start : start + length + 1]
        n = len(seg) - 1
        inputs[i, :n], targets[i, :n] = seg[:-1], seg[1:]
        mask[i, lo - start : hi - start] = True
    return inputs, np.where(mask, targets, pad_id).astype(np.int32), mask


def token_stream(tokens_N: np.ndarray, eos: int) -> np.ndarray:
    """``[</s>] + tokens`` as in :func:`knnlm_jax.data.lm_blocks` (a copy: for small splits)."""
    return np.concatenate([np.asarray([eos], np.int32), np.asarray(tokens_N, np.int32)])


class StreamView:
    """``[</s>] + tokens`` without a copy: slices read the (memory-mapped) token array."""

    def __init__(self, tokens_N: np.ndarray, eos: int):
        self.tokens, self.eos = tokens_N, int(eos)

    def __len__(self) -> int:
        return len(self.tokens) + 1

    def __getitem__(self, span: slice) -> np.ndarray:
        start, stop, step = span.indices(len(self))
        if step != 1:
            raise IndexError("a token stream is sliced with step 1")
        if stop <= start:
            return np.zeros(0, np.int32)
        body = np.asarray(self.tokens[max(start, 1) - 1 : stop - 1], np.int32)
        return np.concatenate([np.asarray([self.eos], np.int32), body]) if start == 0 else body


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
# writer


def _remove(directory: str, *names: str) -> None:
    for name in names:
        path = os.path.join(directory, name)
        if os.path.exists(path):
            os.remove(path)


def check_writable(directory: str, overwrite: bool) -> dict | None:
    """The existing manifest, if any; a complete datastore is an error unless ``overwrite``."""
    old = read_manifest(directory)
    if old is not None and old.get("status") == "complete" and not overwrite:
        raise DatastoreError(f"datastore {os.path.basename(os.path.normpath(directory))} already exists "
                             f"({old.get('num_entries')} entries, complete); pass --overwrite to rebuild it "
                             "or --index-only to re-index it")
    return old


HASH_BLOCK = 1 << 16  # entries per link of the content hash chain


def new_content() -> dict:
    return {"block": HASH_BLOCK, "hashed": 0, "keys": "", "vals": ""}


def chain(previous: str, data: bytes) -> str:
    """One link of a hash chain: sha256 of the previous digest and the next block's bytes."""
    h = hashlib.sha256(previous.encode())
    h.update(data)
    return h.hexdigest()


def content_hashes(store: "Datastore", progress=None) -> dict:
    """The chained sha256 of ``vals.npy`` (and ``keys.npy``) data, recomputed as the build recorded it."""
    content = new_content()
    for start in range(0, store.size, HASH_BLOCK):
        stop = min(store.size, start + HASH_BLOCK)
        content["vals"] = chain(content["vals"], np.ascontiguousarray(store.vals[start:stop]).tobytes())
        if store.keys is not None:
            block = np.ascontiguousarray(store.keys[start:stop])
            if not np.isfinite(block).all():
                bad = start + int(np.flatnonzero(~np.isfinite(block).all(axis=1))[0])
                raise DatastoreError(f"datastore {store.name}: the key of entry {bad} is not finite")
            content["keys"] = chain(content["keys"], block.tobytes())
        content["hashed"] = stop
        if progress is not None:
            progress(stop)
    return content


def verify_content(store: "Datastore", progress=None) -> bool:
    """Compare every byte of keys and values with the hashes recorded at build time.

    ``False`` when the datastore predates them; a :class:`DatastoreError` names the file that differs.
    """
    parts = store.shards if store.shards else [store]
    if any("content" not in part.manifest for part in parts):
        for part in parts:
            content_hashes(part, progress)  # no hashes to compare: still every key must be finite
        return False
    for part in parts:
        recorded, fresh = part.manifest["content"], content_hashes(part, progress)
        for name in ("vals", "keys"):
            if recorded[name] != fresh[name]:
                where = f"{store.name}/{os.path.basename(part.directory)}" if store.shards else store.name
                raise DatastoreError(f"datastore {where}: {name}.npy does not match the sha256 recorded at build "
                                     "time (changed or damaged since); rebuild it with --overwrite")
    return True


class DatastoreWriter:
    """Creates (or resumes) a datastore and streams entries into it, in order.

    ``header`` holds the manifest fields of the build (see :data:`BUILD_IDENTITY`, plus
    anything descriptive). A complete datastore is never replaced unless ``overwrite``; an
    unfinished one with the same identity is resumed at its ``progress``. With
    ``header["keys"] == "none"`` no keys are stored (the build adds them to an index): then
    ``append(..., sync=False)`` writes values without advancing ``progress``, and
    :meth:`sync` makes everything written so far durable once the index is saved too.
    """

    def __init__(self, directory: str, header: dict, *, overwrite: bool = False):
        self.directory = directory
        self.name = os.path.basename(os.path.normpath(directory))
        missing = [k for k in BUILD_IDENTITY if k not in header]
        if missing:
            raise ValueError(f"datastore header lacks {missing}")
        header = dict(header, keys=header.get("keys", "fp16"))
        if header["keys"] not in KEY_MODES:
            raise DatastoreError(f"--keys {header['keys']!r}: choose one of {', '.join(KEY_MODES)}")
        self.stores_keys = header["keys"] == "fp16"
        old = check_writable(directory, overwrite)
        if old is not None and not overwrite:
            diff = [k for k in ("format_version", *BUILD_IDENTITY) if k != "batch_size"
                    and old.get(k) != (FORMAT_VERSION if k == "format_version" else header[k])]
            if old.get("keys", "fp16") != header["keys"]:
                diff.append("keys")
            if diff:
                raise DatastoreError(f"datastore {self.name} holds an unfinished build with another "
                                     f"{', '.join(diff)}; pass --overwrite to start again")
        if old is not None and not overwrite and self._open(old):
            self.manifest = old
        else:
            self._create(header)
        self.written = self.progress

    def _open(self, manifest: dict) -> bool:
        """Reopen the files of an unfinished build; ``False`` when they are unusable."""
        n, d = manifest["num_entries"], manifest["dim"]
        try:
            vals = np.load(os.path.join(self.directory, VALS), mmap_mode="r")
            keys = np.load(os.path.join(self.directory, KEYS), mmap_mode="r") if self.stores_keys else None
        except (OSError, ValueError):
            return False
        ok = (vals.shape, vals.dtype) == ((n,), np.dtype(VAL_DTYPE)) and (
            keys is None or (keys.shape, keys.dtype) == ((n, d), np.dtype(KEY_DTYPE)))
        if ok:
            self._attach(keys, vals, n, d)
        return ok

    def _create(self, header: dict) -> None:
        os.makedirs(self.directory, exist_ok=True)
        _remove(self.directory, MANIFEST, INDEX, KEYS, VALS)  # the manifest first: nothing looks complete
        n, d = int(header["num_entries"]), int(header["dim"])
        keys = (np.lib.format.open_memmap(os.path.join(self.directory, KEYS), "w+", KEY_DTYPE, (n, d))
                if self.stores_keys else None)
        vals = np.lib.format.open_memmap(os.path.join(self.directory, VALS), "w+", VAL_DTYPE, (n,))
        self._attach(keys, vals, n, d)
        self.manifest = {"format_version": FORMAT_VERSION, **header,
                         "dtype": np.dtype(KEY_DTYPE).name if self.stores_keys else None,
                         "status": "building", "progress": 0, "lm_nll_sum": 0.0, "index": None,
                         "created": time.time()}
        write_manifest(self.directory, self.manifest)

    def _attach(self, keys_memmap, vals_memmap, n: int, dim: int) -> None:
        """Keep the ``.npy`` layout (shape, data offsets) and write through file descriptors.

        Positional writes instead of memmap stores keep written pages out of this process's
        resident set, so memory does not grow with N.
        """
        self.n, self.dim = n, dim
        self._val_offset = vals_memmap.offset
        self._keys_fd = self._key_offset = None
        if keys_memmap is not None:
            self._key_offset = keys_memmap.offset
            self._keys_fd = os.open(os.path.join(self.directory, KEYS), os.O_RDWR)
        del keys_memmap, vals_memmap
        self._vals_fd = os.open(os.path.join(self.directory, VALS), os.O_RDWR)
        self._nll_pending = 0.0

    @property
    def progress(self) -> int:
        """Entries made durable (what a resumed build starts from)."""
        return int(self.manifest["progress"])

    def append(self, keys_nxD: np.ndarray | None, vals_n: np.ndarray, nll_sum: float = 0.0, *,
               sync: bool = True) -> None:
        """Write the next ``n`` entries; with ``sync``, flush and advance ``progress`` in the manifest."""
        start, n = self.written, len(vals_n)
        if start + n > self.n or (self.stores_keys and keys_nxD.shape != (n, self.dim)):
            shape = None if keys_nxD is None else keys_nxD.shape
            raise ValueError(f"chunk of {n} entries (keys {shape}) does not fit at {start} of {self.n}")
        if self.stores_keys:
            key_bytes = np.ascontiguousarray(keys_nxD, KEY_DTYPE).tobytes()
            _pwrite_all(self._keys_fd, key_bytes, self._key_offset + start * self.dim * np.dtype(KEY_DTYPE).itemsize)
        val_bytes = np.ascontiguousarray(vals_n, VAL_DTYPE).tobytes()
        _pwrite_all(self._vals_fd, val_bytes, self._val_offset + start * np.dtype(VAL_DTYPE).itemsize)
        self.written, self._nll_pending = start + n, self._nll_pending + float(nll_sum)
        if sync:
            self.sync()

    def sync(self) -> None:
        """Flush what was written and advance ``progress`` to it."""
        if self._keys_fd is not None:
            os.fdatasync(self._keys_fd)
        os.fdatasync(self._vals_fd)
        self._hash_upto(self.written if self.written == self.n else self.written // HASH_BLOCK * HASH_BLOCK)
        self.manifest.update(progress=self.written, lm_nll_sum=self.manifest["lm_nll_sum"] + self._nll_pending)
        self._nll_pending = 0.0
        write_manifest(self.directory, self.manifest)

    def _hash_upto(self, end: int) -> None:
        """Extend the content hashes (chained over blocks of entries) to ``end``, reading back what was written."""
        content = self.manifest.setdefault("content", new_content())
        files = [("vals", self._vals_fd, self._val_offset, np.dtype(VAL_DTYPE).itemsize)]
        if self._keys_fd is not None:
            files.append(("keys", self._keys_fd, self._key_offset, self.dim * np.dtype(KEY_DTYPE).itemsize))
        for start in range(content["hashed"], end, HASH_BLOCK):
            stop = min(end, start + HASH_BLOCK)
            for name, fd, offset, row in files:
                content[name] = chain(content[name], os.pread(fd, (stop - start) * row, offset + start * row))
            content["hashed"] = stop

    def finish(self) -> dict:
        if self.written != self.n:
            raise DatastoreError(f"datastore {self.name}: {self.written} of {self.n} entries written")
        if self.progress != self.written or self.manifest.get("content", {}).get("hashed") != self.n:
            self.sync()
        self.manifest["status"] = "complete"
        write_manifest(self.directory, self.manifest)
        for fd in (self._keys_fd, self._vals_fd):
            if fd is not None:
                os.close(fd)
        return self.manifest


def begin_sharded(directory: str, header: dict, entry_ranges, *, overwrite: bool = False) -> dict:
    """Process 0 of a sharded build: create (or keep, to resume) the top manifest listing the shards.

    A build started by another number of processes, or with another identity, is refused
    unless ``overwrite`` (which removes everything). The shards are each process's own
    :class:`DatastoreWriter`; :func:`finish_sharded` marks the whole complete.
    """
    name = os.path.basename(os.path.normpath(directory))
    count = len(entry_ranges)
    old = check_writable(directory, overwrite)
    if old is not None and not overwrite:
        old_count = int(old.get("num_shards", 1)) if old.get("layout") == SHARDED else 1
        if old_count != count:
            raise DatastoreError(f"datastore {name} holds an unfinished build by {old_count} process"
                                 f"{'es' if old_count > 1 else ''}; relaunch it with --num_processes {old_count} "
                                 "to resume, or pass --overwrite")
        diff = [k for k in BUILD_IDENTITY if k != "batch_size" and old.get(k) != header[k]]
        diff += ["keys"] if old.get("keys", "fp16") != header.get("keys", "fp16") else []
        if diff:
            raise DatastoreError(f"datastore {name} holds an unfinished build with another {', '.join(diff)}; "
                                 "pass --overwrite to start again")
        return old
    if os.path.isdir(directory):
        shutil.rmtree(directory)
    os.makedirs(directory)
    manifest = {"format_version": FORMAT_VERSION, **header, "dtype": np.dtype(KEY_DTYPE).name, "layout": SHARDED,
                "num_shards": count, "shard_entries": [[int(lo), int(hi)] for lo, hi in entry_ranges],
                "status": "building", "lm_nll_sum": 0.0, "index": None, "created": time.time()}
    write_manifest(directory, manifest)
    return manifest


def finish_sharded(directory: str) -> dict:
    """Mark a sharded datastore complete once every shard is (process 0, after all shards finished)."""
    top = read_manifest(directory)
    count = int(top["num_shards"])
    total = 0.0
    for p in range(count):
        m = read_manifest(os.path.join(directory, shard_name(p, count)))
        if m is None or m.get("status") != "complete":
            raise DatastoreError(f"datastore {os.path.basename(directory)}: shard {shard_name(p, count)} "
                                 "is not complete")
        total += float(m["lm_nll_sum"])
    top.update(status="complete", lm_nll_sum=total)
    write_manifest(directory, top)
    return top


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


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
        done = (f"{manifest.get('num_shards')} shards, built by {manifest.get('num_shards')} processes"
                if manifest.get("layout") == SHARDED else f"{manifest.get('progress')} of "
                                                          f"{manifest.get('num_entries')} entries")
        raise DatastoreError(f"datastore {name} is unfinished ({done}); run build.py again to resume it")
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


def stores_keys(manifest: dict) -> bool:
    """Whether the datastore keeps its keys (``keys.npy``) or only the index's codes (``--keys none``)."""
    return manifest.get("keys", "fp16") == "fp16"


# ---------------------------------------------------------------------------------
# sharded datastores: one shard per process of the build, contiguous entry ranges

SHARDED = "sharded"


def build_command(store_directory: str, *flags: str) -> str:
    """``python build.py --workdir W --datastore NAME FLAGS`` (or ``knnlm-build ...``): a hint that works when pasted."""
    from knnlm_jax.cli import command

    workdir = os.path.dirname(os.path.dirname(os.path.normpath(store_directory)))
    return " ".join([command("build"), "--workdir", workdir, "--datastore", os.path.basename(
        os.path.normpath(store_directory)), *flags])


def shard_name(p: int, count: int) -> str:
    return f"shard-{p:05d}-of-{count:05d}"


def shard_ranges(windows_Wx3: np.ndarray, batch_size: int, count: int) -> list[tuple[int, int, int, int]]:
    """``(first window, end window, first entry, end entry)`` of each of ``count`` shards.

    Shards split the build's batches (``batch_size`` windows each) into contiguous runs, so
    every shard computes exactly the batches a one-process build computes: concatenated,
    the shards are byte-identical to it.
    """
    n_batches = -(-len(windows_Wx3) // batch_size)
    if n_batches < count:
        raise DatastoreError(f"the corpus gives {n_batches} batches of windows, fewer than the {count} processes: "
                             "use fewer processes or a smaller --batch-size")
    ranges = []
    for p in range(count):
        w0 = (p * n_batches // count) * batch_size
        w1 = min(len(windows_Wx3), ((p + 1) * n_batches // count) * batch_size)
        ranges.append((w0, w1, int(windows_Wx3[w0, 1]), int(windows_Wx3[w1 - 1, 2])))
    return ranges


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
        raise DatastoreError(f"datastore {name}: shard {shard_name(p, count)} is unfinished or does not hold "
                             f"entries [{lo}, {hi}); run build.py again with {count} processes to finish it")
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
