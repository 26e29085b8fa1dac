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

import dataclasses
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
from knnlm_jax.retrieval.policies import Policy, retrieve_batch
from knnlm_jax.datastore.retriever import Retriever
from knnlm_jax.evaluation.token_files import FILES_FORMAT, META, TokenFiles, open_token_files
from knnlm_jax.data.windows import WindowSpec, token_stream, window_batch

@dataclasses.dataclass(frozen=True)
class Scorer:
    """The LM side of a pass: trained weights (``graphdef``, ``params``, ``cfg``), the key type its
    queries use, and the id that separates lines (the stream starts with it)."""

    trained: object
    key_type: str
    eos: int


@dataclasses.dataclass(frozen=True)
class CacheSpec:
    """The continuous cache (Grave et al. 2017): the last ``size`` scored positions, flatness ``thetas``."""

    thetas: tuple
    size: int


@dataclasses.dataclass(frozen=True)
class StreamSpec:
    """What one streaming pass computes and how.

    ``drop_self``: the scored text is the datastore's own (entry ``p`` is target ``p``), so a
    neighbour with the query's own id is dropped. ``policy``: which tokens search
    (:mod:`~knnlm_jax.retrieval.policies`). ``identity``: what the files answer (recorded for
    reuse). ``overlap=False`` waits for each batch's forward before searching it (a diagnostic
    of the pipeline's own cost).
    """

    windows: WindowSpec
    batch_size: int
    cache: CacheSpec | None = None
    drop_self: bool = False
    policy: Policy = Policy()
    identity: dict = dataclasses.field(default_factory=dict)
    progress: bool = True
    desc: str = "eval"
    overlap: bool = True

    @property
    def thetas(self) -> tuple:
        return tuple(float(t) for t in self.cache.thetas) if self.cache else ()


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


def evaluate_tokens(directory: str, scorer: Scorer, tokens_N: np.ndarray, spec: StreamSpec,
                    retriever: Retriever | None = None, *, capacities=None, on_queries=None) -> TokenFiles:
    """Score every target of ``tokens_N`` and write the per-token files to ``directory``.

    Without ``retriever`` only the LM log-probs (and the cache's) are computed: a base-LM
    evaluation. Files are written under ``directory.tmp`` and renamed when complete.
    ``capacities``: the adaptive softmax's per-band rows (default: what these windows need).
    ``on_queries(queries_QxD)`` sees each batch's query keys (a benchmark hook).
    """
    tmp = directory + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)

    def memmap(name, dtype, shape):
        path = os.path.join(tmp, name + ".npy")
        array = np.lib.format.open_memmap(path, "w+", dtype, shape)
        reserve(path)
        return array

    try:
        out = allocate(len(tokens_N), spec, retriever, head_width(scorer), memmap)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing half-allocated left behind
        raise
    meta = StreamingPass(scorer, tokens_N, spec, retriever, out, capacities, on_queries).run()
    for array in out.values():
        array.flush()
    out.clear()  # close the memmaps before the rename
    with open(os.path.join(tmp, META), "w") as f:
        json.dump(meta, f, indent=2)
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)
    files = open_token_files(directory)
    assert files is not None
    return files


def score_tokens(scorer: Scorer, tokens_N: np.ndarray, spec: StreamSpec, retriever: Retriever | None = None, *,
                 capacities=None) -> TokenFiles:
    """The same pass with the per-token quantities in memory (a text, not a split): nothing written."""
    out = allocate(len(tokens_N), spec, retriever, head_width(scorer), lambda name, dtype, shape: np.zeros(shape, dtype))
    meta = StreamingPass(scorer, tokens_N, spec, retriever, out, capacities, None).run()
    return TokenFiles("", meta, **out)


def head_width(scorer: Scorer) -> int:
    """Features the head softmax summarises per token (adaptive retrieval's, before the query key)."""
    return len(band_edges(scorer.trained.cfg.vocab_size, scorer.trained.cfg.cutoffs))


def allocate(n: int, spec: StreamSpec, retriever: Retriever | None, head: int, make) -> dict:
    """The per-token arrays of a pass over ``n`` targets, each from ``make(name, dtype, shape)``."""
    out = {"logp_lm": make("logp_lm", np.float32, (n,)), "targets": make("targets", np.int32, (n,))}
    if retriever is not None:
        k, store = retriever.k, retriever.store
        id_dtype = np.int32 if store.size < 2**31 else np.int64
        out.update(dists=make("dists", np.float32, (n, k)), ids=make("ids", id_dtype, (n, k)),
                   hit=make("hit", np.bool_, (n, k)), valid=make("valid", np.bool_, (n, k)))
        out["features"] = make("features", np.float32, (n, head + store.dim))  # head summary, query key
        if not spec.policy.full:
            out["retrieved"] = make("retrieved", np.bool_, (n,))
    if spec.thetas:
        out["cache"] = make("cache", np.float32, (n, len(spec.thetas)))
    return out


class StreamingPass:
    """One pass over a token array in windows, filling ``out`` (see :func:`allocate`); :meth:`run`."""

    def __init__(self, scorer: Scorer, tokens_N, spec: StreamSpec, retriever: Retriever | None, out: dict,
                 capacities, on_queries):
        self.scorer, self.tokens_N, self.spec, self.retriever, self.out = scorer, tokens_N, spec, retriever, out
        self.on_queries, self.n = on_queries, len(tokens_N)
        trained, window, batch = scorer.trained, spec.windows.length, spec.batch_size
        self.sharding = NamedSharding(check_batch_size(batch), P("data", None))
        self.windows_Wx3 = spec.windows.windows(self.n)
        edges = band_edges(trained.cfg.vocab_size, trained.cfg.cutoffs)
        # most targets in one batch; the softmax runs on the scored rows only: no band needs more
        self.rows = min(batch * window, window + (batch - 1) * (window - spec.windows.context))
        self.caps = tuple(min(c, self.rows) for c in
                          capacities or build_capacities(tokens_N, self.windows_Wx3, batch, edges, window))
        self.step = make_eval_step(trained.graphdef, scorer.key_type if retriever else None, bool(spec.thetas),
                                   self.rows)
        if spec.thetas:
            self.cache_step = make_cache_step(spec.thetas, int(spec.cache.size), self.rows)
            self.memory = empty_cache_memory(int(spec.cache.size), trained.cfg.d_model)
        self.stream = token_stream(tokens_N, scorer.eos)
        self.timings = dict(forward_wait=0.0, search=0.0, rerank=0.0, write=0.0)
        self.counts = dict(not_found=0, self_dropped=0, batches=0, searches=0)

    def run(self) -> dict:
        """Score every target; returns the pass's ``meta`` (what it answers, counts and timings)."""
        self.out["targets"][:] = self.tokens_N
        spec, batch = self.spec, self.spec.batch_size
        # pointers are followed step by step across a group's windows side by side: more windows, fewer steps
        group = max(1, POINTER_WINDOWS // batch) if self.retriever and spec.policy.min_pointers > 0 else 1
        self.bar = tqdm(total=self.n, disable=not spec.progress, unit="tok", unit_scale=True, dynamic_ncols=True,
                        desc=spec.desc)
        start = time.perf_counter()
        pending, offset = [], 0
        try:
            for i in range(0, len(self.windows_Wx3), batch):
                pending.append(self.dispatch(self.windows_Wx3[i : i + batch]))  # runs while a group is searched
                if len(pending) > group or (not spec.overlap and len(pending) == group):
                    offset = self.process(pending[:group], offset)
                    pending = pending[group:]
            while pending:
                offset = self.process(pending[:group], offset)
                pending = pending[group:]
        finally:
            self.bar.close()
        if offset != self.n:
            raise RuntimeError(f"scored {offset} targets of {self.n}")
        return self.meta(time.perf_counter() - start)

    def dispatch(self, batch_Wx3):
        """Start one batch's forward (asynchronous); ``(result, scored count, per-window spans)``."""
        w = self.spec.windows
        inputs, targets, mask = window_batch(self.stream, batch_Wx3, w.length, self.scorer.eos,
                                             rows=self.spec.batch_size)
        first = bool((batch_Wx3[:, 1] == 0).any())  # the split's first window scores all its positions
        if not first and mask[:, : w.context].any():
            raise RuntimeError("a later window scores a position before its context")
        placed = (jax.device_put(a, self.sharding) for a in (inputs, targets, mask))
        result = self.step(self.scorer.trained.params, *placed, self.caps)
        return result, int(mask.sum()), mask.sum(axis=1)

    def collect(self, group_pending: list, offset: int) -> dict:
        """Wait for a group's forwards: its log-probs, queries, features, cache log-probs and spans."""
        parts = dict(logp=[], queries=[], features=[], cache=[], spans=[])
        at = offset
        for result, count, spans_W in group_pending:
            parts["logp"].append(np.asarray(result["logp"])[:count])  # waits for this batch's forward
            parts["spans"].append(spans_W)
            if self.retriever is not None:
                parts["queries"].append(np.asarray(result["keys"])[:count])
                parts["features"].append(np.asarray(result["features"])[:count])
            if self.spec.thetas:  # the cache spans the stream: these positions see the previous size ones
                targets_R = np.zeros(self.rows, np.int32)
                targets_R[:count] = self.tokens_N[at : at + count]
                cache_RxH, self.memory = self.cache_step(self.memory, result["states"], targets_R, np.int32(at),
                                                         np.int32(count))
                parts["cache"].append(np.asarray(cache_RxH)[:count])
            at += count
        return {name: np.concatenate(arrays) if arrays else None for name, arrays in parts.items()}

    def process(self, group_pending: list, offset: int) -> int:
        """Write one group of dispatched batches (their windows retrieved together); the next offset."""
        t0 = time.perf_counter()
        parts = self.collect(group_pending, offset)
        count = len(parts["logp"])
        self.timings["forward_wait"] += time.perf_counter() - t0
        span = slice(offset, offset + count)
        self.out["logp_lm"][span] = parts["logp"]
        if parts["cache"] is not None:
            self.out["cache"][span] = parts["cache"]
        if self.retriever is not None:
            self.retrieve(span, parts)
        self.counts["batches"] += len(group_pending)
        self.bar.update(count)
        return offset + count

    def timed_search(self, queries_QxD):
        t = time.perf_counter()
        dists, ids = self.retriever.candidates(queries_QxD)
        self.timings["search"] += time.perf_counter() - t
        self.counts["not_found"] += int((ids < 0).sum())
        return dists, ids

    def retrieve(self, span: slice, parts: dict) -> None:
        """Neighbours of the group's scored tokens (under the pass's policy), written at ``span``."""
        t1, search_before = time.perf_counter(), self.timings["search"]
        retriever, policy, out = self.retriever, self.spec.policy, self.out
        queries, count = parts["queries"], span.stop - span.start
        if self.on_queries is not None:
            self.on_queries(queries)
        out["features"][span] = parts["features"]
        own_R = np.arange(span.start, span.stop) if self.spec.drop_self else None
        retrieved = None
        if policy.full:
            found = retriever.nearest(queries, own_R, candidates=self.timed_search)
            self.counts["self_dropped"] += found.self_dropped
            dists, ids, vals, valid, searched = found.dists_QxK, found.ids_QxK, found.vals_QxK, found.found_QxK, count
        else:
            store = retriever.store
            dists, ids, retrieved, searched_R = retrieve_batch(
                policy, queries, self.tokens_N[span], parts["spans"], search=self.timed_search, keys_NxD=store.keys,
                vals_N=store.vals, k=retriever.k, features_RxF=parts["features"], own_ids_R=own_R,
                exact=retriever.exact)
            vals, valid = retriever.values(ids)
            searched = int(searched_R.sum())
        self.counts["searches"] += searched
        t2 = time.perf_counter()
        self.timings["rerank"] += t2 - t1 - (self.timings["search"] - search_before)  # all but the searches
        out["dists"][span], out["ids"][span], out["valid"][span] = dists, ids, valid
        out["hit"][span] = valid & (vals == self.tokens_N[span, None])
        if retrieved is not None:
            out["retrieved"][span] = retrieved
        self.timings["write"] += time.perf_counter() - t2

    def meta(self, seconds: float) -> dict:
        spec, searching, counts = self.spec, self.retriever is not None, self.counts
        policy = spec.policy
        return dict(format=FILES_FORMAT, n=self.n, k=self.retriever.k if searching else 0, identity=spec.identity or {},
                    cache_thetas=list(spec.thetas), cache_size=int(spec.cache.size) if spec.thetas else None,
                    exact=bool(self.retriever.exact) if searching else None, drop_self=bool(spec.drop_self),
                    policy=policy.identity() if searching else None,
                    foss=1.0 - counts["searches"] / max(1, self.n) if searching else None,
                    windows=len(self.windows_Wx3), batch_size=spec.batch_size, seconds=seconds,
                    tokens_per_s=self.n / max(seconds, 1e-9), timings=self.timings,
                    **dict(counts, self_dropped=counts["self_dropped"] if policy.full else None))  # pointers: uncounted
