"""FAISS indexes over datastore keys (host NumPy only; no JAX here).

Small datastores get an exact ``IndexFlatL2``; large ones the paper's IVF-PQ (4096
centroids learned from at most 1M sampled keys, 64-byte codes, 32 probes), with fewer
centroids for smaller N. Any FAISS factory string can be asked for. Distances are squared L2.
"""

from __future__ import annotations

import math
import os
import re
import sys
import time

import faiss
import numpy as np
from tqdm.auto import tqdm

FLAT_MAX = 200_000  # below this many keys the exact index is the default
MAX_CENTROIDS = 4096
CODE_BYTES = 64
DEFAULT_NPROBE = 32
MAX_TRAIN = 1_000_000
ADD_CHUNK = 100_000


def auto_factory(n: int, dim: int) -> str:
    """``Flat`` below :data:`FLAT_MAX` keys, else ``IVF{nlist},PQ{m}``.

    ``nlist`` is ``2 sqrt(n)`` rounded to a power of two, at most 4096 (the paper's value
    for 103M keys): k-means costs ``nlist**2`` per iteration (FAISS samples 256 keys per
    centroid), so 2M keys get 2048 lists, trained in minutes on a few cores. ``m`` is 64
    bytes, or the largest divisor of ``dim`` below it.
    """
    if n < FLAT_MAX:
        return "Flat"
    nlist = min(MAX_CENTROIDS, 2 ** round(math.log2(2 * math.sqrt(n))))
    m = max(d for d in range(1, min(CODE_BYTES, dim) + 1) if dim % d == 0)
    return f"IVF{nlist},PQ{m}"


def _faiss_message(err: Exception) -> str:
    """The useful last part of a FAISS C++ error, on one line."""
    text = re.sub(r"^.*?Error in .*? at \S+:\d+: ", "", " ".join(str(err).split()))
    return re.sub(r"^Error: '.*?' failed: ", "", text)


def set_nprobe(index: faiss.Index, nprobe: int) -> None:
    """Probe ``nprobe`` inverted lists (a no-op for indexes without them)."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.nprobe = int(nprobe)


def _skip_polysemous_training(index: faiss.Index) -> None:
    """The factory turns on polysemous training for 8-bit PQ; search never uses it and it is slow."""
    for part in (index, faiss.try_extract_index_ivf(index)):
        part = faiss.downcast_index(part) if part is not None else None
        if hasattr(part, "do_polysemous_training"):
            part.do_polysemous_training = False


def build_index(keys_NxD: np.ndarray, factory: str | None = None, *, nprobe: int = DEFAULT_NPROBE,
                max_train: int = MAX_TRAIN, seed: int = 0, progress: bool = True) -> tuple[faiss.Index, dict]:
    """``(index, info)`` over ``keys_NxD`` (any float dtype, e.g. the float16 memmap).

    Training uses a seeded sample of at most ``max_train`` keys; keys are added in chunks.
    ``info`` is what the manifest records.
    """
    n, dim = keys_NxD.shape
    factory = factory or auto_factory(n, dim)
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    t0 = time.time()
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_L2)
    except RuntimeError as err:
        raise ValueError(f"FAISS cannot make index {factory!r} for {dim}-dim keys: {_faiss_message(err)}") from None
    _skip_polysemous_training(index)
    trained_on = 0
    if not index.is_trained:
        rng = np.random.default_rng(seed)
        sample = np.sort(rng.choice(n, size=min(n, max_train), replace=False))
        if progress:
            print(f"training {factory} on {len(sample):,} sampled keys", file=sys.stderr, flush=True)
        try:
            index.train(np.ascontiguousarray(keys_NxD[sample], dtype=np.float32))
        except RuntimeError as err:
            raise ValueError(f"FAISS cannot train {factory!r} on {len(sample)} keys: {_faiss_message(err)}") from None
        trained_on = len(sample)
    with tqdm(total=n, disable=not progress, unit="key", unit_scale=True, desc=f"index {factory}") as bar:
        for i in range(0, n, ADD_CHUNK):
            chunk = np.ascontiguousarray(keys_NxD[i : i + ADD_CHUNK], dtype=np.float32)
            index.add(chunk)
            bar.update(len(chunk))
    set_nprobe(index, nprobe)
    info = dict(file="index.faiss", factory=factory, metric="l2", ntotal=int(index.ntotal), nprobe=int(nprobe),
                trained_on=trained_on, seed=seed, seconds=round(time.time() - t0, 3))
    return index, info


def as_float32(keys_NxD: np.ndarray) -> np.ndarray:
    """``keys_NxD`` as float32; float16 is decoded by FAISS's SIMD scalar quantizer (NumPy's cast is slower)."""
    keys_NxD = np.ascontiguousarray(keys_NxD)
    if keys_NxD.dtype != np.float16 or keys_NxD.size == 0:
        return keys_NxD.astype(np.float32, copy=False)
    n, dim = keys_NxD.shape
    quantizer = faiss.ScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16)
    return quantizer.decode(keys_NxD.view(np.uint8).reshape(n, 2 * dim))


def write_index(index: faiss.Index, path: str) -> None:
    """Write to ``path.tmp``, then rename: a killed write never leaves a partial index."""
    faiss.write_index(index, path + ".tmp")
    os.replace(path + ".tmp", path)


def read_index(path: str, nprobe: int | None = None, mmap: bool = False) -> faiss.Index:
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    try:
        index = faiss.read_index(path, faiss.IO_FLAG_MMAP if mmap else 0)
    except RuntimeError as err:
        raise ValueError(f"{path}: unreadable FAISS index ({_faiss_message(err)})") from None
    if nprobe is not None:
        set_nprobe(index, nprobe)
    return index


def search(index: faiss.Index, queries_BxD: np.ndarray, k: int, nprobe: int | None = None):
    """``(dists BxK float32 squared L2, ids BxK int64)``; ids are -1 where fewer than ``k`` were found."""
    if nprobe is not None:
        set_nprobe(index, nprobe)
    return index.search(np.ascontiguousarray(queries_BxD, dtype=np.float32), int(k))
