"""Adaptive input (Baevski & Auli 2019) and adaptive softmax (Grave et al. 2017), Flax NNX.

The vocabulary is cut into bands ``[0, c1), [c1, c2), ..., [ck, V)``; band ``i`` has
embedding size ``d / factor**i``. With ``tie_adaptive_weights`` the softmax reuses the
input embeddings as output word vectors, and with ``tie_adaptive_proj`` it reuses the
input projections (transposed), as in fairseq's ``transformer_lm_wiki103``.

``precision`` is every matmul's precision (``None``: the backend's default); see
``ModelConfig.precision``.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
import jax.numpy as jnp
from flax import nnx

from knnlm_jax.core.errors import InputError


def band_edges(vocab_size: int, cutoffs: Sequence[int]) -> tuple[int, ...]:
    """``(0, c1, ..., ck, V)``, keeping only cutoffs strictly inside ``(0, V)``."""
    inner = sorted({int(c) for c in cutoffs if 0 < int(c) < vocab_size})
    return (0, *inner, vocab_size)


def band_dims(d_model: int, n_bands: int, factor: int) -> tuple[int, ...]:
    return tuple(max(1, int(d_model // factor**i)) for i in range(n_bands))


class AdaptiveInput(nnx.Module):
    """Token ids -> ``d_model`` vectors, with smaller embeddings for rarer bands."""

    def __init__(self, vocab_size: int, d_model: int, cutoffs, factor: int, *, precision=None, rngs: nnx.Rngs):
        self.edges = band_edges(vocab_size, cutoffs)
        self.dims = band_dims(d_model, len(self.edges) - 1, factor)
        self.embeddings = nnx.List()
        self.projections = nnx.List()
        xavier = nnx.initializers.xavier_uniform()
        for i, dim in enumerate(self.dims):
            size = self.edges[i + 1] - self.edges[i]
            init = nnx.initializers.normal(stddev=dim**-0.5)
            self.embeddings.append(nnx.Embed(size, dim, embedding_init=init, rngs=rngs))
            self.projections.append(nnx.Linear(dim, d_model, use_bias=False, kernel_init=xavier, precision=precision,
                                               rngs=rngs))

    def __call__(self, tokens_BxT: jax.Array) -> jax.Array:
        out_BxTxD = None
        for i, (embed, proj) in enumerate(zip(self.embeddings, self.projections)):
            lo, hi = self.edges[i], self.edges[i + 1]
            in_band_BxT = (tokens_BxT >= lo) & (tokens_BxT < hi)
            local_BxT = jnp.clip(tokens_BxT - lo, 0, hi - lo - 1)
            vec_BxTxE = embed(local_BxT) * in_band_BxT[..., None].astype(embed.embedding.dtype)
            band_BxTxD = proj(vec_BxTxE)
            out_BxTxD = band_BxTxD if out_BxTxD is None else out_BxTxD + band_BxTxD
        return out_BxTxD

    def band_weights(self, i: int) -> tuple[jax.Array, jax.Array]:
        """(embedding ``size x dim_i``, projection kernel ``dim_i x d_model``) of band ``i``."""
        return self.embeddings[i].embedding[...], self.projections[i].kernel[...]


class AdaptiveSoftmax(nnx.Module):
    """Hidden states -> log-probabilities over the vocabulary, factored into bands.

    The head scores the first band's words plus one "cluster" entry per tail band;
    ``log p(w in tail i) = log p_head(cluster i) + log p_tail_i(w)``.

    Dropout (training only) sits where fairseq's ``AdaptiveSoftmax.forward`` puts it: once on
    the softmax input, which the head and every tail then read, and again on each tail's
    projection before its output matrix. Masks are drawn in that order: input, then tails 0, 1, ...
    """

    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        cutoffs,
        factor: int,
        *,
        dropout: float,
        adaptive_input: AdaptiveInput | None,
        tie_proj: bool,
        precision=None,
        rngs: nnx.Rngs,
    ):
        self.edges = band_edges(vocab_size, cutoffs)
        self.dims = band_dims(d_model, len(self.edges) - 1, factor)
        self.tied = adaptive_input is not None
        self.tie_proj = bool(tie_proj and self.tied)
        n_tails = len(self.edges) - 2
        head_size = self.edges[1]
        self.precision = precision
        xavier = nnx.initializers.xavier_uniform()

        def linear(n_in, n_out, **kw):
            return nnx.Linear(n_in, n_out, use_bias=False, precision=precision, rngs=rngs, **kw)

        if self.tied:
            if adaptive_input.edges != self.edges or adaptive_input.dims != self.dims:
                raise InputError("tied adaptive softmax needs the adaptive input's cutoffs and factor")
            self.head_words = None
            self.head_classes = linear(d_model, n_tails) if n_tails else None
            # the head's word vectors are the band-0 embeddings; project first when their dim differs
            self.head_proj = linear(d_model, self.dims[0]) if self.dims[0] != d_model else None
        else:
            self.head_words = linear(d_model, head_size + n_tails, kernel_init=xavier)
            self.head_classes = None
            self.head_proj = None
        self.tail_proj = nnx.List()
        self.tail_out = nnx.List()
        for i in range(n_tails):
            dim, size = self.dims[i + 1], self.edges[i + 2] - self.edges[i + 1]
            self.tail_proj.append(None if self.tie_proj else linear(d_model, dim, kernel_init=xavier))
            self.tail_out.append(None if self.tied else linear(dim, size, kernel_init=xavier))
        self.dropout = nnx.Dropout(dropout)

    def _head_logits(self, h_BxTxD, adaptive_input):
        if not self.tied:
            return self.head_words(h_BxTxD)
        emb_WxE, _ = adaptive_input.band_weights(0)
        x = self.head_proj(h_BxTxD) if self.head_proj is not None else h_BxTxD
        words = jnp.matmul(x, emb_WxE.T, precision=self.precision)
        if self.head_classes is None:
            return words
        return jnp.concatenate([words, self.head_classes(h_BxTxD)], axis=-1)

    def _tail_logits(self, i, h_BxTxD, adaptive_input, deterministic, rngs):
        """Tail ``i``'s logits of (already dropped-out) softmax inputs; dropout again after the projection."""
        if self.tied:
            emb_SxE, proj_ExD = adaptive_input.band_weights(i + 1)
        x = jnp.matmul(h_BxTxD, proj_ExD.T, precision=self.precision) if self.tie_proj else self.tail_proj[i](h_BxTxD)
        x = self.dropout(x, deterministic=deterministic, rngs=rngs)
        return jnp.matmul(x, emb_SxE.T, precision=self.precision) if self.tied else self.tail_out[i](x)

    def target_log_probs(
        self, h_BxTxD, targets_BxT, adaptive_input=None, *, capacities=None, deterministic=True, rngs=None
    ):
        """``log p(target)`` at every position, without materialising the full distribution.

        ``capacities`` (one static int per tail band, see :func:`band_capacities`) computes
        each tail only for the positions whose target is in it, as fairseq does; each must be
        at least that count: a position left out by a too-small capacity gets NaN, never a
        finite wrong value. ``None`` computes every tail densely at every position.
        """
        h_BxTxD = self.dropout(h_BxTxD, deterministic=deterministic, rngs=rngs)  # one mask: head and tails alike
        head_lp = jax.nn.log_softmax(self._head_logits(h_BxTxD, adaptive_input).astype(jnp.float32), axis=-1)
        head_size = self.edges[1]
        idx = jnp.clip(targets_BxT, 0, head_size - 1)
        logp_BxT = jnp.take_along_axis(head_lp, idx[..., None], axis=-1)[..., 0]
        n_tails = len(self.edges) - 2
        if capacities is not None and len(capacities) != n_tails:
            raise ValueError(f"{len(capacities)} capacities for {n_tails} tail bands")
        shape = targets_BxT.shape
        for i in range(n_tails):
            lo, hi = self.edges[i + 1], self.edges[i + 2]
            in_band_BxT = (targets_BxT >= lo) & (targets_BxT < hi)
            if capacities is None:
                tail = self._tail_logits(i, h_BxTxD, adaptive_input, deterministic, rngs).astype(jnp.float32)
                local = jnp.clip(targets_BxT - lo, 0, hi - lo - 1)
                tail_lp = jnp.take_along_axis(jax.nn.log_softmax(tail, axis=-1), local[..., None], axis=-1)[..., 0]
                logp_BxT = jnp.where(in_band_BxT, head_lp[..., head_size + i] + tail_lp, logp_BxT)
                continue
            n = in_band_BxT.size
            cap = int(capacities[i])
            # the band's positions are NaN unless the scatter below covers them (capacity too small)
            logp_BxT = jnp.where(in_band_BxT, jnp.nan, logp_BxT)
            if cap <= 0:
                continue
            (rows_C,) = jnp.nonzero(in_band_BxT.reshape(n), size=cap, fill_value=n)
            safe_C = jnp.minimum(rows_C, n - 1)
            h_CxD = h_BxTxD.reshape(n, -1)[safe_C]
            tail = self._tail_logits(i, h_CxD, adaptive_input, deterministic, rngs).astype(jnp.float32)
            local_C = jnp.clip(targets_BxT.reshape(n)[safe_C] - lo, 0, hi - lo - 1)
            tail_lp_C = jnp.take_along_axis(jax.nn.log_softmax(tail, axis=-1), local_C[:, None], axis=-1)[:, 0]
            band_lp_C = head_lp.reshape(n, -1)[safe_C, head_size + i] + tail_lp_C
            logp_BxT = logp_BxT.reshape(n).at[rows_C].set(band_lp_C, mode="drop").reshape(shape)
        return logp_BxT

    def head_features(self, h_BxTxD, adaptive_input=None):
        """The head softmax's summary of each position, ``B x T x (2 + tails)``: its entropy (the tail
        clusters as single outcomes), its top log-prob, and each tail cluster's log-prob. Cheap
        (the head only): what adaptive retrieval decides from before any search."""
        head_lp = jax.nn.log_softmax(self._head_logits(h_BxTxD, adaptive_input).astype(jnp.float32), axis=-1)
        entropy = -jnp.sum(jnp.exp(head_lp) * head_lp, axis=-1, keepdims=True)
        top = jnp.max(head_lp, axis=-1, keepdims=True)
        return jnp.concatenate([entropy, top, head_lp[..., self.edges[1]:]], axis=-1)

    def full_log_probs(self, h_BxTxD, adaptive_input=None, *, deterministic=True, rngs=None):
        """``log p(w)`` for every word: ``B x T x V`` (use only where the full distribution is needed)."""
        h_BxTxD = self.dropout(h_BxTxD, deterministic=deterministic, rngs=rngs)  # one mask: head and tails alike
        head_lp = jax.nn.log_softmax(self._head_logits(h_BxTxD, adaptive_input).astype(jnp.float32), axis=-1)
        head_size = self.edges[1]
        parts = [head_lp[..., :head_size]]
        for i in range(len(self.edges) - 2):
            tail = self._tail_logits(i, h_BxTxD, adaptive_input, deterministic, rngs).astype(jnp.float32)
            parts.append(head_lp[..., head_size + i : head_size + i + 1] + jax.nn.log_softmax(tail, axis=-1))
        return jnp.concatenate(parts, axis=-1)


def band_capacities(targets, edges, mask=None, granularity: int | None = None) -> tuple[int, ...]:
    """Static per-tail capacities for a batch of targets (host NumPy): each band's count rounded up.

    Rounding to multiples of ``granularity`` (default ``n // 16``) keeps the number of
    distinct shapes, hence recompilations, small. ``targets`` may have a leading
    micro-batch axis ``F x ...``: the maximum over micro-batches is taken.
    """
    import numpy as np

    targets = np.asarray(targets)
    per_micro = targets.reshape(-1, *targets.shape[-2:]) if targets.ndim > 2 else targets[None]
    valid = None if mask is None else np.asarray(mask, bool).reshape(per_micro.shape)
    n = per_micro[0].size
    g = granularity or max(8, n // 16)
    caps = []
    for i in range(len(edges) - 2):
        in_band = (per_micro >= edges[i + 1]) & (per_micro < edges[i + 2])
        if valid is not None:
            in_band &= valid
        count = int(in_band.reshape(len(per_micro), -1).sum(axis=1).max())
        caps.append(min(n, -(-count // g) * g))
    return tuple(caps)


def block_band_counts(targets_NBxL, edges, mask_NBxL=None):
    """``NB x tails`` int64: how many targets of each block fall in each tail band (host NumPy)."""
    import numpy as np

    targets = np.asarray(targets_NBxL)
    counts = []
    for lo, hi in zip(edges[1:-1], edges[2:]):
        in_band = (targets >= lo) & (targets < hi)
        if mask_NBxL is not None:
            in_band &= np.asarray(mask_NBxL, bool)
        counts.append(in_band.sum(axis=-1))
    return np.stack(counts, axis=-1).astype(np.int64) if counts else np.zeros((len(targets), 0), np.int64)


def capacities_for_batches(counts_NBxH, batches_SxB, positions: int, granularity: int | None = None):
    """One capacity per tail band that fits every batch (rows of block ids): a single compiled shape.

    Rounded like :func:`band_capacities` (multiples of ``positions // 16``).
    """
    import numpy as np

    g = granularity or max(8, positions // 16)
    if counts_NBxH.shape[1] == 0:
        return ()
    worst_H = counts_NBxH[np.asarray(batches_SxB)].sum(axis=1).max(axis=0)
    return tuple(int(min(positions, -(-int(c) // g) * g)) for c in worst_H)


def build_capacities(tokens_N: np.ndarray, windows_Wx3: np.ndarray, batch_size: int, edges, window: int,
                     chunk: int = 1 << 22):
    """Adaptive-softmax tail capacities that fit every batch of a build: one compiled shape.

    Batch ``k`` holds windows ``[kB, (k+1)B)``, whose spans are one contiguous run of
    entries, so a band's count per batch is a segment sum, taken over ``chunk`` tokens at a
    time (memory does not grow with N). Rounded up as
    :func:`knnlm_jax.models.adaptive.band_capacities` rounds (multiples of ``positions // 16``).
    """
    starts = windows_Wx3[::batch_size, 1]
    positions = batch_size * window
    granularity = max(8, positions // 16)
    n_tails = len(edges) - 2
    counts = np.zeros((n_tails, len(starts)), np.int64)
    for a in range(0, len(tokens_N), chunk):
        band_C = np.searchsorted(edges, np.asarray(tokens_N[a : a + chunk]), side="right") - 1  # 0: head
        batch_C = np.searchsorted(starts, np.arange(a, a + len(band_C)), side="right") - 1
        for b in range(n_tails):
            counts[b] += np.bincount(batch_C[band_C == b + 1], minlength=len(starts))
    return tuple(min(positions, -(-int(c.max(initial=0)) // granularity) * granularity) for c in counts)
