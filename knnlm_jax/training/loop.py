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

import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from knnlm_jax.core import distributed
from knnlm_jax.models.adaptive import band_edges, block_band_counts, capacities_for_batches
from knnlm_jax.core.checkpoint import CheckpointError, Checkpointer, NonFiniteState, abstract_like
from knnlm_jax.configs import validate
from knnlm_jax.data.blocks import BatchOrder, lm_blocks
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
    data = prepare_data(config, workdir, corpus_options=corpus_options)
    resolved = resolved_config(config, data)
    cfg = ModelConfig.from_config(config, vocab_size=len(data.vocab))
    mesh = distributed.make_mesh()
    n_dev = mesh.devices.size
    if config.batch_size % n_dev or config.eval_batch_size % n_dev:
        raise InputError(f"batch_size and eval_batch_size must be multiples of the {n_dev} devices")

    L = config.tokens_per_sample
    train_in, train_tgt, _ = lm_blocks(data.train_ids, L, data.vocab.eos, pad_last=False)
    train_counts = block_band_counts(train_tgt, band_edges(cfg.vocab_size, cfg.cutoffs))
    valid_blocks = lm_blocks(data.valid_ids, L, data.vocab.eos, pad_last=True)
    order = BatchOrder(len(train_in), config.batch_size * config.update_freq, config.seed)
    check_run_config(workdir, resolved, write=main)  # every process refuses alike; process 0 writes
    distributed.barrier("run config")

    tx = make_optimizer(config)
    graphdef, params = init_model(cfg, config.seed)
    replicated = NamedSharding(mesh, P())
    state = dict(
        params=params,
        opt_state=tx.init(params),
        step=jnp.zeros((), jnp.int32),
        rng=jax.random.PRNGKey(config.seed + 1),
    )
    state = jax.tree_util.tree_map(lambda x: global_array(x, replicated), state)

    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=config.keep_checkpoints)
    best_ckpt = Checkpointer(os.path.join(workdir, "best"), max_to_keep=1)
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    meta = {"best_valid_ppl": math.inf, "best_step": -1}
    if ckpt.latest_step() is not None:
        try:
            state, meta = ckpt.restore(abstract_like(state))
        except CheckpointError as err:
            hinted = CheckpointError(f"{err}; delete it to resume from an earlier one, or --overwrite")
            hinted.threads_stuck = getattr(err, "threads_stuck", False)
            hinted.stderr_fd = getattr(err, "stderr_fd", None)
            raise hinted from None
        log(f"resumed from step {int(state['step'])} (checkpoint in {ckpt.directory})")
    elif main:
        _append_jsonl(metrics_path, {"step": 0, "event": "start", "parameters": count_params_of(params),
                                     "time": time.time()})
    start_step = int(state["step"])
    if main:
        _truncate_metrics(metrics_path, start_step)
    append = _append_jsonl if main else (lambda path, record: None)

    train_step = jax.jit(make_train_step(graphdef, tx), donate_argnums=0, static_argnums=3)
    eval_step = jax.jit(make_eval_step(graphdef), static_argnums=4)
    edges = band_edges(cfg.vocab_size, cfg.cutoffs)
    batch_sharding = NamedSharding(mesh, P(None, "data", None))
    schedule = lr_schedule(config)
    F, B = config.update_freq, config.batch_size
    tokens_per_update = F * B * L

    def run_eval(step: int) -> float:
        nll, count = evaluate(eval_step, state["params"], valid_blocks, config.eval_batch_size, mesh, edges,
                              config.max_eval_tokens)
        return math.exp(nll / count) if nll / count < 700 else math.inf  # inf/NaN: diverged

    def diverged(what: str, step: int) -> Diverged:
        last = ckpt.latest_step()
        kept = f"the last finite checkpoint is step {last} in {ckpt.directory}" if last is not None else \
            "no checkpoint was saved"
        hint = f"lower --set lr (now {config.lr:g})" + (" or set clip_norm" if config.clip_norm <= 0 else "")
        return Diverged(f"the {what} is not finite at step {step} (diverged); {kept}; {hint}")

    pending = []  # (step, loss on device) not yet checked: checked where the loop syncs anyway

    def check_losses() -> None:
        losses = jax.device_get([loss for _, loss in pending])
        for (done_i, _), loss in zip(pending, losses):
            if not math.isfinite(float(loss)):
                raise diverged("loss", done_i)
        pending.clear()

    bar = tqdm(total=config.max_steps, initial=start_step, disable=not progress, unit="upd", dynamic_ncols=True)
    t_last, tokens_since = time.time(), 0
    valid_ppl = None
    for step in range(start_step, config.max_steps):
        idx = order.indices(step)
        targets_np = train_tgt[idx].reshape(F, B, L)
        caps = epoch_capacities(order, train_counts, order.position(step)[0], B, L)
        inputs = global_array(train_in[idx].reshape(F, B, L), batch_sharding)
        targets = global_array(targets_np, batch_sharding)
        state, metrics = train_step(state, inputs, targets, caps)
        tokens_since += tokens_per_update
        done = step + 1
        bar.update(1)
        pending.append((done, metrics["loss"]))
        is_eval = done % config.eval_every == 0 or done == config.max_steps
        is_save = done % config.checkpoint_every == 0 or done == config.max_steps
        if done % config.log_every == 0 or is_eval or is_save:
            check_losses()
        if done % config.log_every == 0 or done == config.max_steps:
            loss = float(metrics["loss"])
            elapsed = time.time() - t_last
            tps = tokens_since / max(elapsed, 1e-9)
            t_last, tokens_since = time.time(), 0
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tps:,.0f}")
            epoch, _ = order.position(step)
            grad_norm = float(metrics["grad_norm"])
            if not math.isfinite(grad_norm):
                raise diverged("gradient norm", done)
            append(metrics_path, {"step": done, "epoch": epoch, "loss": loss, "lr": float(schedule(step)),
                                  "grad_norm": grad_norm, "tokens_per_s": tps, "time": time.time()})
        if is_eval:
            valid_ppl = run_eval(done)
            if not math.isfinite(valid_ppl):
                raise diverged("valid perplexity", done)
            append(metrics_path, {"step": done, "valid_ppl": valid_ppl, "time": time.time()})
            if main:
                bar.write(f"step {done}: valid ppl {valid_ppl:.2f}")
            if valid_ppl < meta["best_valid_ppl"]:
                meta = {"best_valid_ppl": valid_ppl, "best_step": done}
                try:
                    best_ckpt.save(done, {"params": state["params"]}, meta)
                except NonFiniteState:
                    raise diverged("training state", done) from None
            t_last = time.time()
        if is_save:
            epoch, pos = order.position(done)
            try:
                ckpt.save(done, state, dict(meta, epoch=epoch, position=pos, step=done))
            except NonFiniteState:  # a non-finite parameter or optimizer state after a finite loss
                raise diverged("training state", done) from None
            t_last = time.time()
    bar.close()
    if valid_ppl is None:  # nothing left to train: report the final model
        valid_ppl = run_eval(int(state["step"]))
        if not math.isfinite(valid_ppl):
            raise diverged("valid perplexity", int(state["step"]))
    _, valid_targets, valid_mask = valid_blocks
    unigram = unigram_perplexity(data.train_ids, valid_targets[valid_mask], len(data.vocab))
    ckpt.close()
    best_ckpt.close()
    result = {
        "config": config.name,
        "steps": int(state["step"]),
        "valid_ppl": valid_ppl,
        "best_valid_ppl": meta["best_valid_ppl"],
        "best_step": meta["best_step"],
        "unigram_valid_ppl": unigram,
        "valid_tokens": int(valid_mask.sum()),
        "vocab_size": len(data.vocab),
        "parameters": count_params_of(state["params"]),
    }
    append(metrics_path, dict(result, step=int(state["step"]), event="end", time=time.time()))
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
