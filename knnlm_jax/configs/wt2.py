"""WikiText-2 on a 2-core CPU: the wt103 architecture shrunk (2 x 256) and AdamW, about an hour."""

from ml_collections import ConfigDict

from knnlm_jax.configs import wt103


def get_config() -> ConfigDict:
    c = wt103.get_config()
    c.name = "wt2"
    c.num_layers = 2
    # a CPU config: float32 and the hand-written attention (the numerics every run so far was trained with)
    c.attention_impl = "explicit"
    c.compute_dtype = "float32"
    c.remat = False
    c.d_model = 256
    c.num_heads = 4
    c.d_ff = 1024
    c.cutoffs = (2000, 10000)
    c.dropout = 0.2
    c.adaptive_softmax_dropout = 0.2
    c.tokens_per_sample = 256
    c.batch_size = 16
    c.update_freq = 1
    c.optimizer = "adamw"
    c.lr = 2e-3
    c.weight_decay = 0.01
    c.warmup_steps = 200
    c.min_lr = 1e-5
    c.max_steps = 2000
    c.clip_norm = 1.0
    c.eval_every = 250
    c.eval_batch_size = 16
    c.log_every = 50
    c.checkpoint_every = 250
    # evaluation windows follow tokens_per_sample (wt103's 3072/2560 are longer than this model's training length)
    c.eval_window = 0  # 0 = tokens_per_sample
    c.eval_context = -1  # -1 = half the window
    return c
