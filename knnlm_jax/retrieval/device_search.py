"""Exact nearest-neighbour search on the accelerators (JAX), a drop-in for ``faiss.IndexFlatL2``.

Squared L2 distances come from a blocked matmul, ``|q - c|^2 - 2 (q - c)·(k - c) + |k - c|^2``,
always in float32 (keys may be stored as float16/bfloat16; each block is cast up before
the matmul, which runs at ``Precision.HIGHEST`` so GPUs do not fall back to TF32). ``c``
is an optional centre (the searcher uses the keys' mean): distances do not change under
a shift, but the expansion loses far less to cancellation when keys share a large offset.
Tiny negative results of the expansion are clamped to 0.

:func:`topk_l2_blocked` scans the keys block by block (``lax.scan``), so memory is
``O(Q x block)``, never ``O(Q x N)``: per block, ``lax.top_k`` of the negated distances
keeps ``min(k, block)`` candidates, which are merged with the running top-k by one more
``top_k`` of the concatenation. ``top_k`` puts the lower index first among equal values
and the running list (lower ids) comes first in the concatenation, so rows are sorted by
(distance, id): ties go to the lower id. Padded rows (``id >= n_valid``) get distance
``+inf`` and id -1, so they are never returned; with ``k`` above the number of keys the
extra slots are id -1, distance ``+inf``.

:class:`DeviceSearcher` shards the keys along N over the local devices (a one-axis
``keys`` mesh), loads them from a (memory-mapped) array chunk by chunk so host memory
stays bounded, and computes the centre (the keys' mean, summed on the host in float64,
so it does not depend on the device count) and the key norms once. ``search`` runs under
``jax.shard_map``: every device finds its shard's top-k (local ids), the lists are
all-gathered and merged with one ``top_k`` (device order = id order, so the tie rule
holds globally), and global int64 ids are formed on the host (so more than 2^31 keys
work without x64). Missing neighbours come back as FAISS returns them: id -1, distance
float32 max. Queries are padded to power-of-two buckets to bound recompilation.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from knnlm_jax.core.errors import InputError

AXIS = "keys"
MISSING = np.finfo(np.float32).max  # FAISS's distance for a missing (-1) neighbour
HIGHEST = lax.Precision.HIGHEST
MIN_BUCKET = 8


def _positive(dists):
    """Clamp to ``>= 0``; yields ``+0.0`` (never ``-0.0``) so ``top_k`` sees equal zeros as equal."""
    return jnp.where(dists > 0, dists, 0.0)


def squared_norms(keys_NxD, center_D=None):
    """``|k - c|^2`` per row, in float32."""
    x = keys_NxD.astype(jnp.float32)
    if center_D is not None:
        x = x - center_D
    return jnp.sum(x * x, axis=-1)


def block_l2(queries_QxD, qnorms_Q, keys_BxD, knorms_B, center_D=None, precision=HIGHEST):
    """Squared L2 distances ``Q x B`` by the expansion, float32; queries already centred."""
    x = keys_BxD.astype(jnp.float32)
    if center_D is not None:
        x = x - center_D
    dots_QxB = lax.dot_general(queries_QxD, x, (((1,), (1,)), ((), ())), precision=precision,
                               preferred_element_type=jnp.float32)
    return _positive(qnorms_Q[:, None] - 2.0 * dots_QxB + knorms_B[None, :])


def merge_topk(dists_QxM, ids_QxM, k: int):
    """The ``k`` smallest of each row (ascending; equal distances keep their column order).

    Returns ``(dists_QxK, ids_QxK, columns_QxK)``.
    """
    neg_QxK, cols_QxK = lax.top_k(-dists_QxM, k)
    return -neg_QxK, jnp.take_along_axis(ids_QxM, cols_QxK, axis=1), cols_QxK


def _block_topk(dists_QxB, ids_B, k: int, approx: bool):
    if approx:
        neg_QxK, cols_QxK = lax.approx_max_k(-dists_QxB, k)
    else:
        neg_QxK, cols_QxK = lax.top_k(-dists_QxB, k)
    return -neg_QxK, ids_B[cols_QxK]


def topk_l2_blocked(queries_QxD, keys_NxD, k: int, block: int, *, key_norms_N=None, center_D=None,
                    n_valid=None, approx: bool = False, precision=HIGHEST):
    """Exact top-k by squared L2: ``(dists_QxK float32, ids_QxK int32)``, ascending, ties to the lower id.

    Jittable with ``k``, ``block``, ``approx`` and ``precision`` static. ``keys_NxD`` is
    padded to a multiple of ``block`` if needed; rows at or past ``n_valid`` (default N,
    may be traced) are never returned. ``key_norms_N`` (optional) must be
    :func:`squared_norms` of the keys with the same ``center_D``. Slots beyond the valid
    keys are id -1, distance ``+inf``. ``approx`` uses ``lax.approx_max_k`` per block
    (only faster on TPU; ties then follow no rule).
    """
    n, dim = keys_NxD.shape
    n_valid = n if n_valid is None else n_valid
    if key_norms_N is None:
        key_norms_N = squared_norms(keys_NxD, center_D)
    pad = -n % block
    if pad:
        keys_NxD = jnp.pad(keys_NxD, ((0, pad), (0, 0)))
        key_norms_N = jnp.pad(key_norms_N, (0, pad))
    blocks = (n + pad) // block
    keys_XxBxD = keys_NxD.reshape(blocks, block, dim)
    norms_XxB = key_norms_N.reshape(blocks, block)
    starts_X = jnp.arange(blocks, dtype=jnp.int32) * block

    q_QxD = queries_QxD.astype(jnp.float32)
    if center_D is not None:
        q_QxD = q_QxD - center_D
    qnorms_Q = jnp.sum(q_QxD * q_QxD, axis=-1)
    q = q_QxD.shape[0]
    kb = min(k, block)

    def candidates(keys_BxD, norms_B, start):
        ids_B = start + jnp.arange(block, dtype=jnp.int32)
        valid_B = ids_B < n_valid
        dists_QxB = jnp.where(valid_B[None, :], block_l2(q_QxD, qnorms_Q, keys_BxD, norms_B, center_D, precision),
                              jnp.inf)
        return _block_topk(dists_QxB, jnp.where(valid_B, ids_B, -1), kb, approx)

    def step(best, xs):
        dists_QxKb, ids_QxKb = candidates(*xs)
        dists_QxK, ids_QxK, _ = merge_topk(jnp.concatenate([best[0], dists_QxKb], 1),
                                           jnp.concatenate([best[1], ids_QxKb], 1), k)
        return (dists_QxK, ids_QxK), None

    # the running top-k starts as block 0's (not a constant: under shard_map it must vary like the keys)
    dists_QxKb, ids_QxKb = candidates(keys_XxBxD[0], norms_XxB[0], starts_X[0])
    init = (jnp.concatenate([dists_QxKb, jnp.full((q, k - kb), jnp.inf, jnp.float32)], 1),
            jnp.concatenate([ids_QxKb, jnp.full((q, k - kb), -1, jnp.int32)], 1))
    (dists_QxK, ids_QxK), _ = lax.scan(step, init, (keys_XxBxD[1:], norms_XxB[1:], starts_X[1:]))
    return dists_QxK, ids_QxK


# ---------------------------------------------------------------------------------
# sharded searcher


def query_bucket(b: int) -> int:
    """Rows a batch of ``b`` queries is padded to: the next power of two, at least 8."""
    return max(MIN_BUCKET, 1 << max(0, b - 1).bit_length())


def shard_rows(n: int, devices: int, block: int) -> tuple[int, int]:
    """``(rows per device, block)``: rows a multiple of the block; the block shrunk for tiny N."""
    block = max(1, min(block, -(-max(n, 1) // devices)))
    return -(-max(n, 1) // (devices * block)) * block, block


@functools.partial(jax.jit, donate_argnums=0)
def _put_rows(buffer_SxD, rows_CxD, start):
    return lax.dynamic_update_slice(buffer_SxD, rows_CxD, (start, 0))


def _load_shard(keys_NxD, lo: int, hi: int, rows: int, dtype, device, chunk_rows: int, sum_D: np.ndarray):
    """Rows ``[lo, hi)`` of ``keys_NxD`` on ``device``, zero-padded to ``rows``, written chunk by chunk.

    Adds the rows (as stored, in float64) to ``sum_D``. Every chunk has the same shape
    (one compilation): a short last chunk is widened backwards, rewriting rows already
    written with the same values.
    """
    buffer_SxD = jnp.zeros((rows, keys_NxD.shape[1]), dtype, device=device)
    size = min(chunk_rows, hi - lo)
    for start in range(lo, hi, chunk_rows):
        at = min(start, hi - size)
        chunk = np.asarray(keys_NxD[at:at + size]).astype(dtype, copy=False)
        sum_D += np.sum(chunk[start - at:], axis=0, dtype=np.float64)
        buffer_SxD = _put_rows(buffer_SxD, jax.device_put(chunk, device), np.int32(at - lo))
    return buffer_SxD


def _norms_shard(keys_SxD, center_D, *, block: int):
    """Per device: ``|k - c|^2`` of its rows, a block at a time (no float32 copy of the shard)."""
    s, dim = keys_SxD.shape
    return lax.map(lambda x: squared_norms(x, center_D), keys_SxD.reshape(s // block, block, dim)).reshape(s)


def _search_shard(queries_QxD, keys_SxD, norms_S, center_D, valid_1, *, k, block, approx, precision):
    """Per device: its top-k (local ids), all-gathered and merged; returns the device of each winner too.

    Every device ends with the same merged lists; each returns its copy under a leading
    axis of 1 (``all_gather``'s result counts as varying, so ``P()`` outputs are refused).
    """
    dists_QxK, ids_QxK = topk_l2_blocked(queries_QxD, keys_SxD, k, block, key_norms_N=norms_S, center_D=center_D,
                                         n_valid=valid_1[0], approx=approx, precision=precision)
    all_dists = lax.all_gather(dists_QxK, AXIS, axis=1, tiled=True)  # Q x (devices * k), device order
    all_ids = lax.all_gather(ids_QxK, AXIS, axis=1, tiled=True)
    dists_QxK, ids_QxK, cols_QxK = merge_topk(all_dists, all_ids, k)
    return dists_QxK[None], ids_QxK[None], (cols_QxK // k)[None]


@functools.lru_cache(maxsize=None)
def _norms_fn(mesh: Mesh, block: int):
    """Jitted ``(keys, center_D) -> norms_N`` on ``mesh`` (shared by searchers alike)."""
    body = functools.partial(_norms_shard, block=block)
    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(AXIS, None), P()), out_specs=P(AXIS)))


@functools.lru_cache(maxsize=None)
def _search_fn(mesh: Mesh, k: int, block: int, approx: bool, precision):
    """Jitted sharded search ``(queries, keys, norms, center, valid) -> (dists, local ids, devices)``."""
    body = functools.partial(_search_shard, k=k, block=block, approx=approx, precision=precision)
    specs = (P(), P(AXIS, None), P(AXIS), P(), P(AXIS))
    per_device = jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=(P(AXIS),) * 3)
    return jax.jit(lambda *args: tuple(x[0] for x in per_device(*args)))  # device 0's copy


class DeviceSearcher:
    """Exact L2 search over keys sharded across the local devices; ``search(queries, k)`` as FAISS.

    ``keys_NxD`` may be a NumPy memmap (read ``chunk_rows`` rows at a time). ``center``
    subtracts the keys' mean before the distance expansion (exact distances unchanged,
    less cancellation). ``max_queries`` bounds one device call's queries (memory is
    ``O(max_queries x block)`` per device). A searcher
    (:class:`~knnlm_jax.retrieval.searcher.Searcher`): exact, so no lists to probe.
    """

    kind, lists = "device", 0

    def __init__(self, keys_NxD, *, devices=None, block: int = 4096, dtype=jnp.float16, chunk_rows: int | None = None,
                 center: bool = True, approx: bool = False, precision=HIGHEST, max_queries: int = 1024):
        self.ntotal, self.d = (int(x) for x in keys_NxD.shape)
        devices = list(devices if devices is not None else jax.local_devices())
        self.mesh = Mesh(np.asarray(devices), (AXIS,))
        self.rows, self.block = shard_rows(self.ntotal, len(devices), block)
        if self.rows >= 2 ** 31:
            raise InputError(f"{self.rows} keys per device: more than int32 ids can number; use more devices")
        self.approx, self.precision, self.max_queries = approx, precision, query_bucket(max_queries)
        dtype = np.dtype(dtype)
        chunk_rows = chunk_rows or max(1, (64 << 20) // max(1, self.d * dtype.itemsize))
        sum_D = np.zeros(self.d, np.float64)
        shards = [_load_shard(keys_NxD, min(p * self.rows, self.ntotal), min((p + 1) * self.rows, self.ntotal),
                              self.rows, dtype, device, chunk_rows, sum_D) for p, device in enumerate(devices)]
        self.keys = jax.make_array_from_single_device_arrays((self.rows * len(devices), self.d),
                                                             NamedSharding(self.mesh, P(AXIS, None)), shards)
        valid = np.clip(self.ntotal - np.arange(len(devices)) * self.rows, 0, self.rows).astype(np.int32)
        self.valid = jax.device_put(valid, NamedSharding(self.mesh, P(AXIS)))
        center_D = (sum_D / max(self.ntotal, 1) if center else sum_D * 0).astype(np.float32)  # same for any devices
        self.center = jax.device_put(center_D, NamedSharding(self.mesh, P()))
        self.norms = _norms_fn(self.mesh, self.block)(self.keys, self.center)

    def _search_padded(self, queries_QxD, k: int):
        fn = _search_fn(self.mesh, k, self.block, self.approx, self.precision)
        q = jax.device_put(queries_QxD, NamedSharding(self.mesh, P()))
        return fn(q, self.keys, self.norms, self.center, self.valid)

    def search(self, queries_BxD, k: int, nprobe: int | None = None):
        """``(dists BxK float32, ids BxK int64)``: ascending squared L2, ties to the lower id; -1 if missing.
        ``nprobe``: ignored (exact search)."""
        queries_BxD = np.asarray(queries_BxD, np.float32).reshape(-1, self.d)
        b, k = len(queries_BxD), int(k)
        dists_BxK = np.empty((b, k), np.float32)
        ids_BxK = np.empty((b, k), np.int64)
        for lo in range(0, b, self.max_queries):
            part = queries_BxD[lo:lo + self.max_queries]
            padded = np.zeros((query_bucket(len(part)), self.d), np.float32)
            padded[: len(part)] = part
            d, i, dev = (np.asarray(x)[: len(part)] for x in self._search_padded(padded, k))
            found = i >= 0
            dists_BxK[lo:lo + len(part)] = np.where(found, d, MISSING)
            ids_BxK[lo:lo + len(part)] = np.where(found, dev.astype(np.int64) * self.rows + i, -1)
        return dists_BxK, ids_BxK

    def __repr__(self) -> str:
        return (f"DeviceSearcher(ntotal={self.ntotal}, d={self.d}, devices={self.mesh.devices.size}, "
                f"block={self.block}, dtype={self.keys.dtype})")
