"""The one interface every searcher offers: FAISS indexes (in RAM, on disk, on GPUs), shards, device search.

Callers dispatch on what a searcher says it is (:class:`Searcher`), never on its class.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from knnlm_jax.retrieval import index as faiss_index


class Searcher(Protocol):
    """``search(queries QxD, k, nprobe) -> (dists QxK squared L2 ascending, ids QxK int64; -1 where none)``."""

    kind: str  # "faiss" (an index, approximate or not) or "device" (exact over the stored keys, in JAX)
    lists: int  # inverted lists the index probes (0: none, nprobe means nothing)

    def search(self, queries_QxD: np.ndarray, k: int, nprobe: int | None = None): ...


def index_lists(index) -> int:
    """How many inverted lists a FAISS index probes; 0 for one without."""
    ivf = faiss_index.faiss.try_extract_index_ivf(index)
    return int(ivf.nlist) if ivf is not None else 0


class IndexSearcher:
    """A FAISS index (in RAM or with its lists memory-mapped) as a :class:`Searcher`."""

    kind = "faiss"

    def __init__(self, index):
        self.index = index
        self.lists = index_lists(index)
        self.ntotal, self.d = index.ntotal, index.d

    def search(self, queries_QxD: np.ndarray, k: int, nprobe: int | None = None):
        return faiss_index.search(self.index, queries_QxD, k, nprobe if self.lists else None)


def as_searcher(searcher) -> Searcher:
    """``searcher`` itself when it offers the interface, else a bare FAISS index wrapped in one."""
    if hasattr(searcher, "kind") and hasattr(searcher, "lists"):
        return searcher
    return IndexSearcher(searcher)
