import numpy as np

from knnlm_jax.data.blocks import BatchOrder, lm_blocks


def test_lm_blocks_align_every_target_once():
    tokens = np.arange(10, 33, dtype=np.int32)  # 23 tokens
    inputs, targets, mask = lm_blocks(tokens, 5, eos=2, pad_last=True)
    assert inputs.shape == (5, 5) and mask.sum() == 23
    np.testing.assert_array_equal(targets[mask], tokens)  # each token is a target exactly once, in order
    assert inputs[0, 0] == 2  # the stream starts with </s>
    flat_in, flat_tgt = inputs.reshape(-1), targets.reshape(-1)
    np.testing.assert_array_equal(flat_in[1:23], flat_tgt[:22])  # target t is input t+1
    full_in, full_tgt, full_mask = lm_blocks(tokens, 5, eos=2, pad_last=False)
    assert full_in.shape == (4, 5) and full_mask.all()


def test_batch_order_is_a_seeded_permutation_per_epoch():
    order = BatchOrder(n_blocks=10, blocks_per_update=3, seed=7)
    assert order.steps_per_epoch == 3
    epoch0 = np.concatenate([order.indices(s) for s in range(3)])
    assert len(set(epoch0)) == 9
    epoch1 = np.concatenate([order.indices(s) for s in range(3, 6)])
    assert not np.array_equal(epoch0, epoch1)
    again = BatchOrder(10, 3, seed=7)
    np.testing.assert_array_equal(again.indices(4), order.indices(4))  # random access: resumable
    assert order.position(4) == (1, 1)
