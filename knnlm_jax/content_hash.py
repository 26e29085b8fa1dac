"""Content hashes: sha256 of a file, and of a datastore chained over blocks of entries of ``vals.npy`` and ``keys.npy``.

The writer extends the chain as it makes entries durable and records it in the manifest;
``build.py --check`` recomputes it to find keys or values changed or damaged since.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np

from knnlm_jax.datastore import Datastore, DatastoreError

HASH_BLOCK = 1 << 16  # entries per link of the content hash chain


def new_content() -> dict:
    return {"block": HASH_BLOCK, "hashed": 0, "keys": "", "vals": ""}


def chain(previous: str, data: bytes) -> str:
    """One link of a hash chain: sha256 of the previous digest and the next block's bytes."""
    h = hashlib.sha256(previous.encode())
    h.update(data)
    return h.hexdigest()


def file_sha256(path: str) -> str:
    """The sha256 of a file's bytes (hex), read in 16 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
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
