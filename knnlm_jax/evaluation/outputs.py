"""An evaluation's output directory, replaced only by a complete new evaluation (no JAX).

A new evaluation writes everything it makes (per-token files it had to compute, log-probs,
sweeps, ``results.json``) into ``<out>/.next/``, beside the last complete evaluation, which it
can still reuse per-token files from. On success a ``COMMIT`` list is written there and its
entries are moved into ``<out>``, ``results.json`` last; outputs of the old evaluation that
the new one does not make (its results, sweeps, log-probs) are removed after that. A run that
is interrupted or killed before ``COMMIT`` leaves ``<out>`` exactly as it was; one interrupted
during the moves finishes them, and one killed during them is rolled forward by the next
writer or reader (:func:`results_path`). One writer at a time (a lock beside ``<out>``).
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager

from knnlm_jax.core import interrupts
from knnlm_jax.core import locks

NEXT, COMMIT, RESULTS = ".next", "COMMIT", "results.json"
OWN_OUTPUTS = ("results.json", "sweep_", "logprobs-")  # what one evaluation owns (per-token files are shared)


class Staging:
    """Where a new evaluation of ``out_dir`` writes until it commits."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self.dir = os.path.join(out_dir, NEXT)

    def path(self, name: str) -> str:
        """Where the new evaluation writes ``name`` now."""
        return os.path.join(self.dir, name)

    def final(self, path: str) -> str:
        """Where ``path`` (staged, or already in ``out_dir``) lives once committed."""
        return os.path.join(self.out_dir, os.path.basename(os.path.normpath(path)))

    def saved(self, name: str) -> list[str]:
        """Candidates for reuse: the one staged by this evaluation first, then the committed one."""
        return [self.path(name), os.path.join(self.out_dir, name)]

    def commit(self) -> None:
        """Mark the staged outputs complete, then move them into place."""
        names = sorted(n for n in os.listdir(self.dir) if n != COMMIT and not n.endswith(".tmp"))
        names.sort(key=lambda n: n == RESULTS)  # results.json moves last
        _write_json(self.path(COMMIT), names)
        roll_forward(self.out_dir)


def _write_json(path: str, value) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(value, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def _committed(out_dir: str) -> list[str] | None:
    try:
        with open(os.path.join(out_dir, NEXT, COMMIT)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def roll_forward(out_dir: str) -> None:
    """Finish a commit that was interrupted (idempotent); without one, do nothing."""
    names = _committed(out_dir)
    if names is None:
        return
    staged = os.path.join(out_dir, NEXT)
    for name in names:
        src, dst = os.path.join(staged, name), os.path.join(out_dir, name)
        if not os.path.lexists(src):
            continue  # moved before the interruption
        if os.path.isdir(dst):
            trash = os.path.join(staged, f".old-{name}")
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(dst, trash)
        os.replace(src, dst)
    for name in os.listdir(out_dir):  # the old evaluation's own outputs the new one did not make
        if name.startswith(OWN_OUTPUTS) and name not in names:
            os.remove(os.path.join(out_dir, name))
    shutil.rmtree(staged)


def results_path(out_dir: str) -> str:
    """The last complete evaluation's ``results.json``.

    A commit that a killed writer left half-moved is finished first (under the writer's lock);
    while a live writer is moving one, its staged ``results.json`` is the complete one.
    """
    if _committed(out_dir) is not None:
        try:
            with locks.exclusive(locks.lock_path(out_dir), f"the evaluation in {out_dir}"):
                roll_forward(out_dir)
        except (locks.LockedError, OSError):  # a writer is finishing it, or this reader cannot write here
            pass
    staged = os.path.join(out_dir, NEXT, RESULTS)
    if _committed(out_dir) is not None and os.path.isfile(staged):
        return staged
    return os.path.join(out_dir, RESULTS)


def tuned(out_dir: str) -> dict:
    """λ and T tuned on valid by the last complete evaluation in ``out_dir`` ({} if none)."""
    try:
        with open(results_path(out_dir)) as f:
            knn = json.load(f).get("knn") or {}
    except (OSError, ValueError):
        return {}
    return {key: knn[key] for key in ("lmbda", "temperature") if isinstance(knn.get(key), (int, float))}


@contextmanager
def staging(out_dir: str):
    """One writer's new evaluation of ``out_dir``: lock, clear stale staging, yield a :class:`Staging`.

    Left without :meth:`Staging.commit` (an error, Ctrl-C), the staged files are removed and
    ``out_dir`` is as it was.
    """
    with locks.exclusive(locks.lock_path(out_dir), f"the evaluation in {out_dir}"):
        os.makedirs(out_dir, exist_ok=True)
        roll_forward(out_dir)
        stage = Staging(out_dir)
        shutil.rmtree(stage.dir, ignore_errors=True)  # an earlier run's, interrupted before its commit

        def abandon():  # uncommitted: remove; committed but interrupted while moving: finish the move
            if _committed(out_dir) is None:
                shutil.rmtree(stage.dir, ignore_errors=True)
            else:
                roll_forward(out_dir)

        os.makedirs(stage.dir)
        try:
            with interrupts.cleanup_on_interrupt(abandon):
                yield stage
        finally:
            abandon()
