"""FAISS on GPUs, when the installed FAISS has GPU support (e.g. the ``faiss-gpu-cu12`` wheel).

With ``faiss-cpu`` (the default requirement) nothing here does anything: :func:`gpus`
is 0 and every function returns its argument. With GPU support:

- index training runs k-means on the GPUs (the coarse quantizer's assignment index is a
  GPU flat index; the trained index itself stays a CPU index, so it is written and
  merged exactly as before);
- keys are added on the host (the index is written and merged as before);
- searches run on a GPU copy of an in-RAM index (an on-disk merged index stays on the
  host: its lists are memory-mapped, not copied).

``KNNLM_FAISS_GPU=0`` turns it off.
"""

from __future__ import annotations

import os

import faiss
import numpy as np


def gpus() -> int:
    """GPUs FAISS can use: 0 with ``faiss-cpu``, or when ``KNNLM_FAISS_GPU=0``."""
    if os.environ.get("KNNLM_FAISS_GPU", "1") == "0" or not hasattr(faiss, "StandardGpuResources"):
        return 0
    return int(faiss.get_num_gpus())


def _options():
    co = faiss.GpuMultipleClonerOptions()
    co.useFloat16 = True  # 64-byte PQ codes need float16 lookup tables in GPU shared memory
    co.shard = True  # big indexes are split across the GPUs, not replicated
    return co


def cluster_on_gpus(index: faiss.Index) -> faiss.Index:
    """Let an IVF index's k-means assign on the GPUs (training only; the index stays on the host)."""
    ivf = faiss.try_extract_index_ivf(index)
    if gpus() and ivf is not None:
        ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatL2(ivf.d))
    return index


class OnGpus:
    """An in-RAM index searched through its GPU copy (``host`` stays for its metadata); a searcher
    (:class:`~knnlm_jax.retrieval.searcher.Searcher`)."""

    kind = "faiss"

    def __init__(self, host: faiss.Index):
        self.host = host
        ivf = faiss.try_extract_index_ivf(host)
        self.lists = int(ivf.nlist) if ivf is not None else 0
        self.gpu = faiss.index_cpu_to_all_gpus(host, _options())
        self.ntotal, self.d = host.ntotal, host.d

    def search(self, queries_BxD, k: int, nprobe: int | None = None):
        if nprobe is not None and faiss.try_extract_index_ivf(self.host) is not None:
            faiss.GpuParameterSpace().set_index_parameter(self.gpu, "nprobe", int(nprobe))
        return self.gpu.search(np.ascontiguousarray(queries_BxD, dtype=np.float32), int(k))


def for_search(index: faiss.Index):
    """``index`` searched on the GPUs when FAISS has them (an :class:`OnGpus`), else ``index`` itself.

    An index whose lists are on disk (memory-mapped) stays on the host.
    """
    if not gpus():
        return index
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None and isinstance(faiss.downcast_InvertedLists(ivf.invlists), faiss.OnDiskInvertedLists):
        return index
    return OnGpus(index)
