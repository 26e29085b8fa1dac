"""Sharded indexes: train once, add per shard, merge on disk or merge results; same answers as one index.

Ties: FAISS does not define the order of equal distances (heap order), nor which of
several keys at the k-th distance make the cut. ``canonical`` sorts each row by
(distance, id); results then agree when distances are equal exactly and ids are equal
everywhere except in the group tied at the last (k-th) distance, where the two sides may
legitimately pick different members (that group's size is fixed by the distances).
"""

import os
import shutil

import numpy as np
import pytest

from knnlm_jax.retrieval import index as ix
from knnlm_jax.retrieval import index_shards as shards

DIM, N, Q, K, NPROBE = 64, 3000, 300, 20, 4
BOUNDS = (0, 700, 2100, N)  # three shards of unequal sizes


def clustered_keys(n=N, dim=DIM, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(24, dim)) * 3
    return (centers[rng.integers(24, size=n)] + rng.normal(size=(n, dim))).astype(np.float16)


def canonical(dists_QxK, ids_QxK):
    order = np.lexsort((ids_QxK, dists_QxK), axis=1)
    return np.take_along_axis(dists_QxK, order, 1), np.take_along_axis(ids_QxK, order, 1)


def assert_same_results(got, want):
    (dists_got, ids_got), (dists_want, ids_want) = canonical(*got), canonical(*want)
    np.testing.assert_array_equal(dists_got, dists_want)
    before_last_tie = dists_want < dists_want[:, -1:]
    np.testing.assert_array_equal(ids_got[before_last_tie], ids_want[before_last_tie])
    assert np.all((ids_got >= 0) == (ids_want >= 0))


@pytest.fixture(scope="module")
def keys():
    return clustered_keys()


@pytest.fixture(scope="module", params=["IVF16,PQ4", "IVF16_HNSW8,PQ4"])
def built(request, keys, tmp_path_factory):
    """A trained index, its shard files, the monolithic index and queries."""
    factory = request.param
    trained = ix.train_index(keys[ix.sample_rows(N, 2000, seed=0)], factory, DIM, seed=0)
    directory = tmp_path_factory.mktemp("shards")
    paths = []
    for s in range(len(BOUNDS) - 1):
        shard = ix.copy_index(trained)
        info = ix.add_keys(shard, keys[BOUNDS[s] : BOUNDS[s + 1]], first_id=BOUNDS[s], progress=False)
        assert (info["added"], info["id_offset"], info["ids"]) == (BOUNDS[s + 1] - BOUNDS[s], 0, "global")
        paths.append(str(directory / f"shard{s}.faiss"))
        ix.write_index(shard, paths[-1])
    whole = ix.copy_index(trained)
    ix.add_keys(whole, keys, progress=False)
    queries = clustered_keys(Q, seed=1).astype(np.float32)
    return dict(trained=trained, paths=paths, whole=whole, queries=queries, directory=directory)


def test_merged_on_disk_index_answers_as_one_index(built, tmp_path):
    index_path, ivfdata_path = str(tmp_path / "index.faiss"), str(tmp_path / "index.ivfdata")
    info = shards.merge_on_disk(built["trained"], built["paths"], index_path, ivfdata_path)
    assert info["ntotal"] == N and sorted(os.listdir(tmp_path)) == ["index.faiss", "index.ivfdata"]
    assert built["trained"].ntotal == 0  # not modified
    merged = ix.read_index(index_path, nprobe=NPROBE)
    assert ix.ondisk_lists(merged) is not None and merged.ntotal == N
    want = ix.search(built["whole"], built["queries"], K, NPROBE)
    assert_same_results(ix.search(merged, built["queries"], K), want)


def test_searching_shards_and_merging_results_answers_as_one_index(built):
    parts = [ix.search(ix.read_index(path), built["queries"], K, NPROBE) for path in built["paths"]]
    got = shards.merge_results([d for d, _ in parts], [i for _, i in parts], K)
    assert_same_results(got, ix.search(built["whole"], built["queries"], K, NPROBE))


def test_merged_index_survives_being_moved(built, tmp_path):
    first = tmp_path / "a" / "store"
    first.mkdir(parents=True)
    shards.merge_on_disk(built["trained"], built["paths"], str(first / "index.faiss"), str(first / "index.ivfdata"))
    want = ix.search(ix.read_index(str(first / "index.faiss")), built["queries"], K, NPROBE)
    moved = tmp_path / "b"
    shutil.move(str(first), str(moved))
    got = ix.search(ix.read_index(str(moved / "index.faiss")), built["queries"], K, NPROBE)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


def test_missing_or_short_ivfdata_is_a_one_line_value_error(built, tmp_path):
    index_path, ivfdata_path = str(tmp_path / "index.faiss"), str(tmp_path / "index.ivfdata")
    shards.merge_on_disk(built["trained"], built["paths"], index_path, ivfdata_path)
    with open(ivfdata_path, "rb+") as f:
        f.truncate(os.path.getsize(ivfdata_path) // 2)  # as if another process was killed writing it
    with pytest.raises(ValueError, match="index.ivfdata have .* bytes, .* expected") as err:
        ix.read_index(index_path)
    assert "\n" not in str(err.value)
    os.remove(ivfdata_path)
    with pytest.raises(ValueError, match="on-disk inverted lists are unreadable .*index.ivfdata") as err:
        ix.read_index(index_path)
    assert "\n" not in str(err.value)


def test_a_killed_merge_leaves_no_complete_looking_index(built, tmp_path, monkeypatch):
    index_path, ivfdata_path = str(tmp_path / "index.faiss"), str(tmp_path / "index.ivfdata")
    shards.merge_on_disk(built["trained"], built["paths"], index_path, ivfdata_path)

    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(shards.faiss, "write_index", killed)
    with pytest.raises(KeyboardInterrupt):
        shards.merge_on_disk(built["trained"], built["paths"], index_path, ivfdata_path)
    assert "index.faiss" in os.listdir(tmp_path)  # the old merge is intact: its files were not touched
    assert ix.read_index(index_path).ntotal == N
    monkeypatch.undo()
    replace = os.replace

    def killed_after_the_lists(src, dst):
        replace(src, dst)
        if dst == ivfdata_path:
            raise KeyboardInterrupt

    monkeypatch.setattr(shards.os, "replace", killed_after_the_lists)
    with pytest.raises(KeyboardInterrupt):
        shards.merge_on_disk(built["trained"], built["paths"], index_path, ivfdata_path)
    assert not os.path.exists(index_path)  # new lists, but no index to pair them with an old one


def test_flat_shards_with_id_offsets_answer_as_one_flat_index(keys):
    queries = clustered_keys(Q, seed=1).astype(np.float32)
    whole, _ = ix.build_index(keys, "Flat", progress=False)
    dists_list, ids_list = [], []
    for s in range(len(BOUNDS) - 1):
        shard = ix.train_index(keys[:0], "Flat", DIM)
        info = ix.add_keys(shard, keys[BOUNDS[s] : BOUNDS[s + 1]], first_id=BOUNDS[s], progress=False)
        assert (info["id_offset"], info["ids"]) == (BOUNDS[s], "local")
        dists, ids = ix.search(shard, queries, K)
        dists_list.append(dists)
        ids_list.append(shards.shift_ids(ids, info["id_offset"]))
    assert_same_results(shards.merge_results(dists_list, ids_list, K), ix.search(whole, queries, K))


def test_merge_results_puts_missing_neighbours_last():
    dists_a, ids_a = np.array([[1.0, 4.0, shards.MISSING]], np.float32), np.array([[7, 9, -1]])
    dists_b, ids_b = np.array([[2.0, 3.0]], np.float32), np.array([[100, 101]])
    dists, ids = shards.merge_results([dists_a, dists_b], [ids_a, ids_b], 6)
    np.testing.assert_array_equal(ids, [[7, 100, 101, 9, -1, -1]])
    np.testing.assert_array_equal(dists[0, :4], [1, 2, 3, 4])
    assert np.all(dists[0, 4:] == shards.MISSING)
    with pytest.raises(ValueError, match="must both be"):
        shards.merge_results([dists_a, dists_b], [ids_a, ids_b[:, :1]], 2)


def test_shards_of_another_training_are_refused(built, keys, tmp_path):
    other = ix.train_index(keys[:2000], "IVF16,PQ4", DIM, seed=5)
    with pytest.raises(ValueError, match="not built from this trained index"):
        shards.merge_on_disk(other, built["paths"], str(tmp_path / "i.faiss"), str(tmp_path / "i.ivfdata"))
    with pytest.raises(ValueError, match="must be in the directory"):
        shards.merge_on_disk(built["trained"], built["paths"], str(tmp_path / "i.faiss"), "/tmp/elsewhere.ivfdata")


def test_fastscan_shards_are_searched_apart_and_answer_as_one_index(keys, tmp_path):
    """FastScan lists do not merge on disk (one clear error); searched apart they answer as one index."""
    trained = ix.train_index(keys[ix.sample_rows(N, 2000, seed=0)], "IVF16,PQ8x4fs", DIM, seed=0)
    assert not ix.mergeable(trained) and ix.mergeable(ix.train_index(keys[:2000], "IVF16,PQ4", DIM, seed=0))
    queries = clustered_keys(Q, seed=1).astype(np.float32)
    whole = ix.copy_index(trained)
    ix.add_keys(whole, keys, progress=False)
    dists_list, ids_list, paths = [], [], []
    for s in range(len(BOUNDS) - 1):
        shard = ix.copy_index(trained)
        ix.add_keys(shard, keys[BOUNDS[s] : BOUNDS[s + 1]], first_id=BOUNDS[s], progress=False)
        paths.append(str(tmp_path / f"shard{s}.faiss"))
        ix.write_index(shard, paths[-1])
        dists, ids = ix.search(shard, queries, K, NPROBE)
        dists_list.append(dists)
        ids_list.append(ids)
    assert_same_results(shards.merge_results(dists_list, ids_list, K), ix.search(whole, queries, K, NPROBE))
    with pytest.raises(ValueError, match="do not merge on disk"):
        shards.merge_on_disk(trained, paths, str(tmp_path / "i.faiss"), str(tmp_path / "i.ivfdata"))
    assert not os.path.exists(tmp_path / "i.faiss")


def test_train_size_grows_with_the_lists():
    assert ix.train_size(500_000, "IVF1024,PQ64") == 500_000  # capped at N
    assert ix.train_size(103_000_000, "IVF4096,PQ64") == 1_000_000  # the paper's sample
    assert ix.train_size(2_870_000_000, "IVF65536_HNSW32,PQ64") == 64 * 65536  # >= 39 per centroid
    assert ix.train_size(5_000_000, "Flat") == 1_000_000
