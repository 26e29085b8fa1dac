"""A pretrained LM's subword tokenizer behind the interface of :class:`~knnlm_jax.data.vocab.Vocab`.

The corpus is read line by line as everywhere else, but encoded as the text it is (each line
with its line end): the ids equal the tokenizer's encoding of the whole text, so a newline may
merge with the spaces or newlines beside it as it did in the LM's training. To bound memory and
encode in parallel, the text is cut into runs of lines, only before a line where a byte-level
BPE's pre-tokens cannot cross the cut (:func:`restartable`). The newline token is the token a
stream starts after. A word-level corpus's word count (whitespace words plus one per line, as
:class:`Vocab` counts them) gives the per-word perplexity beside the per-token one.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
from typing import Iterable, Iterator

import numpy as np

from knnlm_jax.data.vocab import CHUNK_LINES, CHUNK_TOKENS, line_runs
from knnlm_jax.core.errors import InputError

LINE_END = "\n"
RUN_LINES = 256  # lines per separately encoded run (at least; a run ends where encoding may restart)
VISIBLE = str.maketrans({"\n": "\u21b5", "\t": "\u21e5", "\r": "\u240d"})  # ↵ ⇥ ␍
VISIBLE_SPACE = str.maketrans({" ": "\u2423"})  # ␣, in a single token's text


def restartable(previous: str, line: str) -> bool:
    """Whether a byte-level BPE's pre-tokens of a text end at the line end between ``previous`` and
    ``line``, whether or not the text goes on after it: true when ``line`` starts with one space and
    then a letter or mark (the whitespace before that space is one pre-token either way; before a
    digit, a digit-splitting pre-tokenizer would join that space to it), or with a non-space after a
    ``previous`` that ends with one (the newline then stands alone). GPT-2's and Llama 3's split
    patterns agree; a longer run of whitespace before a non-space splits off its last character."""
    if line[:1] == " ":
        return len(line) > 1 and not line[1].isspace() and not line[1].isnumeric()
    return bool(line) and bool(previous) and not previous[-1].isspace()


def _cuts_exactly(vocab: "SubwordVocab") -> bool:
    """Whether :func:`restartable` holds for this tokenizer: no normalizer, byte-level pre-tokens (digits
    split or not), and a probe cut at each kind of line gives the whole text's ids (a prefix space would not)."""
    spec = json.loads(vocab.tokenizer.to_str())
    pre = spec.get("pre_tokenizer") or {}
    kinds = {p.get("type") for p in pre.get("pretokenizers", [pre])}
    if spec.get("normalizer") is not None or not kinds <= {"ByteLevel", "Digits"}:
        return False
    probe = ["a", " b", "c.", "  d", "", " e", "f"]  # runs cut before " b", "c.", " e" and "f"
    whole = vocab.encode_text("".join(line + LINE_END for line in probe))
    runs = (probe[:1], probe[1:2], probe[2:5], probe[5:6], probe[6:])
    return whole == [i for run in runs for i in vocab.encode_text("".join(line + LINE_END for line in run))]


class SubwordVocab:
    """Token ids of a ``tokenizers.Tokenizer`` for a model whose output layer has ``size`` rows."""

    unk = None  # a byte-level tokenizer has no unknown token

    def __init__(self, tokenizer, size: int | None = None, run_lines: int = RUN_LINES):
        self.tokenizer, self.run_lines = tokenizer, int(run_lines)
        self.size = int(size or tokenizer.get_vocab_size(with_added_tokens=True))
        ids = tokenizer.encode(LINE_END, add_special_tokens=False).ids
        if len(ids) != 1:
            raise InputError(f"the tokenizer encodes a line end as {len(ids)} tokens, not one")
        self.eos = ids[0]
        self._words: tuple[str, ...] | None = None
        self.restarts = _cuts_exactly(self)  # False: the text is encoded in one piece

    def __len__(self) -> int:
        return self.size

    @property
    def words(self) -> tuple[str, ...]:
        """Each id's text (what it decodes to alone), for display."""
        if self._words is None:
            self._words = tuple(self.tokenizer.decode([i], skip_special_tokens=False) for i in range(self.size))
        return self._words

    @functools.cached_property
    def index(self) -> dict:
        """Token text -> id (display texts; a prompt goes through :meth:`encode_text`)."""
        return {w: i for i, w in enumerate(self.words)}

    def encode_text(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode(self, lines: Iterable[str]) -> np.ndarray:
        return np.concatenate([np.zeros(0, np.int32), *self.encode_chunks(lines)])

    def starts_fresh(self, previous: str, line: str) -> bool:
        """Whether the text's encoding may restart at ``line``: its ids then equal the whole text's."""
        return self.restarts and restartable(previous, line)

    def encode_chunks(self, lines: Iterable[str], chunk_lines: int = CHUNK_LINES,
                      chunk_tokens: int = CHUNK_TOKENS) -> Iterator[np.ndarray]:
        """int32 ids of a stream of lines (each with its line end) as the text's own encoding, in chunks
        of about ``chunk_lines`` lines, each a batch of runs encoded in parallel."""
        del chunk_tokens  # chunks are bounded by lines: a line's tokens are few
        runs = line_runs(lines, self.run_lines, self.starts_fresh)
        while batch := list(itertools.islice(runs, max(1, chunk_lines // self.run_lines))):
            texts = ["".join(line + LINE_END for line in run) for run in batch]
            encoded = self.tokenizer.encode_batch(texts, add_special_tokens=False)
            yield np.fromiter(itertools.chain.from_iterable(e.ids for e in encoded), np.int32)

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def shown(self, ids: Iterable[int]) -> str:
        """Text for a reader on one line: newlines and tabs as visible marks."""
        return self.decode(ids).translate(VISIBLE)

    def shown_token(self, i: int) -> str:
        """One token's text with its spaces visible too (``␣the``)."""
        return self.words[int(i)].translate(VISIBLE).translate(VISIBLE_SPACE)

    def count_words(self, ids_N) -> int:
        """Whitespace words plus line ends in the text of ``ids_N``: the word-level token count of that text."""
        text = self.decode(np.asarray(ids_N))
        return len(text.split()) + text.count(LINE_END)

    def fingerprint(self) -> str:
        """sha256 of the tokenizer's full definition (vocabulary, merges, pre-tokenizer) and the model's size."""
        return hashlib.sha256(f"{self.size}\n{self.tokenizer.to_str()}".encode("utf-8")).hexdigest()
