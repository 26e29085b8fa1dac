import hashlib
import json
import os

import numpy as np
import pytest

from knnlm_jax.data import corpus
from knnlm_jax.data import corpus_error
from knnlm_jax.data import embedded_corpus
from knnlm_jax.data import token_cache
from knnlm_jax.data import wikitext
from knnlm_jax.data.vocab import Vocab


@pytest.mark.parametrize("raw,expected", [
    ("A well-known 1,000.5 km road.", "A well @-@ known 1 @,@ 000 @.@ 5 km road ."),
    ('He said "hi" (twice); O\'Brien\'s dog didn\'t.', 'He said " hi " ( twice ) ; O \'Brien \'s dog didn \'t .'),
    ("Acid–base   pairs, e.g. 3.14", "Acid – base pairs , e . g . 3 @.@ 14"),
])
def test_wikitext_tokenize(raw, expected):
    assert wikitext.wikitext_tokenize(raw) == expected


def test_article_lines_have_the_wikitext_layout():
    lines = wikitext.article_lines("Cat", "First para.\nSecond one.")
    assert lines == [" ", " = Cat = ", " ", " First para . ", " ", " Second one . ", " "]


def test_wikitext_dir_with_either_file_naming(tmp_path, wikitext_dir):
    a = corpus.read_split(wikitext_dir, "valid")
    other = tmp_path / "wt"
    other.mkdir()
    with open(os.path.join(wikitext_dir, "valid.txt"), encoding="utf-8") as f:
        (other / "wiki.valid.tokens").write_text(f.read(), encoding="utf-8")
    b = corpus.read_split(str(other), "valid")
    assert list(a.lines()) == list(b.lines()) and a.sha256 == b.sha256


def test_missing_split_empty_corpus_and_missing_dir_are_errors(tmp_path, wikitext_dir):
    with pytest.raises(corpus_error.CorpusError, match="no test split"):
        os.remove(os.path.join(wikitext_dir, "test.txt"))
        corpus.read_split(wikitext_dir, "test")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "train.txt").write_text(" \n \n")
    with pytest.raises(corpus_error.CorpusError, match="empty"):
        corpus.read_split(str(tmp_path / "empty"), "train")
    with pytest.raises(corpus_error.CorpusError, match="no such"):
        corpus.read_split(str(tmp_path / "nowhere"), "train")


def test_a_tokenised_split_is_another_text_with_its_own_identity(tmp_path):
    path = tmp_path / "raw.txt"
    path.write_text("Hello, world.\n\nIt's 3.5 km-long.\n")
    raw, tokenised = corpus.read_split(str(path), "test"), corpus.read_split(str(path), "test", tokenize="wikitext")
    assert list(tokenised.lines()) == ["Hello , world .", "", "It 's 3 @.@ 5 km @-@ long ."]
    assert tokenised.identity != raw.identity and tokenised.sha256 != raw.sha256
    with pytest.raises(corpus_error.CorpusError, match="tokenize 'moses': choose one of wikitext"):
        corpus.read_split(str(path), "test", tokenize="moses")


def test_token_cache_is_reused_and_rebuilt_when_the_text_changes(tmp_path, wikitext_dir):
    cache = str(tmp_path / "cache")
    data = corpus.read_split(wikitext_dir, "train", cache_dir=cache)
    vocab = Vocab.build(data.lines())
    ids = token_cache.load_tokens(cache, data, vocab)
    assert isinstance(ids, np.memmap) and not ids.flags.writeable and ids.dtype == np.int32
    np.testing.assert_array_equal(ids, vocab.encode(data.lines()))
    assert len(ids) == sum(len(l.split()) + 1 for l in data.lines())
    npys = lambda: sorted(n for n in os.listdir(cache) if n.endswith(".npy"))
    assert len(npys()) == 1 and npys()[0].startswith(f"train-{data.sha256[:16]}-")
    np.testing.assert_array_equal(token_cache.load_tokens(cache, data, vocab), ids)
    with open(os.path.join(wikitext_dir, "train.txt"), "a") as f:
        f.write(" the cat \n")
    changed = corpus.read_split(wikitext_dir, "train", cache_dir=cache)
    assert changed.sha256 != data.sha256
    ids2 = token_cache.load_tokens(cache, changed, vocab)
    assert len(ids2) == len(ids) + 3 and len(npys()) == 2


def test_lines_stream_afresh_and_sha256_is_the_old_definition_cached_by_file_identity(tmp_path, wikitext_dir):
    cache = str(tmp_path / "fp")
    data = corpus.read_split(wikitext_dir, "valid", cache_dir=cache)
    assert not os.path.exists(os.path.join(cache, corpus.FINGERPRINTS))  # the emptiness check needs no hash
    with open(os.path.join(wikitext_dir, "valid.txt"), encoding="utf-8") as f:
        expected = [line.rstrip("\n") for line in f]
    first = data.lines()
    assert next(first) == expected[0] and list(data.lines()) == expected  # independent iterators
    text = "".join(line + "\n" for line in expected).encode("utf-8")
    assert data.sha256 == hashlib.sha256(text).hexdigest()
    with open(os.path.join(cache, corpus.FINGERPRINTS)) as f:
        assert list(json.load(f).values()) == [data.sha256]
    # a fresh Split of the same unchanged file takes its sha256 from the cache, without reading the text
    again = corpus.read_split(wikitext_dir, "valid", cache_dir=cache)
    assert again.known_sha256() == data.sha256
    with open(os.path.join(wikitext_dir, "valid.txt"), "a") as f:
        f.write(" more \n")
    assert corpus.read_split(wikitext_dir, "valid", cache_dir=cache).known_sha256() is None


def test_load_tokens_hashes_while_encoding_and_writes_a_valid_npy(tmp_path, wikitext_dir):
    cache = str(tmp_path / "tok")
    data = corpus.read_split(wikitext_dir, "train", cache_dir=cache)
    vocab = Vocab.build(data.lines(), max_size=20)
    ids = token_cache.load_tokens(cache, data, vocab)  # sha256 unknown: computed in the encoding pass
    reference = corpus.read_split(wikitext_dir, "train", cache_dir=str(tmp_path / "other"))
    assert data.known_sha256() == reference.sha256
    np.testing.assert_array_equal(ids, vocab.encode(reference.lines()))
    path = os.path.join(cache, f"train-{data.sha256[:16]}-{vocab.fingerprint()[:8]}.npy")
    np.testing.assert_array_equal(np.load(path), ids)  # a plain .npy, not only a memmap
    assert not [n for n in os.listdir(cache) if ".tmp" in n]


def test_emptiness_check_stops_at_the_first_non_blank_line(tmp_path):
    path = tmp_path / "big.txt"
    path.write_text(" a \n" + " b \n" * 100_000, encoding="utf-8")  # decoding is buffered: 400 kB before
    with open(path, "ab") as f:
        f.write(b"\xff\xfe not utf-8\n")  # past the first line: only a full pass would meet it
    data = corpus.read_split(str(path), "train")
    with pytest.raises(corpus_error.CorpusError, match="cannot read"):
        list(data.lines())


def test_embedded_corpus_is_verified_split_by_article_and_deterministic():
    try:
        embedded_corpus.embedded_path()
    except corpus_error.CorpusError as err:
        pytest.skip(str(err))
    splits = {s: corpus.read_split("", s) for s in corpus.SPLITS}
    titles = {s: {l for l in d.lines() if l.startswith(" = ")} for s, d in splits.items()}
    assert not (titles["train"] & titles["valid"]) and not (titles["train"] & titles["test"])
    n = {s: len(t) for s, t in titles.items()}
    assert sum(n.values()) > 9000 and n["valid"] > 300 and n["test"] > 300
    assert corpus.read_split(embedded_corpus.EMBEDDED, "valid").sha256 == splits["valid"].sha256
