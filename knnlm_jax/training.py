"""Training: pure train/eval steps, the loop, periodic evaluation and checkpoints.

A step is a pure function ``(state, batch) -> (state, metrics)`` jitted with the state
donated. ``state`` is a dict pytree: ``params`` (``nnx.State``), ``opt_state``, ``step``
and ``rng``. The batch is sharded over a ``data`` mesh axis; parameters are replicated.

Under several processes (:mod:`knnlm_jax.distributed`, initialised before :func:`train`) the
mesh spans every process's devices: each process computes the same global batch order and
puts only its devices' rows of each batch on them; the jitted step's mean over the ``data``
axis averages the gradients across processes. Process 0 alone writes the run directory's
files (vocabulary, token caches, ``config.json``, ``metrics.jsonl``); checkpoints are written
by all together (orbax).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from knnlm_jax import corpus, distributed, token_cache
from knnlm_jax.adaptive import band_edges, block_band_counts, capacities_for_batches
from knnlm_jax.checkpoint import CheckpointError, Checkpointer, NonFiniteState, abstract_like
from knnlm_jax.configs import validate
from knnlm_jax.data import BatchOrder, lm_blocks
from knnlm_jax.model import ModelConfig, TransformerLM
from knnlm_jax.optim import lr_schedule, make_optimizer
from knnlm_jax.vocab import Vocab


# ---------------------------------------------------------------------------------
# model and steps


def init_model(cfg: ModelConfig, seed: int):
    """``(graphdef, params)`` of a freshly initialised model."""
    model = TransformerLM(cfg, rngs=nnx.Rngs(params=seed))
    graphdef, params = nnx.split(model, nnx.Param)
    return graphdef, params


def abstract_model(cfg: ModelConfig):
    """``(graphdef, abstract params)`` without allocating anything."""
    model = nnx.eval_shape(lambda: TransformerLM(cfg, rngs=nnx.Rngs(0)))
    return nnx.split(model, nnx.Param)


def make_train_step(graphdef, tx: optax.GradientTransformation):
    """``step(state, inputs FxBxT, targets FxBxT, capacities) -> (state, metrics)``.

    F micro-batches are accumulated; ``capacities`` are the static adaptive-softmax tail
    capacities (:func:`knnlm_jax.adaptive.band_capacities`), ``None`` for dense tails.
    """

    def step(state, inputs_FxBxT, targets_FxBxT, capacities=None):
        def loss_fn(params, inputs, targets, key):
            model = nnx.merge(graphdef, params)
            rngs = nnx.Rngs(dropout=key)
            hidden = model(inputs, deterministic=False, rngs=rngs)
            logp = model.target_log_probs(hidden, targets, capacities=capacities, deterministic=False, rngs=rngs)
            return -jnp.sum(logp)

        grad_fn = jax.value_and_grad(loss_fn)

        base = jax.random.fold_in(state["rng"], state["step"])

        def micro(carry, xs):
            grads, loss = carry
            i, inputs, targets = xs
            loss_i, grads_i = grad_fn(state["params"], inputs, targets, jax.random.fold_in(base, i))
            return (jax.tree_util.tree_map(jnp.add, grads, grads_i), loss + loss_i), None

        zeros = jax.tree_util.tree_map(jnp.zeros_like, state["params"])
        n_micro = inputs_FxBxT.shape[0]
        (grads, loss_sum), _ = jax.lax.scan(
            micro, (zeros, jnp.zeros((), jnp.float32)), (jnp.arange(n_micro), inputs_FxBxT, targets_FxBxT)
        )
        n_tokens = inputs_FxBxT.size
        grads = jax.tree_util.tree_map(lambda g: g / n_tokens, grads)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        new_state = dict(
            params=optax.apply_updates(state["params"], updates),
            opt_state=opt_state,
            step=state["step"] + 1,
            rng=state["rng"],
        )
        return new_state, {"loss": loss_sum / n_tokens, "grad_norm": optax.tree.norm(grads)}

    return step


def make_eval_step(graphdef):
    """``eval_step(params, inputs, targets, mask) -> (sum of -log p over the mask, token count)``."""

    def eval_step(params, inputs_BxT, targets_BxT, mask_BxT, capacities=None):
        model = nnx.merge(graphdef, params)
        logp = model.target_log_probs(model(inputs_BxT), targets_BxT, capacities=capacities)
        return -jnp.sum(jnp.where(mask_BxT, logp, 0.0)), jnp.sum(mask_BxT)

    return eval_step


def evaluate(eval_step, params, blocks, batch_size: int, mesh, edges, max_tokens: int = 0) -> tuple[float, int]:
    """Token-weighted ``(sum of NLL, count)`` over LM blocks; the last batch is padded with masked rows."""
    inputs, targets, mask = blocks
    if max_tokens:
        keep = -(-max_tokens // inputs.shape[1])
        inputs, targets, mask = inputs[:keep], targets[:keep], mask[:keep]
    n = len(inputs)
    counts = block_band_counts(targets, edges, mask)
    caps = capacities_for_batches(counts, np.arange(n + (-n) % batch_size).reshape(-1, batch_size) % n,
                                  batch_size * inputs.shape[1])
    pad = (-n) % batch_size
    if pad:
        inputs = np.concatenate([inputs, np.zeros((pad, inputs.shape[1]), inputs.dtype)])
        targets = np.concatenate([targets, np.zeros((pad, targets.shape[1]), targets.dtype)])
        mask = np.concatenate([mask, np.zeros((pad, mask.shape[1]), bool)])
    sharding = NamedSharding(mesh, P("data", None))
    nll, count = 0.0, 0
    for i in range(0, len(inputs), batch_size):
        batch = [global_array(a[i : i + batch_size], sharding) for a in (inputs, targets, mask)]
        s, c = eval_step(params, *batch, caps)
        nll += float(s)
        count += int(c)
    return nll, count


def global_array(host, sharding):
    """A global array of ``sharding`` from the host array every process holds whole (the same in all):
    each process puts only its own devices' slices on them (one process: all of it)."""
    host = np.asarray(host)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def unigram_perplexity(train_ids: np.ndarray, target_ids: np.ndarray, vocab_size: int) -> float:
    """Perplexity of an add-one-smoothed unigram model of ``train_ids`` on ``target_ids``."""
    counts = np.bincount(train_ids, minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(np.exp(-logp[target_ids].mean()))


# ---------------------------------------------------------------------------------
# the run directory


@dataclass
class RunData:
    vocab: Vocab
    train_ids: np.ndarray
    valid_ids: np.ndarray
    train_sha256: str
    corpus: str
    corpus_options: dict


def prepare_data(config, workdir: str, *, need_valid: bool = True, corpus_options: dict | None = None) -> RunData:
    """Vocabulary (built once from the train split, saved) and cached token arrays (memory-mapped).

    ``config.data_dir`` is any corpus spec; ``corpus_options`` (``tfds_data_dir``, ``text_feature``)
    apply to ``tfds:`` sources. The corpus is streamed, never held whole. Under several processes
    process 0 builds and caches them first; the others then read its files.
    """
    processes = distributed.current()
    if not processes.is_main:
        distributed.barrier("training data")
    data = _prepare_data(config, workdir, need_valid=need_valid, corpus_options=corpus_options)
    if processes.is_main:
        distributed.barrier("training data")
    return data


def _prepare_data(config, workdir: str, *, need_valid: bool, corpus_options: dict | None) -> RunData:
    cache = os.path.join(workdir, "tokens")
    options = dict(corpus_options or {}, cache_dir=cache)
    train = corpus.read_split(config.data_dir, "train", **options)
    vocab_path = os.path.join(workdir, "vocab.txt")
    if os.path.isfile(vocab_path):
        vocab = Vocab.load(vocab_path)
    else:
        vocab = Vocab.build(train.lines(), max_size=config.vocab_size)
        os.makedirs(workdir, exist_ok=True)
        vocab.save(vocab_path)
    train_ids = token_cache.load_tokens(cache, train, vocab)
    valid_ids = (token_cache.load_tokens(cache, corpus.read_split(config.data_dir, "valid", **options), vocab)
                 if need_valid else None)
    return RunData(vocab, train_ids, valid_ids, train.sha256, train.corpus, dict(corpus_options or {}))


def resolved_config(config, data: RunData) -> dict:
    """The config as saved in the run directory, with what was derived from the data."""
    resolved = config.to_dict()
    resolved["cutoffs"] = list(resolved["cutoffs"])
    resolved["derived"] = {"vocab_size": len(data.vocab), "corpus": data.corpus, "train_sha256": data.train_sha256}
    if corpus.is_spec(data.corpus):  # a catalog corpus: where it was read from, for build and evaluate
        resolved["derived"]["corpus_options"] = data.corpus_options
    return resolved


TRAINING_NEUTRAL = ("build_", "eval_")


def check_run_config(workdir: str, resolved: dict, *, write: bool = True) -> None:
    """Save ``config.json`` (unless ``write`` is false), or refuse to continue a run whose saved config differs."""
    path = os.path.join(workdir, "config.json")
    if os.path.isfile(path):
        with open(path) as f:
            saved = json.load(f)
        # fields added since the run started, and build/eval-time fields, do not change training
        diff = sorted(k for k in saved if not k.startswith(TRAINING_NEUTRAL) and saved[k] != resolved.get(k))
        if diff:
            raise ValueError(
                f"{workdir} holds a run with a different config ({', '.join(diff)}); "
                "use another --workdir or --overwrite"
            )
        return
    if not write:
        return
    os.makedirs(workdir, exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(resolved, f, indent=2)
    os.replace(path + ".tmp", path)


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
        raise ValueError(f"batch_size and eval_batch_size must be multiples of the {n_dev} devices")

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


class Diverged(ValueError):
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


def count_params_of(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))
