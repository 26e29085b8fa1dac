"""Checkpoints (the only module that imports orbax).

A checkpoint holds a pytree (model parameters, optimizer state, step, RNG) and a JSON
dict of metadata (data position, best valid perplexity, ...).
"""

from __future__ import annotations

import contextlib
import logging
import os

import jax
import orbax.checkpoint as ocp


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


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read."""


class Checkpointer:
    def __init__(self, directory: str, max_to_keep: int = 2):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
        with _quiet_absl():
            self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        with _quiet_absl():
            return self._manager.latest_step()

    def save(self, step: int, tree, meta: dict) -> None:
        """Save ``step``, replacing a step of that number left by a killed run."""
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
            with _quiet_absl():
                restored = self._manager.restore(step, args=args)
        except Exception as err:  # orbax raises many types for damaged files
            msg = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise CheckpointError(f"checkpoint {self.directory}/{step} is unreadable: {msg}") from None
        return restored["state"], dict(restored["meta"])

    def close(self) -> None:
        self._manager.close()


def abstract_like(tree):
    """ShapeDtypeStructs (with shardings) of a pytree of arrays."""
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree
    )
