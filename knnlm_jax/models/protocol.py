"""The model protocol: what a language model provides to be built into a datastore, evaluated and
used for generation. :class:`~knnlm_jax.models.transformer.TransformerLM` and
:class:`~knnlm_jax.models.llama.LlamaLM` implement it; so can a user's own Flax NNX model.

A model is an ``nnx.Module`` whose ``cfg`` has ``vocab_size``, ``d_model`` and ``cutoffs``
(the adaptive softmax's band edges; ``()`` for a full softmax), and which implements the
methods below. Key types are names of states at the last layer: ``attn_output``,
``ffn_input_before_ln``, ``ffn_input_after_ln`` (the paper's default), ``block_output`` and
``final_output`` (the softmax input, what the continuous cache remembers).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class LanguageModel(Protocol):
    cfg: object  # vocab_size, d_model, cutoffs

    def __call__(self, tokens_BxT, *, key_type=None, rows_R=None):
        """The softmax input ``B x T x D`` (float32). With ``key_type`` (a name or a tuple), each named
        state is sown as ``nnx.Intermediate`` under its name, float32. With ``rows_R`` (flat ``B x T``
        positions) the output and the sown states are ``1 x R x D`` at those positions only."""

    def target_log_probs(self, h_BxTxD, targets_BxT, *, capacities=None):
        """``log p(target)`` ``B x T`` from softmax inputs; ``capacities``: an adaptive softmax's rows per
        band (may be ignored)."""

    def full_log_probs(self, h_BxTxD):
        """``log p`` over the whole vocabulary, ``B x T x V``."""

    def head_features(self, h_BxTxD):
        """What adaptive retrieval gates on, ``B x T x len(band_edges(vocab_size, cutoffs))``: e.g. the
        softmax's entropy and top log-prob (a full softmax: 2 values)."""

    def empty_cache(self, batch: int, max_len: int):
        """The state :meth:`decode_step` carries (e.g. attention keys and values), for generation."""

    def decode_step(self, token_B, cache, pos):
        """One position ``pos`` after the cached ones: ``(softmax input Bx1xD, {key type: Bx1xD}, cache)``."""
