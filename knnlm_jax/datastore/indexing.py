"""Indexing a datastore: FAISS over its stored keys, one index or one per shard (trained once, merged on disk).

Every process of a multi-process launch calls these; process 0 trains and broadcasts the
trained index (JAX collectives), each process adds its own shard's keys.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

from knnlm_jax.core import distributed
from knnlm_jax.retrieval import index_shards
from knnlm_jax.retrieval import index as faiss_index
from knnlm_jax.datastore.format import INDEX, Datastore, DatastoreError, read_manifest, shard_name, update_manifest
from knnlm_jax.core.distributed import Processes

TRAINED, IVFDATA = "trained.faiss", "index.ivfdata"


def share_trained(local_SxD: np.ndarray, factory: str, dim: int, processes: Processes, *, seed: int = 0,
                  progress: bool = True):
    """``(trained index, sample size)``: process 0 trains on every process's sample rows, all get the result."""
    gathered = np.concatenate(distributed.allgather_rows(local_SxD)) if processes.multi else local_SxD
    blob = None
    if processes.is_main:
        if progress:
            print(f"training {factory} on {len(gathered):,} sampled keys", file=sys.stderr, flush=True)
        trained = faiss_index.train_index(np.asarray(gathered, np.float32), factory, dim, seed=seed)
        blob = faiss_index.faiss.serialize_index(trained).tobytes()
    if processes.multi:
        blob = distributed.broadcast_bytes(blob)
    trained = faiss_index.faiss.deserialize_index(np.frombuffer(blob, np.uint8))
    return trained, len(gathered)


def index_datastore(store: Datastore, factory: str | None = None, nprobe: int = faiss_index.DEFAULT_NPROBE,
                    progress: bool = True) -> dict:
    """Build, write and record the FAISS index of a complete datastore; returns the index info."""
    index, info = faiss_index.build_index(store.keys, factory, nprobe=nprobe, progress=progress)
    update_manifest(store.directory, index=None)  # no stale record if killed while writing
    faiss_index.write_index(index, os.path.join(store.directory, INDEX))
    store.manifest = update_manifest(store.directory, index=info)
    return info


def index_sharded(store: Datastore, factory: str | None = None, nprobe: int = faiss_index.DEFAULT_NPROBE,
                  processes: Processes = Processes(), progress: bool = True, seed: int = 0) -> dict:
    """Index a sharded datastore: one index trained once, each shard's keys added by its process, merged on disk.

    Every process calls this. The training sample is the one a one-process build would draw
    (seeded ids over all N entries): each process reads the part in its shard, the parts are
    all-gathered, process 0 trains and broadcasts the trained index. Each process adds its
    shard's keys with global ids and writes ``<shard>/index.faiss``; process 0 keeps
    ``trained.faiss`` and, for IVF indexes (not FastScan), merges the shards' lists into ``index.faiss`` +
    ``index.ivfdata`` (searched memory-mapped). With one process every shard is done in turn.
    """
    m = store.manifest
    n, dim, count = store.size, store.dim, len(store.shards)
    if processes.multi and processes.count != count:
        raise DatastoreError(f"datastore {store.name} has {count} shards (built by {count} processes); "
                             f"index it with {count} processes or with one")
    factory = factory or faiss_index.auto_factory(n, dim)
    mine = [processes.index] if processes.multi else list(range(count))
    t0 = time.time()
    update_manifest(store.directory, index=None) if processes.is_main else None  # nothing stale if killed
    trained = faiss_index.faiss.index_factory(dim, factory, faiss_index.faiss.METRIC_L2)
    trained_on = 0
    if not trained.is_trained:
        size = faiss_index.train_size(n, factory)
        sample = np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))
        parts = []
        for p in mine:
            lo, hi = m["shard_entries"][p]
            ids = sample[(sample >= lo) & (sample < hi)] - lo
            parts.append(np.asarray(store.shards[p].keys[ids]))
        local = np.concatenate(parts) if parts else np.zeros((0, dim), np.float16)
        trained, trained_on = share_trained(local, factory, dim, processes, seed=seed, progress=progress)
    lists = faiss_index.mergeable(trained)  # FastScan's blocked lists do not merge on disk: searched apart
    paths = []
    for p in range(count):
        lo, hi = m["shard_entries"][p]
        shard_dir = os.path.join(store.directory, shard_name(p, count))
        paths.append(os.path.join(shard_dir, INDEX))
        if p not in mine:
            continue
        shard_index = faiss_index.faiss.clone_index(trained)
        add_info = faiss_index.add_keys(shard_index, store.shards[p].keys, first_id=lo, progress=progress)
        faiss_index.set_nprobe(shard_index, nprobe)
        update_manifest(shard_dir, index=None)
        faiss_index.write_index(shard_index, paths[-1])
        update_manifest(shard_dir, index=dict(file=INDEX, factory=factory, ntotal=int(shard_index.ntotal),
                                              nprobe=int(nprobe), id_offset=int(add_info.get("id_offset", 0))))
    distributed.barrier(f"indexed shards of {store.directory}")
    info = dict(file=INDEX, factory=factory, metric="l2", ntotal=n, nprobe=int(nprobe), trained_on=trained_on,
                seed=seed, shards=count, merged=lists)
    if processes.is_main:
        faiss_index.write_index(trained, os.path.join(store.directory, TRAINED))
        if lists:
            merged = faiss_index.faiss.clone_index(trained)
            faiss_index.set_nprobe(merged, nprobe)
            index_shards.merge_on_disk(merged, paths, os.path.join(store.directory, INDEX),
                                      os.path.join(store.directory, IVFDATA))
        info["seconds"] = round(time.time() - t0, 3)
        store.manifest = update_manifest(store.directory, index=info)
    distributed.barrier(f"indexed {store.directory}")
    store.manifest = read_manifest(store.directory)
    return store.manifest["index"]
