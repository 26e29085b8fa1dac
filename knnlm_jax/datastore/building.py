"""Building a datastore: one jitted forward per batch of windows, keys streamed to disk.

The forward of batch ``i+1`` is dispatched before batch ``i`` is copied to the host and
written, so device and disk overlap. Batches always have ``batch_size`` rows (the last is
padded with masked rows) and one set of adaptive-softmax capacities (the largest any batch
needs), so a build compiles once.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from knnlm_jax.retrieval import index as faiss_index
from knnlm_jax.models.adaptive import band_edges, build_capacities
from knnlm_jax.core.memory import release_free_memory
from knnlm_jax.datastore import codes as code_files
from knnlm_jax.datastore.codes import SAMPLED, CodeIndex, CodeSegments, load_sampled, sample_batches
from knnlm_jax.core import distributed
from knnlm_jax.core import locks
from knnlm_jax.datastore.format import (INDEX, SHARDED, Datastore, DatastoreError, ModelSignature, read_manifest, shard_name,
                                 signature_fields)
from knnlm_jax.datastore.writer import DatastoreWriter, begin_sharded, finish_sharded, identity_diff, shard_ranges
from knnlm_jax.datastore.indexing import TRAINED, share_trained
from knnlm_jax.models.transformer import forward_states, forward_with_keys
from knnlm_jax.data.windows import StreamView, WindowSpec, window_batch, window_of, windows
from knnlm_jax.core.distributed import Processes, check_batch_size

# stored keys are float16; a recomputed key must agree to within a few float16 steps
KEY_RTOL, KEY_ATOL = 4e-3, 4e-3


def window_sizes(config) -> tuple[int, int]:
    """``(window, context)`` of the build (:meth:`~knnlm_jax.data.windows.WindowSpec.from_config`)."""
    spec = WindowSpec.from_config(config, "build")
    return spec.length, spec.context


@functools.lru_cache(maxsize=4)
def make_key_step(graphdef, key_type: str, score: bool = True):
    """Jitted ``(params, inputs, targets, mask, capacities) -> (NLL sum over mask, float16 keys BxTxD)``.

    ``score=False``: keys only, the NLL is 0 (no softmax: a fifth of a 49k-vocabulary LM's
    forward). Cached, so that a build, its resume and its check in one process compile once.
    """

    def step(params, inputs_BxT, targets_BxT, mask_BxT, capacities):
        model = nnx.merge(graphdef, params)
        if not score:
            _, keys = forward_states(model, inputs_BxT, key_type)
            return jnp.zeros((), jnp.float32), keys[key_type].astype(jnp.float16)
        logp_BxT, keys_BxTxD = forward_with_keys(model, inputs_BxT, targets_BxT, key_type, capacities)
        return -jnp.sum(jnp.where(mask_BxT, logp_BxT, 0.0)), keys_BxTxD.astype(jnp.float16)

    return jax.jit(step, static_argnums=4)


class KeyComputer:
    """Runs batches of windows of one token stream through the model."""

    def __init__(self, trained, key_type: str, tokens_N: np.ndarray, eos: int, window: int, batch_size: int,
                 score: bool = True):
        mesh = check_batch_size(batch_size)
        self.params = trained.params
        self.step = make_key_step(trained.graphdef, key_type, score)
        self.edges = band_edges(trained.cfg.vocab_size, trained.cfg.cutoffs)
        self.dim = int(trained.cfg.d_model)
        self.sharding = NamedSharding(mesh, P("data", None))
        self.stream, self.eos, self.window, self.batch_size = StreamView(tokens_N, eos), eos, window, batch_size

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


@dataclasses.dataclass(frozen=True)
class CorpusInfo:
    """The text a datastore's entries come from, as its manifest records it."""

    corpus: str
    sha256: str
    split: str
    options: dict = dataclasses.field(default_factory=dict)  # tfds_data_dir, text_feature
    encoding: str | None = None  # "text": a subword vocabulary's encoding of the whole text (None: word by word)


@dataclasses.dataclass(frozen=True)
class IndexSpec:
    """How keys are kept: ``keys="fp16"`` stores them (indexed afterwards); ``keys="none"`` stores
    only the codes of the index ``factory`` (None: :func:`index.auto_factory`), trained first and
    filled as the keys are computed (:mod:`knnlm_jax.datastore.codes`)."""

    keys: str = "fp16"
    factory: str | None = None
    nprobe: int = faiss_index.DEFAULT_NPROBE
    memory_mib: float = code_files.MEMORY_MIB  # codes a --keys none build holds at once
    train_keys: int | None = None  # --keys none: keys its index is trained on (None: index.train_size)


@dataclasses.dataclass(frozen=True)
class BuildSpec:
    """What a build writes and how: ``batch_size`` windows per forward; ``score_lm=False`` skips the
    LM's NLL of the entries (keys only; the manifest says ``lm_scored: false``); ``overwrite``
    replaces a datastore rather than resuming it; ``progress`` shows a progress bar."""

    corpus: CorpusInfo
    windows: WindowSpec
    batch_size: int
    index: IndexSpec = IndexSpec()
    score_lm: bool = True
    overwrite: bool = False
    progress: bool = True


@dataclasses.dataclass(frozen=True)
class _Part:
    """This process's part of a build: the whole datastore, or its shard under several processes."""

    directory: str  # where its entries are written
    span: tuple[int, int]  # its windows [w0, w1) among the build's
    first_entry: int  # the global id of its first entry
    header: dict  # its manifest's fields


def build_datastore(directory: str, trained, signature: ModelSignature, tokens_N: np.ndarray, eos: int,
                    spec: BuildSpec, *, on_chunk=None, log=print, processes: Processes = Processes()) -> dict:
    """Write (or resume) the datastore of ``tokens_N`` in ``directory``; returns the final manifest.

    Under several processes each writes its shard (a contiguous run of the build's batches,
    see :func:`knnlm_jax.datastore.writer.shard_ranges`) and process 0 the top manifest; every
    process must call this. ``on_chunk(progress)`` is called after each chunk is committed (a test hook).
    """
    n = len(tokens_N)
    check_batch_size(spec.batch_size)  # before anything is written
    all_windows = windows(n, spec.windows.length, spec.windows.context)
    part = _claim_part(directory, _header(spec, trained, signature, n), all_windows, spec, processes)
    if processes.multi and not spec.overwrite and _complete_shard(part):  # a relaunch after another process died
        return _rejoin(directory, trained, signature, tokens_N, eos, spec, part, log, processes)
    writer = DatastoreWriter(part.directory, part.header, overwrite=spec.overwrite and not processes.multi)
    batch_size = int(writer.manifest["batch_size"])
    windows_Wx3 = all_windows[part.span[0] : part.span[1]]
    first = _resume_point(writer, part, windows_Wx3, n, directory, processes, log)
    computer = KeyComputer(trained, signature.key_type, tokens_N, eos, spec.windows.length, batch_size,
                           score=writer.manifest.get("lm_scored", True))
    capacities = build_capacities(tokens_N, all_windows, batch_size, computer.edges, spec.windows.length)
    factory = spec.index.factory or faiss_index.auto_factory(n, signature.dim)
    trained_index = codes = None
    if spec.index.keys == "none":
        trained_index = train_for_codes(directory, computer, all_windows, part.span, factory, processes,
                                        progress=spec.progress, log=log, train_keys=spec.index.train_keys)
        codes = _code_store(part, trained_index, writer.progress, spec.index)
    bar = tqdm(total=writer.n, initial=writer.progress, disable=not spec.progress, unit="tok", unit_scale=True,
               dynamic_ncols=True, desc=f"datastore {os.path.basename(directory)}"
                                         + (f" [{processes.index}/{processes.count}]" if processes.multi else ""))
    commit = _committer(writer, codes, part.first_entry, signature.key_type, bar, on_chunk)
    try:
        _compute_batches(computer, windows_Wx3, first, capacities, commit)
    finally:
        bar.close()
    if codes is not None:
        writer.manifest["index"] = _finish_codes(codes, part, trained_index, factory, spec, processes)
    manifest = writer.finish()
    if not processes.multi:
        code_files.remove_segments([part.directory])  # their codes are in the recorded index now
        return manifest
    return _finish_shards(directory, n, trained_index, factory, spec, processes)


def _code_store(part: "_Part", trained_index, progress: int, index: IndexSpec):
    """Where a ``--keys none`` build puts its codes: appended segments (IVF), else an index in RAM."""
    if faiss_index.mergeable(trained_index):
        return CodeSegments(part.directory, trained_index, first_id=part.first_entry, progress=progress,
                            memory_mib=index.memory_mib)
    return CodeIndex(part.directory, trained_index, first_id=part.first_entry, progress=progress)


def _finish_codes(codes, part: "_Part", trained_index, factory: str, spec: BuildSpec, processes) -> dict:
    """The index record of a finished ``--keys none`` part. One process assembles its segments into
    its index now; a shard's segments wait for the datastore's one index (:func:`_finish_shards`)."""
    info = dict(factory=factory, metric="l2", nprobe=int(spec.index.nprobe), keys="none")
    if isinstance(codes, CodeIndex):
        codes.finish(spec.index.nprobe)
        return dict(info, file=INDEX, ntotal=int(codes.index.ntotal),
                    id_offset=0 if codes.with_ids else part.first_entry)
    paths = codes.close()
    if processes.multi:
        return dict(info, ntotal=codes.ntotal, segments=len(paths), codes="merged")  # searched in the one index
    lists = code_files.assemble(trained_index, paths, part.directory, nprobe=spec.index.nprobe,
                                memory_mib=spec.index.memory_mib, progress=spec.progress)
    return dict(info, file=INDEX, id_offset=0, **lists)


def _complete_shard(part: "_Part") -> bool:
    """Whether this process's shard is already complete, built with this very identity."""
    old = read_manifest(part.directory)
    return old is not None and old.get("status") == "complete" and not identity_diff(old, part.header)


def _rejoin(directory, trained, signature, tokens_N, eos, spec: BuildSpec, part: "_Part", log, processes) -> dict:
    """A relaunched process whose shard is complete: keep it, and take part in what all do together
    (the ``--keys none`` index training, the top manifest and merge)."""
    n = len(tokens_N)
    log(f"datastore {os.path.basename(directory)} shard {processes.index}: complete, kept")
    factory = spec.index.factory or faiss_index.auto_factory(n, signature.dim)
    trained_index = None
    if spec.index.keys == "none":  # collective: every process computes its sampled batches
        batch_size = int(read_manifest(part.directory)["batch_size"])
        computer = KeyComputer(trained, signature.key_type, tokens_N, eos, spec.windows.length, batch_size,
                               score=bool(spec.score_lm))
        all_windows = windows(n, spec.windows.length, spec.windows.context)
        trained_index = train_for_codes(directory, computer, all_windows, part.span, factory, processes,
                                        progress=spec.progress, log=log, train_keys=spec.index.train_keys)
    return _finish_shards(directory, n, trained_index, factory, spec, processes)


def _header(spec: BuildSpec, trained, signature: ModelSignature, n: int) -> dict:
    """The manifest fields of a build of ``n`` entries."""
    return dict(signature_fields(signature), corpus=spec.corpus.corpus, corpus_sha256=spec.corpus.sha256,
                split=spec.corpus.split, text_encoding=spec.corpus.encoding, num_entries=n, window=spec.windows.length, context=spec.windows.context,
                batch_size=spec.batch_size, keys=spec.index.keys, checkpoint=trained.source,
                corpus_options=dict(spec.corpus.options or {}), lm_scored=bool(spec.score_lm))


def _claim_part(directory, header, all_windows_Wx3, spec: BuildSpec, processes) -> _Part:
    """This process's part; under several processes process 0 first writes (or keeps) the top
    manifest. One process replaces a sharded datastore only with ``overwrite``."""
    if processes.multi:
        batch_size = _begin_shards(directory, header, all_windows_Wx3, spec.batch_size, processes,
                                   spec.overwrite)
        w0, w1, lo, hi = shard_ranges(all_windows_Wx3, batch_size, processes.count)[processes.index]
        header = dict(header, num_entries=hi - lo, entry_range=[lo, hi], shard=processes.index,
                      num_shards=processes.count)
        return _Part(os.path.join(directory, shard_name(processes.index, processes.count)), (w0, w1), lo, header)
    old = read_manifest(directory)
    if old is not None and old.get("layout") == SHARDED:
        if not spec.overwrite:
            begin_sharded(directory, header, [None], overwrite=False)  # refuses: another process count
        shutil.rmtree(directory)
    return _Part(directory, (0, len(all_windows_Wx3)), 0, header)


def _resume_point(writer, part: _Part, windows_Wx3, n: int, directory, processes, log) -> int:
    """The first of the part's windows still to compute (0 unless resuming)."""
    lo, done = part.first_entry, writer.progress
    if done:
        log(f"resuming datastore {os.path.basename(directory)}"
            + (f" shard {processes.index}" if processes.multi else "") + f" at entry {lo + done} of {n}")
    first = int(np.searchsorted(windows_Wx3[:, 1], lo + done))
    if done < writer.n and windows_Wx3[first, 1] != lo + done:
        raise DatastoreError(f"datastore {writer.name}: progress {done} is not a window boundary")
    return first


def _committer(writer, codes, first_entry: int, key_type: str, bar, on_chunk):
    """``commit(result)``: a dispatched batch's entries to the writer (and, ``--keys none``, its codes)."""

    def commit(result):
        nll, keys_BxTxD, targets, mask = result
        keys_nxD = np.asarray(keys_BxTxD)[mask]
        if not np.isfinite(keys_nxD).all():  # float16 tops out at 65,504: a residual-stream key may not fit
            bad = first_entry + writer.written + int(np.flatnonzero(~np.isfinite(keys_nxD).all(axis=1))[0])
            raise DatastoreError(f"the {key_type} key of entry {bad} is not finite in float16 (a value "
                                 "beyond 65,504 or NaN); use a normalised key type such as ffn_input_after_ln")
        if codes is None:
            writer.append(keys_nxD, targets[mask], float(nll))
        else:
            codes.add(keys_nxD, writer.written)
            codes.keep_sample(keys_nxD, writer.written, writer.n)
            writer.append(None, targets[mask], float(nll), sync=False)
            if codes.due():
                codes.save(writer.written)
                writer.sync()
                codes.drop_older()
        bar.update(len(keys_nxD))
        if on_chunk is not None:
            on_chunk(writer.written)

    return commit


def _compute_batches(computer: KeyComputer, windows_Wx3, first: int, capacities, commit) -> None:
    """Batches of windows from ``first`` on; batch ``i+1`` is dispatched before batch ``i`` is committed."""
    pending = None
    for i in range(first, len(windows_Wx3), computer.batch_size):
        result = computer.dispatch(windows_Wx3[i : i + computer.batch_size], capacities)
        if pending is not None:
            commit(pending)
        pending = result
    if pending is not None:
        commit(pending)


def _finish_shards(directory, n: int, trained_index, factory: str, spec: BuildSpec, processes) -> dict:
    """After every shard is written: ``--keys none`` shards' codes become the datastore's one index
    (assembled by all processes together), then process 0 marks the datastore complete (with that
    index, in the same write) and removes the segments; returns the top manifest."""
    distributed.barrier(f"built {directory}")
    count = processes.count
    shards = [os.path.join(directory, shard_name(p, count)) for p in range(count)]
    index = None
    if trained_index is not None:
        index = dict(file=INDEX, factory=factory, metric="l2", ntotal=n, nprobe=int(spec.index.nprobe),
                     keys="none", shards=count, merged=faiss_index.mergeable(trained_index))
        if index["merged"]:
            paths = [path for shard in shards for _, _, path in code_files.segment_paths(shard)]
            index.update(code_files.assemble(trained_index, paths, directory, nprobe=spec.index.nprobe,
                                             memory_mib=spec.index.memory_mib,
                                             progress=spec.progress and processes.is_main, processes=processes))
    if processes.is_main:
        finish_sharded(directory, **({} if index is None else dict(index=index)))
        if index is not None and index["merged"]:
            code_files.remove_segments(shards)
    distributed.barrier(f"finished {directory}")
    return read_manifest(directory)


def writing(directory: str, processes: Processes = Processes()):
    """A datastore's write locks, held for a ``with`` block: process 0 the datastore's, and under a
    multi-process launch every process its own shard's; a second writer is refused in one line."""
    name = os.path.basename(os.path.normpath(directory))
    claims = [(locks.lock_path(directory), f"datastore {name}")] if processes.is_main else []
    if processes.multi:
        shard = shard_name(processes.index, processes.count)
        claims.append((locks.lock_path(directory, shard), f"datastore {name} {shard}"))
    return distributed.held_locks(claims)


def _begin_shards(directory, header, windows_Wx3, batch_size, processes, overwrite) -> int:
    """Process 0 writes (or keeps) the top manifest; every process learns the build's batch size."""
    info, refusal = np.zeros(1, np.int64), None
    if processes.is_main:
        try:
            ranges = [r[2:] for r in shard_ranges(windows_Wx3, batch_size, processes.count)]
            info[0] = int(begin_sharded(directory, header, ranges, overwrite=overwrite)["batch_size"])
        except DatastoreError as err:
            refusal, info[0] = err, -1
    batch_size = int(distributed.broadcast(info)[0])  # a resumed build keeps its batch composition
    if batch_size < 0:
        raise refusal or DatastoreError(f"process 0 refused to build datastore {os.path.basename(directory)} "
                                        "(its message says why)")
    return batch_size


def train_for_codes(directory, computer: KeyComputer, windows_Wx3, own: tuple[int, int], factory: str, processes,
                    *, progress=True, log=print, seed: int = 0, train_keys: int | None = None):
    """The trained, empty index of a ``--keys none`` build (``trained.faiss``, kept for a resume).

    Its sample is every entry of evenly spread batches (about ``train_keys`` entries, default
    :func:`index.train_size`); each process computes the sampled batches among its windows
    ``own`` (``[w0, w1)``), process 0 trains. The memory the sample took is handed back before
    the codes are computed.
    """
    batch_size = computer.batch_size
    path = os.path.join(directory, TRAINED)
    have = distributed.broadcast(np.asarray([os.path.isfile(path)], np.int64))[0]
    if have:
        return faiss_index.read_index(path)
    dim = computer.dim
    candidate = faiss_index.make_index(factory, dim)
    if candidate.is_trained:  # e.g. Flat: nothing to learn
        if processes.is_main:
            faiss_index.write_index(candidate, path)
        distributed.barrier(f"trained {directory}")
        return candidate
    n = int(windows_Wx3[-1, 2])
    n_batches = -(-len(windows_Wx3) // batch_size)
    wanted = min(n, train_keys) if train_keys else faiss_index.train_size(n, factory)
    chosen = sample_batches(n_batches, n // n_batches, wanted)
    w0, w1 = own
    rows = []
    for b in chosen[(chosen * batch_size >= w0) & (chosen * batch_size < w1)]:
        _, keys, _, mask = computer.dispatch(windows_Wx3[b * batch_size : (b + 1) * batch_size])
        rows.append(np.asarray(keys)[mask])
    local = np.concatenate(rows) if rows else np.zeros((0, dim), np.float16)
    del rows
    log(f"sampled {len(chosen)} of {n_batches} batches to train {factory}")
    trained, _ = share_trained(local, factory, dim, processes, seed=seed, progress=progress)
    del local
    release_free_memory()
    if processes.is_main:
        faiss_index.write_index(trained, path)
    distributed.barrier(f"trained {directory}")
    return trained


def indexed_sample(store: Datastore):
    """``(global ids, float16 keys)`` a ``--keys none`` build kept (all shards')."""
    parts = [load_sampled(s.directory) for s in store.shards] if store.shards else [load_sampled(store.directory)]
    if any(p is None for p in parts):
        raise DatastoreError(f"datastore {store.name}: {SAMPLED} is missing (a --keys none build keeps it)")
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def perplexity(manifest: dict) -> float | None:
    """The LM's perplexity over the datastore's entries (each with its build context); None if not scored."""
    if manifest.get("lm_scored") is False:
        return None
    return math.exp(manifest["lm_nll_sum"] / max(1, manifest["num_entries"]))


def check_datastore(store: Datastore, trained, tokens_N: np.ndarray, eos: int, *, sample: int = 64,
                    seed: int = 0, entry_range: tuple[int, int] | None = None) -> dict:
    """Recompute a random sample of entries (plus the first and last) and compare with the stored ones.

    Values must equal the corpus tokens exactly (all of them are compared); keys must agree
    to float16 tolerance. ``entry_range`` limits the check to ``[lo, hi)`` (one process's
    shard). Raises :class:`DatastoreError` on the first disagreement.
    """
    m = store.manifest
    n = store.size
    if len(tokens_N) != n:
        raise DatastoreError(f"datastore {store.name} has {n} entries but its corpus now has {len(tokens_N)} tokens")
    lo, hi = entry_range or (0, n)
    _check_values(store, tokens_N, lo, hi)
    entries, kept = _entries_to_check(store, lo, hi, sample, seed)
    windows_Wx3 = windows(n, m["window"], m["context"])
    computer = KeyComputer(trained, m["key_type"], tokens_N, eos, m["window"], int(m["batch_size"]))
    worst = _compare_keys(store, computer, windows_Wx3, entries, kept)
    return dict(entries_checked=len(entries), values_checked=hi - lo, max_key_difference=worst)


def _check_values(store: Datastore, tokens_N: np.ndarray, lo: int, hi: int) -> None:
    """Every stored value in ``[lo, hi)`` is its corpus token (compared in slices of 4M)."""
    for i in range(lo, hi, 1 << 22):
        j = min(hi, i + (1 << 22))
        bad = np.flatnonzero(np.asarray(store.vals[i:j]) != tokens_N[i:j])
        if len(bad):
            raise DatastoreError(f"datastore {store.name}: value of entry {i + bad[0]} is not the corpus token")


def _entries_to_check(store: Datastore, lo: int, hi: int, sample: int, seed: int):
    """``(sorted entry ids, kept keys by id or None)``: ``lo``, ``hi - 1`` and a random sample; a
    ``--keys none`` store compares instead with the keys its build kept for this check."""
    rng = np.random.default_rng(seed)
    entries = np.unique(np.concatenate([[lo, hi - 1], lo + rng.choice(hi - lo, size=min(hi - lo, sample),
                                                                         replace=False)]))
    if store.keys is not None:
        return entries, None
    ids, keys = indexed_sample(store)
    inside = (ids >= lo) & (ids < hi)
    kept = dict(zip(ids[inside].tolist(), keys[inside]))
    entries = np.asarray(sorted(kept)[:max(sample, 2)], np.int64)
    if not len(entries):
        raise DatastoreError(f"datastore {store.name} keeps no sampled keys to check")
    return entries, kept


def _compare_keys(store: Datastore, computer: KeyComputer, windows_Wx3, entries, kept) -> float:
    """Recompute the keys of ``entries`` (batched by window) against the stored (or ``kept``) ones;
    returns the largest difference."""
    owner = window_of(windows_Wx3, entries)
    used = np.unique(owner)
    batch_size = computer.batch_size
    worst = 0.0
    for b in range(0, len(used), batch_size):
        batch = used[b : b + batch_size]
        _, keys, _, _ = computer.dispatch(windows_Wx3[batch])
        keys = np.asarray(keys).astype(np.float32)
        for e in entries[np.isin(owner, batch)]:
            row = int(np.searchsorted(batch, window_of(windows_Wx3, e)))
            fresh = keys[row, e - windows_Wx3[batch[row], 0]]
            stored = np.asarray(store.keys[e] if kept is None else kept[int(e)], np.float32)
            if not np.allclose(stored, fresh, rtol=KEY_RTOL, atol=KEY_ATOL):
                raise DatastoreError(f"datastore {store.name}: key of entry {e} differs from the recomputed one "
                                     f"(max difference {np.abs(stored - fresh).max():.3g})")
            worst = max(worst, float(np.abs(stored - fresh).max()))
    return worst
