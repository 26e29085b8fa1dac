"""Checkpoints: bit-exact round trips, how many are kept, damaged ones refused."""

import os

import jax
import numpy as np
import pytest

from helpers.training_state import make_state
from knnlm_jax.core.checkpoint import Checkpointer, CheckpointError, abstract_like


def test_save_restore_round_trip_is_bit_exact(tmp_path):
    state = make_state(0)
    ckpt = Checkpointer(str(tmp_path / "ckpt"))
    ckpt.save(7, state, {"best_valid_ppl": 12.5, "position": 3})
    restored, meta = Checkpointer(str(tmp_path / "ckpt")).restore(abstract_like(make_state(1)))
    assert meta == {"best_valid_ppl": 12.5, "position": 3}
    a, b = jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(restored)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert jax.tree_util.tree_structure(state) == jax.tree_util.tree_structure(restored)


def test_max_to_keep_and_latest_step(tmp_path):
    ckpt = Checkpointer(str(tmp_path / "ckpt"), max_to_keep=2)
    state = make_state(0)
    for step in (2, 4, 6):
        ckpt.save(step, state, {})
    assert ckpt.latest_step() == 6
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["4", "6"]


def test_damaged_checkpoint_is_a_clear_error(tmp_path):
    ckpt = Checkpointer(str(tmp_path / "ckpt"))
    ckpt.save(1, make_state(0), {})
    for root, _, files in os.walk(tmp_path / "ckpt" / "1" / "state"):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"garbage")
    with pytest.raises(CheckpointError, match="unreadable"):
        Checkpointer(str(tmp_path / "ckpt")).restore(abstract_like(make_state(0)))
    with pytest.raises(CheckpointError, match="no checkpoint"):
        Checkpointer(str(tmp_path / "empty")).restore(abstract_like(make_state(0)))
