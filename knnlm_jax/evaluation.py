"""Streaming kNN-LM evaluation (Khandelwal et al. 2020), tuning on valid, sweeps and examples.

Stage 1, :func:`evaluate_tokens`: one pass over a split in windows (the datastore's
:func:`~knnlm_jax.datastore.windows`: every target scored exactly once, each with at least
``context`` prior tokens where the text allows). One jitted forward per batch of windows
gives each scored target's LM log-prob, its query key (the datastore's key type) and, with
the continuous cache, its cache log-probs for a grid of θ; the softmax (and, without the
cache, the last block's feed-forward) runs only at scored positions. The forward of batch
``i+1`` is dispatched before batch ``i`` is searched with FAISS on the host, so device and
FAISS overlap. Exact mode re-ranks FAISS's candidates by full-precision squared L2 against
the stored float16 keys, in chunks on one thread per core. Everything per token goes to
``.npy`` memmaps (``logp_lm`` N, ``dists``/``ids``/``hit``/``valid`` N x K sorted by
distance, ``cache`` N x H): memory is bounded by a batch, not by the split.

Stage 2: pure-JAX mixing (:mod:`knnlm_jax.knn`) over those files in chunks, never a
tokens x vocabulary array. ``auto`` parameters (λ, T, the cache's λc and θ) are chosen
on valid from its saved files (no new searches per grid point), then applied to the
requested split. Perplexity is ``exp`` of the token-weighted mean NLL over exactly the
scored tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from knnlm_jax import index as faiss_index
from knnlm_jax.adaptive import band_edges
from knnlm_jax.building import build_capacities, check_batch_size
from knnlm_jax.cache import cache_target_log_prob
from knnlm_jax.datastore import token_stream, window_batch, windows
from knnlm_jax.eval_settings import (CACHE_THETAS, LAMBDAS, TEMPERATURES, EvaluationError, Settings,  # noqa: F401
                                     drop_self_for, eval_window_sizes, own_text, perplexity)
from knnlm_jax.knn import interpolate, knn_target_log_prob, neighbour_log_weights
from knnlm_jax.model import forward_states
from knnlm_jax.search import has_lists, search as search_index

FILES_FORMAT = 1
META = "meta.json"
RERANK_BYTES = 32 << 20  # stored (float16) keys gathered per exact re-ranking chunk (one chunk per thread)
MIX_ROWS = 8192  # tokens per mixing chunk (times K neighbours)


# ---------------------------------------------------------------------------------
# stage 1: the streaming pass


@functools.lru_cache(maxsize=8)
def make_eval_step(graphdef, key_type: str | None, states: bool, rows: int):
    """Jitted ``(params, inputs, targets, mask, capacities) -> dict`` of the ``rows`` first masked positions.

    ``logp`` (rows), ``keys`` (rows x D float32, when ``key_type``), ``states`` (rows x D
    float32, the softmax input: what the continuous cache remembers, when ``states``).
    Masked positions are taken in row-major order: the spans in stream order. The softmax
    and the last block's feed-forward run only at the scored positions; rows past the
    batch's count are padding (target ``</s>``'s band).
    """

    def step(params, inputs_BxL, targets_BxL, mask_BxL, capacities):
        model = nnx.merge(graphdef, params)
        (flat_R,) = jnp.nonzero(mask_BxL.reshape(-1), size=rows, fill_value=0)
        real_R = jnp.arange(rows) < mask_BxL.sum()
        targets_R = jnp.where(real_R, targets_BxL.reshape(-1)[flat_R], 0)  # padding: a head-band id, no tail work
        wanted = ((key_type,) if key_type else ()) + (("final_output",) if states else ())
        hidden, sown = forward_states(model, inputs_BxL, wanted, rows_R=flat_R)
        hidden_RxD = hidden.reshape(rows, -1)
        out = {"logp": model.target_log_probs(hidden_RxD[None], targets_R[None], capacities=capacities)[0]}
        if key_type:
            out["keys"] = sown[key_type].reshape(rows, -1).astype(jnp.float32)
        if states:
            out["states"] = sown["final_output"].reshape(rows, -1).astype(jnp.float32)
        return out

    return jax.jit(step, static_argnums=4)


FAR = -(1 << 30)  # the position of an empty cache slot: never within reach of a query (int32 positions)


@functools.lru_cache(maxsize=8)
def make_cache_step(thetas: tuple, size: int, rows: int):
    """Jitted continuous cache over the evaluated stream: ``(memory, states, targets, first, count) -> (cache, memory)``.

    ``memory`` holds the last ``size`` scored positions before this batch (states ``MxD``,
    the token that followed each, their stream positions; empty slots at ``FAR``). The
    batch's ``count`` scored positions (``first``, ``first + 1``, ...) see the previous
    ``size`` positions of the stream, in earlier windows and batches too; the returned
    memory ends at the batch's last scored position.
    """
    thetas_H = tuple(float(t) for t in thetas)

    def step(memory, states_RxD, targets_R, first, count):
        mem_h, mem_v, mem_p = memory
        pos_R = first + jnp.arange(rows, dtype=jnp.int32)
        real_R = jnp.arange(rows) < count
        all_h = jnp.concatenate([mem_h, states_RxD])
        all_v = jnp.concatenate([mem_v, targets_R])  # the state at p pairs with the token after it, p's target
        all_p = jnp.concatenate([mem_p, jnp.where(real_R, pos_R, FAR)])
        cache_RxH = cache_target_log_prob(states_RxD, pos_R, targets_R, all_h, all_v, all_p,
                                          jnp.asarray(thetas_H, jnp.float32), size)
        kept = tuple(jax.lax.dynamic_slice_in_dim(a, count, size) for a in (all_h, all_v, all_p))
        return cache_RxH, kept

    return jax.jit(step)


def empty_cache_memory(size: int, dim: int):
    return (jnp.zeros((size, dim), jnp.float32), jnp.zeros((size,), jnp.int32), jnp.full((size,), FAR, jnp.int32))


def rerank(keys_NxD, queries_QxD: np.ndarray, ids_QxK: np.ndarray, found_QxK: np.ndarray, rows: int,
           threads: int | None = None) -> np.ndarray:
    """Exact squared L2 (float32) of each query to its candidates' stored keys; ``inf`` where not found.

    Candidates are gathered from the (float16) key memmap ``rows`` queries at a time and
    compared on the host (NumPy), as ``sum((key - query)**2)`` (no cancellation). Chunks run
    on ``threads`` threads (default: one per CPU); NumPy and FAISS release the GIL.
    """
    q, k = ids_QxK.shape
    out = np.empty((q, k), np.float32)

    def chunk(c: int) -> None:
        ids = np.where(found_QxK[c : c + rows], ids_QxK[c : c + rows], 0)
        m = len(ids)
        diff_MxKxD = faiss_index.as_float32(keys_NxD[ids.reshape(-1)]).reshape(m, k, -1)
        diff_MxKxD -= np.asarray(queries_QxD[c : c + rows], np.float32)[:, None, :]
        out[c : c + m] = np.einsum("mkd,mkd->mk", diff_MxKxD, diff_MxKxD)

    starts = range(0, q, rows)
    with ThreadPoolExecutor(max(1, min(len(starts), threads or os.cpu_count() or 1))) as pool:
        list(pool.map(chunk, starts))  # list(): re-raises a chunk's exception
    return np.where(found_QxK, out, np.inf).astype(np.float32)


@dataclasses.dataclass
class TokenFiles:
    """The per-token quantities of one evaluated split (read-only memmaps)."""

    directory: str
    meta: dict
    logp_lm: np.ndarray  # N float32: log p_LM(target)
    targets: np.ndarray  # N int32
    dists: np.ndarray | None = None  # N x K float32 ascending; inf where invalid
    ids: np.ndarray | None = None  # N x K datastore ids; -1 where invalid (not found, or dropped self)
    hit: np.ndarray | None = None  # N x K bool: valid and the neighbour's value is the target
    valid: np.ndarray | None = None  # N x K bool
    cache: np.ndarray | None = None  # N x H float32: log p_cache(target) per θ of meta["cache_thetas"]

    @property
    def n(self) -> int:
        return len(self.logp_lm)

    @property
    def k(self) -> int:
        return 0 if self.dists is None else self.dists.shape[1]

    @property
    def thetas(self) -> tuple:
        return tuple(self.meta.get("cache_thetas") or ())


ARRAYS = ("logp_lm", "targets", "dists", "ids", "hit", "valid", "cache")
CACHE_FIELDS = ("cache_thetas", "cache_size")


def open_token_files(directory: str) -> TokenFiles | None:
    """The complete per-token files in ``directory``, or ``None`` (missing, unfinished or damaged)."""
    path = os.path.join(directory, META)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            meta = json.load(f)
        arrays = {}
        for name in ARRAYS:
            file = os.path.join(directory, name + ".npy")
            if os.path.isfile(file):
                arrays[name] = np.load(file, mmap_mode="r")
    except (OSError, ValueError):
        return None
    if meta.get("format") != FILES_FORMAT or "logp_lm" not in arrays or "targets" not in arrays:
        return None
    n = meta.get("n")
    if any(len(a) != n for a in arrays.values()):
        return None
    return TokenFiles(directory, meta, **arrays)


def files_match(files: TokenFiles | None, identity: dict) -> bool:
    """Whether saved files answer ``identity`` (cache fields only matter when a cache is asked for)."""
    if files is None:
        return False
    saved = files.meta.get("identity", {})
    strip = lambda d: {k: v for k, v in d.items() if k not in CACHE_FIELDS}  # noqa: E731
    if strip(saved) != strip(identity):
        return False
    if identity.get("cache_thetas"):
        return all(saved.get(k) == identity.get(k) for k in CACHE_FIELDS) and files.cache is not None
    return True


def evaluate_tokens(directory: str, trained, tokens_N: np.ndarray, eos: int, *, key_type: str, window: int,
                    context: int, batch_size: int, index=None, store=None, k: int = 0, exact: bool = True,
                    nprobe: int | None = None, drop_self: bool = False, cache_thetas=(), cache_size: int = 0,
                    identity: dict | None = None, capacities=None, progress: bool = True, desc: str = "eval",
                    on_queries=None, overlap: bool = True) -> TokenFiles:
    """Score every target of ``tokens_N`` and write the per-token files to ``directory``.

    Without ``index`` only the LM log-probs (and the cache's) are computed: a base-LM
    evaluation. ``drop_self``: ``tokens_N`` is the datastore's own text (entry ``p`` is
    target ``p``), so a neighbour with the query's own id is dropped. Files are written
    under ``directory.tmp`` and renamed when complete. ``on_queries(queries_QxD)`` sees
    each batch's query keys (a benchmark hook). ``overlap=False`` waits for each batch's
    forward before searching it (no overlap: a diagnostic of the pipeline's own cost).
    """
    n = len(tokens_N)
    searching = index is not None
    if searching and (store is None or k < 1):
        raise ValueError("a search needs the datastore and k >= 1")
    mesh = check_batch_size(batch_size)
    sharding = NamedSharding(mesh, P("data", None))
    windows_Wx3 = windows(n, window, context)
    edges = band_edges(trained.cfg.vocab_size, trained.cfg.cutoffs)
    rows = min(batch_size * window, window + (batch_size - 1) * (window - context))  # most targets in one batch
    # the softmax runs on the scored rows only: no band needs more than ``rows``
    caps = tuple(min(c, rows) for c in capacities or build_capacities(tokens_N, windows_Wx3, batch_size, edges, window))
    thetas = tuple(float(t) for t in cache_thetas)
    step = make_eval_step(trained.graphdef, key_type if searching else None, bool(thetas), rows)
    if thetas:
        cache_step = make_cache_step(thetas, int(cache_size), rows)
        memory = [empty_cache_memory(int(cache_size), trained.cfg.d_model)]
    stream = token_stream(tokens_N, eos)

    tmp = directory + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)

    def memmap(name, dtype, shape):
        return np.lib.format.open_memmap(os.path.join(tmp, name + ".npy"), "w+", dtype, shape)

    out = {"logp_lm": memmap("logp_lm", np.float32, (n,)), "targets": memmap("targets", np.int32, (n,))}
    out["targets"][:] = tokens_N
    if searching:
        id_dtype = np.int32 if store.size < 2**31 else np.int64
        out.update(dists=memmap("dists", np.float32, (n, k)), ids=memmap("ids", id_dtype, (n, k)),
                   hit=memmap("hit", np.bool_, (n, k)), valid=memmap("valid", np.bool_, (n, k)))
        rerank_rows = max(1, min(rows, RERANK_BYTES // (k * store.dim * 2)))
    if thetas:
        out["cache"] = memmap("cache", np.float32, (n, len(thetas)))
    timings = dict(forward_wait=0.0, search=0.0, rerank=0.0, write=0.0)
    counts = dict(not_found=0, self_dropped=0, batches=0)

    def dispatch(batch_Wx3):
        inputs, targets, mask = window_batch(stream, batch_Wx3, window, eos, rows=batch_size)
        first = bool((batch_Wx3[:, 1] == 0).any())  # the split's first window scores all its positions
        if not first and mask[:, :context].any():
            raise RuntimeError("a later window scores a position before its context")
        result = step(trained.params, *(jax.device_put(a, sharding) for a in (inputs, targets, mask)), caps)
        return result, int(mask.sum())

    def process(pending, offset: int) -> int:
        result, count = pending
        t0 = time.perf_counter()
        logp = np.asarray(result["logp"])[:count]  # waits for this batch's forward
        queries = np.asarray(result["keys"])[:count] if searching else None
        cache = None
        if thetas:  # the cache spans the stream: this batch's positions see the previous cache_size ones
            targets_R = np.zeros(rows, np.int32)
            targets_R[:count] = tokens_N[offset : offset + count]
            cache_RxH, memory[0] = cache_step(memory[0], result["states"], targets_R, np.int32(offset), np.int32(count))
            cache = np.asarray(cache_RxH)[:count]
        t1 = time.perf_counter()
        timings["forward_wait"] += t1 - t0
        span = slice(offset, offset + count)
        out["logp_lm"][span] = logp
        if cache is not None:
            out["cache"][span] = cache
        if searching:
            if on_queries is not None:
                on_queries(queries)
            dists, ids = search_index(index, queries, k, nprobe)
            t2 = time.perf_counter()
            timings["search"] += t2 - t1
            found = ids >= 0
            counts["not_found"] += int((~found).sum())
            if drop_self:
                own = ids == np.arange(offset, offset + count)[:, None]
                counts["self_dropped"] += int(own.sum())
                found &= ~own
            if exact:
                dists = rerank(store.keys, queries, ids, found, rerank_rows)
            dists = np.where(found, dists, np.inf).astype(np.float32)
            order = np.argsort(dists, axis=1, kind="stable")
            dists = np.take_along_axis(dists, order, axis=1)
            found = np.take_along_axis(found, order, axis=1)
            ids = np.where(found, np.take_along_axis(ids, order, axis=1), -1)
            vals = np.asarray(store.vals[np.where(found, ids, 0).reshape(-1)]).reshape(ids.shape)
            t3 = time.perf_counter()
            timings["rerank"] += t3 - t2
            out["dists"][span] = dists
            out["ids"][span] = ids
            out["valid"][span] = found
            out["hit"][span] = found & (vals == tokens_N[span, None])
            timings["write"] += time.perf_counter() - t3
        counts["batches"] += 1
        bar.update(count)
        return offset + count

    bar = tqdm(total=n, disable=not progress, unit="tok", unit_scale=True, dynamic_ncols=True, desc=desc)
    start = time.perf_counter()
    pending, offset = None, 0
    try:
        for i in range(0, len(windows_Wx3), batch_size):
            result = dispatch(windows_Wx3[i : i + batch_size])  # batch i+1 runs while batch i is searched
            if not overlap:
                offset = process(result, offset)
                continue
            if pending is not None:
                offset = process(pending, offset)
            pending = result
        if pending is not None:
            offset = process(pending, offset)
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    if offset != n:
        raise RuntimeError(f"scored {offset} targets of {n}")
    for array in out.values():
        array.flush()
    out.clear()  # close the memmaps before the rename
    meta = dict(format=FILES_FORMAT, n=n, k=k if searching else 0, identity=identity or {}, cache_thetas=list(thetas),
                cache_size=int(cache_size) if thetas else None, exact=bool(exact) if searching else None,
                drop_self=bool(drop_self),
                windows=len(windows_Wx3), batch_size=batch_size, seconds=seconds,
                tokens_per_s=n / max(seconds, 1e-9), timings=timings, **counts)
    with open(os.path.join(tmp, META), "w") as f:
        json.dump(meta, f, indent=2)
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)
    files = open_token_files(directory)
    assert files is not None
    return files


# ---------------------------------------------------------------------------------
# stage 2: mixing in chunks (pure JAX)


def _rows_for(n: int, rows: int) -> int:
    """Chunk rows: ``rows``, or the next power of two above ``n`` when smaller (few compiled shapes)."""
    return max(1, min(rows, 1 << max(0, n - 1).bit_length()))


def _chunks(n: int, rows: int):
    for c in range(0, n, rows):
        yield c, min(n, c + rows)


def _padded(array, rows: int, fill=0):
    array = np.asarray(array)
    if len(array) == rows:
        return array
    pad = np.full((rows - len(array), *array.shape[1:]), fill, array.dtype)
    return np.concatenate([array, pad])


@jax.jit
def _knn_chunk(dists_CxK, hit_CxK, valid_CxK, temps_G, ks_G):
    """``log p_kNN(target)`` for each (temperature, k) pair: ``G x C``; ``hit`` stands for ``vals == target``."""
    rank_K = jnp.arange(dists_CxK.shape[1])
    ones_C = jnp.ones(dists_CxK.shape[0], jnp.int32)

    def one(t, k):
        return knn_target_log_prob(dists_CxK, hit_CxK.astype(jnp.int32), valid_CxK & (rank_K < k), ones_C, t)

    return jax.vmap(one)(temps_G, ks_G)


def knn_log_probs(files: TokenFiles, temperatures, ks=None, rows: int = MIX_ROWS) -> np.ndarray:
    """``G x N`` log p_kNN(target) for pairs ``(temperatures[g], ks[g])`` (``ks`` default: all K).

    Only the ``k`` nearest (valid) neighbours count: the files are sorted by distance.
    """
    if files.dists is None:
        raise EvaluationError(f"{files.directory} holds no neighbours (a base-LM evaluation)")
    temps = np.asarray(temperatures, np.float32).reshape(-1)
    ks = np.full(len(temps), files.k, np.int32) if ks is None else np.asarray(ks, np.int32).reshape(-1)
    temps, ks = np.broadcast_arrays(temps, ks)
    out = np.empty((len(temps), files.n), np.float32)
    rows = _rows_for(files.n, rows)
    for a, b in _chunks(files.n, rows):
        res = _knn_chunk(_padded(files.dists[a:b], rows, np.inf), _padded(files.hit[a:b], rows),
                         _padded(files.valid[a:b], rows), jnp.asarray(temps), jnp.asarray(ks))
        out[:, a:b] = np.asarray(res)[:, : b - a]
    return out


@jax.jit
def _mix_chunk(base_C, others_GxC, lambdas_L, weight_C):
    """Summed NLL of ``interpolate(base, other_g, λ_l)`` over the weighted rows: ``G x L``."""

    def one(other_C):
        def at(lam):
            return -jnp.sum(jnp.where(weight_C, interpolate(base_C, other_C, lam), 0.0))

        return jax.vmap(at)(lambdas_L)

    return jax.vmap(one)(others_GxC)


def nll_table(base_N, others_GxN, lambdas, rows: int = MIX_ROWS) -> np.ndarray:
    """Mean NLL (``G x L``) of ``log((1 - λ) p_base + λ p_other)`` for every ``other`` row and λ."""
    base = np.asarray(base_N, np.float32)
    others = np.asarray(others_GxN, np.float32).reshape(-1, len(base))
    lambdas = jnp.asarray(np.asarray(lambdas, np.float32).reshape(-1))
    total = np.zeros((len(others), len(lambdas)), np.float64)
    rows = _rows_for(len(base), rows)
    for a, b in _chunks(len(base), rows):
        weight = _padded(np.ones(b - a, bool), rows)
        total += np.asarray(_mix_chunk(_padded(base[a:b], rows), _padded(others[:, a:b].T, rows).T, lambdas, weight))
    return total / max(1, len(base))


@jax.jit
def _interpolate(base, other, lam):
    return interpolate(base, other, lam)


def mix(base_N, other_N, lmbda: float, rows: int = MIX_ROWS) -> np.ndarray:
    """Per-token ``log((1 - λ) p_base + λ p_other)``; ``λ = 0`` returns ``base`` exactly."""
    base = np.asarray(base_N, np.float32)
    other = np.asarray(other_N, np.float32)
    out = np.empty(len(base), np.float32)
    rows = _rows_for(len(base), rows)
    for a, b in _chunks(len(base), rows):
        out[a:b] = np.asarray(_interpolate(_padded(base[a:b], rows), _padded(other[a:b], rows), lmbda))[: b - a]
    return out


def tune(base_N, others_GxN, lambdas, labels) -> dict:
    """The grid point (``labels[g]``, λ) of least mean NLL, with the whole table of perplexities."""
    table = nll_table(base_N, others_GxN, lambdas)
    g, l = np.unravel_index(int(np.argmin(np.where(np.isnan(table), np.inf, table))), table.shape)
    return dict(label=labels[g], lmbda=float(lambdas[l]), ppl=float(np.exp(table[g, l])),
                grid={"labels": list(labels), "lambdas": [float(x) for x in lambdas],
                      "ppl": np.exp(table).tolist()})


def tune_knn(files: TokenFiles, lambdas=LAMBDAS, temperatures=TEMPERATURES, k: int | None = None,
             refine: int = 3) -> dict:
    """λ and T of least perplexity on ``files`` (valid), over the grids (pass one value to fix one).

    With several temperatures (a geometric grid), the best is then refined on a grid
    ``2**(1/8)`` times finer around it (``refine`` points each side), reported as ``fine_grid``.
    """
    temperatures = tuple(float(t) for t in temperatures)
    best = tune(files.logp_lm, knn_log_probs(files, temperatures, k), tuple(lambdas), temperatures)
    result = dict(lmbda=best["lmbda"], temperature=best["label"], ppl=best["ppl"], grid=best["grid"])
    if len(temperatures) > 1 and refine > 0:
        fine = tuple(best["label"] * 2 ** (j / 8) for j in range(-refine, refine + 1) if j)
        better = tune(files.logp_lm, knn_log_probs(files, fine, k), tuple(lambdas), fine)
        result["fine_grid"] = better["grid"]
        if better["ppl"] < best["ppl"]:
            result.update(lmbda=better["lmbda"], temperature=better["label"], ppl=better["ppl"])
    return result


def tune_cache(base_N, cache_NxH, thetas, lambdas=LAMBDAS) -> dict:
    """λc and θ of least perplexity for ``(1 - λc) p_base + λc p_cache``."""
    best = tune(base_N, np.asarray(cache_NxH).T, tuple(lambdas), tuple(float(t) for t in thetas))
    return dict(lmbda=best["lmbda"], theta=best["label"], ppl=best["ppl"], grid=best["grid"])


# ---------------------------------------------------------------------------------
# sweeps, examples, plots


def k_values(k_max: int) -> list[int]:
    ks = [1 << i for i in range(k_max.bit_length()) if 1 << i <= k_max]
    return ks + ([k_max] if ks[-1] != k_max else [])


def sweep_k(files: TokenFiles, temperature: float, lmbda: float) -> dict:
    """Perplexity against the number of neighbours used (the paper's Figure 4), at fixed T and λ."""
    ks = k_values(files.k)
    knn = knn_log_probs(files, [temperature] * len(ks), ks)
    ppl = np.exp(nll_table(files.logp_lm, knn, [lmbda])[:, 0])
    knn_only = [perplexity(row) for row in knn]
    return dict(k=ks, ppl=ppl.tolist(), knn_only_ppl=knn_only, lmbda=lmbda, temperature=temperature,
                base_ppl=perplexity(files.logp_lm))


def sweep_lambda(files: TokenFiles, logp_knn_N, temperature: float, lambdas=None) -> dict:
    """Perplexity against λ (the paper's Figure 5), at fixed T and k."""
    lambdas = [round(0.05 * i, 2) for i in range(21)] if lambdas is None else list(lambdas)
    ppl = np.exp(nll_table(files.logp_lm, logp_knn_N[None], lambdas)[0])
    return dict(lmbda=lambdas, ppl=ppl.tolist(), temperature=temperature, k=files.k,
                base_ppl=perplexity(files.logp_lm))


def plot_sweep(path: str, x, y, base: float, *, xlabel: str, title: str, log2x: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 3.2), dpi=120)
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    finite = np.isfinite(y)  # e.g. lambda = 1 gives infinite perplexity where nothing was retrieved
    ax.plot(x[finite], y[finite], marker="o", markersize=3, label="kNN-LM")
    if not finite.all():
        ax.text(0.02, 0.02, f"{int((~finite).sum())} points with infinite perplexity not drawn",
                transform=ax.transAxes, fontsize=7)
    ax.axhline(base, color="gray", linestyle="--", linewidth=1, label="base LM")
    if log2x and finite.any():
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("perplexity")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path + ".tmp.png")
    plt.close(fig)
    os.replace(path + ".tmp.png", path)


def helped_most(files: TokenFiles, logp_knn_N, logp_mixed_N, tokens_N, vocab, vals_N, n: int, temperature: float,
                neighbours: int = 3, before: int = 12, after: int = 3, skip=()) -> list[dict]:
    """The ``n`` targets where kNN helped most (largest ``log p_mixed - log p_LM``), with their
    context and, for the top neighbours, the datastore text around each retrieved entry.
    Targets whose word is in ``skip`` (e.g. ``<unk>``) are not listed."""
    gain = np.asarray(logp_mixed_N, np.float64) - np.asarray(files.logp_lm, np.float64)
    skipped = [vocab.index[w] for w in skip if w in vocab.index]
    if skipped:
        gain = np.where(np.isin(np.asarray(tokens_N), skipped), -np.inf, gain)
    examples = []
    for p in np.argsort(-gain, kind="stable")[:n]:
        if not np.isfinite(gain[p]):
            break
        p = int(p)
        d, ids = np.asarray(files.dists[p], np.float32), np.asarray(files.ids[p])
        weights = np.exp(np.asarray(neighbour_log_weights(d[None], ids[None] >= 0, temperature))[0])
        found = []
        for j in np.flatnonzero(ids >= 0)[:neighbours]:
            i = int(ids[j])
            found.append(dict(id=i, distance=float(d[j]), weight=float(weights[j]), value=vocab.words[int(vals_N[i])],
                              hit=bool(files.hit[p, j]), before=vocab.decode(vals_N[max(0, i - before) : i]),
                              after=vocab.decode(vals_N[i + 1 : i + 1 + after])))
        examples.append(dict(position=p, context=vocab.decode(tokens_N[max(0, p - before) : p]),
                             target=vocab.words[int(tokens_N[p])], after=vocab.decode(tokens_N[p + 1 : p + 1 + after]),
                             gain=float(gain[p]),
                             p_lm=float(np.exp(files.logp_lm[p])), p_knn=float(np.exp(logp_knn_N[p])),
                             p_mixed=float(np.exp(logp_mixed_N[p])), neighbours=found))
    return examples


def format_examples(examples: list[dict]) -> str:
    """The paper's Figure 6 as text: each target in [brackets] with its context, then the datastore
    text around its nearest neighbours (their value in [brackets]; "hit" when it is the target)."""
    lines = []
    for e, ex in enumerate(examples, 1):
        lines.append(f"[{e}] position {ex['position']}: p_LM {ex['p_lm']:.3g}  p_kNN {ex['p_knn']:.3g}  "
                     f"mixed {ex['p_mixed']:.3g}  (+{ex['gain']:.2f} nats)")
        lines.append(f"    context: ... {ex['context']} [{ex['target']}] {ex['after']} ...")
        for j, nb in enumerate(ex["neighbours"], 1):
            lines.append(f"    neighbour {j} (entry {nb['id']}, d {nb['distance']:.3g}, weight {nb['weight']:.3f}, "
                         f"{'hit' if nb['hit'] else 'miss'}): ... {nb['before']} [{nb['value']}] {nb['after']} ...")
    return "\n".join(lines)


def json_safe(obj):
    """``obj`` with infinite or NaN floats as ``None`` (strict JSON has no Infinity)."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def format_table(results: dict) -> str:
    r = results
    head = (f"{r['split']} split of {r['corpus_name']}: {r['tokens']} tokens scored ({r['unit']}-level perplexity), "
            f"window {r['window']}, context >= {r['context']}")
    lines = [head]
    if r.get("knn"):
        s = r["knn"]
        lines.append(f"datastore {r['datastore']} ({r['datastore_entries']} entries, {r['index']}, "
                     f"{'exact' if s['exact'] else 'approximate'} L2), k={s['k']}, T={s['temperature']:.3g}, "
                     f"lambda={s['lmbda']:.2f} ({s['lmbda_source']})")
    width = max(len(row["name"]) for row in r["rows"]) + 2
    lines.append(f"{'':{width}}{'perplexity':>12}{'change':>10}")
    for row in r["rows"]:
        change = "" if row["name"] == "base LM" else f"{row['change_pct']:+.1f}%"
        lines.append(f"{row['name']:{width}}{row['ppl']:12.3f}{change:>10}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------
# stage 3: one evaluation end to end


def split_files(out_dir: str, split: str, data, tokens_N, *, settings: Settings, trained, key_type: str, store, index,
                eos: int, nprobe, requested: bool, capacities=None, progress=True, log=print) -> TokenFiles:
    """The per-token files of one split: reused when saved ones match, else computed."""
    m = store.manifest
    n_full = len(tokens_N)
    tokens = tokens_N[: settings.max_tokens] if settings.max_tokens else tokens_N
    drop = drop_self_for(settings, m, data, n_full, requested)
    identity = dict(model_fingerprint=trained.fingerprint, key_type=key_type, datastore=store.name,
                    datastore_created=m.get("created"), datastore_entries=store.size, index=m.get("index"),
                    corpus=data.corpus, split=data.split, corpus_sha256=data.sha256, targets=len(tokens),
                    window=settings.window, context=settings.context, k=settings.k, exact=settings.exact,
                    nprobe=nprobe, drop_self=drop,
                    cache_thetas=list(settings.cache_thetas) if settings.cache else None,
                    cache_size=settings.cache_size if settings.cache else None)
    directory = os.path.join(out_dir, f"tokens-{split}")
    saved = None if settings.recompute else open_token_files(directory)
    if files_match(saved, identity):
        log(f"{split}: reusing the per-token files in {directory}")
        return saved
    return evaluate_tokens(directory, trained, tokens, eos, key_type=key_type, window=settings.window,
                           context=settings.context, batch_size=settings.batch_size, index=index, store=store,
                           k=settings.k, exact=settings.exact, nprobe=nprobe, drop_self=drop,
                           cache_thetas=settings.cache_thetas if settings.cache else (),
                           cache_size=settings.cache_size, identity=identity, capacities=capacities,
                           progress=progress, desc=f"{split} {store.name}")


def clear_outputs(out_dir: str) -> None:
    """Remove an earlier run's results, sweeps and log-probs (not the reusable per-token files), so a
    run that fails never leaves them beside its own."""
    for name in os.listdir(out_dir):
        if name == "results.json" or name.startswith(("sweep_", "logprobs-")):
            os.remove(os.path.join(out_dir, name))


def union_capacities(trained, settings: Settings, token_arrays) -> tuple:
    """Adaptive-softmax capacities that fit every split evaluated in one run: one compiled shape."""
    edges = band_edges(trained.cfg.vocab_size, trained.cfg.cutoffs)
    caps = []
    for tokens in token_arrays:
        tokens = tokens[: settings.max_tokens] if settings.max_tokens else tokens
        w = windows(len(tokens), settings.window, settings.context)
        caps.append(build_capacities(tokens, w, settings.batch_size, edges, settings.window))
    return tuple(int(c) for c in np.max(caps, axis=0)) if caps and caps[0] else ()


def _rows(base: float, named: list[tuple[str, float]]) -> list[dict]:
    rows = [dict(name="base LM", ppl=base, change_pct=0.0)]
    for name, ppl in named:
        rows.append(dict(name=name, ppl=ppl, change_pct=100.0 * (ppl - base) / base))
    return rows


def run(out_dir: str, *, split: str, splits: dict, settings: Settings, trained, key_type: str, store, index, vocab,
        progress: bool = True, log=print) -> dict:
    """Evaluate ``split`` with the datastore; tune ``auto`` parameters on ``splits['valid']``.

    ``splits`` maps split names to ``(Split, tokens)``. Writes the per-token files, the
    per-token log-probs (``.npz``), the sweeps (JSON and PNG) into ``out_dir``; returns
    the results (the caller adds command, config and manifest and writes ``results.json``).
    """
    settings.check()
    os.makedirs(out_dir, exist_ok=True)
    clear_outputs(out_dir)
    m = store.manifest
    index_info = m.get("index") or {}
    nprobe = settings.nprobe or index_info.get("nprobe") or faiss_index.DEFAULT_NPROBE
    if not has_lists(index):
        nprobe = None  # no inverted lists: nothing to probe
    data, tokens = splits[split]
    evaluated = [split]
    if settings.tunes and split != "valid":
        if "valid" not in splits:
            raise EvaluationError("auto parameters are tuned on valid, but there is no valid split")
        if splits["valid"][0].sha256 == data.sha256:
            raise EvaluationError(f"the valid split is the same text as {split} (a single-file corpus?): "
                                  "give --lmbda, --temperature (and the cache's) as numbers instead of auto")
        evaluated = ["valid", split]
    caps = union_capacities(trained, settings, [splits[s][1] for s in evaluated])
    files = {s: split_files(out_dir, s, *splits[s], settings=settings, trained=trained, key_type=key_type,
                            store=store, index=index, eos=vocab.eos, nprobe=nprobe, requested=s == split,
                            capacities=caps, progress=progress, log=log)
             for s in evaluated}
    tuning = files["valid"] if settings.tunes else None

    # kNN-LM: λ and T
    knn = dict(k=settings.k, exact=settings.exact, nprobe=nprobe)
    valid_report = {}
    if tuning is not None and (settings.lmbda is None or settings.temperature is None):
        best = tune_knn(tuning, LAMBDAS if settings.lmbda is None else (settings.lmbda,),
                        TEMPERATURES if settings.temperature is None else (settings.temperature,))
        knn.update(lmbda=best["lmbda"], temperature=best["temperature"],
                   lmbda_source="tuned on valid" if settings.lmbda is None else "given",
                   temperature_source="tuned on valid" if settings.temperature is None else "given")
        valid_report["knn"] = dict(ppl=best["ppl"], grid=best["grid"], fine_grid=best.get("fine_grid"))
    else:
        knn.update(lmbda=settings.lmbda, temperature=settings.temperature, lmbda_source="given",
                   temperature_source="given")
    target = files[split]
    logp_knn = knn_log_probs(target, [knn["temperature"]])[0]
    logp_mixed = mix(target.logp_lm, logp_knn, knn["lmbda"])
    base = perplexity(target.logp_lm)
    named = [("+kNN-LM", perplexity(logp_mixed))]
    per_token = dict(targets=np.asarray(target.targets), lm=np.asarray(target.logp_lm), knn=logp_knn,
                     mixed=logp_mixed)

    # continuous cache: alone, and on top of the kNN-LM
    cache = None
    if settings.cache:
        thetas = tuple(settings.cache_thetas)
        lambdas = LAMBDAS if settings.cache_lambda is None else (settings.cache_lambda,)
        tune_here = tuning is not None and (settings.cache_lambda is None or len(thetas) > 1)
        valid_mixed = None
        if tune_here:
            valid_mixed = logp_mixed if tuning is target else mix(
                tuning.logp_lm, knn_log_probs(tuning, [knn["temperature"]])[0], knn["lmbda"])
        cache = {}
        for name, label, on_target, on_valid in (
                ("cache", "+cache", target.logp_lm, tuning.logp_lm if tune_here else None),
                ("knn_cache", "+kNN-LM+cache", logp_mixed, valid_mixed)):
            if tune_here:
                best = tune_cache(on_valid, tuning.cache, thetas, lambdas)
                chosen = dict(lmbda=best["lmbda"], theta=best["theta"],
                              lmbda_source="tuned on valid" if settings.cache_lambda is None else "given",
                              theta_source="tuned on valid" if len(thetas) > 1 else "given")
                valid_report[name] = dict(ppl=best["ppl"], grid=best["grid"])
            else:
                chosen = dict(lmbda=settings.cache_lambda, theta=thetas[0], lmbda_source="given",
                              theta_source="given")
            chosen["size"] = settings.cache_size
            cache[name] = chosen
            logp_cache = np.asarray(target.cache[:, thetas.index(chosen["theta"])])
            mixed = mix(on_target, logp_cache, chosen["lmbda"])
            per_token[name] = mixed
            per_token[f"{name}_p_cache"] = logp_cache
            named.append((label, perplexity(mixed)))

    rows = _rows(base, named)
    if tuning is not None:
        valid_report["base_ppl"] = perplexity(tuning.logp_lm)
        valid_report["tokens"] = tuning.n

    # sweeps on valid, as the paper's Figures 4 and 5 (never on test)
    on_valid = tuning if tuning is not None else (target if split == "valid" else None)
    sweeps = None
    if on_valid is None:
        log("sweeps are drawn on valid: none this time (evaluate --split valid, or leave a parameter auto)")
    else:
        valid_knn = logp_knn if on_valid is target else knn_log_probs(on_valid, [knn["temperature"]])[0]
        sweeps = dict(k=sweep_k(on_valid, knn["temperature"], knn["lmbda"]),
                      lmbda=sweep_lambda(on_valid, valid_knn, knn["temperature"]))
        for name, sweep, x, xlabel, log2x in (("k", sweeps["k"], "k", "k (number of neighbours)", True),
                                              ("lambda", sweeps["lmbda"], "lmbda", "interpolation parameter λ",
                                               False)):
            with open(os.path.join(out_dir, f"sweep_{name}.json.tmp"), "w") as f:
                json.dump(json_safe(dict(sweep, split="valid", datastore=store.name)), f, indent=2)
            os.replace(os.path.join(out_dir, f"sweep_{name}.json.tmp"), os.path.join(out_dir, f"sweep_{name}.json"))
            plot_sweep(os.path.join(out_dir, f"sweep_{name}.png"), sweep[x], sweep["ppl"], sweep["base_ppl"],
                       xlabel=xlabel, title=f"valid, datastore {store.name}", log2x=log2x)
    npz = os.path.join(out_dir, f"logprobs-{split}.npz")
    np.savez(npz + ".tmp.npz", **per_token)
    os.replace(npz + ".tmp.npz", npz)

    examples = []
    if settings.show:
        examples = helped_most(target, logp_knn, logp_mixed, np.asarray(target.targets), vocab, store.vals,
                               settings.show, knn["temperature"], skip=settings.show_skip)
    meta = target.meta
    return dict(
        split=split, corpus_name=data.corpus, datastore=store.name, datastore_entries=store.size,
        index=index_info.get("factory"), tokens=target.n, unit="word", window=settings.window,
        context=settings.context, rows=rows, knn=knn, cache=cache, tuned_on_valid=bool(settings.tunes),
        valid=valid_report or None, drop_self=meta.get("drop_self"),
        self_dropped=meta.get("self_dropped", 0), not_found=meta.get("not_found", 0),
        sweeps=sweeps, examples=examples,
        speed={s: dict(seconds=f.meta.get("seconds"), tokens_per_s=f.meta.get("tokens_per_s"),
                       timings=f.meta.get("timings")) for s, f in files.items()},
        files=dict(tokens={s: f.directory for s, f in files.items()}, logprobs=npz,
                   sweeps=[os.path.join(out_dir, f"sweep_{x}.{e}") for x in ("k", "lambda") for e in ("json", "png")]
                   if sweeps else []),
    )
