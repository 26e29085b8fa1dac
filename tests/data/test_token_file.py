"""Training blocks read by range from the token file: the blocks, band counts and counts of the whole array."""

import numpy as np
import pytest

from knnlm_jax.data.blocks import lm_blocks
from knnlm_jax.data.token_file import TokenFile, TrainBlocks
from knnlm_jax.models.adaptive import block_band_counts


@pytest.fixture(params=["file", "array"])
def tokens(request, tmp_path):
    ids = np.random.default_rng(0).integers(0, 50, size=1003).astype(np.int32)
    if request.param == "array":
        return ids
    np.save(tmp_path / "t.npy", ids)
    return np.load(tmp_path / "t.npy", mmap_mode="r")


@pytest.mark.parametrize("length", [1, 7, 64])
def test_blocks_are_lm_blocks_without_the_copy(tokens, length):
    inputs, targets, mask = lm_blocks(tokens, length, eos=2, pad_last=False)
    blocks = TrainBlocks(TokenFile(tokens), length, eos=2)
    assert len(blocks) == len(inputs) and mask.all()
    order = np.random.default_rng(1).permutation(len(blocks))
    rows = blocks.rows(order)
    np.testing.assert_array_equal(rows[:, :-1], inputs[order])
    np.testing.assert_array_equal(rows[:, 1:], targets[order])
    edges = [0, 10, 30, 50]
    np.testing.assert_array_equal(blocks.band_counts(edges), block_band_counts(targets, edges))


def test_counts_and_chunks_cover_the_array_once(tokens, monkeypatch):
    from knnlm_jax.data import token_file

    monkeypatch.setattr(token_file, "CHUNK_TOKENS", 100)  # several reads
    f = TokenFile(tokens)
    np.testing.assert_array_equal(np.concatenate(list(f.chunks(100))), np.asarray(tokens))
    np.testing.assert_array_equal(f.bincount(60), np.bincount(np.asarray(tokens), minlength=60))
    assert f.read(1000, 2000).tolist() == np.asarray(tokens)[1000:].tolist() and len(f.read(5, 5)) == 0


def _mapped_kb(path: str) -> int:
    """Resident kB of this process's mappings of ``path`` (Linux smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            if "-" in line.split()[0]:
                inside = line.rstrip().endswith(path)
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1])
    return total


def test_a_memory_mapped_split_is_read_not_mapped(tmp_path):
    """Every block read through ``pread``: the memory map the split came in holds no resident page."""
    ids = np.arange(1 << 18, dtype=np.int32)
    np.save(tmp_path / "t.npy", ids)
    path = str(tmp_path / "t.npy")
    mapped = np.load(path, mmap_mode="r")
    blocks = TrainBlocks(TokenFile(mapped), 256, eos=0)
    assert blocks[3].tolist() == list(range(3 * 256 - 1, 4 * 256))
    rows = blocks.rows(np.arange(len(blocks)))
    assert rows[-1, -1] == ids[-1] and _mapped_kb(path) == 0
    assert int(mapped[-1]) == ids[-1] and _mapped_kb(path) > 0  # the check sees a page read through the map
