"""A pretrained LM (``--model PATH``): no training fields, only how build and evaluate use it.

Windows of 512 tokens (the fastest per token on a CPU); a stored entry has at least 128
tokens of context (a build does 4/3 of the forward work), a scored token at least 256.
``d_model`` and ``vocab_size`` are read from the model each time it is used.
"""

from ml_collections import ConfigDict


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.name = "pretrained"
    c.model = ""  # a .gguf file, a Hugging Face directory, or "smollm2" (the embedded SmolLM2-135M-Instruct)
    c.data_dir = "wiki-offline"  # the corpus build and evaluate default to (set up from --data_dir)
    c.key_type = "ffn_input_after_ln"
    c.tokens_per_sample = 512
    c.build_window = 0  # 0 = tokens_per_sample
    c.build_context = 128
    c.eval_window = 0
    c.eval_context = 256
    c.eval_batch_size = 4
    c.d_model = 0
    c.vocab_size = 0
    return c
