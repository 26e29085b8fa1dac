"""A pretrained LM's text is encoded as the text it is: the ids of the whole text, however the lines are cut
into runs, by one process or several; and what a reader is shown of a subword token keeps its newlines and
spaces visible."""

import numpy as np
import pytest

from helpers import smollm2
from helpers.llama_fixture import tiny_tokenizer_parts
from knnlm_jax.data.subword import SubwordVocab, restartable
from knnlm_jax.data.vocab import line_runs

CODE = '''def mean(xs):
    """The mean of 12 values."""
    total = 0

    for x in xs:
        total += x
  # two spaces
 return total / len(xs)


class Point:
	x: int = 3
 1990 was a year
end.
'''.split("\n")[:-1]


def whole(vocab: SubwordVocab, lines) -> list[int]:
    return vocab.encode_text("".join(line + "\n" for line in lines))


def tiny_tokenizer(normalized: bool = False):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    tokens, merges = tiny_tokenizer_parts()
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    if normalized:
        tok.normalizer = normalizers.NFKC()
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    tok.decoder = decoders.ByteLevel()
    return tok


def test_code_is_encoded_as_its_whole_text_not_line_by_line():
    """SmolLM2's ids of a Python snippet (indentation, blank lines, tabs, digits) cut into runs at every
    line where a cut is allowed equal the whole text's; line by line they would not."""
    from knnlm_jax.models.convert.pretrained import peek

    _, tokenizer = peek(smollm2())
    vocab = SubwordVocab(tokenizer, run_lines=1)
    assert vocab.restarts
    ids = whole(vocab, CODE)
    assert vocab.encode(CODE).tolist() == ids
    assert np.concatenate(list(vocab.encode_chunks(CODE, chunk_lines=2))).tolist() == ids
    line_by_line = [i for line in CODE for i in vocab.encode_text(line + "\n")]
    assert line_by_line != ids  # what the vocabulary did before: another token sequence
    assert sum(vocab.starts_fresh(a, b) for a, b in zip(CODE, CODE[1:])) >= 3  # runs were really cut


@pytest.mark.parametrize("seed", range(6))
def test_random_text_cut_at_every_allowed_line_is_the_whole_texts_encoding(seed):
    """Lines of spaces, tabs, digits, punctuation and letters: cutting wherever ``restartable`` allows
    never changes the ids (a rule that let a cut follow a blank line, or precede " 1", would)."""
    rng = np.random.default_rng(seed)
    pieces = ["", " ", "  ", "\t", "a", "bc", "de", "1", "23", ".", ",", "::", "é", "-"]
    lines = ["".join(rng.choice(pieces, size=int(rng.integers(0, 6)))) for _ in range(300)]
    vocab = SubwordVocab(tiny_tokenizer(), run_lines=1)
    assert vocab.restarts
    assert vocab.encode(lines).tolist() == whole(vocab, lines)
    cuts = sum(vocab.starts_fresh(a, b) for a, b in zip(lines, lines[1:]))
    assert 30 < cuts < 299


def test_a_tokenizer_with_a_normalizer_is_never_cut():
    vocab = SubwordVocab(tiny_tokenizer(normalized=True), run_lines=1)
    assert not vocab.restarts
    assert vocab.encode(CODE).tolist() == whole(vocab, CODE)


def test_runs_end_only_before_a_fresh_line():
    lines = ["a", " b", "", " c", "  d", "e", "1"]
    runs = list(line_runs(lines, 1, restartable))
    assert [line for run in runs for line in run] == lines
    assert [run[0] for run in runs] == ["a", " b", " c", "e", "1"]  # not before "", nor "  d" (two spaces)
    assert not restartable("", "e") and not restartable("a ", "e") and not restartable("a", " 1")
    assert [len(run) for run in line_runs(lines, 3, restartable)] == [3, 3, 1]  # at least 3, then where allowed


def test_a_reader_sees_newlines_and_spaces():
    vocab = SubwordVocab(tiny_tokenizer())
    ids = whole(vocab, ["a b", "", " c"])
    shown = vocab.shown(ids)
    assert "\n" not in shown and shown.count("\u21b5") == 3 and shown.replace("\u21b5", "\n") == "a b\n\n c\n"
    space = vocab.encode_text(" ")[0]
    assert vocab.shown_token(space) == "\u2423" and vocab.shown_token(vocab.eos) == "\u21b5"
