"""Building a datastore: one jitted forward per batch of windows, keys streamed to disk.

The forward of batch ``i+1`` is dispatched before batch ``i`` is copied to the host and
written, so device and disk overlap. Batches always have ``batch_size`` rows (the last is
padded with masked rows) and one set of adaptive-softmax capacities (the largest any batch
needs), so a build compiles once.
"""

from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from knnlm_jax import index as faiss_index
from knnlm_jax.adaptive import band_edges
from knnlm_jax.datastore import (INDEX, Datastore, DatastoreError, DatastoreWriter, ModelSignature, signature_fields,
                                 token_stream, update_manifest, window_batch, window_of, windows)
from knnlm_jax.model import forward_with_keys
from knnlm_jax.training import make_mesh

# stored keys are float16; a recomputed key must agree to within a few float16 steps
KEY_RTOL, KEY_ATOL = 4e-3, 4e-3


def window_sizes(config) -> tuple[int, int]:
    """``(window, context)`` from ``build_window`` (0: ``tokens_per_sample``) and ``build_context`` (-1: half)."""
    window = int(config.get("build_window", 0) or config.tokens_per_sample)
    context = int(config.get("build_context", -1))
    return window, (window // 2 if context < 0 else context)


@functools.lru_cache(maxsize=4)
def make_key_step(graphdef, key_type: str):
    """Jitted ``(params, inputs, targets, mask, capacities) -> (NLL sum over mask, float16 keys BxTxD)``.

    Cached, so that a build, its resume and its check in one process compile once.
    """

    def step(params, inputs_BxT, targets_BxT, mask_BxT, capacities):
        model = nnx.merge(graphdef, params)
        logp_BxT, keys_BxTxD = forward_with_keys(model, inputs_BxT, targets_BxT, key_type, capacities)
        return -jnp.sum(jnp.where(mask_BxT, logp_BxT, 0.0)), keys_BxTxD.astype(jnp.float16)

    return jax.jit(step, static_argnums=4)


def build_capacities(tokens_N: np.ndarray, windows_Wx3: np.ndarray, batch_size: int, edges, window: int):
    """Adaptive-softmax tail capacities that fit every batch of a build: one compiled shape.

    Batch ``k`` holds windows ``[kB, (k+1)B)``, whose spans are one contiguous run of
    entries, so a band's count per batch is a segment sum. Rounded up as
    :func:`knnlm_jax.adaptive.band_capacities` rounds (multiples of ``positions // 16``).
    """
    starts = windows_Wx3[::batch_size, 1]
    positions = batch_size * window
    granularity = max(8, positions // 16)
    caps = []
    for lo, hi in zip(edges[1:-1], edges[2:]):
        count = int(np.add.reduceat((tokens_N >= lo) & (tokens_N < hi), starts, dtype=np.int64).max())
        caps.append(min(positions, -(-count // granularity) * granularity))
    return tuple(caps)


def check_batch_size(batch_size: int) -> jax.sharding.Mesh:
    """The data mesh; the batch must split evenly over its devices."""
    mesh = make_mesh()
    if batch_size < 1 or batch_size % mesh.devices.size:
        raise ValueError(f"batch size {batch_size} is not a positive multiple of the {mesh.devices.size} devices")
    return mesh


class KeyComputer:
    """Runs batches of windows of one token stream through the model."""

    def __init__(self, trained, key_type: str, tokens_N: np.ndarray, eos: int, window: int, batch_size: int):
        mesh = check_batch_size(batch_size)
        self.params = trained.params
        self.step = make_key_step(trained.graphdef, key_type)
        self.edges = band_edges(trained.cfg.vocab_size, trained.cfg.cutoffs)
        self.sharding = NamedSharding(mesh, P("data", None))
        self.stream, self.eos, self.window, self.batch_size = token_stream(tokens_N, eos), eos, window, batch_size

    def dispatch(self, windows_Wx3: np.ndarray, capacities=None):
        """Start the forward of up to ``batch_size`` windows: ``(nll, keys on device, targets, mask)``.

        Without ``capacities`` only keys are wanted: targets become ``</s>`` (no tail band
        is computed) and the NLL is meaningless.
        """
        inputs, targets, mask = window_batch(self.stream, windows_Wx3, self.window, self.eos, rows=self.batch_size)
        scored = targets if capacities is not None else np.full_like(targets, self.eos)
        caps = capacities if capacities is not None else (0,) * (len(self.edges) - 2)
        nll, keys = self.step(self.params, *(jax.device_put(a, self.sharding) for a in (inputs, scored, mask)), caps)
        return nll, keys, targets, mask


def build_datastore(directory: str, trained, signature: ModelSignature, tokens_N: np.ndarray, eos: int, *,
                    corpus: str, corpus_sha256: str, split: str, window: int, context: int, batch_size: int,
                    overwrite: bool = False, progress: bool = True, on_chunk=None, log=print) -> dict:
    """Write (or resume) the datastore of ``tokens_N`` in ``directory``; returns the final manifest.

    ``on_chunk(progress)`` is called after each chunk is committed (a test hook).
    """
    n = len(tokens_N)
    check_batch_size(batch_size)  # before anything is written
    header = dict(signature_fields(signature), corpus=corpus, corpus_sha256=corpus_sha256, split=split,
                  num_entries=n, window=window, context=context, batch_size=batch_size,
                  checkpoint=trained.source)
    writer = DatastoreWriter(directory, header, overwrite=overwrite)
    batch_size = int(writer.manifest["batch_size"])  # a resumed build keeps its batch composition
    if writer.progress:
        log(f"resuming datastore {writer.name} at entry {writer.progress} of {n}")
    windows_Wx3 = windows(n, window, context)
    first = int(np.searchsorted(windows_Wx3[:, 1], writer.progress))
    if writer.progress < n and windows_Wx3[first, 1] != writer.progress:
        raise DatastoreError(f"datastore {writer.name}: progress {writer.progress} is not a window boundary")
    computer = KeyComputer(trained, signature.key_type, tokens_N, eos, window, batch_size)
    capacities = build_capacities(tokens_N, windows_Wx3, batch_size, computer.edges, window)
    bar = tqdm(total=n, initial=writer.progress, disable=not progress, unit="tok", unit_scale=True,
               dynamic_ncols=True, desc=f"datastore {writer.name}")

    def commit(result):
        nll, keys, targets, mask = result
        keys_nxD = np.asarray(keys)[mask]
        writer.append(keys_nxD, targets[mask], float(nll))
        bar.update(len(keys_nxD))
        if on_chunk is not None:
            on_chunk(writer.progress)

    pending = None
    try:
        for i in range(first, len(windows_Wx3), batch_size):
            result = computer.dispatch(windows_Wx3[i : i + batch_size], capacities)
            if pending is not None:
                commit(pending)
            pending = result
        if pending is not None:
            commit(pending)
    finally:
        bar.close()
    return writer.finish()


def index_datastore(store: Datastore, factory: str | None = None, nprobe: int = faiss_index.DEFAULT_NPROBE,
                    progress: bool = True) -> dict:
    """Build, write and record the FAISS index of a complete datastore; returns the index info."""
    index, info = faiss_index.build_index(store.keys, factory, nprobe=nprobe, progress=progress)
    update_manifest(store.directory, index=None)  # no stale record if killed while writing
    faiss_index.write_index(index, os.path.join(store.directory, INDEX))
    store.manifest = update_manifest(store.directory, index=info)
    return info


def perplexity(manifest: dict) -> float:
    """The LM's perplexity over the datastore's entries (each with its build context)."""
    return math.exp(manifest["lm_nll_sum"] / max(1, manifest["num_entries"]))


def check_datastore(store: Datastore, trained, tokens_N: np.ndarray, eos: int, *, sample: int = 64,
                    seed: int = 0) -> dict:
    """Recompute a random sample of entries (plus the first and last) and compare with the stored ones.

    Values must equal the corpus tokens exactly (all of them are compared); keys must agree
    to float16 tolerance. Raises :class:`DatastoreError` on the first disagreement.
    """
    m = store.manifest
    n = store.size
    if len(tokens_N) != n:
        raise DatastoreError(f"datastore {store.name} has {n} entries but its corpus now has {len(tokens_N)} tokens")
    for i in range(0, n, 1 << 22):
        bad = np.flatnonzero(np.asarray(store.vals[i : i + (1 << 22)]) != tokens_N[i : i + (1 << 22)])
        if len(bad):
            raise DatastoreError(f"datastore {store.name}: value of entry {i + bad[0]} is not the corpus token")
    rng = np.random.default_rng(seed)
    entries = np.unique(np.concatenate([[0, n - 1], rng.choice(n, size=min(n, sample), replace=False)]))
    windows_Wx3 = windows(n, m["window"], m["context"])
    owner = window_of(windows_Wx3, entries)
    used = np.unique(owner)
    batch_size = int(m["batch_size"])
    computer = KeyComputer(trained, m["key_type"], tokens_N, eos, m["window"], batch_size)
    worst = 0.0
    for b in range(0, len(used), batch_size):
        batch = used[b : b + batch_size]
        _, keys, _, _ = computer.dispatch(windows_Wx3[batch])
        keys = np.asarray(keys).astype(np.float32)
        for e in entries[np.isin(owner, batch)]:
            row = int(np.searchsorted(batch, window_of(windows_Wx3, e)))
            fresh = keys[row, e - windows_Wx3[batch[row], 0]]
            stored = np.asarray(store.keys[e], np.float32)
            if not np.allclose(stored, fresh, rtol=KEY_RTOL, atol=KEY_ATOL):
                raise DatastoreError(f"datastore {store.name}: key of entry {e} differs from the recomputed one "
                                     f"(max difference {np.abs(stored - fresh).max():.3g})")
            worst = max(worst, float(np.abs(stored - fresh).max()))
    return dict(entries_checked=len(entries), values_checked=n, max_key_difference=worst)
