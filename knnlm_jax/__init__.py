"""knnlm-jax: nearest-neighbour language models (Khandelwal et al., ICLR 2020) in JAX/Flax.

The Python API (:mod:`knnlm_jax.api`), imported on first use so that ``import knnlm_jax`` stays
light (no JAX, no FAISS)::

    import knnlm_jax as knnlm
    lm = knnlm.load("runs/demo")
    print(lm.score("the king sang .", lm.datastore("train")).perplexity)
"""

from knnlm_jax.core.errors import KnnlmError

__version__ = "0.1.0"

_API = ("load", "LM", "Store", "Scores", "Generation")
__all__ = ["KnnlmError", "Sampling", "Settings", *_API]


def __getattr__(name: str):
    if name in _API:
        from knnlm_jax import api

        return getattr(api, name)
    if name == "Sampling":
        from knnlm_jax.generation import Sampling

        return Sampling
    if name == "Settings":
        from knnlm_jax.evaluation.settings import Settings

        return Settings
    raise AttributeError(f"module 'knnlm_jax' has no attribute {name!r}")
