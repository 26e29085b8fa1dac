"""TFDS corpora (real ArrayRecord datasets written in a tmp dir) and the wiki3b preset logic."""

import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from helpers import ROOT, SHARED_DATA
from helpers.tfds_fixture import write_tfds_articles, write_tfds_wikitext
from knnlm_jax.data import corpus
from knnlm_jax.data import tfds_source
from knnlm_jax.data import token_cache
from knnlm_jax.data import wikitext
from knnlm_jax.data.corpus_error import CorpusError
from knnlm_jax.data.vocab import Vocab

ARTICLES = [  # (title, raw text) as in wikipedia/20230601.en
    ("First Article", "Alpha beta gamma.\nDelta epsilon."),
    ("Acid-base reaction", "An excluded article, by its WikiText-tokenized title."),
    ("Third", "Zeta eta theta iota.\n\nKappa."),
    ("Fourth", "Lambda mu nu xi omicron pi rho sigma tau upsilon phi chi psi omega."),
    ("Fifth", "Tiny."),
]


@pytest.fixture
def tfds_dir(tmp_path):
    return str(tmp_path / "tfds")


@pytest.fixture
def wikitext_tfds(wikitext_dir, tfds_dir):
    return write_tfds_wikitext(wikitext_dir, tfds_dir)


def read(spec, split, tfds_dir, tmp_path, **kw):
    return corpus.read_split(spec, split, tfds_data_dir=tfds_dir, cache_dir=str(tmp_path / "fp"), **kw)


def test_tfds_corpus_equals_the_wikitext_dir_lines_sha256_vocab_and_tokens(wikitext_dir, wikitext_tfds, tfds_dir,
                                                                            tmp_path):
    assert wikitext_tfds == "tfds:wikitext_tfds_test"
    for split in corpus.SPLITS:
        a = read(wikitext_tfds, split, tfds_dir, tmp_path)
        b = corpus.read_split(wikitext_dir, split, cache_dir=str(tmp_path / "fp"))
        assert a.corpus == wikitext_tfds and list(a.lines()) == list(b.lines()) and a.sha256 == b.sha256
    a, b = read(wikitext_tfds, "train", tfds_dir, tmp_path), corpus.read_split(wikitext_dir, "train")
    vocab = Vocab.build(a.lines())
    assert vocab == Vocab.build(b.lines()) and vocab.counts == Vocab.build(b.lines()).counts
    ids_a = token_cache.load_tokens(str(tmp_path / "ta"), a, vocab)
    np.testing.assert_array_equal(ids_a, token_cache.load_tokens(str(tmp_path / "tb"), b, vocab))
    assert os.listdir(tmp_path / "ta") == os.listdir(tmp_path / "tb")  # same cache key: split, sha256, vocab


def test_spec_split_replaces_the_train_split_only(wikitext_dir, wikitext_tfds, tfds_dir, tmp_path):
    train = list(read(wikitext_tfds, "train", tfds_dir, tmp_path).lines())
    half = read(wikitext_tfds + ":train[:50%]", "train", tfds_dir, tmp_path)
    assert half.corpus == "tfds:wikitext_tfds_test:train[:50%]"
    lines = list(half.lines())
    assert 0 < len(lines) < len(train) and train[: len(lines)] == lines
    other = read(wikitext_tfds + ":validation", "train", tfds_dir, tmp_path)
    valid = read(wikitext_tfds + ":train[:50%]", "valid", tfds_dir, tmp_path)
    assert list(other.lines()) == list(valid.lines()) == list(corpus.read_split(wikitext_dir, "valid").lines())


def test_bad_specs_and_inputs_are_one_line_corpus_errors(wikitext_tfds, tfds_dir, tmp_path):
    write_tfds_articles(ARTICLES, tfds_dir)
    cases = [
        ("tfds:", {}, re.escape("malformed corpus spec; expected tfds:NAME[/CONFIG][:SPLIT]")),
        ("tfds:a:b:c", {}, "malformed corpus spec"),
        ("tfds:a/b/c", {}, "malformed corpus spec"),
        ("tfds:nosuch_corpus", {}, "no dataset nosuch_corpus in .* \\(prepared there: wiki_articles_test/small, "
                                   "wikitext_tfds_test;"),
        ("tfds:mnist", {}, "mnist is not prepared in .*; prepare it with: python -m knnlm_jax.cli.prepare "
                           "tfds:mnist --tfds-data-dir "),
        ("tfds:wikitext_tfds_test/x", {}, "wikitext_tfds_test has no configs"),
        ("tfds:wiki_articles_test/big", {}, "config big of wiki_articles_test is not prepared .*configs there: small"),
        ("tfds:wikitext_tfds_test:nosuch", {}, "no nosuch split for our train split \\(splits: test, train, validation\\)"),
        ("tfds:wikitext_tfds_test", dict(text_feature="body"), "no feature 'body' \\(features: text;"),
    ]
    for spec, kw, message in cases:
        with pytest.raises(CorpusError, match=message) as err:
            read(spec, "train", tfds_dir, tmp_path, **kw)
        assert "\n" not in str(err.value)
    with pytest.raises(CorpusError, match="no valid split for our valid split \\(splits: train\\)"):
        read("tfds:wiki_articles_test", "valid", tfds_dir, tmp_path)


def test_a_tfrecord_dataset_needs_tensorflow(wikitext_tfds, tfds_dir, tmp_path):
    target = os.path.join(tfds_dir, "tfrecord_copy", "1.0.0")
    shutil.copytree(os.path.join(tfds_dir, "wikitext_tfds_test", "1.0.0"), target)
    info_path = os.path.join(target, "dataset_info.json")
    with open(info_path) as f:
        info = json.load(f)
    info["fileFormat"] = "tfrecord"
    with open(info_path, "w") as f:
        json.dump(info, f)
    if importlib.util.find_spec("tensorflow") is not None:
        pytest.skip("tensorflow is installed here")
    with pytest.raises(CorpusError, match="stored as tfrecord, which needs TensorFlow to read: pip install "
                                          "tensorflow, or re-prepare it as ArrayRecord: python -m knnlm_jax.cli.prepare "
                                          "tfds:tfrecord_copy --tfds-data-dir "):
        list(read("tfds:tfrecord_copy", "train", tfds_dir, tmp_path).lines())


def test_reading_a_tfds_corpus_does_not_import_tensorflow(wikitext_tfds, tfds_dir, tmp_path):
    """A stub ``tensorflow`` is importable here, so an import of it anywhere on the path would show."""
    stub = tmp_path / "stub" / "tensorflow"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("__version__ = '2.99.0'  # a stub: importing it means TensorFlow was asked for\n")
    code = ("import sys; from knnlm_jax.data import corpus; from knnlm_jax.data.vocab import Vocab; "
            f"s = corpus.read_split({wikitext_tfds!r}, 'train', tfds_data_dir={tfds_dir!r}); "
            "v = Vocab.build(s.lines()); print(len(v), s.sha256[:8], 'tensorflow' in sys.modules)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(stub.parent), ROOT]))
    found = subprocess.run([sys.executable, "-c", "import tensorflow; print(tensorflow.__version__)"], env=env,
                           capture_output=True, text=True)
    assert found.stdout.strip() == "2.99.0", found.stderr  # the stub is what an import would find
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == "False"


def article_tokens(title, text):
    return sum(len(line.split()) + 1 for line in wikitext.article_lines(title, text))


def test_wiki3b_excludes_eval_titles_stops_at_an_article_boundary_and_keeps_order(tfds_dir, tmp_path, monkeypatch):
    dataset = write_tfds_articles(ARTICLES, tfds_dir)
    titles = tmp_path / "titles.txt"
    titles.write_text("# a header\n# comment\nAcid @-@ base reaction\nNot In The Data\n", encoding="utf-8")
    kept = [ARTICLES[0], ARTICLES[2]]
    cap = sum(article_tokens(*a) for a in kept) + article_tokens(*ARTICLES[3]) - 1  # Fourth would cross it
    assert article_tokens(*ARTICLES[4]) < article_tokens(*ARTICLES[3])  # Fifth would fit: it must not be taken
    name, open_lines, _ = tfds_source.open_wiki3b("train", tfds_dir, dataset=dataset, max_tokens=cap,
                                                  titles_path=str(titles))
    expected = [line for a in kept for line in wikitext.article_lines(*a)]
    assert name == "wiki3b" and list(open_lines()) == expected == list(open_lines())
    exact = sum(article_tokens(*a) for a in kept)  # a cap met exactly keeps the article
    _, open_exact, _ = tfds_source.open_wiki3b("train", tfds_dir, dataset=dataset, max_tokens=exact,
                                               titles_path=str(titles))
    assert list(open_exact()) == expected
    # the same through read_split, the module constants injected
    monkeypatch.setattr(tfds_source, "WIKI3B_DATASET", dataset)
    monkeypatch.setattr(tfds_source, "WIKI3B_MAX_TOKENS", 10**9)
    monkeypatch.setattr(tfds_source, "TITLES_FILE", str(titles))
    data = read("wiki3b", "train", tfds_dir, tmp_path)
    everything = [line for i, a in enumerate(ARTICLES) if i != 1 for line in wikitext.article_lines(*a)]
    assert data.corpus == "wiki3b" and list(data.lines()) == everything
    ids = token_cache.load_tokens(str(tmp_path / "tok"), data, Vocab.build(data.lines()))
    assert len(ids) == sum(article_tokens(*a) for i, a in enumerate(ARTICLES) if i != 1)


def test_wiki3b_errors(tfds_dir, tmp_path):
    with pytest.raises(CorpusError, match="wiki3b has only a train split.*evaluation text comes from the "
                                          "run's own corpus"):
        read("wiki3b", "valid", tfds_dir, tmp_path)
    with pytest.raises(CorpusError, match="wiki3b needs TFDS wikipedia/20230601.en, not prepared in .*"
                                          "apache-beam, mwparserfromhell and mwxml.*GiB.*weeks on a single "
                                          "machine.*python -m knnlm_jax.cli.prepare wiki3b --tfds-data-dir "):
        read("wiki3b", "train", tfds_dir, tmp_path)


# sha256 of the 118 titles (joined by newlines) that WikiText-103's valid and test splits give, recorded
# from the real splits: the shipped file is checked against it even where the corpus is absent
WT103_TITLES_SHA256 = "e61cec06e12507d59a86b15600c068567226bc93d5ffe6109d08f37e01d743a1"


def titles_sha256(titles) -> str:
    return hashlib.sha256("\n".join(titles).encode()).hexdigest()


def test_wt103_eval_titles_file_is_what_wikitext103_valid_and_test_give():
    with open(tfds_source.TITLES_FILE, encoding="utf-8") as f:
        lines = f.read().splitlines()
    assert [l for l in lines[:2] if l.startswith("#")] == lines[:2]
    assert titles_sha256(lines[2:]) == WT103_TITLES_SHA256
    assert len(tfds_source.eval_titles()) == len(lines) - 2 and "Homarus gammarus" in tfds_source.eval_titles()
    directory = os.path.join(SHARED_DATA, "wikitext-103")
    if os.path.isdir(directory):  # where the corpus is at hand, the titles are derived from it again
        assert titles_sha256(tfds_source.wt103_titles(directory)) == WT103_TITLES_SHA256
