"""knnlm-jax: nearest-neighbour language models (Khandelwal et al., ICLR 2020) in JAX/Flax."""

__version__ = "0.1.0"
