"""FAISS indexes: the automatic choice, exact self-retrieval, IVF-PQ, -1 ids, files."""

import os

import numpy as np
import pytest

from knnlm_jax.retrieval import index as ix


def keys_with_duplicates(n=600, dim=16, seed=0):
    keys = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float16)
    keys[10:20] = keys[0]  # repeated contexts give repeated keys
    return keys


def test_auto_factory_is_flat_when_small_and_the_papers_ivf_pq_when_large():
    assert ix.auto_factory(1000, 16) == "Flat"
    assert ix.auto_factory(ix.FLAT_MAX - 1, 1024) == "Flat"
    assert ix.auto_factory(ix.FLAT_MAX, 1024) == "IVF1024,PQ64"  # 2 sqrt(200k) = 894 -> 1024
    assert ix.auto_factory(103_000_000, 1024) == "IVF4096,PQ64"  # the paper's WikiText-103 index
    assert ix.auto_factory(2_088_628, 256) == "IVF2048,PQ64"  # WikiText-2 train: 2 sqrt(N) = 2890
    assert ix.auto_factory(1_000_000, 48) == "IVF2048,PQ48"  # code size divides the dimension
    assert ix.auto_factory(1_000_000, 100) == "IVF2048,PQ50"
    assert ix.auto_factory(5_000_000, 256) == "IVF4096,PQ64"


def test_auto_factory_from_the_paper_to_billions():
    assert ix.auto_factory(100_000, 1024) == "Flat"
    assert ix.auto_factory(2_000_000, 1024) == "IVF2048,PQ64"
    assert ix.auto_factory(103_000_000, 1024) == "IVF4096,PQ64"  # WikiText-103, as the paper
    assert ix.auto_factory(4096 * ix.MAX_PER_LIST, 1024) == "IVF4096,PQ64"  # the last size with 4096 lists
    assert ix.auto_factory(4096 * ix.MAX_PER_LIST + 1, 1024) == "IVF8192_HNSW32,PQ64"
    assert ix.auto_factory(2_870_000_000, 1024) == "IVF65536_HNSW32,PQ64"  # Wiki-3B: 43.8k keys per list
    for n in (3e8, 1e9, 2.87e9, 1e10):
        nlist = int(ix.auto_factory(int(n), 1024).split(",")[0][3:].split("_")[0])
        assert n / nlist <= ix.MAX_PER_LIST < 2 * n / nlist  # the fewest lists that keep <= 50k keys each


def test_flat_index_returns_each_key_at_distance_zero():
    keys = keys_with_duplicates()
    index, info = ix.build_index(keys, progress=False)
    assert info["factory"] == "Flat" and info["ntotal"] == len(keys) and info["trained_on"] == 0
    ids = np.concatenate([[0, 15], np.random.default_rng(1).choice(len(keys), 30, replace=False)])
    queries = keys[ids].astype(np.float32)
    dists, found = ix.search(index, queries, 5)
    assert dists.dtype == np.float32 and found.shape == (len(ids), 5)
    np.testing.assert_array_equal(dists[:, 0], 0.0)
    np.testing.assert_array_equal(keys[found[:, 0]].astype(np.float32), queries)  # the key itself or a duplicate
    dup_dists, dup_ids = ix.search(index, keys[:1].astype(np.float32), 11)
    assert set(dup_ids[0]) == {0, *range(10, 20)} and np.all(dup_dists[0] == 0.0)


def test_fewer_than_k_results_come_back_as_minus_one():
    keys = keys_with_duplicates(n=5)
    index, _ = ix.build_index(keys, "Flat", progress=False)
    dists, ids = ix.search(index, keys[:2], 8)
    assert np.all(ids[:, 5:] == -1) and np.all(ids[:, :5] >= 0)  # left as they are: the evaluator masks them
    assert np.all(dists[:, 5:] > 1e30)


def test_ivf_pq_builds_searches_and_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(20, 32)) * 4
    keys = (centers[rng.integers(20, size=4000)] + rng.normal(size=(4000, 32))).astype(np.float16)
    index, info = ix.build_index(keys, "IVF16,PQ8", nprobe=4, max_train=2000, progress=False)
    assert (info["factory"], info["ntotal"], info["nprobe"], info["trained_on"]) == ("IVF16,PQ8", 4000, 4, 2000)
    assert not ix.faiss.downcast_index(index).do_polysemous_training  # slow, and search does not use it
    queries = keys[:50].astype(np.float32)
    dists, ids = ix.search(index, queries, 10)
    assert np.all(ids >= 0) and np.all(np.diff(dists, axis=1) >= 0)
    assert np.mean(ids == np.arange(50)[:, None]) * 10 > 0.8  # the key itself is usually among the 10
    path = str(tmp_path / "index.faiss")
    ix.write_index(index, path)
    assert os.listdir(tmp_path) == ["index.faiss"]  # written under .tmp, then renamed
    again = ix.read_index(path, nprobe=4)
    np.testing.assert_array_equal(ix.search(again, queries, 10)[1], ids)
    wider = ix.search(again, queries, 10, nprobe=16)[0]
    assert np.all(wider[:, 0] <= dists[:, 0] + 1e-3)  # more probes never find a worse nearest code


def test_adding_in_chunks_from_a_float16_memmap(tmp_path, monkeypatch):
    monkeypatch.setattr(ix, "ADD_CHUNK", 64)
    keys = keys_with_duplicates(n=300)
    path = tmp_path / "keys.npy"
    np.save(path, keys)
    index, info = ix.build_index(np.load(path, mmap_mode="r"), "Flat", progress=False)
    assert index.ntotal == 300
    np.testing.assert_array_equal(ix.search(index, keys[299:], 1)[1], [[299]])


def test_bad_factories_are_one_line_value_errors():
    keys = keys_with_duplicates(n=50)
    for factory, message in (("Nonsense7", "could not parse"), ("IVF4,PQ5", "multiple of"),
                             ("IVF64,Flat", "Number of training points")):
        with pytest.raises(ValueError, match=message) as err:
            ix.build_index(keys, factory, progress=False)
        assert "\n" not in str(err.value)


def test_as_float32_decodes_float16_exactly():
    keys = np.random.default_rng(0).standard_normal((37, 12)).astype(np.float16)
    keys[0, :3] = [np.inf, -0.0, 6.1e-5]  # non-finite, signed zero, subnormal
    got = ix.as_float32(keys)
    assert got.dtype == np.float32 and got.shape == (37, 12)
    np.testing.assert_array_equal(got, keys.astype(np.float32))
    assert ix.as_float32(keys[:0]).shape == (0, 12)


def test_faiss_without_gpus_leaves_indexes_on_the_host(monkeypatch):
    """faiss-cpu (CI): no GPU copies, k-means untouched; KNNLM_FAISS_GPU=0 turns GPUs off even with them."""
    import faiss

    from knnlm_jax.retrieval import faiss_gpu

    index = faiss.index_factory(8, "IVF4,Flat")
    expected = int(faiss.get_num_gpus()) if hasattr(faiss, "StandardGpuResources") else 0
    assert faiss_gpu.gpus() == expected
    if expected == 0:
        assert faiss_gpu.for_search(index) is index
        assert faiss_gpu.cluster_on_gpus(index) is index and faiss.extract_index_ivf(index).clustering_index is None
    monkeypatch.setenv("KNNLM_FAISS_GPU", "0")
    assert faiss_gpu.gpus() == 0 and faiss_gpu.for_search(index) is index


def test_one_process_and_sharded_indexing_train_the_same_index():
    """A sharded build trains on the sample a one-process build draws, with the same k-means seed: the same
    coarse and product quantizers, so the same neighbours whatever the process count."""
    from knnlm_jax.core.distributed import Processes
    from knnlm_jax.datastore.indexing import share_trained

    rng = np.random.default_rng(1)
    keys = (rng.normal(size=(3000, 16)) * rng.uniform(0.5, 3, size=16)).astype(np.float16)
    factory = "IVF16,PQ4"
    whole, info = ix.build_index(keys, factory, nprobe=4, seed=7, progress=False)
    rows = ix.sample_rows(len(keys), ix.train_size(len(keys), factory), 7)
    shared, trained_on = share_trained(keys[rows], factory, 16, Processes(), seed=7, progress=False)
    other, _ = ix.build_index(keys, factory, nprobe=4, seed=8, progress=False)

    def quantizers(index):
        ivf = ix.faiss.extract_index_ivf(index)
        pq = ix.faiss.downcast_index(ivf).pq
        return ivf.quantizer.reconstruct_n(0, ivf.nlist), ix.faiss.vector_to_array(pq.centroids)

    assert trained_on == info["trained_on"] == len(rows)
    for a, b in zip(quantizers(whole), quantizers(shared)):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(quantizers(whole)[0], quantizers(other)[0])  # the seed is what decides
    ix.add_keys(shared, keys, progress=False)
    ix.set_nprobe(shared, 4)
    queries = keys[:40].astype(np.float32)
    np.testing.assert_array_equal(ix.search(whole, queries, 8)[1], ix.search(shared, queries, 8)[1])
