"""Checkpoints (the only module that imports orbax).

A checkpoint holds a pytree (model parameters, optimizer state, step, RNG) and a JSON
dict of metadata (data position, best valid perplexity, ...). The metadata also records a
CRC-32 of every leaf, checked after each restore: a damaged file is refused, never resumed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
import zlib

import jax
import numpy as np
import orbax.checkpoint as ocp

from knnlm_jax.core.errors import KnnlmError

CHECKSUMS = "_leaf_crc32"  # metadata key, removed from the metadata restore() returns


@contextlib.contextmanager
def _quiet_absl():
    """orbax logs damaged files itself; our error says it in one line."""
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        absl.setLevel(level)


@contextlib.contextmanager
def _stderr_silenced():
    """File descriptor 2 (and thread tracebacks) to /dev/null for the duration."""
    sys.stderr.flush()
    saved, hook = os.dup(2), threading.excepthook
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    threading.excepthook = lambda args: None
    try:
        yield
    except Exception as err:  # orbax's threads may still be dying: stay silent; the error keeps the real stderr
        os.close(devnull)
        err.stderr_fd = saved
        raise
    sys.stderr.flush()
    os.dup2(saved, 2)
    os.close(saved)
    os.close(devnull)
    threading.excepthook = hook


class CheckpointError(KnnlmError, RuntimeError):
    """A checkpoint that cannot be read or written."""

    # True after a failed orbax write: its (non-daemon) threads stay blocked, so a CLI must exit with os._exit
    threads_stuck = False


class NonFiniteState(KnnlmError, ValueError):
    """A tree with a NaN or an infinity, refused by :meth:`Checkpointer.save`."""


def _host(x) -> np.ndarray:
    """This process's copy of a (replicated) array."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = x.addressable_data(0)
    return np.asarray(x)


def leaf_summary(tree) -> tuple[dict[str, int], list[str]]:
    """``({leaf path: CRC-32 of its bytes}, [paths of floating-point leaves with a NaN or an infinity])``."""
    checksums, non_finite = {}, []
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name, a = jax.tree_util.keystr(path), np.ascontiguousarray(_host(x))
        checksums[name] = zlib.crc32(a.reshape(-1).view(np.uint8))
        if jax.numpy.issubdtype(a.dtype, jax.numpy.inexact) and not np.isfinite(a).all():
            non_finite.append(name)
    return checksums, non_finite


def _os_error(err: BaseException) -> OSError | None:
    """The ``OSError`` behind an exception (orbax wraps them; tensorstore reports one in its message), if any."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError):
            return err
        code = re.search(r"os_error_code='?(\d+)", str(err))  # tensorstore: a ValueError naming the errno
        if code:
            return OSError(int(code.group(1)), os.strerror(int(code.group(1))))
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


@contextlib.contextmanager
def _writing(directory: str, threads_stuck: bool = False):
    """An ``OSError`` (full disk, read-only or blocked directory) becomes one ``CheckpointError`` line."""
    try:
        yield
    except Exception as err:
        os_err = _os_error(err)
        if os_err is None:
            raise
        reason = f"[Errno {os_err.errno}] {os_err.strerror}" if os_err.strerror else str(os_err)
        error = CheckpointError(f"cannot write {directory}: {reason}; fix it and run the same command again")
        error.threads_stuck = threads_stuck
        error.stderr_fd = getattr(err, "stderr_fd", None)
        if threads_stuck:
            threading.excepthook = lambda args: None  # orbax's writer threads die noisily after the failure
        raise error from None


class Checkpointer:
    def __init__(self, directory: str, max_to_keep: int = 2):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
        with _quiet_absl(), _writing(self.directory):
            os.makedirs(self.directory, exist_ok=True)  # a file in its place fails here, before orbax starts threads
            self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        with _quiet_absl():
            return self._manager.latest_step()

    def save(self, step: int, tree, meta: dict) -> None:
        """Save ``step`` with its leaves' checksums, replacing a step of that number left by a killed run.

        A tree with a non-finite leaf is refused (:class:`NonFiniteState`): it would rotate good ones out.
        """
        checksums, bad = leaf_summary(tree)
        if bad:
            raise NonFiniteState(f"not saving step {step} in {self.directory}: {bad[0]} is not finite")
        meta = dict(meta, **{CHECKSUMS: checksums})
        with _quiet_absl(), _writing(self.directory, threads_stuck=True), _stderr_silenced():
            if step in self._manager.all_steps():
                self._manager.delete(step)
            args = ocp.args.Composite(state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta))
            self._manager.save(step, args=args, force=True)
            self._manager.wait_until_finished()

    def restore(self, abstract_tree, step: int | None = None):
        """``(tree, meta)`` at ``step`` (default: latest); ``abstract_tree`` gives shapes, dtypes, shardings."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"{self.directory}: no checkpoint to restore")
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_tree), meta=ocp.args.JsonRestore())
        try:
            with _quiet_absl(), _stderr_silenced():  # a damaged file makes orbax's threads print their ends
                restored = self._manager.restore(step, args=args)
        except Exception as err:  # orbax raises many types for damaged files
            msg = str(err).splitlines()[0] if str(err) else type(err).__name__
            msg = re.sub(r"\s*\[tensorstore_spec.*$", "", msg)[:200]  # not the whole storage spec
            error = CheckpointError(f"checkpoint step {step} in {self.directory} is damaged (unreadable: {msg})")
            error.threads_stuck = True  # orbax's reader threads may outlive the failure: exit without them
            error.stderr_fd = getattr(err, "stderr_fd", None)
            threading.excepthook = lambda args: None  # ... and their dying tracebacks are not the user's error
            raise error from None
        tree, meta = restored["state"], dict(restored["meta"])
        saved = meta.pop(CHECKSUMS, None)  # None: a checkpoint from before checksums were recorded
        checksums, bad = leaf_summary(tree)
        if saved is not None and checksums != saved:
            reason = "checksum mismatch"
        elif bad:
            reason = f"{bad[0]} is not finite"
        else:
            return tree, meta
        raise CheckpointError(f"checkpoint step {step} in {self.directory} is damaged ({reason})")

    def close(self) -> None:
        self._manager.close()


def abstract_like(tree):
    """ShapeDtypeStructs (with shardings) of a pytree of arrays."""
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree
    )
