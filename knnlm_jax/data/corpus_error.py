"""The user error every corpus source raises: a corpus that is missing, empty or unreadable."""

from knnlm_jax.core.errors import KnnlmError


class CorpusError(KnnlmError, ValueError):
    """A user error: a corpus that is missing, empty or unreadable."""
