"""FAISS indexes over datastore keys (host NumPy only; no JAX here).

Small datastores get an exact ``IndexFlatL2``; large ones the paper's IVF-PQ (4096
centroids, 64-byte codes, 32 probes), with fewer centroids for smaller N and, past about
2^28 keys, many more centroids behind an HNSW coarse quantizer. Any FAISS factory string
can be asked for. Distances are squared L2.

Building in pieces (one trained index, keys added per shard, shards merged on disk or
searched apart) uses :func:`train_index`, :func:`add_keys` and ``index_shards``.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import sys
import time

import faiss
import numpy as np
from tqdm.auto import tqdm

from knnlm_jax.retrieval import faiss_gpu
from knnlm_jax.core.errors import InputError

FLAT_MAX = 200_000  # below this many keys the exact index is the default
MAX_CENTROIDS = 4096  # the paper's list count; more only past MAX_PER_LIST keys per list
MAX_PER_LIST = 50_000  # past 4096 * this (~2^27.6 keys), lists grow to keep this many keys each
HNSW_NEIGHBOURS = 32  # coarse quantizer graph degree when there are more than MAX_CENTROIDS lists
CODE_BYTES = 64
DEFAULT_NPROBE = 32
MAX_TRAIN = 1_000_000
TRAIN_PER_LIST = 64  # k-means wants at least 39 points per centroid
ADD_CHUNK = 100_000


def auto_factory(n: int, dim: int) -> str:
    """``Flat`` below :data:`FLAT_MAX` keys, else ``IVF{nlist},PQ{m}`` or ``IVF{nlist}_HNSW32,PQ{m}``.

    ``nlist`` is ``2 sqrt(n)`` rounded to a power of two, at most 4096 (the paper's value
    for 103M keys): k-means costs ``nlist**2`` per iteration (FAISS samples 256 keys per
    centroid), so 2M keys get 2048 lists, trained in minutes on a few cores. Past
    ``4096 * MAX_PER_LIST`` keys (204.8M, about 2^27.6) ``nlist`` is the smallest power of two
    that keeps at most :data:`MAX_PER_LIST` (50k) keys per list, and the coarse quantizer is
    an HNSW graph (32 neighbours) so that assigning a key or query to one of that many
    centroids stays cheap: 2.87B keys (Wiki-3B) give ``IVF65536_HNSW32,PQ64``. ``m`` is 64
    bytes, or the largest divisor of ``dim`` below it.
    """
    if n < FLAT_MAX:
        return "Flat"
    nlist = min(MAX_CENTROIDS, 2 ** round(math.log2(2 * math.sqrt(n))))
    nlist = max(nlist, 2 ** math.ceil(math.log2(n / MAX_PER_LIST)))
    m = max(d for d in range(1, min(CODE_BYTES, dim) + 1) if dim % d == 0)
    coarse = f"IVF{nlist}_HNSW{HNSW_NEIGHBOURS}" if nlist > MAX_CENTROIDS else f"IVF{nlist}"
    return f"{coarse},PQ{m}"


def train_size(n: int, factory: str) -> int:
    """Keys to train ``factory`` on: ``max(1M, 64 * nlist)``, at most ``n``.

    1M for up to 4096 lists (as the paper); 64 keys per centroid beyond (4.2M for 65536
    lists). Factories without ``IVF{nlist}`` get ``min(n, 1M)``.
    """
    found = re.search(r"IVF(\d+)", factory)
    nlist = int(found.group(1)) if found else 0
    return min(int(n), max(MAX_TRAIN, TRAIN_PER_LIST * nlist))


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


def make_index(factory: str, dim: int) -> faiss.Index:
    """An empty, untrained index from a factory string (polysemous training off); ValueError if FAISS refuses."""
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_L2)
    except RuntimeError as err:
        raise InputError(f"FAISS cannot make index {factory!r} for {dim}-dim keys: {_faiss_message(err)}") from None
    _skip_polysemous_training(index)
    return index


def sample_rows(n: int, size: int, seed: int = 0) -> np.ndarray:
    """Sorted rows of a seeded sample of ``min(n, size)`` distinct rows out of ``n``."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=min(n, size), replace=False))


def _train(index: faiss.Index, sample_SxD: np.ndarray, factory: str) -> None:
    try:
        index.train(np.ascontiguousarray(sample_SxD, dtype=np.float32))
    except RuntimeError as err:
        raise InputError(f"FAISS cannot train {factory!r} on {len(sample_SxD)} keys: {_faiss_message(err)}") from None


def _set_kmeans_seed(index: faiss.Index, seed: int) -> None:
    """Seed the coarse and product quantizers' k-means (FAISS's default seed is 1234)."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.cp.seed = int(seed)
    for part in (index, ivf):
        part = faiss.downcast_index(part) if part is not None else None
        if hasattr(part, "pq"):
            part.pq.cp.seed = int(seed)


def train_index(sample_SxD: np.ndarray, factory: str, dim: int, *, seed: int | None = None,
                progress: bool = False) -> faiss.Index:
    """A trained, empty index: ``factory`` trained on ``sample_SxD`` (any float dtype).

    Train it once and give a copy to every shard (``faiss.serialize_index`` /
    ``write_index``) so that shards can be merged. ``seed`` seeds k-means (None: FAISS's
    default). A factory that needs no training (``Flat``) ignores the sample.
    """
    if sample_SxD.ndim != 2 or sample_SxD.shape[1] != dim:
        raise ValueError(f"training sample has shape {tuple(sample_SxD.shape)}, expected (S, {dim})")
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    index = make_index(factory, dim)
    if seed is not None:
        _set_kmeans_seed(index, seed)
    if not index.is_trained:
        if progress:
            print(f"training {factory} on {len(sample_SxD):,} sampled keys", file=sys.stderr, flush=True)
        faiss_gpu.cluster_on_gpus(index)  # k-means on the GPUs when FAISS has them
        _train(index, sample_SxD, factory)
    return index


def copy_index(index: faiss.Index) -> faiss.Index:
    """A deep copy (through FAISS's serialization, which knows every index type)."""
    return faiss.deserialize_index(faiss.serialize_index(index))


def add_keys(index: faiss.Index, keys_NxD, *, first_id: int = 0, progress: bool = True) -> dict:
    """Add ``keys_NxD`` (anything sliceable with ``.shape``, e.g. a float16 memmap) in chunks.

    IVF indexes store global ids ``first_id + arange(N)`` (``add_with_ids``), so shards
    built from one trained index merge into one index and their search results are
    global: the returned ``id_offset`` is 0. Other indexes (``Flat``) number their entries
    ``ntotal, ntotal + 1, ...``; the returned ``id_offset`` (``first_id - ntotal`` before
    the add) is what to add to the ids a search of this index returns
    (``index_shards.shift_ids``).
    """
    n, dim = keys_NxD.shape
    if dim != index.d:
        raise ValueError(f"keys have dimension {dim}, the index {index.d}")
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    with_ids = faiss.try_extract_index_ivf(index) is not None
    id_offset = 0 if with_ids else int(first_id) - int(index.ntotal)
    t0 = time.time()
    desc = f"index {faiss.downcast_index(index).__class__.__name__}"
    with tqdm(total=n, disable=not progress, unit="key", unit_scale=True, desc=desc) as bar:
        for i in range(0, n, ADD_CHUNK):
            chunk = np.ascontiguousarray(keys_NxD[i : i + ADD_CHUNK], dtype=np.float32)
            if with_ids:
                index.add_with_ids(chunk, np.arange(first_id + i, first_id + i + len(chunk), dtype=np.int64))
            else:
                index.add(chunk)
            bar.update(len(chunk))
    seconds = time.time() - t0
    return dict(added=int(n), first_id=int(first_id), id_offset=id_offset, ids="global" if with_ids else "local",
                seconds=round(seconds, 3), keys_per_s=round(n / seconds, 1) if seconds > 0 else None)


def build_index(keys_NxD: np.ndarray, factory: str | None = None, *, nprobe: int = DEFAULT_NPROBE,
                max_train: int | None = None, seed: int = 0, progress: bool = True) -> tuple[faiss.Index, dict]:
    """``(index, info)`` over ``keys_NxD`` (any float dtype, e.g. the float16 memmap).

    Training uses a seeded sample of at most ``max_train`` keys (default
    :func:`train_size`) and k-means seeded by ``seed`` too: the trained index a sharded build's
    processes share (:func:`knnlm_jax.datastore.indexing.share_trained`) is this one. Keys are added
    in chunks. ``info`` is what the manifest records.
    """
    n, dim = keys_NxD.shape
    factory = factory or auto_factory(n, dim)
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    t0 = time.time()
    index = make_index(factory, dim)
    trained_on = 0
    if not index.is_trained:
        rows = sample_rows(n, max_train or train_size(n, factory), seed)
        index = train_index(keys_NxD[rows], factory, dim, seed=seed, progress=progress)
        trained_on = len(rows)
    add_keys(index, keys_NxD, progress=progress)
    set_nprobe(index, nprobe)
    info = dict(file="index.faiss", factory=factory, metric="l2", ntotal=int(index.ntotal), nprobe=int(nprobe),
                trained_on=trained_on, seed=seed, seconds=round(time.time() - t0, 3))
    return index, info


def mergeable(index: faiss.Index) -> bool:
    """Whether shards of ``index`` merge into one on-disk index: IVF with plain lists (not FastScan's blocks)."""
    ivf = faiss.try_extract_index_ivf(index)
    return ivf is not None and not isinstance(faiss.downcast_index(ivf), faiss.IndexIVFFastScan)


def as_float32(keys_NxD: np.ndarray) -> np.ndarray:
    """``keys_NxD`` as float32; float16 is decoded by FAISS's SIMD scalar quantizer (NumPy's cast is slower)."""
    keys_NxD = np.ascontiguousarray(keys_NxD)
    if keys_NxD.dtype != np.float16 or keys_NxD.size == 0:
        return keys_NxD.astype(np.float32, copy=False)
    n, dim = keys_NxD.shape
    quantizer = faiss.ScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16)
    return quantizer.decode(keys_NxD.view(np.uint8).reshape(n, 2 * dim))


def faiss_write(index: faiss.Index, path: str) -> None:
    """``faiss.write_index`` through a Python file, flushed and fsynced: FAISS's own file writer only
    prints a failed close (a disk that fills during its last buffer) and returns, so a short file
    could pass for an index. Write errors are :class:`OSError` (one line for a user); a partial
    file is removed."""
    try:
        with open(path, "wb") as f:
            writer = faiss.PyCallbackIOWriter(f.write)
            faiss.write_index(index, writer)
            del writer  # flushes FAISS's own buffer into ``f``
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        if os.path.exists(path):
            os.remove(path)
        raise


def write_index(index: faiss.Index, path: str) -> None:
    """Write to ``path.tmp``, then rename: a killed or failed write never leaves a partial index."""
    faiss_write(index, path + ".tmp")
    os.replace(path + ".tmp", path)


@contextlib.contextmanager
def _stdout_to_stderr():
    """FAISS's C++ prints notes on stdout (e.g. when it re-points on-disk lists); send them to stderr."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def ondisk_lists(index: faiss.Index):
    """The index's ``OnDiskInvertedLists`` (lists in a separate ``.ivfdata`` file), or None."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        return None
    lists = faiss.downcast_InvertedLists(ivf.invlists)
    return lists if isinstance(lists, faiss.OnDiskInvertedLists) else None


def read_index(path: str, nprobe: int | None = None, mmap: bool = False) -> faiss.Index:
    """Read an index; ``mmap`` maps its inverted lists instead of reading them into RAM.

    An index merged on disk (``index_shards.merge_on_disk``) always has its lists
    memory-mapped, read-only, from the ``.ivfdata`` file of the same directory (wherever
    that directory has moved); a missing or short ``.ivfdata`` is a ValueError.
    """
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    flags = (faiss.IO_FLAG_MMAP if mmap else 0) | faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY
    try:
        with _stdout_to_stderr():
            index = faiss.read_index(path, flags)
    except RuntimeError as err:
        if "OnDiskInvertedLists" in str(err):
            raise InputError(f"{path}: its on-disk inverted lists are unreadable ({_faiss_message(err)})") from None
        raise InputError(f"{path}: unreadable FAISS index ({_faiss_message(err)})") from None
    lists = ondisk_lists(index)
    if lists is not None and mmap:  # IO_FLAG_MMAP over on-disk lists crashes FAISS at search: they map themselves
        return read_index(path, nprobe, mmap=False)
    if lists is not None and os.path.getsize(lists.filename) < lists.totsize:
        raise InputError(f"{path}: its inverted lists {lists.filename} have {os.path.getsize(lists.filename)} bytes, "
                         f"{lists.totsize} expected (truncated, or from another merge)")
    if nprobe is not None:
        set_nprobe(index, nprobe)
    return index


def search(index: faiss.Index, queries_BxD: np.ndarray, k: int, nprobe: int | None = None,
           id_range: tuple[int, int] | None = None):
    """``(dists BxK float32 squared L2, ids BxK int64)``; ids are -1 where fewer than ``k`` were found.

    ``id_range`` ``(lo, hi)`` (IVF indexes): only entries with ids in ``[lo, hi)`` are candidates,
    i.e. the results a shard index holding exactly those entries would give.
    """
    if nprobe is not None:
        set_nprobe(index, nprobe)
    queries_BxD = np.ascontiguousarray(queries_BxD, dtype=np.float32)
    if id_range is None:
        return index.search(queries_BxD, int(k))
    params = faiss.SearchParametersIVF()
    selector = faiss.IDSelectorRange(int(id_range[0]), int(id_range[1]))
    params.sel = selector
    params.nprobe = int(faiss.extract_index_ivf(index).nprobe)
    return index.search(queries_BxD, int(k), params=params)


def encode_codes(index: faiss.Index, keys_NxD: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(inverted list N int64, codes NxC uint8)``: what adding ``keys_NxD`` to a trained IVF
    ``index`` would store, without adding them (FAISS's standalone codes, list number split off)."""
    ivf = faiss.extract_index_ivf(index)
    sa_NxS = index.sa_encode(np.ascontiguousarray(keys_NxD, np.float32))
    coarse = ivf.coarse_code_size()
    lists_N = np.zeros(len(sa_NxS), np.int64)
    for byte in range(coarse):  # FAISS writes the list number little-endian in ``coarse`` bytes
        lists_N |= sa_NxS[:, byte].astype(np.int64) << (8 * byte)
    return lists_N, np.ascontiguousarray(sa_NxS[:, coarse:])
