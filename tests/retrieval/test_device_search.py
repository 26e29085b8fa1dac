"""Device-side exact search against ``faiss.IndexFlatL2``, on tiny float16 key sets.

Distances: FAISS (fewer than 20 queries) sums squared differences directly; the device
expands ``|q|^2 - 2 q·k + |k|^2`` in float32, whose error grows with the norms, not with
the distance. So distances must agree within 1e-4 relative plus an absolute ``1e-6 x``
the largest squared norm (near-duplicates sit at distances far below the norms). Ids:
equal, except that an entry may be swapped for another key at the same exact distance
(1e-5 relative); FAISS leaves the order of ties undefined, the device puts the lower id
first, which is checked on its own.
"""

import json
import os
import subprocess
import sys

import faiss
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import ROOT, TESTS
from helpers.search_cases import BIG_K, BLOCK, CASES, COPIES, DIM, K, N, Q, make_case, searcher_results
from knnlm_jax.retrieval import device_search as ds

topk = jax.jit(ds.topk_l2_blocked, static_argnames=("k", "block", "approx", "precision"))


def faiss_search(keys, queries, k):
    index = faiss.IndexFlatL2(keys.shape[1])
    index.add(keys.astype(np.float32))
    return index.search(queries, k)


def exact_dists(keys, queries, ids_QxK):
    """Float64 squared distances of each query to the keys ``ids_QxK`` name."""
    diff = keys.astype(np.float64)[ids_QxK] - queries.astype(np.float64)[:, None, :]
    return np.sum(diff * diff, -1)


def expansion_atol(keys):
    """Absolute error allowed in an expanded float32 distance: 1e-6 x the largest squared norm."""
    return 1e-6 * np.max(np.sum(keys.astype(np.float64) ** 2, 1))


def assert_matches_faiss(keys, queries, dists, ids, k, missing):
    want_dists, want_ids = faiss_search(keys, queries, k)
    found = want_ids >= 0
    np.testing.assert_array_equal(ids >= 0, found)
    np.testing.assert_array_equal(dists[~found], missing)
    atol = expansion_atol(keys)
    np.testing.assert_allclose(dists[found], want_dists[found], rtol=1e-4, atol=atol)
    assert all(len(set(row[row >= 0])) == np.sum(row >= 0) for row in ids), "an id returned twice"
    swapped = found & (ids != want_ids)
    mine = exact_dists(keys, queries, np.where(found, ids, 0))
    theirs = exact_dists(keys, queries, np.where(found, want_ids, 0))
    np.testing.assert_allclose(mine[swapped], theirs[swapped], rtol=1e-5, atol=1e-9 * atol,
                               err_msg="an id differs from FAISS's where the distances are not tied")
    return int(swapped.sum())


def assert_ties_to_lower_id(dists, ids):
    """Rows ascend by (distance, id), missing (-1) entries last."""
    d, i, found = dists[:, 1:], ids[:, 1:], ids[:, 1:] >= 0
    ascending = (d > dists[:, :-1]) | ((d == dists[:, :-1]) & (i > ids[:, :-1]))
    assert np.all(np.where(found, ascending & (ids[:, :-1] >= 0), True))


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    return searcher_results(jax.local_devices()[:1], str(tmp_path_factory.mktemp("one_device")))


@pytest.mark.parametrize("name", sorted(CASES))
def test_blocked_topk_matches_faiss(name):
    keys, queries = make_case(name)
    dists, ids = (np.asarray(x) for x in topk(queries, keys, k=K, block=BLOCK))
    assert (dists.dtype, ids.dtype, dists.shape) == (np.float32, np.int32, (Q, K))
    assert_matches_faiss(keys, queries, dists, ids, K, missing=np.inf)
    assert_ties_to_lower_id(dists, ids)


def test_more_neighbours_than_keys_are_missing():
    keys, queries = make_case("random")
    dists, ids = (np.asarray(x) for x in topk(queries, keys, k=BIG_K, block=BLOCK))
    assert np.all(ids[:, N:] == -1) and np.all(dists[:, N:] == np.inf)
    assert np.all(np.sort(ids[:, :N], 1) == np.arange(N)), "every key once, padding never"
    assert_matches_faiss(keys, queries, dists, ids, BIG_K, missing=np.inf)


def test_block_sizes_give_identical_results():
    """Identical ids; distances up to the matmul's rounding, which depends on the block's shape."""
    keys, queries = make_case("clustered")
    results = [tuple(np.asarray(x) for x in topk(queries, keys, k=K, block=b)) for b in (BLOCK, 333, N)]
    for dists, ids in results[1:]:
        np.testing.assert_array_equal(ids, results[0][1])
        np.testing.assert_allclose(dists, results[0][0], rtol=1e-6, atol=expansion_atol(keys))


def test_ties_go_to_the_lower_id():
    keys, queries = make_case("duplicates")
    dists, ids = (np.asarray(x) for x in topk(queries, keys, k=K, block=BLOCK))
    np.testing.assert_array_equal(ids[:4], np.broadcast_to(COPIES[:K], (4, K)))  # the k-th place is a tie
    assert np.all(dists[:4] == dists[:4, :1])
    assert_ties_to_lower_id(dists, ids)


def test_large_norms_need_float32_accumulation():
    keys, queries = make_case("large")
    naive = jnp.dot(jnp.asarray(queries, jnp.float16), jnp.asarray(keys).T)
    assert not np.all(np.isfinite(np.asarray(naive))), "float16 products should overflow here"
    dists, ids = (np.asarray(x) for x in topk(queries, keys, k=K, block=BLOCK))
    assert_matches_faiss(keys, queries, dists, ids, K, missing=np.inf)
    np.testing.assert_array_equal(ids[:5, 0], np.arange(5))


@pytest.mark.parametrize("name", sorted(CASES))
def test_searcher_matches_faiss(one_device, name):
    keys, queries = make_case(name)
    dists, ids = one_device[f"{name}/{K}/dists"], one_device[f"{name}/{K}/ids"]
    assert (dists.dtype, ids.dtype, dists.shape) == (np.float32, np.int64, (Q, K))
    assert_matches_faiss(keys, queries, dists, ids, K, missing=ds.MISSING)
    assert_ties_to_lower_id(dists, ids)
    if name == "duplicates":
        np.testing.assert_array_equal(one_device[f"{name}/{K}/ids"][:4], np.broadcast_to(COPIES[:K], (4, K)))


def test_searcher_loads_keys_padded_and_sharded(tmp_path):
    keys, _ = make_case("random")
    path = str(tmp_path / "keys.npy")
    np.save(path, keys)
    searcher = ds.DeviceSearcher(np.load(path, mmap_mode="r"), devices=jax.local_devices()[:1], block=BLOCK,
                                 chunk_rows=150)
    assert searcher.keys.shape == (1024, DIM) and searcher.keys.dtype == jnp.float16
    np.testing.assert_array_equal(np.asarray(searcher.keys)[:N], keys)
    assert not np.asarray(searcher.keys)[N:].any()
    np.testing.assert_allclose(np.asarray(searcher.center), keys.astype(np.float64).mean(0), atol=1e-5)
    assert [ds.query_bucket(b) for b in (1, 8, 9, 17, 64, 65)] == [8, 8, 16, 32, 64, 128]
    assert ds.shard_rows(N, 2, BLOCK) == (512, BLOCK) and ds.shard_rows(10, 2, BLOCK) == (5, 5)


TWO_DEVICES = r"""
import sys
sys.path[:0] = [{root!r}, {tests!r}]
import jax, numpy as np
from helpers.search_cases import searcher_results
devices = jax.local_devices()
assert len(devices) >= 2, devices
np.savez({out!r}, devices=len(devices), **searcher_results(devices[:2], {tmp!r}, big_k=True))
"""


def test_two_devices_give_the_same_results_as_one(one_device, tmp_path):
    out = str(tmp_path / "two.npz")
    code = TWO_DEVICES.format(root=ROOT, tests=TESTS, out=out, tmp=str(tmp_path))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    two = dict(np.load(out))
    assert int(two.pop("devices")) >= 2
    assert sorted(two) == sorted(list(one_device) + [f"random/{BIG_K}/dists", f"random/{BIG_K}/ids"]), \
        json.dumps(sorted(two))
    for name, value in one_device.items():  # same centre, same blocks: the same float32 results
        np.testing.assert_array_equal(two[name], value, err_msg=name)
    keys, queries = make_case("random")  # device 1 holds fewer than k keys
    dists, ids = two[f"random/{BIG_K}/dists"], two[f"random/{BIG_K}/ids"]
    assert_matches_faiss(keys, queries, dists, ids, BIG_K, missing=ds.MISSING)  # FAISS's value for -1
    assert np.all(ids[:, N:] == -1) and np.all(np.sort(ids[:, :N], 1) == np.arange(N))
    assert_ties_to_lower_id(dists, ids)


def test_the_searchers_distance_matmuls_run_at_highest_precision():
    """Read from the lowered computation (CPU ignores precision; a GPU would use TF32 without it): every dot
    of the search and of the key norms asks for HIGHEST."""
    import re

    from knnlm_jax.retrieval.device_search import DeviceSearcher, _search_fn

    keys = np.random.default_rng(0).normal(size=(300, 8)).astype(np.float16)
    searcher = DeviceSearcher(keys, block=64)
    fn = _search_fn(searcher.mesh, 4, searcher.block, searcher.approx, searcher.precision)
    queries = np.zeros((8, 8), np.float32)
    text = fn.lower(queries, searcher.keys, searcher.norms, searcher.center, searcher.valid).as_text()
    dots = re.findall(r"stablehlo\.dot_general.*", text)
    assert dots and all("precision = [HIGHEST, HIGHEST]" in d for d in dots), dots
