"""Training input: each process reads its rows of each global batch from the token file, through Grain.

The batch of update ``step`` is :class:`~knnlm_jax.data.blocks.BatchOrder`'s ``F x B`` blocks (the
same order whatever the process count). Micro-batch rows are sharded over the mesh's ``data``
axis, whose devices are numbered process by process, so process ``p`` of ``P`` holds rows
``[pB/P, (p+1)B/P)`` of each micro-batch: it reads only those blocks
(:class:`~knnlm_jax.data.token_file.TrainBlocks`, ``pread`` calls: nothing of the corpus stays
resident). A Grain ``MapDataset`` over the steps from the restored one makes a resumed run read
exactly what an uninterrupted one would; its iterator reads ahead in a thread.
"""

from __future__ import annotations

import dataclasses

import grain
import numpy as np

from knnlm_jax.data.blocks import BatchOrder
from knnlm_jax.data.token_file import TrainBlocks

PREFETCH = 2  # steps read ahead of the one being computed


@dataclasses.dataclass(frozen=True)
class StepRows:
    """``step -> (inputs F x B/P x L, targets F x B/P x L)``: this process's rows of the step's batch."""

    blocks: TrainBlocks
    order: BatchOrder
    update_freq: int
    batch_size: int
    process: int = 0
    processes: int = 1

    def __call__(self, step) -> tuple[np.ndarray, np.ndarray]:
        F, B, P = self.update_freq, self.batch_size, self.processes
        local = B // P
        idx_FxB = self.order.indices(int(step)).reshape(F, B)[:, self.process * local : (self.process + 1) * local]
        ids = self.blocks.rows(idx_FxB.reshape(-1)).reshape(F, local, -1)
        return ids[..., :-1], ids[..., 1:]


def step_batches(rows: StepRows, first_step: int, last_step: int):
    """An iterator of :class:`StepRows` outputs for steps ``[first_step, last_step)``, read ahead."""
    dataset = grain.MapDataset.range(first_step, last_step).map(rows)
    return iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=PREFETCH)))
