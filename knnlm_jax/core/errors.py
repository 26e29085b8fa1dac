"""The one base of every error a user causes (no JAX).

The tools show a :class:`KnnlmError` as one line and exit 2; anything else is a bug and keeps
its traceback. Each layer's own errors (``DatastoreError``, ``CorpusError``, ...) derive from
it, and :class:`InputError` is the plain one: a value, option or file the user gave is wrong.
They stay ``ValueError`` (or ``RuntimeError``) too, for callers that catch those.
"""

from __future__ import annotations


class KnnlmError(Exception):
    """An error caused by the user's input or files: reported as one line, no traceback."""


class InputError(KnnlmError, ValueError):
    """A value, option or file the user gave is wrong, and the message says how."""
