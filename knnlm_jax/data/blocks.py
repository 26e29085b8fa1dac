"""Language-model blocks from a contiguous token stream, and the deterministic batch order.

The stream is ``[</s>] + tokens`` so that every token of the text is a target exactly once:
block ``i`` has inputs ``stream[iL:(i+1)L]`` and targets ``stream[iL+1:(i+1)L+1]``.
"""

from __future__ import annotations

import numpy as np

from knnlm_jax.core.errors import InputError


def lm_blocks(tokens_N: np.ndarray, length: int, eos: int, *, pad_last: bool):
    """``(inputs NBxL, targets NBxL, mask NBxL)``; ``pad_last`` keeps the final partial block."""
    stream = np.concatenate([np.asarray([eos], np.int32), np.asarray(tokens_N, np.int32)])
    n_targets = len(stream) - 1
    n_blocks = -(-n_targets // length) if pad_last else n_targets // length
    size = n_blocks * length
    padded = np.full(size + 1, eos, dtype=np.int32)
    padded[: min(len(stream), size + 1)] = stream[: size + 1]
    inputs = padded[:-1].reshape(n_blocks, length)
    targets = padded[1:].reshape(n_blocks, length)
    mask = (np.arange(size) < n_targets).reshape(n_blocks, length)
    return inputs, targets, mask


class BatchOrder:
    """Which training blocks make update ``step``: a fresh seeded permutation per epoch."""

    def __init__(self, n_blocks: int, blocks_per_update: int, seed: int):
        if n_blocks < blocks_per_update:
            raise InputError(
                f"the training split has {n_blocks} blocks, fewer than one update needs ({blocks_per_update}); "
                "lower batch_size, update_freq or tokens_per_sample"
            )
        self.n_blocks, self.per_update, self.seed = n_blocks, blocks_per_update, seed
        self.steps_per_epoch = n_blocks // blocks_per_update
        self._epoch, self._perm = -1, None

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, update index within the epoch) of a global step."""
        return divmod(step, self.steps_per_epoch)

    def indices(self, step: int) -> np.ndarray:
        epoch, i = self.position(step)
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_blocks)
        return self._perm[i * self.per_update : (i + 1) * self.per_update]
