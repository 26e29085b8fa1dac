"""The resumable datastore writer, and a sharded build's top manifest (one shard per process).

The writer lays the ``.npy`` files out once and writes chunks into them with positional writes;
after each chunk it syncs them and atomically advances ``progress`` in the manifest, so a killed
build resumes where it stopped and ends byte-identical to an uninterrupted one. No JAX here.
"""

from __future__ import annotations

import os
import shutil
import time

import numpy as np

from knnlm_jax.datastore.content_hash import HASH_BLOCK, LINE_BYTES, LINKS, chain, link_line, new_content
from knnlm_jax.datastore.format import (BUILD_IDENTITY, FORMAT_VERSION, INDEX, KEY_DTYPE, KEY_MODES, KEYS, MANIFEST, SHARDED,
                                 VAL_DTYPE, VALS, DatastoreError, read_manifest, shard_name, write_manifest)


def _remove(directory: str, *names: str) -> None:
    for name in names:
        path = os.path.join(directory, name)
        if os.path.exists(path):
            os.remove(path)


def identity_diff(old: dict, header: dict) -> list[str]:
    """The fields (format version, build identity but the batch size, key mode) in which an unfinished build differs."""
    new = {"format_version": FORMAT_VERSION, **header, "keys": header.get("keys", "fp16")}
    return [k for k in ("format_version", *BUILD_IDENTITY, "keys") if k != "batch_size"
            and old.get(k, "fp16" if k == "keys" else None) != new[k]]


def check_writable(directory: str, overwrite: bool) -> dict | None:
    """The existing manifest, if any; a complete datastore is an error unless ``overwrite``."""
    old = read_manifest(directory)
    if old is not None and old.get("status") == "complete" and not overwrite:
        raise DatastoreError(f"datastore {os.path.basename(os.path.normpath(directory))} already exists "
                             f"({old.get('num_entries')} entries, complete); pass --overwrite to rebuild it "
                             "or --index-only to re-index it")
    return old


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
            diff = identity_diff(old, header)
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
            self._attach(keys, vals, n, d, manifest.get("content"))
        return ok

    def _create(self, header: dict) -> None:
        os.makedirs(self.directory, exist_ok=True)
        _remove(self.directory, MANIFEST, INDEX, KEYS, VALS, LINKS)  # the manifest first: nothing looks complete
        n, d = int(header["num_entries"]), int(header["dim"])
        keys = (np.lib.format.open_memmap(os.path.join(self.directory, KEYS), "w+", KEY_DTYPE, (n, d))
                if self.stores_keys else None)
        vals = np.lib.format.open_memmap(os.path.join(self.directory, VALS), "w+", VAL_DTYPE, (n,))
        self._attach(keys, vals, n, d, None)
        self.manifest = {"format_version": FORMAT_VERSION, **header,
                         "dtype": np.dtype(KEY_DTYPE).name if self.stores_keys else None,
                         "status": "building", "progress": 0, "lm_nll_sum": 0.0, "index": None,
                         "created": time.time()}
        write_manifest(self.directory, self.manifest)

    def _attach(self, keys_memmap, vals_memmap, n: int, dim: int, content: dict | None) -> None:
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
        self._links_fd = None
        if content is None or content.get("links"):  # a build resumed from an older version records none
            self._links_fd = os.open(os.path.join(self.directory, LINKS), os.O_RDWR | os.O_CREAT, 0o644)
            # links past what the manifest records were written by a build killed before recording them
            os.ftruncate(self._links_fd, -(-(content or {}).get("hashed", 0) // HASH_BLOCK) * LINE_BYTES)

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
        lines = []
        for start in range(content["hashed"], end, HASH_BLOCK):
            stop = min(end, start + HASH_BLOCK)
            for name, fd, offset, row in files:
                content[name] = chain(content[name], os.pread(fd, (stop - start) * row, offset + start * row))
            content["hashed"] = stop
            lines.append(link_line(content["vals"], content["keys"]))
        if lines and self._links_fd is not None:  # durable before the manifest that counts them
            _pwrite_all(self._links_fd, b"".join(lines), os.fstat(self._links_fd).st_size)
            os.fdatasync(self._links_fd)

    def finish(self) -> dict:
        if self.written != self.n:
            raise DatastoreError(f"datastore {self.name}: {self.written} of {self.n} entries written")
        if self.progress != self.written or self.manifest.get("content", {}).get("hashed") != self.n:
            self.sync()
        self.manifest["status"] = "complete"
        write_manifest(self.directory, self.manifest)
        for fd in (self._keys_fd, self._vals_fd, self._links_fd):
            if fd is not None:
                os.close(fd)
        return self.manifest


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
        diff = identity_diff(old, header)
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


def finish_sharded(directory: str, **fields) -> dict:
    """Mark a sharded datastore complete once every shard is (process 0, after all shards finished),
    with ``fields`` (e.g. its index) in the same write."""
    top = read_manifest(directory)
    count = int(top["num_shards"])
    total = 0.0
    for p in range(count):
        m = read_manifest(os.path.join(directory, shard_name(p, count)))
        if m is None or m.get("status") != "complete":
            raise DatastoreError(f"datastore {os.path.basename(directory)}: shard {shard_name(p, count)} "
                                 "is not complete")
        total += float(m["lm_nll_sum"])
    top.update(status="complete", lm_nll_sum=total, **fields)
    write_manifest(directory, top)
    return top


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written
