"""A datastore's nearest entries for a batch of queries: search, self-drop, exact re-ranking, values.

Written once, used by the streaming evaluation, generation and the Python API.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from knnlm_jax.datastore.format import Datastore, DatastoreError
from knnlm_jax.retrieval.index import DEFAULT_NPROBE
from knnlm_jax.retrieval.policies import exact_distances, nearest
from knnlm_jax.retrieval.searcher import Searcher, as_searcher


@dataclasses.dataclass(frozen=True)
class Neighbours:
    """The ``k`` nearest entries of ``Q`` queries, ascending; ``-1`` ids, ``inf`` distances where none."""

    dists_QxK: np.ndarray
    ids_QxK: np.ndarray
    vals_QxK: np.ndarray  # each entry's value: the token that followed its context
    found_QxK: np.ndarray
    self_dropped: int = 0


@dataclasses.dataclass(frozen=True)
class Retriever:
    """``k`` neighbours from ``store`` through ``searcher``; ``exact`` re-ranks by full-precision L2.

    ``nprobe``: inverted lists probed (``None``: the index's own setting; ignored without lists).
    A ``k`` above the datastore's size pads with ``-1`` ids (the tools refuse it as a user error).
    """

    store: Datastore
    searcher: Searcher
    k: int
    exact: bool = True
    nprobe: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "searcher", as_searcher(self.searcher))
        if self.k < 1:
            raise DatastoreError(f"k {self.k}: the number of neighbours must be a positive integer")
        if self.exact and self.store.keys is None:
            raise DatastoreError(f"datastore {self.store.name} keeps no keys (built with --keys none): exact "
                                 "re-ranking needs them; search approximately")
        if not self.searcher.lists:
            object.__setattr__(self, "nprobe", None)  # nothing to probe

    @classmethod
    def for_store(cls, store: Datastore, searcher, k: int, exact: bool = True, nprobe: int | None = None):
        """A retriever probing ``nprobe`` lists, else the number recorded with the datastore's index."""
        info = store.manifest.get("index") or {}
        return cls(store, searcher, k, exact, nprobe or info.get("nprobe") or DEFAULT_NPROBE)

    def candidates(self, queries_QxD: np.ndarray):
        """The searcher's own top-k ``(dists, ids)``, unranked by the stored keys."""
        return self.searcher.search(np.asarray(queries_QxD, np.float32), self.k, self.nprobe)

    def nearest(self, queries_QxD: np.ndarray, own_ids_Q=None, candidates=None) -> Neighbours:
        """The ``k`` nearest entries of each query; ``own_ids_Q``: each query's own entry, dropped.

        ``candidates(queries) -> (dists, ids)``: the search to use (default :meth:`candidates`;
        a caller may time or count it).
        """
        queries_QxD = np.asarray(queries_QxD, np.float32)
        dists, ids = (candidates or self.candidates)(queries_QxD)
        dropped = 0
        if own_ids_Q is not None:
            own = ids == np.asarray(own_ids_Q)[:, None]
            dropped = int(own.sum())
            ids = np.where(own, -1, ids)
        if self.exact:
            dists = exact_distances(self.store.keys, queries_QxD, ids)
        dists, ids = nearest(dists, ids, self.k)
        vals, found = self.values(ids)
        return Neighbours(dists, ids, vals, found, dropped)

    def values(self, ids_QxK: np.ndarray):
        """``(vals QxK, found QxK)``: each id's stored next token (0 where the id is -1)."""
        found = ids_QxK >= 0
        vals = np.asarray(self.store.vals[np.where(found, ids_QxK, 0).reshape(-1)]).reshape(ids_QxK.shape)
        return vals, found
