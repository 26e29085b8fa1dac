"""optax optimizers and schedules: the paper's NAG + cosine recipe, or AdamW."""

from __future__ import annotations

import optax

from knnlm_jax.core.errors import InputError


def lr_schedule(config) -> optax.Schedule:
    """Linear warm-up from ``warmup_init_lr`` to ``lr``, then one cosine period down to ``min_lr``.

    With the wt103 numbers (16k warm-up, 286k updates) this is fairseq's cosine schedule
    with one 270k-update period.
    """
    return optax.warmup_cosine_decay_schedule(
        init_value=config.warmup_init_lr,
        peak_value=config.lr,
        warmup_steps=config.warmup_steps,
        decay_steps=max(config.max_steps, config.warmup_steps + 1),
        end_value=config.min_lr,
    )


def make_optimizer(config) -> optax.GradientTransformation:
    schedule = lr_schedule(config)
    clip = [optax.clip_by_global_norm(config.clip_norm)] if config.clip_norm > 0 else []
    if config.optimizer == "nag":
        decay = [optax.add_decayed_weights(config.weight_decay)] if config.weight_decay > 0 else []
        return optax.chain(*clip, *decay, optax.sgd(schedule, momentum=config.momentum, nesterov=True))
    if config.optimizer == "adamw":
        return optax.chain(
            *clip,
            optax.adamw(schedule, b1=config.beta1, b2=config.beta2, weight_decay=config.weight_decay),
        )
    raise InputError(f"unknown optimizer {config.optimizer!r}; choose nag or adamw")
