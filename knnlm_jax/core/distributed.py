"""Processes and devices: the one place train, build and evaluate start JAX's runtime and get a mesh.

JAX's multi-controller model: every process runs the same program on its slice of the work.
``jax.distributed.initialize`` connects them (auto-detected on SLURM and TPU pods; explicit
``--coordinator/--num_processes/--process_id`` otherwise, e.g. two processes on localhost,
which use gloo CPU collectives). Small arrays move between processes with
``jax.experimental.multihost_utils`` (all-gather, broadcast, barrier); nothing home-made.
"""

from __future__ import annotations

import argparse
import os
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import numpy as np

from knnlm_jax.core import locks
from knnlm_jax.core.errors import InputError, KnnlmError


class ProcessError(KnnlmError, ValueError):
    """Process flags that do not fit together (a user error)."""


@dataclass(frozen=True)
class Processes:
    """This process's place among the processes of one launch."""

    index: int = 0
    count: int = 1

    @property
    def is_main(self) -> bool:
        return self.index == 0

    @property
    def multi(self) -> bool:
        return self.count > 1


def add_process_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                        help="multi-process launch: address of process 0 (with --num_processes and --process_id; "
                             "auto-detected on SLURM and TPU pods)")
    parser.add_argument("--num_processes", "--num-processes", type=int, default=None, metavar="P",
                        help="processes in the launch (default 1, or what SLURM/TPU says)")
    parser.add_argument("--process_id", "--process-id", type=int, default=None, metavar="I",
                        help="this process's index in [0, P)")


def _cluster_detected() -> bool:
    """SLURM with several tasks, or a TPU pod: ``jax.distributed.initialize()`` finds the rest."""
    if int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_JOB_ID" in os.environ:
        return True
    return len([h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1


def check_process_args(coordinator, num_processes, process_id) -> None:
    """Refuse flags that cannot describe a launch, before anything is started."""
    given = [x is not None for x in (coordinator, num_processes, process_id)]
    if num_processes is not None and num_processes < 1:
        raise ProcessError(f"--num_processes {num_processes}: must be at least 1")
    if num_processes is not None and num_processes > 1 and not all(given):
        raise ProcessError("a multi-process launch needs --coordinator HOST:PORT, --num_processes P and "
                           "--process_id I together")
    if process_id is not None and not 0 <= process_id < (num_processes or 1):
        raise ProcessError(f"--process_id {process_id}: must be in [0, {num_processes or 1})")
    if coordinator is not None and ":" not in coordinator:
        raise ProcessError(f"--coordinator {coordinator!r}: expected HOST:PORT")


_CURRENT = Processes()


def initialize(coordinator=None, num_processes=None, process_id=None) -> Processes:
    """Start JAX's distributed runtime when the launch has several processes; returns this process's place."""
    global _CURRENT
    check_process_args(coordinator, num_processes, process_id)
    import jax

    if num_processes is not None and num_processes > 1:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id)
    elif num_processes is None and _cluster_detected():
        jax.distributed.initialize()
    _CURRENT = Processes(jax.process_index(), jax.process_count())
    return _CURRENT


def initialize_from(args) -> Processes:
    return initialize(args.coordinator, args.num_processes, args.process_id)


def current() -> Processes:
    """The place set by :func:`initialize` (one process if it was never called)."""
    return _CURRENT


# ---------------------------------------------------------------------------------
# meshes


def make_mesh():
    """A 1-D ``data`` mesh over all devices of the launch (training's data parallelism)."""
    import jax

    return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def local_mesh():
    """A 1-D ``data`` mesh over this process's devices: a build or evaluation shard runs on it."""
    import jax

    devices = np.asarray(jax.local_devices())
    return jax.sharding.Mesh(devices, ("data",), axis_types=(jax.sharding.AxisType.Auto,))


# ---------------------------------------------------------------------------------
# collectives (no-ops for one process)


def barrier(name: str) -> None:
    """Wait until every process reaches ``name``."""
    if _CURRENT.multi:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def allgather(array: np.ndarray) -> np.ndarray:
    """``P x ...``: every process's ``array`` (same shape and dtype in all), in process order."""
    array = np.asarray(array)
    if not _CURRENT.multi:
        return array[None]
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(array, tiled=False))


def broadcast(array: np.ndarray) -> np.ndarray:
    """Process 0's ``array``; the others pass one of the same shape and dtype."""
    array = np.asarray(array)
    if not _CURRENT.multi:
        return array
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.broadcast_one_to_all(array))


def broadcast_bytes(data: bytes | None) -> bytes:
    """Process 0's ``data`` (any length) on every process."""
    n = broadcast(np.asarray([len(data) if data is not None else 0], np.int64))[0]
    buffer = np.frombuffer(data, np.uint8) if _CURRENT.is_main else np.zeros(int(n), np.uint8)
    return broadcast(buffer).tobytes()


def allgather_rows(rows_RxD: np.ndarray) -> list[np.ndarray]:
    """Every process's rows (counts may differ), in process order."""
    counts = allgather(np.asarray([len(rows_RxD)], np.int64))[:, 0]
    padded = np.zeros((int(counts.max()),) + rows_RxD.shape[1:], rows_RxD.dtype)
    padded[: len(rows_RxD)] = rows_RxD
    gathered = allgather(padded)
    return [gathered[p, : counts[p]] for p in range(len(counts))]


@contextmanager
def held_locks(claims: list[tuple[str, str]]):
    """Hold this process's write locks ``[(lock path, what it guards)]`` for the block.

    Every process of a launch learns whether any was refused, so that none waits at a barrier
    for a peer that stopped: the refused one raises its own :class:`~knnlm_jax.core.locks.LockedError`
    (naming the holder), the others one that names the refused process.
    """
    with ExitStack() as stack:
        refusal = None
        try:
            for path, what in claims:
                stack.enter_context(locks.exclusive(path, what))
        except Exception as err:  # noqa: BLE001 - every process must learn of it before anyone raises
            refusal = err
        if _CURRENT.multi:
            refused = allgather(np.asarray([refusal is not None], np.int32)).reshape(-1)
            if refusal is None and refused.any():
                refusal = locks.LockedError(f"process {int(np.argmax(refused))} could not take its write lock "
                                            "(its message says why)")
        if refusal is not None:
            raise refusal
        yield


def check_batch_size(batch_size: int):
    """The data mesh (a ``jax.sharding.Mesh``); the batch must split evenly over its devices."""
    mesh = local_mesh()
    if batch_size < 1 or batch_size % mesh.devices.size:
        raise InputError(f"batch size {batch_size} is not a positive multiple of the {mesh.devices.size} devices")
    return mesh
