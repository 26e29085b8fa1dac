"""Stage 1 of an evaluation: the streaming pass that writes the per-token files.

One pass over a split in windows (the datastore's :func:`~knnlm_jax.data.windows.windows`:
every target scored exactly once, each with at least ``context`` prior tokens where the
text allows). One jitted forward per batch of windows gives each scored target's LM
log-prob, its query key (the datastore's key type) and, with the continuous cache, its
cache log-probs for a grid of θ; the softmax (and, without the cache, the last block's
feed-forward) runs only at scored positions. The forward of batch ``i+1`` is dispatched
before batch ``i`` is searched with FAISS on the host, so device and FAISS overlap. Exact
mode re-ranks FAISS's candidates by full-precision squared L2 against the stored float16
keys, in chunks on one thread per core. Which tokens search, and with which candidates,
is a :mod:`~knnlm_jax.retrieval.policies` policy (every token by default). Everything per token goes
to ``.npy`` memmaps (:mod:`~knnlm_jax.evaluation.token_files`): memory is bounded by a batch, not by
the split.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from knnlm_jax.core.distributed import check_batch_size
from knnlm_jax.models.adaptive import band_edges, build_capacities
from knnlm_jax.evaluation.cache import cache_target_log_prob
from knnlm_jax.models.transformer import forward_states
from knnlm_jax.retrieval.policies import Policy, exact_distances, nearest, retrieve_batch
from knnlm_jax.datastore.search import search as search_index
from knnlm_jax.evaluation.token_files import FILES_FORMAT, META, TokenFiles, open_token_files
from knnlm_jax.data.windows import token_stream, window_batch, windows

@functools.lru_cache(maxsize=8)
def make_eval_step(graphdef, key_type: str | None, states: bool, rows: int):
    """Jitted ``(params, inputs, targets, mask, capacities) -> dict`` of the ``rows`` first masked positions.

    ``logp`` (rows), ``keys`` (rows x D float32, when ``key_type``) with ``features`` (rows x F:
    the head softmax's summary and the key, what adaptive retrieval gates on), ``states`` (rows x D
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
            out["features"] = jnp.concatenate([model.head_features(hidden_RxD), out["keys"]], -1)
        if states:
            out["states"] = sown["final_output"].reshape(rows, -1).astype(jnp.float32)
        return out

    return jax.jit(step, static_argnums=4)


POINTER_WINDOWS = 64  # windows whose RetoMaton pointers are followed side by side (one search per step)
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


def reserve(path: str) -> None:
    """Allocate a (sparse) file's blocks now: a full disk is an ``OSError`` here, where writing
    through its memmap later would end the process with SIGBUS."""
    if not hasattr(os, "posix_fallocate"):
        return
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as err:
        if err.errno in (errno.EOPNOTSUPP, errno.EINVAL):  # a file system that cannot reserve: write as before
            return
        raise OSError(err.errno, f"{err.strerror}: the per-token files need more space", path) from None
    finally:
        os.close(fd)


def evaluate_tokens(directory: str, trained, tokens_N: np.ndarray, eos: int, *, key_type: str, window: int,
                    context: int, batch_size: int, index=None, store=None, k: int = 0, exact: bool = True,
                    nprobe: int | None = None, drop_self: bool = False, cache_thetas=(), cache_size: int = 0,
                    identity: dict | None = None, capacities=None, progress: bool = True, desc: str = "eval",
                    on_queries=None, overlap: bool = True, policy: Policy = Policy()) -> TokenFiles:
    """Score every target of ``tokens_N`` and write the per-token files to ``directory``.

    Without ``index`` only the LM log-probs (and the cache's) are computed: a base-LM
    evaluation. ``drop_self``: ``tokens_N`` is the datastore's own text (entry ``p`` is
    target ``p``), so a neighbour with the query's own id is dropped. Files are written
    under ``directory.tmp`` and renamed when complete. ``on_queries(queries_QxD)`` sees
    each batch's query keys (a benchmark hook). ``overlap=False`` waits for each batch's
    forward before searching it (no overlap: a diagnostic of the pipeline's own cost). ``policy``: which
    tokens search (:mod:`~knnlm_jax.retrieval.policies`; default every one).
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
        path = os.path.join(tmp, name + ".npy")
        array = np.lib.format.open_memmap(path, "w+", dtype, shape)
        reserve(path)
        return array

    try:
        out = {"logp_lm": memmap("logp_lm", np.float32, (n,)), "targets": memmap("targets", np.int32, (n,))}
        if searching:
            id_dtype = np.int32 if store.size < 2**31 else np.int64
            out.update(dists=memmap("dists", np.float32, (n, k)), ids=memmap("ids", id_dtype, (n, k)),
                       hit=memmap("hit", np.bool_, (n, k)), valid=memmap("valid", np.bool_, (n, k)))
            out["features"] = memmap("features", np.float32, (n, len(edges) + store.dim))  # head summary, query key
            if not policy.full:
                out["retrieved"] = memmap("retrieved", np.bool_, (n,))
        if thetas:
            out["cache"] = memmap("cache", np.float32, (n, len(thetas)))
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing half-allocated left behind
        raise
    out["targets"][:] = tokens_N
    timings = dict(forward_wait=0.0, search=0.0, rerank=0.0, write=0.0)
    counts = dict(not_found=0, self_dropped=0, batches=0, searches=0)

    def timed_search(queries_QxD):
        t = time.perf_counter()
        dists, ids = search_index(index, queries_QxD, k, nprobe)
        timings["search"] += time.perf_counter() - t
        counts["not_found"] += int((ids < 0).sum())
        return dists, ids

    def dispatch(batch_Wx3):
        inputs, targets, mask = window_batch(stream, batch_Wx3, window, eos, rows=batch_size)
        first = bool((batch_Wx3[:, 1] == 0).any())  # the split's first window scores all its positions
        if not first and mask[:, :context].any():
            raise RuntimeError("a later window scores a position before its context")
        result = step(trained.params, *(jax.device_put(a, sharding) for a in (inputs, targets, mask)), caps)
        return result, int(mask.sum()), mask.sum(axis=1)

    def process(group_pending: list, offset: int) -> int:
        """Write one group of dispatched batches (their windows retrieved together); the next offset."""
        t0 = time.perf_counter()
        logps, queries, features, caches, spans = [], [], [], [], []
        at = offset
        for result, count, spans_W in group_pending:
            logps.append(np.asarray(result["logp"])[:count])  # waits for this batch's forward
            spans.append(spans_W)
            if searching:
                queries.append(np.asarray(result["keys"])[:count])
                features.append(np.asarray(result["features"])[:count])
            if thetas:  # the cache spans the stream: this batch's positions see the previous cache_size ones
                targets_R = np.zeros(rows, np.int32)
                targets_R[:count] = tokens_N[at : at + count]
                cache_RxH, memory[0] = cache_step(memory[0], result["states"], targets_R, np.int32(at), np.int32(count))
                caches.append(np.asarray(cache_RxH)[:count])
            at += count
        count, spans_W = at - offset, np.concatenate(spans)
        logp = np.concatenate(logps)
        queries = np.concatenate(queries) if searching else None
        cache = np.concatenate(caches) if thetas else None
        t1 = time.perf_counter()
        timings["forward_wait"] += t1 - t0
        search_before = timings["search"]
        span = slice(offset, offset + count)
        out["logp_lm"][span] = logp
        if cache is not None:
            out["cache"][span] = cache
        if searching:
            if on_queries is not None:
                on_queries(queries)
            features = np.concatenate(features)
            out["features"][span] = features
            own_R = np.arange(offset, offset + count) if drop_self else None
            if policy.full:
                dists, ids = timed_search(queries)
                if own_R is not None:
                    own = ids == own_R[:, None]
                    counts["self_dropped"] += int(own.sum())
                    ids = np.where(own, -1, ids)
                if exact:
                    dists = exact_distances(store.keys, queries, ids)
                dists, ids = nearest(dists, ids, k)  # sorted by distance; -1 / inf where nothing was found
                retrieved, searched = None, count
            else:
                dists, ids, retrieved, searched_R = retrieve_batch(
                    policy, queries, tokens_N[span], spans_W, search=timed_search, keys_NxD=store.keys,
                    vals_N=store.vals, k=k, features_RxF=features, own_ids_R=own_R, exact=exact)
                searched = int(searched_R.sum())
            counts["searches"] += searched
            found = ids >= 0
            vals = np.asarray(store.vals[np.where(found, ids, 0).reshape(-1)]).reshape(ids.shape)
            t2 = time.perf_counter()
            timings["rerank"] += t2 - t1 - (timings["search"] - search_before)  # all but the searches
            out["dists"][span] = dists
            out["ids"][span] = ids
            out["valid"][span] = found
            out["hit"][span] = found & (vals == tokens_N[span, None])
            if retrieved is not None:
                out["retrieved"][span] = retrieved
            timings["write"] += time.perf_counter() - t2
        counts["batches"] += len(group_pending)
        bar.update(count)
        return offset + count

    # pointers are followed step by step across a group's windows side by side: more windows, fewer steps
    group = max(1, POINTER_WINDOWS // batch_size) if searching and policy.min_pointers > 0 else 1
    bar = tqdm(total=n, disable=not progress, unit="tok", unit_scale=True, dynamic_ncols=True, desc=desc)
    start = time.perf_counter()
    pending, offset = [], 0
    try:
        for i in range(0, len(windows_Wx3), batch_size):
            pending.append(dispatch(windows_Wx3[i : i + batch_size]))  # the next batch runs while a group is searched
            if len(pending) > group or (not overlap and len(pending) == group):
                offset = process(pending[:group], offset)
                pending = pending[group:]
        while pending:
            offset = process(pending[:group], offset)
            pending = pending[group:]
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
                drop_self=bool(drop_self), policy=policy.identity() if searching else None,
                foss=1.0 - counts["searches"] / max(1, n) if searching else None,
                windows=len(windows_Wx3), batch_size=batch_size, seconds=seconds,
                tokens_per_s=n / max(seconds, 1e-9), timings=timings,
                **dict(counts, self_dropped=counts["self_dropped"] if policy.full else None))  # pointers: uncounted
    with open(os.path.join(tmp, META), "w") as f:
        json.dump(meta, f, indent=2)
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)
    files = open_token_files(directory)
    assert files is not None
    return files
