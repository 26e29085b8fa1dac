"""The paper's base LM (Baevski & Auli 2019, as used by Khandelwal et al. 2020) on WikiText-103.

16 layers, d 1024, 8 heads, FFN 4096, pre-norm, sinusoidal positions, adaptive input
and softmax (cutoffs 20000/60000, factor 4, tied weights and projections), dropout
0.3 / attention 0.1 / activation 0.1, 3072 tokens per sample, NAG lr 1.0 with a
cosine schedule and 16000 warm-up steps, clipping 0.1, 286k updates.

Speed (for GPUs/TPUs; none changes the parameters): bf16 activations and matmuls with
float32 parameters, optimizer state, softmax and loss (``compute_dtype``), and fused
attention (``attention_impl = "auto"``: cuDNN's flash kernel on a GPU, XLA's elsewhere).
The paper's attention dropout (0.1) cannot run inside a fused kernel, so training keeps
the explicit attention and the fused one serves evaluation and datastore builds;
``--set attention_dropout=0`` (a departure from the paper) fuses training too. ``remat``
stays off: at 1 sequence of 3072 tokens per device (8 devices) the activations fit in
80 GB; on fewer devices (8 sequences on one) turn it on. On a CPU, ``--set
compute_dtype=float32`` (bf16 matmuls are slow there).
"""

from ml_collections import ConfigDict


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.name = "wt103"
    # data
    c.data_dir = ""  # "" = the embedded demo corpus; else a WikiText-format directory
    c.seed = 1
    # model
    c.vocab_size = 0  # 0 = size of the vocabulary built from the training split
    c.num_layers = 16
    c.d_model = 1024
    c.num_heads = 8  # fairseq transformer_lm_baevski_wiki103: decoder_attention_heads 8
    c.d_ff = 4096
    c.cutoffs = (20000, 60000)
    c.adaptive_factor = 4
    c.tie_adaptive_weights = True
    c.tie_adaptive_proj = True
    c.dropout = 0.3
    c.attention_dropout = 0.1
    c.activation_dropout = 0.1
    c.adaptive_softmax_dropout = 0.2
    c.final_norm = False  # fairseq's transformer_lm_wiki103 has no final LayerNorm
    c.scale_embedding = True
    c.key_type = "ffn_input_after_ln"
    # speed (see the docstring); tiny and wt2 set float32 and the explicit attention
    c.attention_impl = "auto"  # explicit (hand-written, materialises B x H x T x T) | xla | cudnn | auto
    c.compute_dtype = "bfloat16"  # float32 | bfloat16 (parameters, optimizer state, softmax, loss stay float32)
    c.remat = False  # recompute each block's activations in the backward pass
    # training (fairseq: 8 GPUs x 1 sample x 3072 tokens x update_freq 3 = 73,728 tokens/update)
    c.tokens_per_sample = 3072
    c.batch_size = 8  # sequences per micro-batch, summed over all devices
    c.update_freq = 3  # gradient accumulation: micro-batches per update
    c.optimizer = "nag"
    c.lr = 1.0
    c.momentum = 0.99
    c.beta1 = 0.9
    c.beta2 = 0.98
    c.weight_decay = 0.0
    c.warmup_steps = 16000
    c.warmup_init_lr = 1e-7
    c.min_lr = 1e-4
    c.max_steps = 286000
    c.clip_norm = 0.1
    # evaluation, logging, checkpoints
    c.eval_every = 2000
    c.eval_batch_size = 8
    c.max_eval_tokens = 0  # 0 = the whole valid split
    c.log_every = 100
    c.checkpoint_every = 2000
    c.keep_checkpoints = 2
    # early stopping: stop after this many evaluations in a row without a better valid perplexity
    # (0: never); the learning-rate schedule still spans max_steps, so a stopped run is a prefix of a full one
    c.patience = 0
    # datastore (build.py): windows of build_window tokens, each stored entry with at least
    # build_context tokens of prior context (paper: 3072 and 1536 on WikiText-103)
    c.build_window = 0  # 0 = tokens_per_sample
    c.build_context = -1  # -1 = half the window
    # evaluation (evaluate.py): windows of eval_window tokens scoring their last
    # eval_window - eval_context tokens, each with at least eval_context tokens of prior
    # context (paper: score 512 tokens with up to 2560 prior on WikiText-103)
    c.eval_window = 3072  # 0 = tokens_per_sample
    c.eval_context = 2560  # -1 = half the window
    return c
