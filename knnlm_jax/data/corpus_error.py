"""The user error every corpus source raises: a corpus that is missing, empty or unreadable."""


class CorpusError(ValueError):
    """A user error: a corpus that is missing, empty or unreadable."""
