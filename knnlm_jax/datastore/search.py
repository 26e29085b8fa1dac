"""Searching a datastore's index: one index (in RAM or merged on disk), or its shards across processes.

A sharded datastore has one FAISS index per shard (global ids for IVF, an id offset for
Flat). With one process its shards are searched one after another; under a multi-process
launch each process searches its own shard: process 0 broadcasts the queries (JAX
collectives), every process searches, the top-k lists are all-gathered and merged with
FAISS's own merge. Process 0 runs the evaluation; the others serve searches until it closes.
"""

from __future__ import annotations

import os

import numpy as np

from knnlm_jax.core import distributed
from knnlm_jax.retrieval import faiss_gpu
from knnlm_jax.retrieval import index_shards
from knnlm_jax.retrieval import index as faiss_index
from knnlm_jax.retrieval.searcher import as_searcher, index_lists
from knnlm_jax.datastore.format import INDEX, Datastore, DatastoreError, build_command, shard_name
from knnlm_jax.core.distributed import Processes

_STOP, _SEARCH = 0, 1


def has_lists(index) -> bool:
    """Whether ``index`` probes inverted lists (so ``nprobe`` means something)."""
    return as_searcher(index).lists > 0


def inverted_lists(index) -> int:
    """How many inverted lists ``index`` (or each shard's) probes; 0 for an exact index."""
    return as_searcher(index).lists


def search(index, queries_BxD: np.ndarray, k: int, nprobe: int | None = None):
    """``(dists BxK, ids BxK)`` from any searcher (:class:`~knnlm_jax.retrieval.searcher.Searcher`) or FAISS index."""
    return as_searcher(index).search(queries_BxD, k, nprobe)


def searcher_kind(index) -> str:
    """``device`` (exact search of the keys in JAX) or ``faiss`` (an index, merged or in shards)."""
    return as_searcher(index).kind


class ShardSearcher:
    """Top-k over a sharded datastore's shard indexes; see the module docstring. A searcher
    (:class:`~knnlm_jax.retrieval.searcher.Searcher`)."""

    kind = "faiss"

    def __init__(self, shards: list[tuple[object, int, tuple[int, int] | None]], dim: int, ntotal: int,
                 processes: Processes):
        """``shards``: ``(index, id offset, id range)`` each; an id range restricts a search of the
        datastore's one index to a shard's entries (``--keys none`` shards keep no index of their own)."""
        self.shards, self.dim, self.ntotal, self.processes = shards, dim, ntotal, processes
        self.lists = max((index_lists(ix) for ix, _, _ in shards), default=0)
        self.searches = 0

    def _local(self, queries_BxD: np.ndarray, k: int, nprobe: int | None):
        dists, ids = [], []
        for ix, offset, id_range in self.shards:
            d, i = faiss_index.search(ix, queries_BxD, k, nprobe if self.lists else None, id_range=id_range)
            dists.append(d)
            ids.append(np.where(i >= 0, i + offset, -1))
        return index_shards.merge_results(dists, ids, k)

    def search(self, queries_BxD: np.ndarray, k: int, nprobe: int | None = None):
        """Process 0 (or a single process): the merged top-k of every shard."""
        queries_BxD = np.ascontiguousarray(queries_BxD, np.float32)
        self.searches += 1
        if not self.processes.multi:
            return self._local(queries_BxD, k, nprobe)
        distributed.broadcast(np.asarray([_SEARCH, len(queries_BxD), k, nprobe or -1], np.int64))
        return self._gathered(distributed.broadcast(queries_BxD), k, nprobe)

    def _gathered(self, queries_BxD, k, nprobe):
        dists, ids = self._local(queries_BxD, k, nprobe)
        all_dists, all_ids = distributed.allgather(dists), distributed.allgather(ids)
        return index_shards.merge_results(list(all_dists), list(all_ids), k)

    def serve(self) -> int:
        """Processes other than 0: answer searches until process 0 closes; returns how many."""
        while True:
            op, b, k, nprobe = (int(x) for x in distributed.broadcast(np.zeros(4, np.int64)))
            if op == _STOP:
                return self.searches
            queries = distributed.broadcast(np.zeros((b, self.dim), np.float32))
            self._gathered(queries, k, None if nprobe < 0 else nprobe)
            self.searches += 1

    def close(self) -> None:
        """Process 0: release the serving processes."""
        if self.processes.multi and self.processes.is_main:
            distributed.broadcast(np.asarray([_STOP, 0, 0, 0], np.int64))


def open_searcher(store: Datastore, processes: Processes = Processes(), *, mode: str = "auto", nprobe=None):
    """The index to search ``store`` with.

    ``mode``: ``merged`` (the one index file, lists memory-mapped), ``shards`` (this
    process's shards; all of them with one process), ``device`` (the stored keys on this
    process's accelerators, searched exactly by :mod:`~knnlm_jax.retrieval.device_search`) or
    ``auto`` (shards under a multi-process launch, else the merged or only index).
    """
    if mode == "device":
        if store.keys is None:
            raise DatastoreError(f"datastore {store.name} keeps no keys (built with --keys none): --search device "
                                 "searches the stored keys")
        if processes.multi:
            raise DatastoreError("--search device runs in one process (its keys sharded over the local devices)")
        from knnlm_jax.retrieval.device_search import DeviceSearcher

        return DeviceSearcher(store.keys)
    info = store.manifest.get("index") or {}
    if not info:
        raise DatastoreError(f"datastore {store.name} has no FAISS index; index it with: "
                             f"{build_command(store.directory, '--index-only')}")
    sharded = store.shards is not None
    if processes.multi and not sharded:
        raise DatastoreError(f"datastore {store.name} is not sharded (built by one process): evaluate it with one "
                             "process")
    if mode == "auto":
        mode = "shards" if processes.multi or (sharded and not info.get("merged")) else "merged"
    if mode == "merged":
        if sharded and not info.get("merged"):
            raise DatastoreError(f"datastore {store.name} has no merged index (its shards' indexes are Flat or FastScan, "
                                 "which do not merge on disk): search its shards (--search shards)")
        path = os.path.join(store.directory, INDEX)
        if not os.path.isfile(path):
            raise DatastoreError(f"datastore {store.name}: {INDEX} is missing; re-index it with: "
                                 f"{build_command(store.directory, '--index-only')}")
        index = faiss_index.read_index(path, nprobe, mmap=True)  # lists mapped, not read into RAM
        _check_index(store, index)
        return as_searcher(faiss_gpu.for_search(index))  # a GPU copy when FAISS has GPUs
    if not sharded:
        raise DatastoreError(f"datastore {store.name} is not sharded: it has one index")
    count = len(store.shards)
    if processes.multi and processes.count != count:
        raise DatastoreError(f"datastore {store.name} has {count} shards (built by {count} processes) but this "
                             f"launch has {processes.count}: launch {count} processes, or search its merged index "
                             "with one process")
    mine = [processes.index] if processes.multi else list(range(count))
    shards, merged = [], None
    for p in mine:
        shard = store.shards[p]
        lo, hi = store.manifest["shard_entries"][p]
        if (shard.manifest.get("index") or {}).get("codes") == "merged":  # its codes are in the one index
            if merged is None:  # memory-mapped, on the host: FAISS's GPUs do not select by id
                merged = faiss_index.read_index(os.path.join(store.directory, INDEX), nprobe, mmap=True)
                _check_index(store, merged)
            shards.append((merged, 0, (lo, hi)))
            continue
        path = os.path.join(shard.directory, INDEX)
        if not os.path.isfile(path):
            raise DatastoreError(f"datastore {store.name}: shard {shard_name(p, count)} has no {INDEX}; re-index "
                                 f"it with: {build_command(store.directory, '--index-only')}")
        ix = faiss_index.read_index(path, nprobe, mmap=True)
        if ix.ntotal != hi - lo:
            raise DatastoreError(f"datastore {store.name}: shard {shard_name(p, count)}'s index holds {ix.ntotal} "
                                 f"keys, the shard {hi - lo}; re-index it with --index-only")
        shards.append((ix, int((shard.manifest.get("index") or {}).get("id_offset", 0)), None))
    return ShardSearcher(shards, store.dim, store.size, processes)


def _check_index(store: Datastore, index) -> None:
    if index.ntotal != store.size or index.d != store.dim:
        raise DatastoreError(f"datastore {store.name}: its index holds {index.ntotal} {index.d}-dim keys, the "
                             f"datastore {store.size} {store.dim}-dim ones; re-index it with: "
                             f"{build_command(store.directory, '--index-only')}")
