"""Content hashes: sha256 of a file, and of a datastore chained over blocks of entries of ``vals.npy`` and ``keys.npy``.

The writer extends the chain as it makes entries durable and records it in the manifest;
``build.py --check`` recomputes it to find keys or values changed or damaged since.
"""

from __future__ import annotations

import hashlib
import os
import time

import numpy as np

from knnlm_jax.datastore.format import Datastore, DatastoreError

HASH_BLOCK = 1 << 16  # entries per link of the content hash chain
LINKS = "content.links"  # every link of both chains, one fixed-width line per block: a block checks alone
_NO_KEYS = "-" * 64
LINE_BYTES = 64 + 1 + 64 + 1
SAMPLE_BYTES, SAMPLE_MAX = 128 << 20, 8  # the sampled check on open: at most this much data, this many blocks


def new_content() -> dict:
    return {"block": HASH_BLOCK, "hashed": 0, "keys": "", "vals": "", "links": True}


def link_line(vals_hex: str, keys_hex: str) -> bytes:
    """One block's line of :data:`LINKS`: the chains' digests after that block."""
    return f"{vals_hex} {keys_hex or _NO_KEYS}\n".encode()


def _read_links(part: "Datastore") -> list[tuple[str, str]] | None:
    """Every block's link, checked against the manifest's chain; ``None`` for a store that records none."""
    content = part.manifest.get("content") or {}
    if not content.get("links"):
        return None
    count = -(-part.size // HASH_BLOCK)
    where = os.path.join(part.directory, LINKS)
    try:
        with open(where, "rb") as f:
            data = f.read(count * LINE_BYTES + 1)
        pairs = [line.split(" ") for line in data.decode("ascii").splitlines()]
        links = [(v, "" if k == _NO_KEYS else k) for v, k in pairs]
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise DatastoreError(f"{where} is missing or damaged ({err}); rebuild the datastore with --overwrite") from None
    if content.get("hashed") != part.size or len(data) != count * LINE_BYTES or (
            links and links[-1] != (content["vals"], content["keys"])):
        raise DatastoreError(f"{where} does not match the manifest's content hashes (damaged or replaced); "
                             "rebuild the datastore with --overwrite")
    return links


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


def _check_blocks(part: "Datastore", blocks: list[int], links: list[tuple[str, str]], where: str) -> None:
    for b in blocks:
        start, stop = b * HASH_BLOCK, min(part.size, (b + 1) * HASH_BLOCK)
        before = links[b - 1] if b else ("", "")
        got = chain(before[0], np.ascontiguousarray(part.vals[start:stop]).tobytes())
        bad = ["vals"] if got != links[b][0] else []
        if part.keys is not None and chain(before[1], np.ascontiguousarray(part.keys[start:stop]).tobytes()) != links[b][1]:
            bad.append("keys")
        if bad:
            raise DatastoreError(f"datastore {where}: {' and '.join(f'{n}.npy' for n in bad)} entries {start}..{stop - 1} "
                                 "do not match the sha256 recorded at build time (changed or damaged since); rebuild "
                                 "it with --overwrite")


def sample_content(store: "Datastore", rng: np.random.Generator | None = None) -> str:
    """Check random blocks of keys and values (and the very last block) against the hashes recorded at
    build time: at most :data:`SAMPLE_MAX` blocks and :data:`SAMPLE_BYTES` (but at least 2 blocks) over
    all shards; raise :class:`DatastoreError` naming what differs.

    Returns what was checked, for the output. ``build.py --check`` verifies every byte.
    """
    rng = rng or np.random.default_rng()
    parts = store.shards if store.shards else [store]
    t0 = time.perf_counter()
    links = [_read_links(part) for part in parts]
    if any(link is None for link in links):
        return "no block hashes recorded (built by an older version); build.py --check verifies every byte"
    blocks = [(p, b) for p, part in enumerate(parts) for b in range(-(-part.size // HASH_BLOCK))]
    if not blocks:
        return "empty datastore: nothing to check"
    row = parts[0].vals.dtype.itemsize + (
        parts[0].keys.shape[1] * parts[0].keys.dtype.itemsize if parts[0].keys is not None else 0)
    budget = max(2, min(SAMPLE_MAX, SAMPLE_BYTES // (HASH_BLOCK * row)))
    picked = rng.choice(len(blocks) - 1, size=min(len(blocks) - 1, budget - 1), replace=False).tolist()
    for i in sorted({len(blocks) - 1, *picked}):  # the last block too: the end of every build
        p, b = blocks[i]
        where = f"{store.name}/{os.path.basename(parts[p].directory)}" if store.shards else store.name
        _check_blocks(parts[p], [b], links[p], where)
    return (f"checked {len({len(blocks) - 1, *picked})} of {len(blocks)} blocks of keys and values against their "
            f"build-time hashes ({time.perf_counter() - t0:.2f} s; build.py --check verifies every byte)")
