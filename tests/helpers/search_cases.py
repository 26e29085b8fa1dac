"""The device-search key sets (random, clustered, large norms, duplicates) and a searcher's results on them.

Shared by ``retrieval/test_device_search.py`` and the 2-device subprocess it starts.
"""

import os

import numpy as np

from knnlm_jax.retrieval import device_search as ds

N, DIM, Q, K, BIG_K = 1000, 32, 17, 10, 1200  # N: no multiple of the block or of 2 devices
BLOCK = 128
COPIES = (3, 60, 128, 250, 400, 511, 512, 600, 700, 800, 900, 999)  # one key repeated, across blocks and devices


def random_case(rng):
    return rng.normal(size=(N, DIM)).astype(np.float16), rng.normal(size=(Q, DIM)).astype(np.float32)


def clustered_case(rng):
    """Tight clusters, rows 500-799 exact copies of rows 100-399 (ties across the device boundary)."""
    centers_CxD = rng.normal(size=(8, DIM)) * 3
    keys = (centers_CxD[rng.integers(8, size=N)] + rng.normal(size=(N, DIM)) * 0.05).astype(np.float16)
    keys[500:800] = keys[100:400]
    queries = np.concatenate([keys[[3, 100, 150, 399, 250, 520]].astype(np.float32),
                              (centers_CxD[rng.integers(8, size=Q - 6)] + rng.normal(size=(Q - 6, DIM)) * 0.05)])
    return keys, queries.astype(np.float32)


def large_case(rng):
    """Values around 100: float16 dot products overflow (> 65504), float32 accumulation must not."""
    keys = (rng.normal(size=(N, DIM)) * 100).astype(np.float16)
    queries = np.concatenate([keys[:5].astype(np.float32) + rng.normal(size=(5, DIM)),
                              rng.normal(size=(Q - 5, DIM)) * 100])
    return keys, queries.astype(np.float32)


def duplicates_case(rng):
    """One key at the ids ``COPIES``; the first queries sit near it, so the k-th place is a tie."""
    keys, queries = random_case(rng)
    keys[list(COPIES)] = keys[COPIES[0]]
    queries[:4] = keys[COPIES[0]].astype(np.float32) + rng.normal(size=(4, DIM)).astype(np.float32) * 0.3
    return keys, queries


CASES = {"random": random_case, "clustered": clustered_case, "large": large_case, "duplicates": duplicates_case}


def make_case(name):
    return CASES[name](np.random.default_rng(sorted(CASES).index(name)))


def searcher_results(devices, directory, big_k=False):
    """Every case searched by a :class:`DeviceSearcher` over ``devices``, keys read from a memmap in chunks.

    ``big_k``: also the random case with more neighbours than keys.
    """
    out = {}
    for name in CASES:
        keys, queries = make_case(name)
        path = os.path.join(directory, f"{name}.npy")
        np.save(path, keys)
        searcher = ds.DeviceSearcher(np.load(path, mmap_mode="r"), devices=devices, block=BLOCK, chunk_rows=150,
                                     max_queries=8)
        assert (searcher.ntotal, searcher.d) == (N, DIM)
        for k in (K, BIG_K) if name == "random" and big_k else (K,):
            out[f"{name}/{k}/dists"], out[f"{name}/{k}/ids"] = searcher.search(queries, k)
    return out
