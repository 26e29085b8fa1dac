"""A tiny model's full training state (params, moved optimizer state, step, rng) for checkpoint tests."""

import jax
import jax.numpy as jnp
import optax

from knnlm_jax.models.steps import init_model
from knnlm_jax.models.transformer import ModelConfig

CFG = ModelConfig(vocab_size=40, num_layers=1, d_model=16, num_heads=2, d_ff=32, cutoffs=(8, 20))


def make_state(seed):
    _, params = init_model(CFG, seed)
    tx = optax.adamw(1e-3)
    opt_state = tx.init(params)
    # move the optimizer state away from zeros so the round trip checks real values
    grads = jax.tree_util.tree_map(lambda p: jnp.full_like(p, 0.1), params)
    _, opt_state = tx.update(grads, opt_state, params)
    return dict(params=params, opt_state=opt_state, step=jnp.array(7, jnp.int32), rng=jax.random.PRNGKey(3))
