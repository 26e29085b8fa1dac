"""Corpus specs -> :class:`Split`: streamed lines of whitespace tokens and their sha256, cached by source identity.

Sources (a *corpus spec*):
- ``wiki-offline`` (the embedded default, :mod:`knnlm_jax.data.embedded_corpus`).
- a WikiText-format directory: ``{split}.txt`` or ``wiki.{split}.tokens``.
- a plain text file (a single split).
- ``tfds:NAME[/CONFIG][:SPLIT]``: a prepared TensorFlow Datasets dataset (:mod:`knnlm_jax.data.tfds_source`).
- ``wiki3b``: English Wikipedia (TFDS ``wikipedia/20230601.en``) capped at 2.87B tokens.

A :class:`Split` is never materialised: ``lines()`` streams, the vocabulary counts in chunks
and :func:`knnlm_jax.data.token_cache.load_tokens` encodes in chunks straight into an ``.npy``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Callable, Iterable, Iterator

from knnlm_jax.data.corpus_error import CorpusError
from knnlm_jax.data.embedded_corpus import EMBEDDED, EMBEDDED_SHA256, embedded_lines, embedded_path

SPLITS = ("train", "valid", "test")
FINGERPRINTS = "fingerprints.json"
DEFAULT_FINGERPRINT_DIR = os.path.join("~", ".cache", "knnlm_jax")


def hashing(lines: Iterable[str], h) -> Iterator[str]:
    """Yield ``lines`` while feeding ``h`` each one and a newline: a corpus's sha256 is of its lines so joined."""
    for line in lines:
        h.update(line.encode("utf-8"))
        h.update(b"\n")
        yield line


def _sha256_lines(lines: Iterable[str]) -> str:
    h = hashlib.sha256()
    for _ in hashing(lines, h):
        pass
    return h.hexdigest()


# ---------------------------------------------------------------------------------
# the fingerprint cache: sha256 of a split's text, keyed by its source's identity


def _fingerprint_path(cache_dir: str | None) -> str:
    return os.path.join(os.path.expanduser(cache_dir or DEFAULT_FINGERPRINT_DIR), FINGERPRINTS)


def _read_fingerprints(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            table = json.load(f)
        return table if isinstance(table, dict) else {}
    except (OSError, ValueError):
        return {}


def cached_sha256(identity: str, cache_dir: str | None = None) -> str | None:
    """The recorded sha256 of the text whose source has ``identity``, if any."""
    return _read_fingerprints(_fingerprint_path(cache_dir)).get(identity)


def record_sha256(identity: str, sha256: str, cache_dir: str | None = None) -> None:
    """Record ``sha256`` for ``identity`` (read-modify-write, replaced atomically; best effort)."""
    path = _fingerprint_path(cache_dir)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        table = _read_fingerprints(path)
        table[identity] = sha256
        fd, tmp = tempfile.mkstemp(prefix=FINGERPRINTS, dir=os.path.dirname(path))
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(table, f, indent=0, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        pass  # an unwritable cache only costs a re-hash next time


def file_identity(path: str) -> str:
    """Identity of a file's content for the fingerprint cache: absolute path, size, mtime."""
    st = os.stat(path)
    return f"file:{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}"


class Split:
    """One split of a corpus: a stream of its lines and the sha256 of their text.

    ``lines()`` returns a fresh iterator over the lines, in the same order every call (the
    split is never held in memory). ``sha256`` (over each line's utf-8 bytes + ``\\n``) is
    computed by streaming on first use and cached under ``identity`` (a string that changes
    whenever the source's content may have: path + size + mtime, dataset files, options) in
    ``<cache_dir>/fingerprints.json`` (default ``~/.cache/knnlm_jax``).
    """

    def __init__(self, corpus: str, split: str, open_lines: Callable[[], Iterable[str]], identity: str,
                 cache_dir: str | None = None):
        self.corpus, self.split, self.identity, self.cache_dir = corpus, split, identity, cache_dir
        self._open_lines = open_lines
        self._sha256: str | None = None

    def __repr__(self) -> str:
        return f"Split({self.corpus!r}, {self.split!r})"

    def lines(self) -> Iterator[str]:
        return iter(self._open_lines())

    def known_sha256(self) -> str | None:
        """The sha256 if already computed or cached, else ``None`` (no pass over the text)."""
        if self._sha256 is None:
            self._sha256 = cached_sha256(self.identity, self.cache_dir)
        return self._sha256

    def record_sha256(self, sha256: str) -> None:
        """Set the sha256 (computed by a caller's own pass over ``lines()``) and cache it."""
        self._sha256 = sha256
        record_sha256(self.identity, sha256, self.cache_dir)

    @property
    def sha256(self) -> str:
        if self.known_sha256() is None:
            self.record_sha256(_sha256_lines(self.lines()))
        return self._sha256


# ---------------------------------------------------------------------------------
# Reading splits


def _wikitext_file(directory: str, split: str) -> str:
    candidates = [os.path.join(directory, f"{split}.txt"), os.path.join(directory, f"wiki.{split}.tokens")]
    for path in candidates:
        if os.path.isfile(path):
            return path
    raise CorpusError(f"{directory}: no {split} split (looked for {split}.txt and wiki.{split}.tokens)")


def _read_lines(path: str) -> Iterator[str]:
    """The lines of a text file, streamed (universal newlines, ``\\n`` stripped)."""
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                yield line.rstrip("\n")
    except (OSError, UnicodeDecodeError) as err:
        raise CorpusError(f"{path}: cannot read ({err})") from None


def is_spec(source: str) -> bool:
    """Whether ``source`` names a catalog corpus (``tfds:...`` or ``wiki3b``) rather than a path."""
    from knnlm_jax.data import tfds_source

    return tfds_source.is_spec(source)


def _open_source(source: str, split: str, tfds_data_dir: str | None, text_feature: str):
    """``(name, open_lines, identity)`` of one split of ``source``."""
    if source in ("", EMBEDDED):
        embedded_path()  # fail now if the package is missing
        return EMBEDDED, lambda: embedded_lines(split), f"embedded:{EMBEDDED_SHA256}:{split}"
    if is_spec(source):
        from knnlm_jax.data import tfds_source

        return tfds_source.open_split(source, split, data_dir=tfds_data_dir, text_feature=text_feature)
    if os.path.isdir(source):
        path = _wikitext_file(source, split)
        return os.path.abspath(source), lambda: _read_lines(path), file_identity(path)
    if os.path.isfile(source):
        return os.path.abspath(source), lambda: _read_lines(source), file_identity(source)
    raise CorpusError(f"{source}: no such data directory or file")


TOKENIZERS = ("wikitext",)  # what ``tokenize`` may name


def _tokenized(open_lines: Callable[[], Iterable[str]], identity: str, tokenize: str | None):
    """``open_lines`` with each line tokenised as ``tokenize`` says (``None``: as it is), and its identity."""
    if tokenize is None:
        return open_lines, identity
    if tokenize not in TOKENIZERS:
        raise CorpusError(f"tokenize {tokenize!r}: choose one of {', '.join(TOKENIZERS)}")
    from knnlm_jax.data.wikitext import wikitext_tokenize

    return (lambda: (wikitext_tokenize(line) for line in open_lines())), f"{identity}:tokenize={tokenize}"


def read_split(source: str, split: str, *, tfds_data_dir: str | None = None, text_feature: str = "text",
               tokenize: str | None = None, cache_dir: str | None = None) -> Split:
    """``split`` of ``source`` as a :class:`Split` (streamed; nothing is read whole).

    ``source``: ``""``/``wiki-offline``, a WikiText directory, a text file, ``tfds:NAME[/CONFIG][:SPLIT]``
    or ``wiki3b``. ``tfds_data_dir`` (default: env ``TFDS_DATA_DIR``, else TFDS's default) and
    ``text_feature`` apply to TFDS sources; ``tokenize="wikitext"`` splits each line's punctuation off as
    WikiText is (its sha256 is of the tokenised text); ``cache_dir`` holds the fingerprint cache.
    A split without a non-blank line is an error (found without a full pass).
    """
    if split not in SPLITS:
        raise CorpusError(f"unknown split {split!r}; choose one of {SPLITS}")
    name, open_lines, identity = _open_source(source, split, tfds_data_dir, text_feature)
    open_lines, identity = _tokenized(open_lines, identity, tokenize)
    if not any(line.strip() for line in open_lines()):
        raise CorpusError(f"{name}: the {split} split is empty")
    return Split(name, split, open_lines, identity, cache_dir)

