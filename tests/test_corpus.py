import os

import numpy as np
import pytest

from knnlm_jax import corpus
from knnlm_jax.vocab import Vocab


@pytest.mark.parametrize("raw,expected", [
    ("A well-known 1,000.5 km road.", "A well @-@ known 1 @,@ 000 @.@ 5 km road ."),
    ('He said "hi" (twice); O\'Brien\'s dog didn\'t.', 'He said " hi " ( twice ) ; O \'Brien \'s dog didn \'t .'),
    ("Acid–base   pairs, e.g. 3.14", "Acid – base pairs , e . g . 3 @.@ 14"),
])
def test_wikitext_tokenize(raw, expected):
    assert corpus.wikitext_tokenize(raw) == expected


def test_article_lines_have_the_wikitext_layout():
    lines = corpus.article_lines("Cat", "First para.\nSecond one.")
    assert lines == [" ", " = Cat = ", " ", " First para . ", " ", " Second one . ", " "]


def test_wikitext_dir_with_either_file_naming(tmp_path, wikitext_dir):
    a = corpus.read_split(wikitext_dir, "valid")
    other = tmp_path / "wt"
    other.mkdir()
    with open(os.path.join(wikitext_dir, "valid.txt"), encoding="utf-8") as f:
        (other / "wiki.valid.tokens").write_text(f.read(), encoding="utf-8")
    b = corpus.read_split(str(other), "valid")
    assert a.lines == b.lines and a.sha256 == b.sha256


def test_missing_split_empty_corpus_and_missing_dir_are_errors(tmp_path, wikitext_dir):
    with pytest.raises(corpus.CorpusError, match="no test split"):
        os.remove(os.path.join(wikitext_dir, "test.txt"))
        corpus.read_split(wikitext_dir, "test")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "train.txt").write_text(" \n \n")
    with pytest.raises(corpus.CorpusError, match="empty"):
        corpus.read_split(str(tmp_path / "empty"), "train")
    with pytest.raises(corpus.CorpusError, match="no such"):
        corpus.read_split(str(tmp_path / "nowhere"), "train")


def test_token_cache_is_reused_and_rebuilt_when_the_text_changes(tmp_path, wikitext_dir):
    data = corpus.read_split(wikitext_dir, "train")
    vocab = Vocab.build(data.lines)
    cache = str(tmp_path / "cache")
    ids = corpus.load_tokens(cache, data, vocab)
    assert len(ids) == sum(len(l.split()) + 1 for l in data.lines)
    assert len(os.listdir(cache)) == 1
    np.testing.assert_array_equal(corpus.load_tokens(cache, data, vocab), ids)
    with open(os.path.join(wikitext_dir, "train.txt"), "a") as f:
        f.write(" the cat \n")
    changed = corpus.read_split(wikitext_dir, "train")
    assert changed.sha256 != data.sha256
    ids2 = corpus.load_tokens(cache, changed, vocab)
    assert len(ids2) == len(ids) + 3 and len(os.listdir(cache)) == 2


def test_embedded_corpus_is_verified_split_by_article_and_deterministic():
    try:
        corpus.embedded_path()
    except corpus.CorpusError as err:
        pytest.skip(str(err))
    splits = {s: corpus.read_split("", s) for s in corpus.SPLITS}
    titles = {s: {l for l in d.lines if l.startswith(" = ")} for s, d in splits.items()}
    assert not (titles["train"] & titles["valid"]) and not (titles["train"] & titles["test"])
    n = {s: len(t) for s, t in titles.items()}
    assert sum(n.values()) > 9000 and n["valid"] > 300 and n["test"] > 300
    assert corpus.read_split(corpus.EMBEDDED, "valid").sha256 == splits["valid"].sha256
