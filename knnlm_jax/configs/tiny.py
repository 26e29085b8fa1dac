"""The demo: a tiny model on the embedded Wikipedia-summaries corpus, minutes on a CPU."""

from ml_collections import ConfigDict

from knnlm_jax.configs import wt2


def get_config() -> ConfigDict:
    c = wt2.get_config()
    c.name = "tiny"
    c.num_layers = 2
    c.d_model = 128
    c.num_heads = 4
    c.d_ff = 512
    c.cutoffs = (2000, 10000)
    c.dropout = 0.1
    c.attention_dropout = 0.0
    c.activation_dropout = 0.0
    c.adaptive_softmax_dropout = 0.0
    c.tokens_per_sample = 128
    c.batch_size = 16
    c.lr = 2e-3
    c.warmup_steps = 100
    c.max_steps = 600
    c.eval_every = 200
    c.checkpoint_every = 200
    return c
