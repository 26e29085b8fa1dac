"""The model's pure steps: init, jitted train/eval steps, evaluation over LM blocks.

A step is a pure function ``(state, batch) -> (state, metrics)`` jitted with the state
donated. ``state`` is a dict pytree: ``params`` (``nnx.State``), ``opt_state``, ``step``
and ``rng``. The batch is sharded over a ``data`` mesh axis; parameters are replicated.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from knnlm_jax.models.adaptive import block_band_counts, capacities_for_batches
from knnlm_jax.models.transformer import ModelConfig, TransformerLM


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
    capacities (:func:`knnlm_jax.models.adaptive.band_capacities`), ``None`` for dense tails.
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


def unigram_perplexity(train_ids: np.ndarray, target_ids: np.ndarray, vocab_size: int, *,
                       counts_V: np.ndarray | None = None) -> float:
    """Perplexity of an add-one-smoothed unigram model of ``train_ids`` (or their ``counts_V``) on ``target_ids``."""
    if counts_V is None:
        counts_V = np.bincount(train_ids, minlength=vocab_size)
    counts = np.asarray(counts_V, np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(np.exp(-logp[target_ids].mean()))


def count_params_of(params) -> int:
    """Scalars in a parameter pytree (``model.count_params`` counts them from the config)."""
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))
