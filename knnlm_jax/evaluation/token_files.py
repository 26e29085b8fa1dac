"""The per-token files of one evaluated split: what stage 1 writes and stages 2-3 read.

``logp_lm`` N, ``targets`` N, and with a datastore ``dists``/``ids``/``hit``/``valid``
N x K sorted by distance, ``retrieved`` N (whether the token retrieved at all: adaptive
retrieval skips some), with the cache ``cache`` N x H; ``meta.json`` says what they answer
(``identity``) and how they were made. Written under ``DIR.tmp`` and renamed when complete.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

FILES_FORMAT = 1
META = "meta.json"


@dataclasses.dataclass
class TokenFiles:
    """The per-token quantities of one evaluated split (read-only memmaps)."""

    directory: str
    meta: dict
    logp_lm: np.ndarray  # N float32: log p_LM(target)
    targets: np.ndarray  # N int32
    dists: np.ndarray | None = None  # N x K float32 ascending; inf where invalid
    ids: np.ndarray | None = None  # N x K datastore ids; -1 where invalid (not found, or dropped self)
    hit: np.ndarray | None = None  # N x K bool: valid and the neighbour's value is the target
    valid: np.ndarray | None = None  # N x K bool
    cache: np.ndarray | None = None  # N x H float32: log p_cache(target) per θ of meta["cache_thetas"]
    retrieved: np.ndarray | None = None  # N bool: the token has a neighbour set (absent: every token has)
    features: np.ndarray | None = None  # N x F float32: head-softmax summary and query key (adaptive retrieval)

    @property
    def n(self) -> int:
        return len(self.logp_lm)

    @property
    def k(self) -> int:
        return 0 if self.dists is None else self.dists.shape[1]

    @property
    def thetas(self) -> tuple:
        return tuple(self.meta.get("cache_thetas") or ())

    def head(self, n: int) -> "TokenFiles":
        """The first ``n`` tokens' quantities (views, nothing copied)."""
        arrays = {a: getattr(self, a)[:n] for a in ARRAYS if getattr(self, a) is not None}
        return dataclasses.replace(self, meta=dict(self.meta, n=min(n, self.n)), **arrays)


ARRAYS = ("logp_lm", "targets", "dists", "ids", "hit", "valid", "cache", "retrieved", "features")
CACHE_FIELDS = ("cache_thetas", "cache_size")


def open_token_files(directory: str) -> TokenFiles | None:
    """The complete per-token files in ``directory``, or ``None`` (missing, unfinished or damaged)."""
    path = os.path.join(directory, META)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            meta = json.load(f)
        arrays = {}
        for name in ARRAYS:
            file = os.path.join(directory, name + ".npy")
            if os.path.isfile(file):
                arrays[name] = np.load(file, mmap_mode="r")
    except (OSError, ValueError):
        return None
    if meta.get("format") != FILES_FORMAT or "logp_lm" not in arrays or "targets" not in arrays:
        return None
    n = meta.get("n")
    if any(len(a) != n for a in arrays.values()):
        return None
    return TokenFiles(directory, meta, **arrays)


def files_match(files: TokenFiles | None, identity: dict) -> bool:
    """Whether saved files answer ``identity`` (cache fields only matter when a cache is asked for)."""
    if files is None:
        return False
    saved = files.meta.get("identity", {})
    strip = lambda d: {k: v for k, v in d.items() if k not in CACHE_FIELDS}  # noqa: E731
    if strip(saved) != strip(identity):
        return False
    if identity.get("cache_thetas"):
        return all(saved.get(k) == identity.get(k) for k in CACHE_FIELDS) and files.cache is not None
    return True
