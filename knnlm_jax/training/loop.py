"""Training: the loop, periodic evaluation and checkpoints, ``metrics.jsonl``.

The steps are :mod:`knnlm_jax.models.steps`'s; the data and ``config.json`` are
:mod:`knnlm_jax.training.run_data`'s. Under several processes (:mod:`knnlm_jax.core.distributed`, initialised
before :func:`train`) the mesh spans every process's devices: each process computes the same
global batch order and puts only its devices' rows of each batch on them; the jitted step's mean
over the ``data`` axis averages the gradients across processes. Process 0 alone writes the run
directory's files (vocabulary, token caches, ``config.json``, ``metrics.jsonl``); checkpoints
are written by all together (orbax).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from knnlm_jax.core import distributed
from knnlm_jax.core.environment import package_versions
from knnlm_jax.models.adaptive import band_edges, capacities_for_batches
from knnlm_jax.core.checkpoint import CheckpointError, Checkpointer, NonFiniteState, abstract_like
from knnlm_jax.configs import validate
from knnlm_jax.data.blocks import BatchOrder, lm_blocks
from knnlm_jax.data.token_file import TokenFile, TrainBlocks
from knnlm_jax.training.input import StepRows, step_batches
from knnlm_jax.models.transformer import ModelConfig
from knnlm_jax.training.optim import lr_schedule, make_optimizer
from knnlm_jax.training.run_data import check_run_config, prepare_data, resolved_config
from knnlm_jax.models.steps import (count_params_of, evaluate, global_array, init_model, make_eval_step,
                                   make_train_step, unigram_perplexity)
from knnlm_jax.core.errors import KnnlmError, InputError


def _append_jsonl(path: str, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record, allow_nan=False) + "\n")


def _truncate_metrics(path: str, step: int) -> None:
    """Drop records written after ``step`` (a killed run's lost work is redone on resume)."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)


# ---------------------------------------------------------------------------------
# the loop


def train(config, workdir: str, *, progress: bool = True, log=print, corpus_options: dict | None = None) -> dict:
    """Train (or resume) the run in ``workdir``; returns the final metrics.

    ``corpus_options`` (``tfds_data_dir``, ``text_feature``) apply to ``tfds:``/``wiki3b`` corpora.
    A run whose loss or valid perplexity stops being finite raises :class:`Diverged`; every
    checkpoint it leaves is finite. Every check of the config comes before ``config.json`` is written.
    Under several processes every process calls this (see the module docstring); only process 0
    logs, shows progress and writes files other than checkpoints.
    """
    validate(config)
    main = distributed.current().is_main
    if not main:
        progress, log = False, lambda *a: None
    setup = _prepare(config, workdir, corpus_options, main)
    graphdef, tx, state = _initial_state(config, setup)
    files = _RunFiles.open(workdir, config, main)
    state, meta = _restore(files, state, log)
    loop = _Loop(config, setup, files, graphdef, tx, state, meta)
    valid_ppl = loop.run(progress)
    return _finish(config, setup, files, loop.state, loop.meta, valid_ppl)


@dataclasses.dataclass(frozen=True)
class _Setup:
    """What the loop reads: the model's config, the mesh, the blocks of tokens and their order."""

    data: object  # :func:`prepare_data`'s vocabulary and token ids
    cfg: ModelConfig
    mesh: Mesh
    train_blocks: TrainBlocks  # read from the token file, a step's rows at a time
    train_counts_NxH: np.ndarray  # tail-band token counts of each training block
    valid_blocks: tuple  # inputs, targets, mask
    order: BatchOrder


def _prepare(config, workdir: str, corpus_options: dict | None, main: bool) -> _Setup:
    """Tokens, blocks and mesh of the run, its config checked (and written by process 0)."""
    data = prepare_data(config, workdir, corpus_options=corpus_options)
    resolved = resolved_config(config, data)
    cfg = ModelConfig.from_config(config, vocab_size=len(data.vocab))
    mesh = distributed.make_mesh()
    n_dev = mesh.devices.size
    if config.batch_size % n_dev or config.eval_batch_size % n_dev:
        raise InputError(f"batch_size and eval_batch_size must be multiples of the {n_dev} devices")
    L = config.tokens_per_sample
    blocks = TrainBlocks(TokenFile(data.train_ids), L, data.vocab.eos)
    order = BatchOrder(len(blocks), config.batch_size * config.update_freq, config.seed)  # checks the size first
    train_counts = blocks.band_counts(band_edges(cfg.vocab_size, cfg.cutoffs))
    valid_blocks = lm_blocks(data.valid_ids, L, data.vocab.eos, pad_last=True)  # a small split, held whole
    check_run_config(workdir, resolved, write=main)  # every process refuses alike; process 0 writes
    distributed.barrier("run config")
    return _Setup(data, cfg, mesh, blocks, train_counts, valid_blocks, order)


def _initial_state(config, setup: _Setup):
    """``(graphdef, optimizer, state)``: the freshly initialised model, replicated over the mesh."""
    tx = make_optimizer(config)
    graphdef, params = init_model(setup.cfg, config.seed)
    replicated = NamedSharding(setup.mesh, P())
    state = dict(
        params=params,
        opt_state=tx.init(params),
        step=jnp.zeros((), jnp.int32),
        rng=jax.random.PRNGKey(config.seed + 1),
    )
    return graphdef, tx, jax.tree_util.tree_map(lambda x: global_array(x, replicated), state)


@dataclasses.dataclass(frozen=True)
class _RunFiles:
    """The run directory's checkpoints (written by every process) and ``metrics.jsonl`` (process 0's)."""

    ckpt: Checkpointer
    best: Checkpointer
    metrics_path: str
    main: bool

    @classmethod
    def open(cls, workdir: str, config, main: bool) -> "_RunFiles":
        return cls(Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=config.keep_checkpoints),
                   Checkpointer(os.path.join(workdir, "best"), max_to_keep=1),
                   os.path.join(workdir, "metrics.jsonl"), main)

    def append(self, record: dict) -> None:
        if self.main:
            _append_jsonl(self.metrics_path, record)

    def close(self) -> None:
        self.ckpt.close()
        self.best.close()


def _restore(files: _RunFiles, state: dict, log) -> tuple[dict, dict]:
    """``(state, meta)`` of the latest checkpoint, or the fresh ``state`` (logging the run's start);
    ``metrics.jsonl`` loses the records of steps the checkpoint does not hold."""
    meta = {"best_valid_ppl": math.inf, "best_step": -1}
    if files.ckpt.latest_step() is not None:
        try:
            state, meta = files.ckpt.restore(abstract_like(state))
        except CheckpointError as err:
            hinted = CheckpointError(f"{err}; delete it to resume from an earlier one, or --overwrite")
            hinted.threads_stuck = getattr(err, "threads_stuck", False)
            hinted.stderr_fd = getattr(err, "stderr_fd", None)
            raise hinted from None
        log(f"resumed from step {int(state['step'])} (checkpoint in {files.ckpt.directory})")
    elif files.main:
        files.append({"step": 0, "event": "start", "parameters": count_params_of(state["params"]),
                      "time": time.time()})
    if files.main:
        _truncate_metrics(files.metrics_path, int(state["step"]))
    return state, meta


def _diverged(what: str, step: int, files: _RunFiles, config) -> Diverged:
    last = files.ckpt.latest_step()
    kept = f"the last finite checkpoint is step {last} in {files.ckpt.directory}" if last is not None else \
        "no checkpoint was saved"
    hint = f"lower --set lr (now {config.lr:g})" + (" or set clip_norm" if config.clip_norm <= 0 else "")
    return Diverged(f"the {what} is not finite at step {step} (diverged); {kept}; {hint}")


class _Loop:
    """The updates from the restored step to ``max_steps``: logs, evaluations and checkpoints on schedule."""

    def __init__(self, config, setup: _Setup, files: _RunFiles, graphdef, tx, state: dict, meta: dict):
        self.config, self.setup, self.files = config, setup, files
        self.state, self.meta = state, meta
        self.train_step = jax.jit(make_train_step(graphdef, tx), donate_argnums=0, static_argnums=3)
        self.eval_step = jax.jit(make_eval_step(graphdef), static_argnums=4)
        self.edges = band_edges(setup.cfg.vocab_size, setup.cfg.cutoffs)
        self.batch_sharding = NamedSharding(setup.mesh, P(None, "data", None))
        self.schedule = lr_schedule(config)
        self.pending = []  # (step, loss on device) not yet checked: checked where the loop syncs anyway
        self.t_last, self.tokens_since = time.time(), 0

    def run(self, progress: bool) -> float:
        """Train to ``max_steps``; returns the last valid perplexity (the final model's if no step was left)."""
        c = self.config
        start_step = int(self.state["step"])
        bar = tqdm(total=c.max_steps, initial=start_step, disable=not progress, unit="upd", dynamic_ncols=True)
        self.t_last, self.tokens_since = time.time(), 0
        valid_ppl = None
        processes = distributed.current()
        setup = self.setup
        rows = StepRows(setup.train_blocks, BatchOrder(setup.order.n_blocks, setup.order.per_update, c.seed),
                        c.update_freq, c.batch_size, processes.index, processes.count)
        self.batches = step_batches(rows, start_step, c.max_steps)  # its own order: read in another thread
        last = start_step if self._patience_spent(start_step) else c.max_steps  # a stopped run trains no further
        for step in range(start_step, last):
            metrics = self._update(step)
            done = step + 1
            bar.update(1)
            self.pending.append((done, metrics["loss"]))
            is_eval = done % c.eval_every == 0 or done == c.max_steps
            is_save = done % c.checkpoint_every == 0 or done == c.max_steps
            if done % c.log_every == 0 or is_eval or is_save:
                self._check_losses()
            if done % c.log_every == 0 or done == c.max_steps:
                self._log(step, metrics, bar)
            if is_eval:
                valid_ppl = self._evaluate(done, bar)
            stop = is_eval and self._patience_spent(done)
            if is_save or stop:  # the stopped run's last checkpoint: its meta says it stopped
                self._save(done)
            if stop:
                if self.files.main:
                    bar.write(f"stopped early at update {done}: no better valid perplexity in {c.patience} "
                              f"evaluations (best {self.meta['best_valid_ppl']:.2f} at {self.meta['best_step']})")
                break
        bar.close()
        if valid_ppl is None:  # nothing left to train: report the final model
            valid_ppl = self._valid_ppl()
            if not math.isfinite(valid_ppl):
                raise _diverged("valid perplexity", int(self.state["step"]), self.files, c)
        return valid_ppl

    def _patience_spent(self, done: int) -> bool:
        """Early stopping: after ``done`` updates, ``patience`` evaluations in a row found no better model."""
        c = self.config
        return (c.get("patience", 0) > 0 and done > 0 and done % c.eval_every == 0
                and done - self.meta["best_step"] >= c.patience * c.eval_every)

    def _update(self, step: int) -> dict:
        """One update: ``update_freq`` micro-batches of ``batch_size`` blocks."""
        setup, F, B, L = self.setup, self.config.update_freq, self.config.batch_size, self.config.tokens_per_sample
        inputs_local, targets_local = next(self.batches)
        caps = epoch_capacities(setup.order, setup.train_counts_NxH, setup.order.position(step)[0], B, L)
        inputs = jax.make_array_from_process_local_data(self.batch_sharding, inputs_local, (F, B, L))
        targets = jax.make_array_from_process_local_data(self.batch_sharding, targets_local, (F, B, L))
        self.state, metrics = self.train_step(self.state, inputs, targets, caps)
        self.tokens_since += F * B * L
        return metrics

    def _check_losses(self) -> None:
        losses = jax.device_get([loss for _, loss in self.pending])
        for (done_i, _), loss in zip(self.pending, losses):
            if not math.isfinite(float(loss)):
                raise _diverged("loss", done_i, self.files, self.config)
        self.pending.clear()

    def _log(self, step: int, metrics: dict, bar) -> None:
        """The training record of update ``step`` (loss, lr, gradient norm, throughput since the last)."""
        done = step + 1
        loss = float(metrics["loss"])
        elapsed = time.time() - self.t_last
        tps = self.tokens_since / max(elapsed, 1e-9)
        self.t_last, self.tokens_since = time.time(), 0
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tps:,.0f}")
        epoch, _ = self.setup.order.position(step)
        grad_norm = float(metrics["grad_norm"])
        if not math.isfinite(grad_norm):
            raise _diverged("gradient norm", done, self.files, self.config)
        self.files.append({"step": done, "epoch": epoch, "loss": loss, "lr": float(self.schedule(step)),
                           "grad_norm": grad_norm, "tokens_per_s": tps, "time": time.time()})

    def _valid_ppl(self) -> float:
        nll, count = evaluate(self.eval_step, self.state["params"], self.setup.valid_blocks,
                              self.config.eval_batch_size, self.setup.mesh, self.edges, self.config.max_eval_tokens)
        return math.exp(nll / count) if nll / count < 700 else math.inf  # inf/NaN: diverged

    def _evaluate(self, done: int, bar) -> float:
        """Valid perplexity after ``done`` updates, logged; a new best model is saved to ``best/``."""
        valid_ppl = self._valid_ppl()
        if not math.isfinite(valid_ppl):
            raise _diverged("valid perplexity", done, self.files, self.config)
        self.files.append({"step": done, "valid_ppl": valid_ppl, "time": time.time()})
        if self.files.main:
            bar.write(f"step {done}: valid ppl {valid_ppl:.2f}")
        if valid_ppl < self.meta["best_valid_ppl"]:
            self.meta = {"best_valid_ppl": valid_ppl, "best_step": done}
            try:
                self.files.best.save(done, {"params": self.state["params"]}, self.meta)
            except NonFiniteState:
                raise _diverged("training state", done, self.files, self.config) from None
        self.t_last = time.time()
        return valid_ppl

    def _save(self, done: int) -> None:
        """The checkpoint after ``done`` updates: state, best so far and data position."""
        epoch, pos = self.setup.order.position(done)
        try:
            self.files.ckpt.save(done, self.state, dict(self.meta, epoch=epoch, position=pos, step=done))
        except NonFiniteState:  # a non-finite parameter or optimizer state after a finite loss
            raise _diverged("training state", done, self.files, self.config) from None
        self.t_last = time.time()


def _finish(config, setup: _Setup, files: _RunFiles, state: dict, meta: dict, valid_ppl: float) -> dict:
    """Close the checkpoints; the run's final metrics, also the last record of ``metrics.jsonl``."""
    _, valid_targets, valid_mask = setup.valid_blocks
    vocab_size = len(setup.data.vocab)
    unigram = unigram_perplexity(None, valid_targets[valid_mask], vocab_size,
                                 counts_V=setup.train_blocks.tokens.bincount(vocab_size))
    files.close()
    result = {
        "config": config.name,
        "steps": int(state["step"]),
        "stopped_early": int(state["step"]) < config.max_steps,
        "valid_ppl": valid_ppl,
        "best_valid_ppl": meta["best_valid_ppl"],
        "best_step": meta["best_step"],
        "unigram_valid_ppl": unigram,
        "valid_tokens": int(valid_mask.sum()),
        "vocab_size": len(setup.data.vocab),
        "parameters": count_params_of(state["params"]),
        "versions": package_versions(),
    }
    files.append(dict(result, step=int(state["step"]), event="end", time=time.time()))
    return result


class Diverged(KnnlmError, ValueError):
    """The loss, valid perplexity or training state stopped being finite (a user error: lr, clipping)."""


def epoch_capacities(order: BatchOrder, counts_NBxH, epoch: int, batch_size: int, length: int):
    """Tail capacities covering every micro-batch of an epoch: one compiled step per epoch at most.

    A function of the epoch's permutation only, so a resumed run uses the same shapes
    (the tails' dropout masks depend on them).
    """
    key = (epoch, id(counts_NBxH))
    if getattr(order, "_caps_key", None) != key:
        first = epoch * order.steps_per_epoch
        blocks = np.concatenate([order.indices(s) for s in range(first, first + order.steps_per_epoch)])
        order._caps_key, order._caps = key, capacities_for_batches(
            counts_NBxH, blocks.reshape(-1, batch_size), batch_size * length)
    return order._caps
