"""Processes and devices: the one place train, build and evaluate start JAX's runtime and get a mesh.

JAX's multi-controller model: every process runs the same program on its slice of the work.
``jax.distributed.initialize`` connects them (auto-detected on SLURM and TPU pods; explicit
``--coordinator/--num_processes/--process_id`` otherwise, e.g. two processes on localhost,
which use gloo CPU collectives). Small arrays move between processes with
``jax.experimental.multihost_utils`` (all-gather, broadcast, barrier); nothing home-made.
"""

from __future__ import annotations

import argparse
import atexit
import os
import sys
import threading
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import numpy as np

from knnlm_jax.core import locks, supervisor
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


@dataclass(frozen=True)
class Launch:
    """How this process was launched: alone, or as ``process_id`` of ``num_processes`` that meet at
    ``coordinator`` (``HOST:PORT``); all ``None`` lets SLURM or a TPU pod say. The processes must all
    connect within ``init_s`` seconds; a peer that sends no heartbeat for ``heartbeat_s`` seconds has
    failed; a finished process waits ``shutdown_s`` for the rest."""

    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    heartbeat_s: int = 15
    shutdown_s: int = 120
    init_s: int = 300

    @classmethod
    def from_args(cls, args) -> "Launch":
        return cls(args.coordinator, args.num_processes, args.process_id, args.heartbeat_timeout,
                   args.shutdown_timeout, args.init_timeout)

    def check(self) -> None:
        check_process_args(self.coordinator, self.num_processes, self.process_id)
        for name, value in (("--heartbeat-timeout", self.heartbeat_s), ("--shutdown-timeout", self.shutdown_s),
                            ("--init-timeout", self.init_s)):
            if value < 1:
                raise ProcessError(f"{name} {value}: must be at least 1 second")

    @property
    def multi(self) -> bool:
        """Several processes: given by the flags, or by SLURM or a TPU pod."""
        return (self.num_processes or 1) > 1 or (self.num_processes is None and _cluster_detected())


def add_process_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                        help="multi-process launch: address of process 0 (with --num_processes and --process_id; "
                             "auto-detected on SLURM and TPU pods)")
    parser.add_argument("--num_processes", "--num-processes", type=int, default=None, metavar="P",
                        help="processes in the launch (default 1, or what SLURM/TPU says)")
    parser.add_argument("--process_id", "--process-id", type=int, default=None, metavar="I",
                        help="this process's index in [0, P)")
    parser.add_argument("--heartbeat-timeout", "--heartbeat_timeout", dest="heartbeat_timeout", type=int,
                        default=Launch.heartbeat_s, metavar="S",
                        help=f"multi-process: a process silent this long has failed; every process then exits "
                             f"with one line (default {Launch.heartbeat_s})")
    parser.add_argument("--init-timeout", "--init_timeout", dest="init_timeout", type=int, default=Launch.init_s,
                        metavar="S", help=f"multi-process: how long the processes may take to all connect "
                                          f"(default {Launch.init_s})")
    parser.add_argument("--shutdown-timeout", "--shutdown_timeout", dest="shutdown_timeout", type=int,
                        default=Launch.shutdown_s, metavar="S",
                        help=f"multi-process: how long a finished process waits for the others to finish "
                             f"(default {Launch.shutdown_s})")


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


def initialize(launch: Launch = Launch()) -> Processes:
    """Start JAX's distributed runtime when the launch has several processes; returns this process's place."""
    global _CURRENT
    launch.check()
    import jax

    timeouts = dict(heartbeat_timeout_seconds=launch.heartbeat_s, shutdown_timeout_seconds=launch.shutdown_s,
                    initialization_timeout=launch.init_s)
    if launch.num_processes is not None and launch.num_processes > 1:
        jax.distributed.initialize(coordinator_address=launch.coordinator, num_processes=launch.num_processes,
                                   process_id=launch.process_id, **timeouts)
    elif launch.multi:
        jax.distributed.initialize(**timeouts)
    _CURRENT = Processes(jax.process_index(), jax.process_count())
    if _CURRENT.multi and supervisor.is_child():
        os.write(2, supervisor.CONNECTED)  # the supervisor now knows the launch came together
    if _CURRENT.multi:
        beat = threading.Thread(target=_beat, args=(_CURRENT.index,), daemon=True, name="knnlm-heartbeat")
        beat.start()
        # before JAX's own exit handler (registered earlier, so run later) destroys the runtime's client: a beat
        # still calling into it then aborts the process
        atexit.register(_stop_beat, beat)
    return _CURRENT


# ---------------------------------------------------------------------------------
# which peer stopped: each process counts up a key in the coordinator's key-value store

_ALIVE = "knnlm/alive/"
_PEER_LOST = ("Connection closed by peer", "Connection reset", "Broken pipe", "Connection refused")


def _client():
    from jax._src import distributed as jax_distributed  # the runtime's key-value store has no public handle

    return jax_distributed.global_state.client


_STOP_BEAT = threading.Event()


def _beat(index: int, every_s: float = 0.5) -> None:
    beat = 0
    while not _STOP_BEAT.is_set():
        beat += 1
        try:
            _client().key_value_set(f"{_ALIVE}{index}", str(beat), allow_overwrite=True)
        except Exception:  # noqa: BLE001 - the coordinator is gone: the runtime ends this process
            return
        _STOP_BEAT.wait(every_s)


def _stop_beat(thread: threading.Thread) -> None:
    _STOP_BEAT.set()
    thread.join(timeout=5)


def _beats() -> dict[int, str]:
    return {int(key.rsplit("/", 1)[1]): value for key, value in _client().key_value_dir_get(_ALIVE)}


def stopped_peers(wait_s: float = 2.0) -> list[int]:
    """The processes whose heartbeat key did not move in ``wait_s`` seconds (``[0]`` if the coordinator,
    which holds the keys, cannot be reached)."""
    try:
        before = _beats()
        time.sleep(wait_s)
        after = _beats()
    except Exception:  # noqa: BLE001 - no answer from the key-value store: the coordinator is gone
        return [0]
    return [p for p in range(_CURRENT.count) if p != _CURRENT.index and before.get(p) == after.get(p)]


def lost_peer(err: BaseException) -> str | None:
    """If ``err`` came from a peer going away, which process stopped (in words). The heartbeats decide:
    the runtime's wording for a vanished peer varies with the call that meets it."""
    if not _CURRENT.multi:
        return None
    stopped = stopped_peers()
    if not stopped:
        return "a peer process stopped" if any(s in str(err) for s in _PEER_LOST) else None
    names = [f"{p} (the coordinator)" if p == 0 else str(p) for p in stopped]  # the supervisor's wording
    return f"process{'es' if len(stopped) > 1 else ''} {', '.join(names)} stopped"


def leave(status: int) -> None:
    """End this process now with ``status``. Under several processes, skip the runtime's shutdown
    barrier (the peers wait in a collective for this one and would hold it for the shutdown timeout):
    the peers learn of it by its missing heartbeat and exit too."""
    if _CURRENT.multi:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)


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
