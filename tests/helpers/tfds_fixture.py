"""Real TFDS datasets in ArrayRecord format, written from local text for the tests (no network, no TF).

``write_tfds_wikitext(wikitext_dir, data_dir)`` turns a WikiText-format directory into the TFDS
dataset ``wikitext_tfds_test`` (feature ``text``, one example per article, splits train /
validation / test in file order) and returns its corpus spec; ``write_tfds_articles(articles,
data_dir)`` writes ``wiki_articles_test/small`` (features ``title``, ``text``; split train).
"""

from __future__ import annotations

import os
import re

import tensorflow_datasets as tfds
from etils import epath

HEADING = re.compile(r"^ = [^=].*[^=] = $")
SPLITS = {"train": "train", "validation": "valid", "test": "test"}
# where TFDS finds the builders' code: this file (TFDS's own lookup, for a builder in a package, needs
# importlib_resources, which is not installed)
CODE_PATH = epath.Path(__file__)


def wikitext_articles(path: str) -> list[str]:
    """A WikiText file's lines grouped into articles (a new one at each top-level heading), joined by "\\n"."""
    with open(path, encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f]
    groups: list[list[str]] = []
    for line in lines:
        if not groups or HEADING.match(line):
            groups.append([])
        groups[-1].append(line)
    return ["\n".join(g) for g in groups]


class WikitextTfdsTest(tfds.core.GeneratorBasedBuilder):
    """A WikiText-format directory as a TFDS dataset: one example per article."""

    code_path = CODE_PATH
    VERSION = tfds.core.Version("1.0.0")
    SOURCE_DIR = ""  # set before building

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
                                     disable_shuffling=True)

    def _split_generators(self, dl_manager):
        return {tfds_split: self._generate_examples(os.path.join(self.SOURCE_DIR, f"{ours}.txt"))
                for tfds_split, ours in SPLITS.items() if os.path.isfile(os.path.join(self.SOURCE_DIR, f"{ours}.txt"))}

    def _generate_examples(self, path):
        for i, text in enumerate(wikitext_articles(path)):
            yield i, {"text": text}


class WikiArticlesTestConfig(tfds.core.BuilderConfig):
    pass


class WikiArticlesTest(tfds.core.GeneratorBasedBuilder):
    """Raw Wikipedia-like articles (``title``, ``text``), a config as in ``wikipedia/20230601.en``."""

    code_path = CODE_PATH
    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [WikiArticlesTestConfig(name="small")]
    ARTICLES: list[tuple[str, str]] = []  # set before building

    def _info(self):
        features = tfds.features.FeaturesDict({"title": tfds.features.Text(), "text": tfds.features.Text()})
        return tfds.core.DatasetInfo(builder=self, features=features, disable_shuffling=True)

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i, (title, text) in enumerate(self.ARTICLES):
            yield i, {"title": title, "text": text}


def _prepare(builder_cls, data_dir: str, **kwargs) -> None:
    builder = builder_cls(data_dir=data_dir, file_format="array_record", **kwargs)
    config = tfds.download.DownloadConfig(compute_stats=tfds.download.ComputeStatsMode.SKIP)
    builder.download_and_prepare(download_config=config)


def write_tfds_wikitext(wikitext_dir: str, data_dir: str) -> str:
    """Write ``wikitext_dir`` as the ArrayRecord TFDS dataset ``wikitext_tfds_test`` in ``data_dir``; its spec."""
    WikitextTfdsTest.SOURCE_DIR = wikitext_dir
    _prepare(WikitextTfdsTest, data_dir)
    return "tfds:wikitext_tfds_test"


def write_tfds_articles(articles: list[tuple[str, str]], data_dir: str) -> str:
    """Write ``(title, text)`` articles as ``wiki_articles_test/small`` in ``data_dir``; its dataset name."""
    WikiArticlesTest.ARTICLES = list(articles)
    _prepare(WikiArticlesTest, data_dir, config="small")
    return "wiki_articles_test/small"
