"""Keys kept only as index codes (``build.py --keys none``): the index is filled during the build.

At billions of entries fp16 keys do not fit ordinary disks (2.87B x 1024 x 2 bytes is about
6 TB), while 64-byte PQ codes do. The build then trains the index first, on the keys of an
evenly spread sample of its batches, and adds every batch's keys to it as they are computed.
The index is saved every few minutes as ``codes-<progress>.faiss``, and only then does the
datastore's ``progress`` advance, so a killed build resumes from the last saved codes. A
seeded sample of keys is kept as ``sampled_keys.npz`` (global ids, float16 keys) so that
``build.py --check`` can compare recomputed keys with the ones that were indexed.
"""

from __future__ import annotations

import glob
import os
import time

import numpy as np

from knnlm_jax.retrieval import index as faiss_index
from knnlm_jax.datastore.format import INDEX

SNAPSHOT_SECONDS = 300.0
SAMPLED = "sampled_keys.npz"
SAMPLE_SIZE = 256


def load_sampled(directory: str):
    """``(global ids S, float16 keys SxD)`` kept by a ``--keys none`` build (``None`` if absent)."""
    path = os.path.join(directory, SAMPLED)
    if not os.path.isfile(path):
        return None
    with np.load(path) as f:
        return f["ids"], f["keys"]


def sample_batches(n_batches: int, entries_per_batch: int, wanted: int) -> np.ndarray:
    """Indexes of evenly spread batches holding about ``wanted`` entries (all of them if needed)."""
    count = min(n_batches, max(1, -(-wanted // max(1, entries_per_batch))))
    return np.unique(np.linspace(0, n_batches - 1, count).round().astype(np.int64))


class CodeIndex:
    """The index one build process fills: resumed from its last snapshot, saved atomically."""

    def __init__(self, directory: str, trained, first_id: int, progress: int, every_s: float | None = None):
        self.directory, self.first_id = directory, int(first_id)
        self.every_s = SNAPSHOT_SECONDS if every_s is None else every_s
        path = self._path(progress)
        if progress:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path}: the saved codes of this unfinished build are missing; "
                                        "rebuild it with --overwrite")
            self.index = faiss_index.read_index(path)
        else:
            self.index = faiss_index.faiss.clone_index(trained)
        self.saved, self.last = progress, time.monotonic()
        self.with_ids = faiss_index.faiss.try_extract_index_ivf(self.index) is not None
        self.sample_ids, self.sample_keys = [], []
        if progress and os.path.isfile(self._path(progress) + ".npz"):
            with np.load(self._path(progress) + ".npz") as f:
                self.sample_ids, self.sample_keys = list(f["ids"]), list(f["keys"])

    def keep_sample(self, keys_nxD: np.ndarray, start: int, n_local: int) -> None:
        """Keep the keys of this chunk's entries that are in the seeded sample of the shard."""
        rng = np.random.default_rng([self.first_id, n_local])
        chosen = np.sort(rng.choice(n_local, size=min(n_local, SAMPLE_SIZE), replace=False))
        here = chosen[(chosen >= start) & (chosen < start + len(keys_nxD))]
        self.sample_ids += [self.first_id + int(i) for i in here]
        self.sample_keys += [np.asarray(keys_nxD[i - start], np.float16) for i in here]

    def _write_sample(self, path: str) -> None:
        dim = self.index.d
        keys = np.stack(self.sample_keys) if self.sample_keys else np.zeros((0, dim), np.float16)
        with open(path + ".tmp", "wb") as f:
            np.savez(f, ids=np.asarray(self.sample_ids, np.int64), keys=keys)
        os.replace(path + ".tmp", path)

    def _path(self, progress: int) -> str:
        return os.path.join(self.directory, f"codes-{progress}.faiss")

    def add(self, keys_nxD: np.ndarray, start: int) -> None:
        """Add keys of local entries ``[start, start + n)`` (global ids for IVF indexes)."""
        keys = np.ascontiguousarray(keys_nxD, np.float32)
        if self.with_ids:
            first = self.first_id + start
            self.index.add_with_ids(keys, np.arange(first, first + len(keys), dtype=np.int64))
        else:
            self.index.add(keys)

    def due(self) -> bool:
        return time.monotonic() - self.last >= self.every_s

    def save(self, progress: int) -> None:
        """Write ``codes-<progress>.faiss`` (the caller then advances the datastore's progress)."""
        self._write_sample(self._path(progress) + ".npz")
        faiss_index.write_index(self.index, self._path(progress))
        self.saved, self.last = progress, time.monotonic()

    def drop_older(self) -> None:
        """Remove snapshots other than the last saved (after the manifest points to it)."""
        keep = (self._path(self.saved), self._path(self.saved) + ".npz")
        for path in glob.glob(os.path.join(self.directory, "codes-*.faiss*")):
            if path not in keep:
                os.remove(path)

    def finish(self, nprobe: int) -> str:
        """Save the full index as ``index.faiss``; drop the snapshots. Returns its path."""
        faiss_index.set_nprobe(self.index, nprobe)
        path = os.path.join(self.directory, INDEX)
        self._write_sample(os.path.join(self.directory, SAMPLED))
        faiss_index.write_index(self.index, path)
        for old in glob.glob(os.path.join(self.directory, "codes-*.faiss*")):
            os.remove(old)
        return path
