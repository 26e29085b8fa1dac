import numpy as np
import pytest

from knnlm_jax.data.vocab import SPECIALS, Vocab

LINES = [" b a c a ", " ", " c a b d "]


def test_build_orders_by_count_then_alphabetically_after_specials():
    v = Vocab.build(LINES)
    assert v.words[:4] == SPECIALS
    # counts: a 3, </s> 3 (one per line), b 2, c 2, d 1
    assert v.words[4:] == ("a", "b", "c", "d")
    assert v.counts[v.eos] == 3


def test_encode_maps_unknown_words_and_ends_lines():
    v = Vocab.build(LINES)
    ids = v.encode([" a zzz ", " "])
    assert ids.dtype == np.int32
    assert list(ids) == [v.index["a"], v.unk, v.eos, v.eos]
    assert v.decode(ids) == "a <unk> </s> </s>"


def test_literal_unk_in_text_is_the_unk_symbol():
    v = Vocab.build([" x <unk> y "])
    assert v.encode([" <unk> "])[0] == v.unk
    assert v.words.count("<unk>") == 1


def test_max_size_keeps_most_frequent():
    v = Vocab.build(LINES, max_size=6)
    assert len(v) == 6 and v.words[4:] == ("a", "b")
    assert v.encode([" d "])[0] == v.unk


def test_save_load_round_trip(tmp_path):
    v = Vocab.build(LINES)
    path = str(tmp_path / "vocab.txt")
    v.save(path)
    w = Vocab.load(path)
    assert w == v and w.counts == v.counts and w.fingerprint() == v.fingerprint()


def test_build_is_deterministic_and_fingerprint_tracks_order():
    assert Vocab.build(LINES).fingerprint() == Vocab.build(list(LINES)).fingerprint()
    assert Vocab.build(LINES).fingerprint() != Vocab.build(LINES + [" d d d d "]).fingerprint()


def test_vocab_must_start_with_specials():
    with pytest.raises(ValueError):
        Vocab(["a", "b"])


def test_build_streams_a_generator_in_chunks_with_the_same_result(monkeypatch):
    lines = [f" w{i % 7} w{i % 3} x " for i in range(1000)]
    import knnlm_jax.data.vocab as vocab_module

    monkeypatch.setattr(vocab_module, "CHUNK_LINES", 64)
    expected = Vocab.build(lines)
    assert Vocab.build(line for line in lines) == expected
    assert Vocab.build(iter(lines)).counts == expected.counts


def test_encode_chunks_concatenate_to_encode_and_stay_bounded():
    v = Vocab.build(LINES)
    lines = [" a zzz b ", " ", " c a b d "] * 50
    parts = list(v.encode_chunks(iter(lines), chunk_lines=7, chunk_tokens=1000))
    assert all(p.dtype == np.int32 for p in parts) and len(parts) == -(-len(lines) // 7)
    np.testing.assert_array_equal(np.concatenate(parts), v.encode(lines))
    by_tokens = list(v.encode_chunks(lines, chunk_tokens=10))
    assert max(len(p) for p in by_tokens) < 10 + 5
    np.testing.assert_array_equal(np.concatenate(by_tokens), v.encode(lines))
    assert list(v.encode_chunks([])) == []
