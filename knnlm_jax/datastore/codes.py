"""Keys kept only as index codes (``build.py --keys none``): the index is filled during the build.

At billions of entries fp16 keys do not fit ordinary disks (2.87B x 1024 x 2 bytes is about
6 TB), while 64-byte PQ codes do. The build then trains the index first, on the keys of an
evenly spread sample of its batches, and encodes every batch's keys as they are computed.

For IVF indexes (the default at scale) a process's memory is bounded whatever its share:
:class:`CodeSegments` keeps only the entries since its last save, and each save appends them
once, sorted by inverted list, as a segment file ``codes-<start>-<end>.seg`` (local entry
positions); the datastore's ``progress`` advances only then, so a killed build resumes from
its last segment. When every entry is encoded, :func:`assemble` writes the one index
(``index.faiss`` + its lists in ``index.ivfdata``) from every segment, group of lists by
group of lists, with plain file writes, and the segments are removed: the codes end up
stored once. Flat and FastScan indexes are filled in RAM instead (:class:`CodeIndex`),
saved every few minutes as ``codes-<progress>.faiss``.

A seeded sample of keys is kept as ``sampled_keys.npz`` (global ids, float16 keys) so that
``build.py --check`` can compare recomputed keys with the ones that were indexed.
"""

from __future__ import annotations

import glob
import os
import time

import numpy as np

from tqdm import tqdm

from knnlm_jax.core import distributed
from knnlm_jax.core.distributed import Processes
from knnlm_jax.core.memory import release_free_memory
from knnlm_jax.retrieval import index as faiss_index
from knnlm_jax.retrieval import index_shards
from knnlm_jax.datastore.format import INDEX, DatastoreError

SNAPSHOT_SECONDS = 300.0
MEMORY_MIB = 256  # what a --keys none build may hold of codes at once (a segment, a group of lists)
IVFDATA = "index.ivfdata"
_MAGIC = b"KNNCODE1"
_HEAD = 5  # int64s after the magic: lists, entries, code size, first id, header bytes
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
        self.sample = _Sample(first_id)
        if progress and os.path.isfile(self._path(progress) + ".npz"):
            self.sample.load(self._path(progress) + ".npz")

    def keep_sample(self, keys_nxD: np.ndarray, start: int, n_local: int) -> None:
        """Keep the keys of this chunk's entries that are in the seeded sample of the shard."""
        self.sample.keep(keys_nxD, start, n_local)

    def _write_sample(self, path: str) -> None:
        self.sample.write(path, self.index.d)

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


class _Sample:
    """The seeded sample of a shard's keys that ``--check`` compares with (about ``SAMPLE_SIZE``)."""

    def __init__(self, first_id: int):
        self.first_id, self.ids, self.keys = int(first_id), [], []
        self._chosen = (None, None)  # (n_local, its sorted sample): drawn once, not per chunk

    def keep(self, keys_nxD: np.ndarray, start: int, n_local: int) -> None:
        if self._chosen[0] != n_local:
            rng = np.random.default_rng([self.first_id, n_local])
            self._chosen = (n_local, np.sort(rng.choice(n_local, size=min(n_local, SAMPLE_SIZE), replace=False)))
        chosen = self._chosen[1]
        here = chosen[(chosen >= start) & (chosen < start + len(keys_nxD))]
        self.ids += [self.first_id + int(i) for i in here]
        self.keys += [np.array(keys_nxD[i - start], np.float16) for i in here]  # a copy: a view keeps the chunk

    def load(self, path: str) -> None:
        with np.load(path) as f:
            self.ids, self.keys = list(f["ids"]), list(f["keys"])

    def write(self, path: str, dim: int) -> None:
        keys = np.stack(self.keys) if self.keys else np.zeros((0, dim), np.float16)
        with open(path + ".tmp", "wb") as f:
            np.savez(f, ids=np.asarray(self.ids, np.int64), keys=keys)
        os.replace(path + ".tmp", path)


def segment_paths(directory: str) -> list[tuple[int, int, str]]:
    """``(start, end, path)`` of a directory's code segments, in entry order."""
    found = []
    for path in glob.glob(os.path.join(directory, "codes-*-*.seg")):
        start, end = os.path.basename(path)[len("codes-"):-len(".seg")].split("-")
        found.append((int(start), int(end), path))
    return sorted(found)


def _segment_head(path: str) -> tuple[int, int, int, int, int]:
    """``(lists, entries, code size, first id, header bytes)`` of a segment file."""
    with open(path, "rb") as f:
        magic, head = f.read(len(_MAGIC)), np.frombuffer(f.read(8 * _HEAD), np.int64)
    if magic != _MAGIC or len(head) != _HEAD:
        raise DatastoreError(f"{path}: not a code segment (rebuild the datastore with --overwrite)")
    return tuple(int(x) for x in head)


class CodeSegments:
    """The codes one build process appends (IVF indexes; see the module docstring).

    Entries must come in order (``add`` from the local position ``saved + pending``); only the
    pending segment is in RAM: its list numbers and codes, about ``memory_mib`` of them (up to
    twice that while it is sorted and saved).
    """

    def __init__(self, directory: str, trained, first_id: int, progress: int, every_s: float | None = None,
                 memory_mib: float = MEMORY_MIB):
        self.directory, self.trained, self.first_id = directory, trained, int(first_id)
        self.every_s = SNAPSHOT_SECONDS if every_s is None else every_s
        ivf = faiss_index.faiss.extract_index_ivf(trained)
        self.nlist, self.code_size, self.dim = int(ivf.nlist), int(ivf.code_size), int(trained.d)
        self.max_entries = max(1, int(memory_mib * 2**20) // (self.code_size + 24))  # codes, list, sort order
        self.sample, self.with_ids = _Sample(first_id), True
        self._resume(int(progress))
        self.lists, self.codes, self.pending, self.last = [], [], 0, time.monotonic()

    def _resume(self, progress: int) -> None:
        """Keep the segments up to ``progress``; remove any written after it (progress not yet advanced)."""
        covered = 0
        for start, end, path in segment_paths(self.directory):
            if end > progress:
                for stale in (path, path + ".npz"):
                    if os.path.exists(stale):
                        os.remove(stale)
            elif start != covered:  # a gap or an overlap: the segments no longer say which codes are whose
                break
            else:
                covered = end
        if covered != progress:
            raise DatastoreError(f"{self.directory}: the code segments of this unfinished build cover entries "
                                 f"0-{covered}, its progress is {progress}; rebuild it with --overwrite")
        self.saved = progress
        if progress:
            self.sample.load(self._path(*segment_paths(self.directory)[-1][:2]) + ".npz")

    def _path(self, start: int, end: int) -> str:
        return os.path.join(self.directory, f"codes-{start}-{end}.seg")

    @property
    def ntotal(self) -> int:
        return self.saved + self.pending

    def keep_sample(self, keys_nxD: np.ndarray, start: int, n_local: int) -> None:
        self.sample.keep(keys_nxD, start, n_local)

    def add(self, keys_nxD: np.ndarray, start: int) -> None:
        """Encode the keys of local entries ``[start, start + n)``; ``start`` continues the last ones."""
        if start != self.ntotal:
            raise ValueError(f"codes of entry {start} added after entry {self.ntotal}")
        lists_n, codes_nxC = faiss_index.encode_codes(self.trained, keys_nxD)
        self.lists.append(lists_n.astype(np.int32))
        self.codes.append(codes_nxC)
        self.pending += len(lists_n)

    def due(self) -> bool:
        return self.pending >= self.max_entries or time.monotonic() - self.last >= self.every_s

    def save(self, progress: int) -> None:
        """Write the pending entries (up to ``progress``) as one segment; the caller then advances progress."""
        if progress != self.ntotal:
            raise ValueError(f"saving codes up to {progress}, encoded up to {self.ntotal}")
        if self.pending:
            lists_n = np.concatenate(self.lists)
            order = np.argsort(lists_n, kind="stable")
            starts = np.searchsorted(lists_n[order], np.arange(self.nlist + 1)).astype(np.int64)
            ids = (self.first_id + self.saved + order).astype(np.int64)
            codes, self.codes = np.concatenate(self.codes), []
            codes = codes[order]  # at most two copies of the segment at once
            path = self._path(self.saved, progress)
            self.sample.write(path + ".npz", self.dim)
            head = np.asarray([self.nlist, len(order), self.code_size, self.first_id,
                               len(_MAGIC) + 8 * (_HEAD + self.nlist + 1)], np.int64)
            with open(path + ".tmp", "wb") as f:
                f.write(_MAGIC + head.tobytes() + starts.tobytes() + ids.tobytes() + codes.tobytes())
            os.replace(path + ".tmp", path)
            del lists_n, order, starts, ids, codes
            release_free_memory()  # the segment's buffers, so that the heap does not creep up over a long build
        self.saved, self.lists, self.codes, self.pending, self.last = progress, [], [], 0, time.monotonic()

    def drop_older(self) -> None:
        """Nothing to drop: each segment is written once and kept until :func:`assemble`."""

    def close(self) -> list[str]:
        """Save what is pending and the sample ``--check`` uses; returns the segment files, in order."""
        self.save(self.ntotal)
        self.sample.write(os.path.join(self.directory, SAMPLED), self.dim)
        return [path for _, _, path in segment_paths(self.directory)]


def remove_segments(directories: list[str]) -> None:
    """Remove code segments (once the index holding their codes is recorded)."""
    for directory in directories:
        for path in glob.glob(os.path.join(directory, "codes-*-*.seg*")):
            os.remove(path)


def _list_groups(bytes_L: np.ndarray, budget: int) -> list[tuple[int, int]]:
    """Consecutive lists ``[a, b)`` whose bytes add up to at most ``budget`` (or one list, if larger)."""
    groups, a, used = [], 0, 0
    for list_no, size in enumerate(bytes_L.tolist()):
        if used and used + size > budget:
            groups.append((a, list_no))
            a, used = list_no, 0
        used += size
    groups.append((a, len(bytes_L)))
    return groups


def _read_group(path: str, head, a: int, b: int):
    """``(list N, ids N, codes NxC)`` of lists ``[a, b)`` in one segment (plain reads, nothing mapped)."""
    nlist, n, code_size, _, data = head
    with open(path, "rb") as f:
        f.seek(len(_MAGIC) + 8 * _HEAD + 8 * a)
        starts = np.frombuffer(f.read(8 * (b - a + 1)), np.int64)
        lo, hi = int(starts[0]), int(starts[-1])
        f.seek(data + 8 * lo)
        ids = np.frombuffer(f.read(8 * (hi - lo)), np.int64)
        f.seek(data + 8 * n + code_size * lo)
        codes = np.frombuffer(f.read(code_size * (hi - lo)), np.uint8).reshape(hi - lo, code_size)
    return np.repeat(np.arange(a, b), np.diff(starts)), ids, codes


def assemble(trained, paths: list[str], directory: str, *, nprobe: int | None = None, memory_mib: float = MEMORY_MIB,
             progress: bool = True, processes: Processes = Processes()) -> dict:
    """Write ``index.faiss`` + ``index.ivfdata`` in ``directory`` from code segments (in entry order).

    Lists are written a group at a time (about ``memory_mib`` of codes): each segment's part of
    the group is read, the parts are put list by list (segments in order, so ids ascend within a
    list, as if every key had been added in order) and written at their place in the lists file,
    with plain file writes. Under several processes every process calls this and writes its
    share of the groups; process 0 lays the files out first and renames them last (written
    under ``.tmp`` names, :func:`index_shards.publish`), its ``nprobe`` set. Returns what the manifest records.
    """
    t0 = time.time()
    heads = [_segment_head(p) for p in paths]
    nlist, code_size = heads[0][0], heads[0][2]
    sizes = np.zeros(nlist, np.int64)
    for path in paths:
        with open(path, "rb") as f:
            f.seek(len(_MAGIC) + 8 * _HEAD)
            sizes += np.diff(np.frombuffer(f.read(8 * (nlist + 1)), np.int64))
    index_path, ivfdata_path = os.path.join(directory, INDEX), os.path.join(directory, IVFDATA)
    offsets = index_shards.list_offsets(sizes, code_size)
    if processes.is_main:
        index_shards.ondisk_layout(trained, sizes, index_path + ".tmp", ivfdata_path + ".tmp", IVFDATA, nprobe=nprobe)
    distributed.barrier(f"laid out {ivfdata_path}")
    groups = _list_groups(sizes * (code_size + 8), int(memory_mib * 2**18))  # parts, sorted copies, output
    mine = groups[processes.index :: processes.count] if processes.multi else groups
    with open(ivfdata_path + ".tmp", "r+b") as out:
        for a, b in tqdm(mine, disable=not progress, desc="assembling index lists", unit="group"):
            parts = [_read_group(path, head, a, b) for path, head in zip(paths, heads)]
            lists, ids, codes = (np.concatenate(x) for x in zip(*parts))
            order = np.argsort(lists, kind="stable")
            del parts, lists
            out.seek(int(offsets[a]))
            out.write(_group_bytes(ids[order], codes[order], sizes[a:b]))
        out.flush()
        os.fsync(out.fileno())
    distributed.barrier(f"wrote {ivfdata_path}")
    if processes.is_main:
        index_shards.publish(index_path + ".tmp", ivfdata_path + ".tmp", index_path, ivfdata_path)
    return dict(ivfdata=IVFDATA, ntotal=int(sizes.sum()), segments=len(paths),
                ivfdata_bytes=int(offsets[-1]), assemble_seconds=round(time.time() - t0, 3))


def _group_bytes(ids_N: np.ndarray, codes_NxC: np.ndarray, sizes_G: np.ndarray) -> np.ndarray:
    """A group's lists as laid out on disk: each list's codes, then its ids."""
    code_size = codes_NxC.shape[1]
    out = np.empty(len(ids_N) * (code_size + 8), np.uint8)
    k = o = 0
    for size in sizes_G.tolist():
        out[o : o + size * code_size] = codes_NxC[k : k + size].reshape(-1)
        o += size * code_size
        out[o : o + 8 * size] = ids_N[k : k + size].view(np.uint8)
        o, k = o + 8 * size, k + size
    return out
