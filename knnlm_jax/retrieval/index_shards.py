"""Sharded FAISS indexes: merge shards into one on-disk index, or merge their search results.

Every shard is a copy of one trained index (``index.train_index``) with its own keys
added (``index.add_keys``): IVF shards store global ids, so they merge into one index
whose inverted lists live in a ``.ivfdata`` file (FAISS ``OnDiskInvertedLists``, as
``faiss.contrib.ondisk.merge_ondisk``), or are searched apart and their top-k merged
(``faiss.merge_knn_results``). Flat shards number their entries from 0; ``shift_ids``
makes their ids global. Host NumPy and FAISS only.
"""

from __future__ import annotations

import os
import time

import faiss
import numpy as np

from knnlm_jax.retrieval import index as faiss_index
from knnlm_jax.retrieval.index import _faiss_message, _stdout_to_stderr
from knnlm_jax.core.errors import InputError

MISSING = np.finfo(np.float32).max  # FAISS's distance for a missing (-1) neighbour


def _centroids(ivf, count: int = 8) -> np.ndarray:
    """The first coarse centroids: a cheap check that two IVF indexes share their training."""
    return ivf.quantizer.reconstruct_n(0, min(count, ivf.nlist))


def _read_shard(path: str, ivf_ref) -> faiss.Index:
    """A shard index with its lists memory-mapped; ValueError unless it matches the trained index."""
    try:
        with _stdout_to_stderr():
            shard = faiss.read_index(path, faiss.IO_FLAG_MMAP | faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY)
    except RuntimeError as err:
        raise InputError(f"{path}: unreadable FAISS index ({_faiss_message(err)})") from None
    ivf = faiss.try_extract_index_ivf(shard)
    if ivf is None:
        raise InputError(f"{path}: not an IVF index; only IVF shards merge into one index")
    if (ivf.d, ivf.nlist, ivf.code_size) != (ivf_ref.d, ivf_ref.nlist, ivf_ref.code_size) or not np.array_equal(
            _centroids(ivf), _centroids(ivf_ref)):
        raise InputError(f"{path}: shard was not built from this trained index "
                         "(dimension, lists, codes or centroids differ)")
    return shard


def merge_on_disk(trained_index: faiss.Index, shard_index_paths: list[str], index_path: str,
                  ivfdata_path: str) -> dict:
    """Merge IVF shard index files into ``index_path`` with its lists in ``ivfdata_path``.

    ``trained_index`` is the trained, empty index every shard was copied from (it is not
    modified). Entries keep the ids the shards stored (``add_keys``'s global ids); within a
    list, shards come in the given order, so the result equals one index with all keys
    added in order. Both files must be in one directory: the index records only the
    ``.ivfdata`` file's name, and ``index.read_index`` finds it next to the index, so the
    directory may move. Written under ``.tmp`` names; the ``.ivfdata`` is renamed first and
    the index last (an existing index at ``index_path`` is removed first), so a killed
    merge never leaves a complete-looking index. Returns what a manifest records.
    """
    if os.path.dirname(os.path.abspath(index_path)) != os.path.dirname(os.path.abspath(ivfdata_path)):
        raise InputError(f"{ivfdata_path} must be in the directory of {index_path}")
    ivf_ref = faiss.try_extract_index_ivf(trained_index)
    if ivf_ref is None or not trained_index.is_trained or trained_index.ntotal != 0:
        raise InputError("merge_on_disk needs the trained, empty IVF index the shards were copied from")
    if isinstance(faiss.downcast_index(ivf_ref), faiss.IndexIVFFastScan):
        raise InputError("FastScan indexes (…x4fs) keep their lists in blocks that do not merge on disk: "
                         "search the shards apart")
    if not shard_index_paths:
        raise InputError("merge_on_disk needs at least one shard index")
    t0 = time.time()
    shards = [_read_shard(path, ivf_ref) for path in shard_index_paths]
    merged = _clone_without_tables(trained_index)
    ivf = faiss.extract_index_ivf(merged)
    index_tmp, ivfdata_tmp = index_path + ".tmp", ivfdata_path + ".tmp"
    for stale in (index_tmp, ivfdata_tmp):
        if os.path.exists(stale):
            os.remove(stale)
    lists = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, ivfdata_tmp)
    parts = faiss.InvertedListsPtrVector()
    for shard in shards:
        parts.push_back(faiss.extract_index_ivf(shard).invlists)
    with _stdout_to_stderr():
        ntotal = lists.merge_from_multiple(parts.data(), parts.size(), False)
    merged.ntotal = ivf.ntotal = ntotal
    ivf.replace_invlists(lists, True)
    lists.this.disown()  # owned by the index now
    lists.filename = os.path.basename(ivfdata_path)  # what the index file records
    faiss_index.faiss_write(merged, index_tmp)
    del merged, ivf, lists, parts, shards  # unmaps the lists
    publish(index_tmp, ivfdata_tmp, index_path, ivfdata_path)
    return dict(file=os.path.basename(index_path), ivfdata=os.path.basename(ivfdata_path), ntotal=int(ntotal),
                shards=len(shard_index_paths), index_bytes=os.path.getsize(index_path),
                ivfdata_bytes=os.path.getsize(ivfdata_path), seconds=round(time.time() - t0, 3))


def publish(index_tmp: str, ivfdata_tmp: str, index_path: str, ivfdata_path: str) -> None:
    """Move a finished on-disk index into place: lists synced and renamed first, the index last
    (an existing index is removed first: never an old index over new lists)."""
    with open(ivfdata_tmp, "rb+") as f:
        os.fsync(f.fileno())
    if os.path.exists(index_path):
        os.remove(index_path)
    os.replace(ivfdata_tmp, ivfdata_path)
    os.replace(index_tmp, index_path)


def ondisk_layout(trained_index: faiss.Index, sizes_L: np.ndarray, index_tmp: str, ivfdata_tmp: str,
                  ivfdata_name: str, *, nprobe: int | None = None) -> np.ndarray:
    """Write ``index_tmp``: the trained, empty IVF index with lists of ``sizes_L`` entries in a new
    zero-filled (sparse) ``ivfdata_tmp``, laid out as FAISS's ``set_all_lists_sizes`` lays them:
    list ``l`` at byte ``offsets[l]``, its codes (``size x code_size``) then its int64 ids.

    Returns ``offsets`` (L+1 int64). The caller writes the lists' bytes there with plain file
    writes (nothing mapped, so nothing counts towards its memory), then publishes them (:func:`publish`).
    """
    ivf_ref = faiss.try_extract_index_ivf(trained_index)
    if ivf_ref is None or not trained_index.is_trained or trained_index.ntotal != 0:
        raise InputError("ondisk_layout needs a trained, empty IVF index")
    if isinstance(faiss.downcast_index(ivf_ref), faiss.IndexIVFFastScan):
        raise InputError("FastScan indexes (…x4fs) keep their lists in blocks, not on disk")
    sizes = np.ascontiguousarray(sizes_L, dtype=np.uint64)
    if sizes.shape != (ivf_ref.nlist,) or not sizes.sum():
        raise InputError(f"ondisk_layout needs {ivf_ref.nlist} list sizes, not all zero")
    for stale in (index_tmp, ivfdata_tmp):
        if os.path.exists(stale):
            os.remove(stale)
    index = _clone_without_tables(trained_index)
    if nprobe is not None:
        faiss_index.set_nprobe(index, nprobe)
    ivf = faiss.extract_index_ivf(index)
    lists = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, ivfdata_tmp)
    offsets = list_offsets(sizes, ivf.code_size)
    with _stdout_to_stderr():
        lists.set_all_lists_sizes(faiss.swig_ptr(sizes))
        lists.update_totsize(int(offsets[-1]))  # creates the file (sparse: nothing written yet)
    index.ntotal = ivf.ntotal = int(sizes.sum())
    ivf.replace_invlists(lists, True)
    lists.this.disown()  # owned by the index now
    lists.filename = ivfdata_name  # what the index file records
    faiss_index.faiss_write(index, index_tmp)
    del index, ivf, lists  # unmaps the (untouched) lists
    return offsets


def _clone_without_tables(index: faiss.Index) -> faiss.Index:
    """A copy of ``index`` to write, without IVF-PQ's precomputed search tables (lists x M x 256 floats:
    128 MiB at 2,048 lists, more than the codes a bounded build holds), which writing does not need."""
    limit = faiss.cvar.precomputed_table_max_bytes
    faiss.cvar.precomputed_table_max_bytes = 0
    try:
        return faiss.deserialize_index(faiss.serialize_index(index))
    finally:
        faiss.cvar.precomputed_table_max_bytes = limit


def list_offsets(sizes_L: np.ndarray, code_size: int) -> np.ndarray:
    """``L+1`` byte offsets of lists of ``sizes_L`` entries laid out by :func:`ondisk_layout`."""
    return np.concatenate([[0], np.cumsum(np.asarray(sizes_L, np.int64) * (int(code_size) + 8))])


def shift_ids(ids_QxK: np.ndarray, offset: int) -> np.ndarray:
    """``ids_QxK + offset`` with -1 (missing) left as -1: a Flat shard's local ids made global."""
    return np.where(ids_QxK >= 0, ids_QxK + np.int64(offset), np.int64(-1))


def merge_results(dists_list: list[np.ndarray], ids_list: list[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(dists QxK, ids QxK)``: the ``k`` nearest over per-shard results (FAISS's merge).

    Each shard's ``(dists QxK_s, ids QxK_s)`` is a search result (rows sorted by distance,
    ids already global, -1 trailing where it found fewer). Missing neighbours come last as
    id -1 with distance ``MISSING`` (float32 max, as FAISS); the order among equal
    distances is FAISS's heap order (not defined).
    """
    if len(dists_list) != len(ids_list) or not dists_list:
        raise ValueError(f"merge_results needs as many distance as id arrays, at least one "
                         f"({len(dists_list)} and {len(ids_list)})")
    q = dists_list[0].shape[0]
    dists_SxQxK = np.full((len(dists_list), q, k), MISSING, dtype=np.float32)
    ids_SxQxK = np.full((len(dists_list), q, k), -1, dtype=np.int64)
    for s, (dists, ids) in enumerate(zip(dists_list, ids_list)):
        if dists.ndim != 2 or dists.shape != ids.shape or dists.shape[0] != q:
            raise ValueError(f"shard {s}: dists {dists.shape} and ids {ids.shape} must both be ({q}, K)")
        kk = min(k, dists.shape[1])
        dists_SxQxK[s, :, :kk] = dists[:, :kk]
        ids_SxQxK[s, :, :kk] = ids[:, :kk]
    return faiss.merge_knn_results(dists_SxQxK, ids_SxQxK)


def same_neighbours(d_ref, i_ref, d, i) -> bool:
    """Whether two top-k lists agree, ties aside: equal sorted distances, and equal (distance, id) pairs
    below the reference's k-th distance (FAISS does not define which equal-distance entries make the cut)."""
    cut = d_ref[-1]
    a = sorted((float(x), int(y)) for x, y in zip(d_ref, i_ref) if x < cut)
    b = sorted((float(x), int(y)) for x, y in zip(d, i) if x < cut)
    return a == b and np.array_equal(np.sort(d_ref), np.sort(d))
